"""Per-chip temporary memory of one attention layer on a TPU, XLA's attention against splash attention.

    python -m tools.tpu_attention_memory [--topology v5e:2x4]

Compiles ``layers.causal_attention`` forward and backward (gradients of queries, keys and values)
ahead of time for a TPU topology on this host, which needs ``libtpu`` installed but no TPU: the
batch is split over all chips (FSDP), inputs are bfloat16 (or ``--dtype``), and the shapes are each family's real
attention kinds. Prints a table of the temporaries XLA reserves per chip for each implementation.
A measurement, not a test.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")   # no TPU metadata server to ask on this host
# Compiling touches no chip, so another process compiling with libtpu at the same time is no conflict.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp

# (layer, batch, length, query heads, key/value heads, head dim, window): each family's attention kinds,
# at Crowfeather's micro-batch (16 x 4096) and at the family's own training length.
LAYERS = [
    ("toylm sliding (crowfeather)", 16, 4096, 8, 8, 64, 1024),
    ("toylm global (crowfeather)", 16, 4096, 8, 8, 64, None),
    ("llama think full (GQA)", 16, 4096, 9, 3, 64, None),
    ("llama think full (GQA)", 16, 1024, 9, 3, 64, None),
    ("llama think csa local (GQA)", 16, 4096, 9, 3, 64, 64),
    ("llama think csa local (GQA)", 16, 1024, 9, 3, 64, 64),
    ("nanowhale mla (MQA)", 16, 4096, 8, 1, 96, None),
    ("nanowhale mla (MQA)", 16, 2048, 8, 1, 96, None),
]


def temp_bytes(implementation: str, mesh, dtype, B, T, H, G, K, window) -> int:
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxlm import sharding, switches
    from jaxlm.models import layers

    def loss(q, k, v, w):   # a weighted sum: a plain sum's backward would be degenerate
        return jnp.sum(layers.causal_attention(q, k, v, window=window).astype(jnp.float32) * w)

    split = NamedSharding(mesh, P(sharding.BATCH_AXES))
    q = jax.ShapeDtypeStruct((B, T, H, K), dtype, sharding=split)
    kv = jax.ShapeDtypeStruct((B, T, G, K), dtype, sharding=split)
    with switches.PLATFORM.scope("tpu"), sharding.use_mesh(mesh), layers.ATTENTION.scope(implementation):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", default="v5e:2x4", help="a TPU topology libtpu knows (default v5e:2x4)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    from jax.experimental import topologies
    from jaxlm import config, sharding

    topology = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=-1), devices=topology.devices)
    print(f"{args.topology}: {len(topology.devices)} chips ({topology.devices[0].device_kind}), batch split "
          f"over all (FSDP), {args.dtype}, forward + backward; temporaries per chip")
    print(f"{'layer':30} {'B x T':>11} {'heads q/kv x dim':>17} {'window':>7} {'xla MiB':>9} {'splash MiB':>11}")
    for name, B, T, H, G, K, window in LAYERS:
        xla, splash = (temp_bytes(impl, mesh, args.dtype, B, T, H, G, K, window) / 2**20 for impl in ("xla", "splash"))
        print(f"{name:30} {f'{B} x {T}':>11} {f'{H}/{G} x {K}':>17} {str(window or '-'):>7} "
              f"{xla:9.1f} {splash:11.1f}")


if __name__ == "__main__":
    main()
