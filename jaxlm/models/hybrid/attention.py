"""Llama Think's gated GQA attention (SPEC §5) and the pieces CSA shares with it.

Queries and their output gates come out of one projection, interleaved by head (``[q_h | gate_h]``
blocks of ``2 d``); Q and K are RMS-normed per head, then partially rotated (the first ``r``
channels, rotate-half pairs ``(i, i + r/2)``). Query head ``h`` reads kv head ``h // R``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models import kv_cache, layers


def partial_rope(x_BTHK, positions_BT, *, rotary_dim: int, theta: float):
    """RoPE on the first ``rotary_dim`` channels (frequencies ``theta^(-2i/rotary_dim)``); the rest pass."""
    rotated = layers.rope(x_BTHK[..., :rotary_dim], positions_BT, theta=theta, pairing="rotate_half")
    return jnp.concatenate([rotated, x_BTHK[..., rotary_dim:]], axis=-1)


def grouped_masked_attention(q_BTHK, k_BGSK, v_BGSK, mask_BTS):
    """``kv_cache.masked_attention`` for GQA: the ``R = H / G`` query heads that share a kv head
    become ``R`` queries of that head under the same mask (no copy of the keys per query head)."""
    B, T, H, K = q_BTHK.shape
    G = k_BGSK.shape[1]
    R = H // G
    q = q_BTHK.reshape(B, T, G, R, K).transpose(0, 1, 3, 2, 4).reshape(B, T * R, G, K)
    out = kv_cache.masked_attention(q, k_BGSK, v_BGSK, jnp.repeat(mask_BTS, R, axis=1))
    return out.reshape(B, T, R, G, K).transpose(0, 1, 3, 2, 4).reshape(B, T, H, K)


def store_token(cache_BGSK, new_BGK, slot):
    """Write one time step's keys or values at ``slot`` (the attention itself is the caller's)."""
    return jax.lax.dynamic_update_slice_in_dim(cache_BGSK, new_BGK[:, :, None].astype(cache_BGSK.dtype), slot, axis=2)


class PrefillContext(NamedTuple):
    """What every layer's prefill needs to know about the (left-padded) prompt."""

    positions_BT: jax.Array   # time - start (negative on padding)
    times_T: jax.Array
    starts_B: jax.Array
    valid_BT: jax.Array       # True on real tokens


class GatedAttention(nnx.Module):
    """Full causal attention with gated queries, QK-norm, GQA and partial RoPE (layer kind ``full``)."""

    window: int | None = None

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        D, H, G, d = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.wq = layers.dense(D, 2 * H * d, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.wk = layers.dense(D, G * d, ("embed", "kv"), dtype=dtype, rngs=rngs)
        self.wv = layers.dense(D, G * d, ("embed", "kv"), dtype=dtype, rngs=rngs)
        self.wo = layers.dense(H * d, D, ("heads", "embed"), dtype=dtype, rngs=rngs)
        self.wo.kernel[...] = self.wo.kernel[...] / math.sqrt(2 * cfg.n_layers)   # upstream's residual init
        self.q_norm = layers.RMSNorm(d, cfg.norm_eps, offset=1.0)
        self.k_norm = layers.RMSNorm(d, cfg.norm_eps, offset=1.0)

    def rotate(self, x, positions):
        return partial_rope(x, positions, rotary_dim=self.cfg.rotary_dim, theta=self.cfg.rope_base)

    def project(self, x_BTD, positions_BT):
        """``(q_BTHK rotated, gate_BTF, k_BTGK normed and unrotated, v_BTGK)``."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        d = cfg.head_size
        qg = self.wq(x_BTD).reshape(B, T, cfg.n_heads, 2, d)
        q = self.rotate(self.q_norm(qg[..., 0, :]), positions_BT)
        gate = qg[..., 1, :].reshape(B, T, -1)
        k = self.k_norm(self.wk(x_BTD).reshape(B, T, cfg.n_kv_heads, d))
        v = self.wv(x_BTD).reshape(B, T, cfg.n_kv_heads, d)
        return q, gate, k, v

    def finish(self, ctx_BTHK, gate_BTF):
        ctx = ctx_BTHK.reshape(gate_BTF.shape).astype(jnp.float32) * jax.nn.sigmoid(gate_BTF.astype(jnp.float32))
        return self.wo(ctx.astype(self.dtype))

    def __call__(self, x_BTD, positions_BT):
        q, gate, k, v = self.project(x_BTD, positions_BT)
        out = layers.causal_attention(q, self.rotate(k, positions_BT), v, window=None)
        return self.finish(out, gate)

    # ---- decoding: a key/value slot per time step

    def init_cache(self, batch: int, max_len: int, dtype) -> kv_cache.KVLayer:
        shape = (batch, self.cfg.n_kv_heads, max_len, self.cfg.head_size)
        return kv_cache.KVLayer(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def prefill(self, x_BTD, ctx: PrefillContext, cache: kv_cache.KVLayer):
        q, gate, k, v = self.project(x_BTD, ctx.positions_BT)
        to_cache = lambda y: y.transpose(0, 2, 1, 3).astype(cache.keys.dtype)
        k_BGTK, v_BGTK = to_cache(self.rotate(k, ctx.positions_BT)), to_cache(v)
        mask = kv_cache.visible_keys(ctx.times_T, ctx.times_T, ctx.starts_B, self.window)
        out = grouped_masked_attention(q, k_BGTK, v_BGTK, mask)
        return self.finish(out, gate), kv_cache.KVLayer(kv_cache.store_prompt(cache.keys, k_BGTK),
                                                        kv_cache.store_prompt(cache.values, v_BGTK))

    def attend_cached(self, q_B1HK, k_B1GK, v_B1GK, time, starts_B, cache: kv_cache.KVLayer):
        """Store the new key/value at ``time mod slots`` and attend the query over the cache."""
        size = cache.keys.shape[2]
        keys = store_token(cache.keys, k_B1GK[:, 0], time % size)
        values = store_token(cache.values, v_B1GK[:, 0], time % size)
        mask = kv_cache.visible_keys(time[None], kv_cache.slot_times(time, size), starts_B, self.window)
        return grouped_masked_attention(q_B1HK, keys, values, mask), kv_cache.KVLayer(keys, values)

    def decode(self, x_B1D, positions_B1, time, starts_B, cache: kv_cache.KVLayer):
        q, gate, k, v = self.project(x_B1D, positions_B1)
        out, cache = self.attend_cached(q, self.rotate(k, positions_B1), v, time, starts_B, cache)
        return self.finish(out, gate), cache
