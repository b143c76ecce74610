"""Compressed sparse attention (SPEC §6): a local window and a compressed past, blended by a gate.

Both paths share the gated, normed, rotated query. The **local** path is causal attention over
the last ``W`` tokens (rotated normed keys, raw values). The **compressed** path pools the normed,
unrotated keys and the raw values over blocks of ``S`` positions (a mean, zero-padded at the end),
mixes the kv heads with ``compress_k`` / ``compress_v``, rotates the pooled keys at each block's
centre ``c S + S // 2`` and lets a query at position ``p`` see the blocks that ended before its
own: ``c < p // S``. A query that sees no block gets exactly 0 from that path. The mix is
``b * compressed + (1 - b) * local`` with ``b = sigmoid(blend_gate(x))``.

Blocks are counted in positions (time minus the row's start), so a left-padded row pools the same
tokens as the unpadded one. Decoding keeps the rotated keys of the last ``W`` times in a ring, the
finished compressed blocks, and the running sums of the block being filled.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models import kv_cache, layers
from jaxlm.models.hybrid.attention import GatedAttention, PrefillContext, grouped_masked_attention


class CSALayer(NamedTuple):
    """A CSA layer's decode cache."""

    local: kv_cache.KVLayer   # ring of W slots: rotated normed keys, raw values [B, G, W, d]
    comp_keys: jax.Array      # [B, G, blocks, d] finished blocks, projected and rotated
    comp_values: jax.Array    # [B, G, blocks, d]
    sum_keys: jax.Array       # [B, G*d] float32: normed keys of the block being filled, summed
    sum_values: jax.Array     # [B, G*d] float32


def empty_safe_attention(q_BTHK, k_BCGK, v_BCGK, visible_BTC):
    """Softmax attention under ``visible_BTC`` whose rows with no visible key are exactly 0.

    (PyTorch's SDPA has returned 0 for an all-masked row since its "safe softmax", which the
    upstream model relies on; ``kv_cache.masked_attention`` gives such a row a uniform average.)
    The mask is ``[B, T, blocks]``, ``T / S`` times smaller than a token-by-token one.
    """
    B, T, H, K = q_BTHK.shape
    G = k_BCGK.shape[2]
    q = q_BTHK.reshape(B, T, G, H // G, K)
    if T == 1:   # one decode query: XLA:CPU has no bf16 x bf16 -> f32 kernel for these products; they are tiny
        q, k_BCGK, v_BCGK = q.astype(jnp.float32), k_BCGK.astype(jnp.float32), v_BCGK.astype(jnp.float32)
    scores = jnp.einsum("btgrk,bcgk->bgrtc", q, k_BCGK, preferred_element_type=jnp.float32) / math.sqrt(K)
    mask = visible_BTC[:, None, None]
    # Masked scores are replaced before the exp, so no inf appears (its gradient would be NaN).
    scores = jnp.where(mask, scores, kv_cache._MASKED)
    probs = jnp.where(mask, jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)), 0.0)
    total = jnp.sum(probs, axis=-1, keepdims=True)
    probs = (probs / jnp.where(total > 0, total, 1.0)).astype(v_BCGK.dtype)
    out = jnp.einsum("bgrtc,bcgk->btgrk", probs, v_BCGK, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, K).astype(q_BTHK.dtype)


