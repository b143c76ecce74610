"""The KV cache of autoregressive decoding: layout, masks, and the attention of one new token.

Every row of a batch advances in lockstep on one *time* axis: prompts are left-padded to a
common length, so token t of every row is written at time t. A row's RoPE position is its time
minus ``starts_B`` (the time of its first real token), and masks are built from times, so the
left padding is invisible. Global layers keep one slot per time step; sliding layers keep a
ring of ``window`` slots (slot = time mod size), so their memory does not grow with length.

``attend_one_token`` has two implementations of the same function: plain XLA (anywhere), and,
for large batches on GPU, a Pallas kernel that stores the new key and value and attends in one
launch, reading only the slots written so far (XLA reads the whole cache, in four kernels).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxlm.switches import Switch, target_platform

# Stands for -inf in masked scores: exp() of it is 0, and it never makes NaN (as in jax.nn).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


class KVLayer(NamedTuple):
    """One attention layer's cache entry: keys and values ``[B, H, S, K]`` (heads before slots,
    so that the decode attention is a batched matmul over ``B x H`` without a transpose)."""

    keys: jax.Array
    values: jax.Array


def slot_times(time, size: int):
    """Time held by each of ``size`` slots once time ``time`` is written, ``[size]``.

    A slot holds the latest time ``<= time`` congruent to it modulo ``size``: for a global cache
    (``size`` > ``time``) that is the slot index itself, negative for slots not written yet.
    """
    slots_S = jnp.arange(size, dtype=jnp.int32)
    return time - jnp.mod(time - slots_S, size)


def visible_keys(query_times_T, key_times_S, starts_B, window: int | None):
    """``mask_BTS``: the key at time s is visible to the query at time t of row b when it is a
    real token of that row (s >= starts_B[b]), not in the future, and within ``window`` keys."""
    query_11T1 = query_times_T[None, :, None]
    key_11S = key_times_S[None, None, :]
    mask_BTS = (key_11S <= query_11T1) & (key_11S >= starts_B[:, None, None])
    if window is not None:
        mask_BTS = mask_BTS & (query_11T1 - key_11S < window)
    return mask_BTS


def masked_attention(q_BTHK, k_BHSK, v_BHSK, mask_BTS):
    """Softmax attention under an explicit mask, as the XLA path of ``jax.nn.dot_product_attention``
    computes it (float32 scores and softmax, probabilities cast back to the value dtype).

    A query that sees no key (a left-pad position during prefill) gets a uniform average rather
    than NaN; its output is never used.
    """
    scores_BHTS = jnp.einsum("bthk,bhsk->bhts", q_BTHK, k_BHSK, preferred_element_type=jnp.float32)
    scores_BHTS = scores_BHTS * (1.0 / math.sqrt(q_BTHK.shape[-1]))
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, _MASKED)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BHSK.dtype)
    return jnp.einsum("bhts,bhsk->bthk", probs_BHTS, v_BHSK).astype(q_BTHK.dtype)


def store_prompt(cache_BHSK, new_BHTK):
    """The prompt's keys or values (times 0..T-1) in an empty cache; a ring smaller than the
    prompt keeps the last S times, at slot time mod S (the last S rows rolled by T mod S)."""
    T, size = new_BHTK.shape[2], cache_BHSK.shape[2]
    if T <= size:
        return jax.lax.dynamic_update_slice_in_dim(cache_BHSK, new_BHTK.astype(cache_BHSK.dtype), 0, axis=2)
    return jnp.roll(new_BHTK[:, :, T - size:], T % size, axis=2).astype(cache_BHSK.dtype)


# --------------------------------------------------------------------------- one new token

PALLAS_BLOCK = 32          # cache slots per step of the kernel's loop
# ``with IMPLEMENTATION.scope("xla"):`` forces an implementation (benchmarks compare them).
IMPLEMENTATION = Switch("decode attention implementation", ("xla", "pallas", "pallas_interpret"))

# Rows x heads from which the kernel pays: its programs walk the cache one block after another,
# so with few of them it is latency-bound (docs/PERFORMANCE.md, "Generation", has the crossover).
PALLAS_MIN_ROW_HEADS = 256


def attention_implementation(cache_BHSK) -> str:
    """The Pallas kernel on GPU for large batches of half-precision caches it tiles, else XLA."""
    if IMPLEMENTATION.get():
        return IMPLEMENTATION.get()
    B, H, S, K = cache_BHSK.shape
    if (target_platform() == "gpu" and cache_BHSK.dtype in (jnp.bfloat16, jnp.float16)
            and B * H >= PALLAS_MIN_ROW_HEADS and S % PALLAS_BLOCK == 0 and K in (16, 32, 64, 128, 256)):
        return "pallas"
    return "xla"


def attend_one_token(q_BHK, k_BHK, v_BHK, k_cache_BHSK, v_cache_BHSK, time, starts_B, *, window: int | None,
                     implementation: str | None = None):
    """Store the new key and value at slot ``time mod S``, then attend the query over the cache.

    ``q``/``k`` are already rotated. Returns ``(out_BHK, k_cache, v_cache)``.
    """
    implementation = implementation or attention_implementation(k_cache_BHSK)
    if implementation == "xla":
        return _attend_xla(q_BHK, k_BHK, v_BHK, k_cache_BHSK, v_cache_BHSK, time, starts_B, window)
    return _attend_pallas(q_BHK, k_BHK, v_BHK, k_cache_BHSK, v_cache_BHSK, time, starts_B, window=window,
                          interpret=implementation == "pallas_interpret")


def _attend_xla(q_BHK, k_BHK, v_BHK, k_cache_BHSK, v_cache_BHSK, time, starts_B, window):
    size = k_cache_BHSK.shape[2]
    slot = time % size
    k_cache_BHSK = jax.lax.dynamic_update_slice_in_dim(k_cache_BHSK, k_BHK[:, :, None].astype(k_cache_BHSK.dtype),
                                                       slot, axis=2)
    v_cache_BHSK = jax.lax.dynamic_update_slice_in_dim(v_cache_BHSK, v_BHK[:, :, None].astype(v_cache_BHSK.dtype),
                                                       slot, axis=2)
    mask_B1S = visible_keys(time[None], slot_times(time, size), starts_B, window)
    out_B1HK = masked_attention(q_BHK[:, None], k_cache_BHSK, v_cache_BHSK, mask_B1S)
    return out_B1HK[:, 0], k_cache_BHSK, v_cache_BHSK


def _pallas_kernel(time_ref, start_ref, q_ref, k_new_ref, v_new_ref, k_cache_ref, v_cache_ref,
                   out_ref, k_out_ref, v_out_ref, *, window, block):
    """One (row, head): write the new key/value, then an online softmax over the written slots.

    The cache refs alias the outputs; the new key and value are also merged into the loaded
    blocks in registers, so nothing depends on a store being visible to a later load.
    """
    size, head_dim = k_cache_ref.shape
    time, start = time_ref[()], start_ref[()]
    slot = time % size
    k_new, v_new = k_new_ref[...], v_new_ref[...]
    k_out_ref[pl.ds(slot, 1), :] = k_new[None, :]
    v_out_ref[pl.ds(slot, 1), :] = v_new[None, :]
    q = q_ref[...].astype(jnp.float32) * (1.0 / math.sqrt(head_dim))

    def body(j, carry):
        acc_K, max_score, total = carry
        slots = j * block + jnp.arange(block, dtype=jnp.int32)
        is_new = (slots == slot)[:, None]
        k = jnp.where(is_new, k_new[None, :], k_cache_ref[pl.ds(j * block, block), :]).astype(jnp.float32)
        v = jnp.where(is_new, v_new[None, :], v_cache_ref[pl.ds(j * block, block), :]).astype(jnp.float32)
        key_times = time - (time - slots + size) % size
        visible = key_times >= start
        if window is not None:
            visible = visible & (time - key_times < window)
        scores = jnp.where(visible, jnp.sum(k * q[None, :], axis=1), _MASKED)
        new_max = jnp.maximum(max_score, jnp.max(scores))
        rescale = jnp.exp(max_score - new_max)
        probs = jnp.where(visible, jnp.exp(scores - new_max), 0.0)
        return (acc_K * rescale + jnp.sum(probs[:, None] * v, axis=0), new_max,
                total * rescale + jnp.sum(probs))

    n_blocks = (jnp.minimum(time + 1, size) + block - 1) // block   # only slots written so far
    init = (jnp.zeros((head_dim,), jnp.float32), jnp.float32(_MASKED), jnp.float32(0.0))
    acc_K, _, total = jax.lax.fori_loop(0, n_blocks, body, init)
    out_ref[...] = (acc_K / total).astype(out_ref.dtype)


def _attend_pallas(q_BHK, k_BHK, v_BHK, k_cache_BHSK, v_cache_BHSK, time, starts_B, *, window, interpret=False):
    B, H, S, K = k_cache_BHSK.shape
    row_head = lambda shape: pl.BlockSpec((None, None, *shape), lambda b, h: (b, h) + (0,) * len(shape))
    kernel = functools.partial(_pallas_kernel, window=window, block=PALLAS_BLOCK)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton
        params["compiler_params"] = pl_triton.CompilerParams(num_warps=4, num_stages=2)
    out_BHK, k_cache_BHSK, v_cache_BHSK = pl.pallas_call(
        kernel, grid=(B, H),
        in_specs=[pl.BlockSpec((), lambda b, h: ()), pl.BlockSpec((None,), lambda b, h: (b,)),
                  row_head((K,)), row_head((K,)), row_head((K,)), row_head((S, K)), row_head((S, K))],
        out_specs=[row_head((K,)), row_head((S, K)), row_head((S, K))],
        out_shape=[jax.ShapeDtypeStruct((B, H, K), q_BHK.dtype), jax.ShapeDtypeStruct(k_cache_BHSK.shape, k_cache_BHSK.dtype),
                   jax.ShapeDtypeStruct(v_cache_BHSK.shape, v_cache_BHSK.dtype)],
        input_output_aliases={5: 1, 6: 2}, interpret=interpret, name="decode_attention", **params,
    )(jnp.asarray(time, jnp.int32), starts_B.astype(jnp.int32), q_BHK, k_BHK.astype(k_cache_BHSK.dtype),
      v_BHK.astype(v_cache_BHSK.dtype), k_cache_BHSK, v_cache_BHSK)
    return out_BHK, k_cache_BHSK, v_cache_BHSK
