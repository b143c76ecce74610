"""Splash attention: the Pallas TPU kernel behind ``layers.causal_attention`` on TPU.

XLA's attention materialises every head's T x T scores, forward and backward; splash attention
(``jax.experimental.pallas.ops.tpu.splash_attention``) walks blocks of queries and keys, skips the
blocks its mask hides and keeps only a running softmax, so its memory grows with T, not T².
This module fits our tensors and conventions to the kernel:

* ``[B, T, H, K]`` in and out; the kernel takes one example's ``[H, T, K]`` and is vmapped over B.
* The kernel does not scale the scores: queries are scaled by ``1 / sqrt(K)`` first.
* Grouped heads are the kernel's own: given G key/value heads it reads head ``h // (H / G)`` for
  query head h (as ``jax.nn.dot_product_attention`` does), and one shared head runs as MQA, so
  keys and values are never repeated per query head.
* Blocks are multiples of 128 (TPU lanes): a length they do not divide is padded with keys and
  queries at the end, which no real query sees under a causal mask, and the output sliced back.
* A ``pallas_call`` is not partitioned by XLA. Under a mesh the kernel runs in ``shard_map``:
  sequences split as the activation rules split the batch, heads as they split attention heads
  (where the head counts divide), with no communication inside.
* TPU v2 and v3 have no bf16 matrix product in Mosaic (the kernels' compiler refuses it): there
  the kernel runs in float32 and its output is cast back.
* ``interpret=True`` runs the kernel in Pallas' interpreter, on any backend: how tests on a CPU
  compare it with XLA's attention.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from jaxlm import switches

LANES = 128
FLOAT32_ONLY = ("TPU v2", "TPU v3")   # device kinds whose Mosaic matmuls take no bf16
BLOCKS = (512, 256, LANES)   # the largest that divides the padded length is used


def block_size(seq_len: int) -> tuple[int, int]:
    """``(padded length, block)``: the length rounded up to whole lanes and a block that divides it."""
    padded = -(-seq_len // LANES) * LANES
    return padded, next(b for b in BLOCKS if padded % b == 0)


def _kernel(heads: int, shared_kv: bool, seq_len: int, window: int | None, interpret: bool):
    """The kernel for one example's ``[heads, seq_len, K]`` queries.

    Made in each trace, which its mask tables join as constants (the kernel library caches the
    work of computing them)."""
    padded, block = block_size(seq_len)
    if window is None or window >= seq_len:
        mask = sa.CausalMask((padded, padded))
    else:   # query t sees keys t-window+1 .. t
        mask = sa.LocalMask((padded, padded), (window - 1, 0), offset=0)
    blocks = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                           block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                           block_q_dq=block, block_kv_dq=block)
    make = sa.make_splash_mqa if shared_kv else sa.make_splash_mha
    return make(sa.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
                interpret=interpret)


def _attend(q_BTHK, k_BTGK, v_BTGK, *, window: int | None, interpret: bool):
    """Splash attention on local (unsharded) arrays."""
    B, T, H, K = q_BTHK.shape
    G = k_BTGK.shape[2]
    padded, _ = block_size(T)
    out_dtype = q_BTHK.dtype
    compute_dtype = jnp.float32 if switches.target_device_kind() in FLOAT32_ONLY else out_dtype
    k_BTGK, v_BTGK = k_BTGK.astype(compute_dtype), v_BTGK.astype(compute_dtype)
    q_BTHK = (q_BTHK.astype(jnp.float32) * (1.0 / math.sqrt(K))).astype(compute_dtype)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - T), (0, 0), (0, 0)))
    q_BHTK = pad(q_BTHK).transpose(0, 2, 1, 3)
    k_BGTK, v_BGTK = (pad(x).transpose(0, 2, 1, 3) for x in (k_BTGK, v_BTGK))
    if G == 1:   # MQA: the kernel takes the one shared head as [T, K]
        k_BGTK, v_BGTK = k_BGTK[:, 0], v_BGTK[:, 0]
    kernel = _kernel(H, G == 1, T, window, interpret)
    out_BHTK = jax.vmap(kernel)(q_BHTK, k_BGTK, v_BGTK)
    return out_BHTK.transpose(0, 2, 1, 3)[:, :T].astype(out_dtype)


def _shard_map(f, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map   # older JAX
    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _split(axes, size: int, mesh) -> tuple[str, ...]:
    """The mesh axes among ``axes`` that split ``size`` evenly, in order (an axis that does not stays whole)."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    out, parts = [], 1
    for axis in axes:
        if axis in mesh.axis_names and size % (parts * mesh.shape[axis]) == 0:
            out.append(axis)
            parts *= mesh.shape[axis]
    return tuple(out)


def attention(q_BTHK, k_BTGK, v_BTGK, *, window: int | None, rules: dict | None, interpret: bool):
    """Causal (``window`` None) or sliding-window softmax attention, ``[B, T, H, K]`` out.

    ``rules`` are the activation rules (``layers.ACTIVATION_RULES``): under a mesh, the batch is
    split over ``rules["batch"]`` and heads over ``rules["act_heads"]``.
    """
    B, T, H, K = q_BTHK.shape
    G = k_BTGK.shape[2]
    if k_BTGK.shape != (B, T, G, K) or v_BTGK.shape != k_BTGK.shape or H % G:
        raise ValueError(f"splash attention takes queries [B, T, H, K] and keys/values [B, T, G, K] with G "
                         f"dividing H; got {q_BTHK.shape}, {k_BTGK.shape}, {v_BTGK.shape}")
    attend = functools.partial(_attend, window=window, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(q_BTHK, k_BTGK, v_BTGK)
    rules = rules or {}
    batch = _split(rules.get("batch"), B, mesh)
    heads = _split(rules.get("act_heads"), H, mesh)
    if G > 1 and G % math.prod(mesh.shape[a] for a in heads):
        heads = ()   # a shard must hold whole groups of query heads with their key/value head
    q_spec = jax.sharding.PartitionSpec(batch or None, None, heads or None, None)
    # One shared key/value head goes whole to every head shard.
    kv_spec = q_spec if G > 1 else jax.sharding.PartitionSpec(batch or None, None, None, None)
    return _shard_map(attend, mesh, (q_spec, kv_spec, kv_spec), q_spec)(q_BTHK, k_BTGK, v_BTGK)