class CompressedSparseAttention(GatedAttention):
    """Layer kind ``csa``: ``GatedAttention``'s projections plus the compressors and the blend gate."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        # llama2c_lossy: the layer runs as the full attention run.c makes of it (the compressors unused;
        # no window either, which GatedAttention's cached paths read from ``self.window``).
        self.as_full = cfg.llama2c_lossy
        self.window = None if self.as_full else cfg.csa_local_window
        kv = cfg.n_kv_heads * cfg.head_size
        self.compress_k = layers.dense(kv, kv, ("kv", "kv"), dtype=dtype, rngs=rngs)
        self.compress_v = layers.dense(kv, kv, ("kv", "kv"), dtype=dtype, rngs=rngs)
        self.blend_gate = layers.dense(cfg.dim, cfg.n_heads * cfg.head_size, ("embed", "heads"),
                                       dtype=dtype, rngs=rngs)

    # ---- the compressed path

    def block_sums(self, k_BTGK, v_BTGK):
        """Per block of ``S`` positions, the sums of normed keys and of values ``[B, blocks, G*d]`` (float32)."""
        B, T = k_BTGK.shape[:2]
        S = self.cfg.csa_stride
        n = -(-T // S)

        def sums(x):
            x = jnp.pad(x.reshape(B, T, -1).astype(jnp.float32), [(0, 0), (0, n * S - T), (0, 0)])
            return x.reshape(B, n, S, -1).sum(axis=2)

        return sums(k_BTGK), sums(v_BTGK)

    def compress(self, sum_k_BCF, sum_v_BCF, block_BC, last_position):
        """Pooled (mean over ``S``, padding included) and projected blocks, keys rotated at the centre."""
        cfg = self.cfg
        S = cfg.csa_stride
        heads = lambda y: y.reshape(*y.shape[:2], cfg.n_kv_heads, cfg.head_size)
        k = heads(self.compress_k((sum_k_BCF / S).astype(self.dtype)))
        v = heads(self.compress_v((sum_v_BCF / S).astype(self.dtype)))
        centre = jnp.minimum(block_BC * S + S // 2, last_position)
        return self.rotate(k, centre), v

    def compressed_attention(self, q_BTHK, sum_k, sum_v, positions_BT, last_position):
        B, n = sum_k.shape[:2]
        blocks_BC = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
        k, v = self.compress(sum_k, sum_v, blocks_BC, last_position)
        visible = blocks_BC[:, None, :] < jnp.floor_divide(positions_BT, self.cfg.csa_stride)[:, :, None]
        return empty_safe_attention(q_BTHK, k, v, visible)

    def causal_compressed_attention(self, q_BTHK, sum_k, sum_v):
        """The compressed path where every row starts at position 0 (training), as causal attention,
        so that the fused kernels run it. The ``S`` queries of block ``c`` see blocks ``< c``: made
        ``S`` times as many heads of one time ``c`` and moved one time earlier, they see keys ``<= c - 1``,
        which is causal attention; block 0 sees none and gets 0."""
        B, T, H, K = q_BTHK.shape
        S, G, n = self.cfg.csa_stride, self.cfg.n_kv_heads, sum_k.shape[1]
        blocks_BC = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
        k_BCGK, v_BCGK = self.compress(sum_k, sum_v, blocks_BC, T - 1)
        # Query heads of one kv head stay together, as grouped-query attention reads them.
        q = jnp.pad(q_BTHK, [(0, 0), (0, n * S - T), (0, 0), (0, 0)]).reshape(B, n, S, G, H // G, K)
        q = q.transpose(0, 1, 3, 2, 4, 5).reshape(B, n, G * S * (H // G), K)
        # ``y`` one time later (by=1) or earlier (by=-1), the time left empty zeroed.
        moved = lambda y, by: jnp.roll(y, by, axis=1).at[:, 0 if by > 0 else -1].set(0)
        o = moved(layers.causal_attention(moved(q, -1), k_BCGK, v_BCGK, window=None), 1)
        o = o.reshape(B, n, G, S, H // G, K).transpose(0, 1, 3, 2, 4, 5)
        return o.reshape(B, n * S, H, K)[:, :T]

    def blend(self, x_BTD, local_BTHK, comp_BTHK, gate_BTF):
        b = jax.nn.sigmoid(self.blend_gate(x_BTD).astype(jnp.float32))
        flat = lambda y: y.reshape(gate_BTF.shape).astype(jnp.float32)
        return self.finish(b * flat(comp_BTHK) + (1.0 - b) * flat(local_BTHK), gate_BTF)

    def __call__(self, x_BTD, positions_BT):
        """Training form: every row starts at index 0 (``positions_BT`` only rotate)."""
        if self.as_full:
            return super().__call__(x_BTD, positions_BT)
        q, gate, k, v = self.project(x_BTD, positions_BT)
        local = layers.causal_attention(q, self.rotate(k, positions_BT), v, window=self.window)
        comp = self.causal_compressed_attention(q, *self.block_sums(k, v))
        return self.blend(x_BTD, local, comp, gate)

    # ---- decoding

    def init_cache(self, batch: int, max_len: int, dtype) -> CSALayer:
        if self.as_full:
            return super().init_cache(batch, max_len, dtype)
        cfg = self.cfg
        G, d = cfg.n_kv_heads, cfg.head_size
        ring = (batch, G, min(self.window, max_len), d)
        blocks = (batch, G, -(-max_len // cfg.csa_stride), d)
        return CSALayer(kv_cache.KVLayer(jnp.zeros(ring, dtype), jnp.zeros(ring, dtype)),
                        jnp.zeros(blocks, dtype), jnp.zeros(blocks, dtype),
                        jnp.zeros((batch, G * d), jnp.float32), jnp.zeros((batch, G * d), jnp.float32))

    def prefill(self, x_BTD, ctx: PrefillContext, cache: CSALayer):
        if self.as_full:
            return super().prefill(x_BTD, ctx, cache)
        B, T, _ = x_BTD.shape
        S = self.cfg.csa_stride
        q, gate, k, v = self.project(x_BTD, ctx.positions_BT)
        to_cache = lambda y: y.transpose(0, 2, 1, 3).astype(cache.local.keys.dtype)
        k_BGTK, v_BGTK = to_cache(self.rotate(k, ctx.positions_BT)), to_cache(v)
        mask = kv_cache.visible_keys(ctx.times_T, ctx.times_T, ctx.starts_B, self.window)
        local = grouped_masked_attention(q, k_BGTK, v_BGTK, mask)
        ring = kv_cache.KVLayer(kv_cache.store_prompt(cache.local.keys, k_BGTK),
                                kv_cache.store_prompt(cache.local.values, v_BGTK))
        # Blocks are made in position space: row b's token at position p sits at time p + start_b.
        source_BT = ctx.times_T[None, :] + ctx.starts_B[:, None]
        inside_BT = source_BT < T
        gather = lambda y: jnp.where(inside_BT[:, :, None, None],
                                     jnp.take_along_axis(y, jnp.minimum(source_BT, T - 1)[:, :, None, None], axis=1), 0)
        sum_k, sum_v = self.block_sums(gather(k), gather(v))
        comp = self.compressed_attention(q, sum_k, sum_v, ctx.positions_BT, T - 1)
        n = sum_k.shape[1]
        blocks_BC = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
        comp_k, comp_v = self.compress(sum_k, sum_v, blocks_BC, T - 1)
        slots = cache.comp_keys.shape[2]
        keep = min(n, slots)
        put = lambda c, y: jax.lax.dynamic_update_slice_in_dim(
            c, y[:, :keep].transpose(0, 2, 1, 3).astype(c.dtype), 0, axis=2)
        # The block being filled (position T - start_b lies in it): its running sums carry on.
        filling_B = (T - ctx.starts_B) // S
        pick = lambda s: jnp.where((filling_B < n)[:, None],
                                   jnp.take_along_axis(s, jnp.minimum(filling_B, n - 1)[:, None, None], axis=1)[:, 0], 0.0)
        new_cache = CSALayer(ring, put(cache.comp_keys, comp_k), put(cache.comp_values, comp_v),
                             pick(sum_k), pick(sum_v))
        return self.blend(x_BTD, local, comp, gate), new_cache

    def decode(self, x_B1D, positions_B1, time, starts_B, cache: CSALayer):
        if self.as_full:
            return super().decode(x_B1D, positions_B1, time, starts_B, cache)
        cfg = self.cfg
        S = cfg.csa_stride
        B = x_B1D.shape[0]
        q, gate, k, v = self.project(x_B1D, positions_B1)
        local, ring = self.attend_cached(q, self.rotate(k, positions_B1), v, time, starts_B, cache.local)
        position_B = positions_B1[:, 0]
        sum_k = cache.sum_keys + k.reshape(B, -1).astype(jnp.float32)
        sum_v = cache.sum_values + v.reshape(B, -1).astype(jnp.float32)
        block_B = position_B // S
        # This token's own block is not visible to it, so the attention may read the cache as it was.
        slots = cache.comp_keys.shape[2]
        visible = jnp.arange(slots)[None, None, :] < block_B[:, None, None]
        comp = empty_safe_attention(q, cache.comp_keys.transpose(0, 2, 1, 3), cache.comp_values.transpose(0, 2, 1, 3),
                                    visible)
        done_B = position_B % S == S - 1
        new_k, new_v = self.compress(sum_k[:, None], sum_v[:, None], block_B[:, None], block_B[:, None] * S + S // 2)
        write = (done_B[:, None] & (jnp.arange(slots)[None, :] == block_B[:, None]))[:, None, :, None]
        comp_keys = jnp.where(write, new_k.transpose(0, 2, 1, 3).astype(cache.comp_keys.dtype), cache.comp_keys)
        comp_values = jnp.where(write, new_v.transpose(0, 2, 1, 3).astype(cache.comp_values.dtype), cache.comp_values)
        sum_k, sum_v = jnp.where(done_B[:, None], 0.0, sum_k), jnp.where(done_B[:, None], 0.0, sum_v)
        return (self.blend(x_B1D, local, comp, gate),
                CSALayer(ring, comp_keys, comp_values, sum_k, sum_v))
