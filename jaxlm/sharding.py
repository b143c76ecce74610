"""The device mesh and the mapping of logical parameter axes onto it.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters and
optimizer state sharded, ZeRO-3 style), ``experts`` (a mixture of experts' experts split, the
batch split with them) and ``tensor`` (heads / MLP hidden split). Parameters name their axes
logically (``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``, ``norm``, ``experts``, ``layers``);
``LOGICAL_RULES`` says which mesh axis each logical axis is split over, and a name it does not
know is an error. The batch is split over ``data`` x ``fsdp`` x ``experts``. XLA's SPMD
partitioner inserts all communication.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxlm.config import MeshConfig
from jaxlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "experts", "tensor")
BATCH_AXES = ("data", "fsdp", "experts")

LOGICAL_RULES = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv": None,          # key/value heads: few (GQA, MLA's one shared head), kept whole
    "mlp": "tensor",
    "experts": "experts",
    "layers": None,      # a stacked layer axis
    "norm": None,
}


# Activations at block boundaries: sequences split like the batch, the residual stream whole;
# attention's inputs split by heads like the projections that make them.
ACTIVATION_RULES = {"batch": BATCH_AXES, "length": None, "act_embed": None, "act_heads": "tensor"}


def activation_rules(rules: dict | None = None):
    """Within this block, models pin activations at block boundaries (see layers.constrain)."""
    from jaxlm.models import layers
    return layers.ACTIVATION_RULES.scope(rules or ACTIVATION_RULES)


@contextlib.contextmanager
def use_mesh(mesh):
    """Make ``mesh`` the current mesh and turn the activation constraints on."""
    with jax.set_mesh(mesh), activation_rules():
        yield mesh


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh of all (or the given) devices; one axis may be -1 for "the rest".

    Axis types are Auto: with Explicit axes, optax's Muon fails on sharded parameters.
    """
    devices = devices if devices is not None else jax.devices()
    sizes = [cfg.data, cfg.fsdp, cfg.experts, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices cannot be split with fixed axes of total size {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"mesh: data x fsdp x experts x tensor = {'x'.join(map(str, sizes))} = {math.prod(sizes)}, "
            f"but {len(devices)} devices are present; use -1 for one axis to take the rest")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes, shape, mesh) -> P:
    """Partition spec for one parameter; an axis whose size the mesh axis does not divide stays whole."""
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"parameter axis {name!r} has no sharding rule in jaxlm.sharding.LOGICAL_RULES; "
                             f"known: {', '.join(LOGICAL_RULES)}")
        axis = LOGICAL_RULES.get(name)
        if axis is not None and (size % mesh.shape[axis] or axis in spec):
            axis = None
        spec.append(axis)
    return P(*spec)


def state_shardings(abstract_state, mesh):
    """NamedShardings for a pytree of nnx Variables (params) or plain arrays (replicated)."""
    def variable_or_array(leaf):
        # A Variable keeps its place in the tree (its value becomes the sharding), so that
        # the result matches the state's structure; optimizer moments inherit the axes of
        # their parameter this way, which is what makes FSDP shard them too.
        axes = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
        def array(x):
            spec = logical_to_spec(axes, x.shape, mesh) if axes and len(axes) == len(x.shape) else P()
            return NamedSharding(mesh, spec)
        return jax.tree.map(array, leaf)
    return jax.tree.map(variable_or_array, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh, batch_axis: int = 0) -> NamedSharding:
    """Sequences (axis ``batch_axis``) split over data x fsdp x experts; every other axis whole."""
    return NamedSharding(mesh, P(*[None] * batch_axis, BATCH_AXES))


def global_batch(host_batch: np.ndarray, mesh, batch_axis: int = 0) -> jax.Array:
    """Assemble this process's rows into one global array sharded over the batch axes."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, batch_axis), host_batch)


# --------------------------------------------------------------------------- several hosts


def initialize_distributed() -> bool:
    """Join a multi-process run when the environment describes one; True if it did.

    Explicit: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. Otherwise JAX's own cluster detection (SLURM, Open MPI, TPU pods,
    GKE) is used when a scheduler says there is more than one task or host.
    """
    import os
    env = os.environ
    if "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env:
        missing = [k for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ConfigError(f"multi-process run: set {', '.join(missing)} as well "
                              "(coordinator host:port, process count, this process's id)")
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
        return True
    several_tasks = int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    tpu_pod = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if several_tasks or tpu_pod:
        jax.distributed.initialize()  # JAX reads the scheduler's environment itself
        return True
    return False
