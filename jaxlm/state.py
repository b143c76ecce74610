"""The training state: ``{step, params, opt_state, rng}`` (and ``buffers``), a plain pytree of arrays.

A pytree rather than a stateful ``nnx.Optimizer`` object, because three things want
plain arrays with known shardings: ``jit`` with donated buffers, Orbax (save and
restore onto any mesh), and the converters. The model's structure (its graphdef) is
static and rebuilt from the config wherever needed.

``buffers`` holds the model's :class:`jaxlm.models.family.Buffer` variables (non-trained state a
family declares, such as a router bias), present only when the model has any: the optimizer
never sees them, checkpoints keep them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import config as C
from jaxlm import sharding
from jaxlm.models import build_model
from jaxlm.models.family import Buffer
from jaxlm.optim import build_optimizer


def compute_dtype(cfg: C.Config):
    return jnp.bfloat16 if cfg.train.compute_dtype == "bfloat16" else jnp.float32


def make_model(cfg: C.Config, rng):
    return build_model(cfg.model, rngs=nnx.Rngs(params=rng), dtype=compute_dtype(cfg))


def split_model(model):
    """``(graphdef, params, buffers)``; ``buffers`` is None when the model has no Buffer variables."""
    graphdef, params, buffers = nnx.split(model, nnx.Param, Buffer)
    return graphdef, params, (buffers if jax.tree.leaves(buffers) else None)


def merge_model(graphdef, params, buffers=None):
    """The model back from ``split_model``'s parts (``buffers`` None: it has none).

    The buffers are copied: a forward pass that updates them (inside a trace such as
    ``value_and_grad``) must not write into arrays that came from outside that trace."""
    return nnx.merge(graphdef, params, *([] if buffers is None else [buffers]), copy=buffers is not None)


def init_state(cfg: C.Config, tx, rng) -> dict:
    params_rng, state_rng = jax.random.split(rng)
    _, params, buffers = split_model(make_model(cfg, params_rng))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": jax.random.key_data(state_rng)}
    if buffers is not None:
        state["buffers"] = buffers
    return state


@dataclasses.dataclass
class StatePlan:
    """Everything known about a run's state before any weight exists."""

    graphdef: Any                        # the model's static structure
    tx: Any                              # the optax transformation
    learning_rates: dict[str, Callable]  # group -> schedule, for logging
    shardings: Any                       # NamedShardings matching the state pytree
    abstract: Any                        # ShapeDtypeStructs (with shardings) of the state

    def init(self, cfg: C.Config):
        """Fresh weights and optimizer state from ``cfg.seed``, created already sharded."""
        return jax.jit(lambda r: init_state(cfg, self.tx, r), out_shardings=self.shardings)(
            jax.random.key(cfg.seed))


def plan_state(cfg: C.Config, mesh) -> StatePlan:
    rng = jax.random.key(cfg.seed)
    graphdef, abstract_params, _ = split_model(nnx.eval_shape(lambda: make_model(cfg, rng)))
    tx, learning_rates = build_optimizer(cfg.optim, abstract_params, cfg.train.steps)
    abstract = jax.eval_shape(lambda: init_state(cfg, tx, rng))
    shardings = sharding.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return StatePlan(graphdef, tx, learning_rates, shardings, abstract)
