"""DeepSeek-V4 as nanowhale's code computes it (``fixtures/nanowhale/SPEC.md`` is the authority).

A block is ``HCpost(h, Attn(norm(HCpre(h))))`` then ``HCpost(h, MoE(norm(HCpre(h))))`` over four
residual streams (``hyper.py``); the MoE and its dispatch are in ``moe.py``. The attention:

- q: low rank (``wq_a``, its RMSNorm, ``wq_b``), split head-major, each head RMS-normalised
  without a weight;
- one shared head ``kv = RMS(wkv x)`` that is both the key and the value of every head;
- RoPE (rotate-half pairs, angle *minus* ``t w``) on the last ``qk_rope_head_dim`` dims of q and
  kv; the values are the rotated kv, so the output's rotary part is rotated back with the query's
  position (net: a rotation by the relative offset);
- scores scaled by ``head_dim ** -0.5``, plain causal softmax (``attn_sink`` is loaded, kept in
  checkpoints and never used, as upstream);
- the output: heads cut into ``o_groups`` contiguous groups, each projected by its own slice of
  ``wo_a`` to ``o_lora_rank``, concatenated, then ``wo_b``.

The decode cache holds the shared head only (``MLALayer``: ``[B, 1, S, head_dim]``, rotated),
not per-head keys and values: each query head attends over the same cached rows.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models import family, kv_cache, layers
from jaxlm.models.deepseek_v4 import hyper
from jaxlm.models.deepseek_v4.config import DeepSeekV4Config
from jaxlm.models.deepseek_v4.moe import MoE


class MLALayer(NamedTuple):
    """One layer's decode cache: the rotated shared K=V head ``[B, 1, S, head_dim]``."""

    kv: jax.Array


def rope_last(x_BTHK, positions_BT, rope_dims: int, theta: float):
    """``layers.rope`` (rotate-half) on the last ``rope_dims`` dims, the others unchanged.

    Upstream's forward rotation is by ``-t w``: it is this at ``-positions``; at ``positions`` it
    undoes that."""
    if rope_dims == 0:
        return x_BTHK
    K = x_BTHK.shape[-1]
    rotated = layers.rope(x_BTHK[..., K - rope_dims:], positions_BT, theta=theta, pairing="rotate_half")
    return jnp.concatenate([x_BTHK[..., :K - rope_dims], rotated], axis=-1)


def shared_head_attention(q_BTHK, kv_B1SK, mask_BTS):
    """Every query head over the one shared K=V head under an explicit mask: the heads fold into
    the query axis, so the shared head is read as it is, never repeated per head."""
    B, T, H, K = q_BTHK.shape
    out = kv_cache.masked_attention(q_BTHK.reshape(B, T * H, 1, K), kv_B1SK, kv_B1SK,
                                    jnp.repeat(mask_BTS, H, axis=1))
    return out.reshape(B, T, H, K)


class MLA(nnx.Module):
    def __init__(self, cfg: DeepSeekV4Config, *, dtype, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        D, n, d, G = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
        self.wq_a = layers.dense(D, cfg.q_lora_rank, ("embed", "kv"), dtype=dtype, rngs=rngs)
        self.q_norm = layers.RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = layers.dense(cfg.q_lora_rank, n * d, ("kv", "heads"), dtype=dtype, rngs=rngs)
        self.wkv = layers.dense(D, d, ("embed", "kv"), dtype=dtype, rngs=rngs)
        self.kv_norm = layers.RMSNorm(d, cfg.rms_norm_eps)
        # Group g's projection is columns g*o_lora_rank.. of this (in, out) kernel (see _output).
        self.wo_a = layers.dense(n * d // G, G * cfg.o_lora_rank, ("heads", "kv"), dtype=dtype, rngs=rngs)
        self.wo_b = layers.dense(G * cfg.o_lora_rank, D, ("kv", "embed"), dtype=dtype, rngs=rngs)
        self.attn_sink = family.Buffer(jnp.zeros((n,), jnp.float32), out_sharding=("heads",))

    def qkv(self, x_BTD, positions_BT):
        """Rotated queries ``[B, T, n, d]`` (head-RMS-normalised) and the rotated shared head ``[B, T, 1, d]``."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        q_BTHK = self.wq_b(self.q_norm(self.wq_a(x_BTD))).reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
        q32 = q_BTHK.astype(jnp.float32)
        q_BTHK = (q32 * jax.lax.rsqrt(jnp.mean(q32 * q32, axis=-1, keepdims=True) + cfg.rms_norm_eps)).astype(self.dtype)
        kv_BT1K = self.kv_norm(self.wkv(x_BTD))[:, :, None, :]
        rotate = lambda y: rope_last(y, -positions_BT, cfg.qk_rope_head_dim, cfg.rope_theta)
        return rotate(q_BTHK), rotate(kv_BT1K)

    def _output(self, out_BTHK, positions_BT):
        """Undo the values' rotation at the query's position, then the grouped low-rank projection."""
        cfg = self.cfg
        B, T = out_BTHK.shape[:2]
        out_BTHK = rope_last(out_BTHK, positions_BT, cfg.qk_rope_head_dim, cfg.rope_theta)
        G, R = cfg.o_groups, cfg.o_lora_rank
        o_BTGI = out_BTHK.reshape(B, T, G, -1).astype(self.dtype)
        kernel_IGR = self.wo_a.kernel[...].astype(self.dtype).reshape(-1, G, R)
        z_BTGR = jnp.einsum("btgi,igr->btgr", o_BTGI, kernel_IGR)
        return self.wo_b(z_BTGR.reshape(B, T, G * R))

    def __call__(self, x_BTD, positions_BT):
        q_BTHK, kv_BT1K = self.qkv(x_BTD, positions_BT)
        out_BTHK = layers.causal_attention(q_BTHK, kv_BT1K, kv_BT1K, window=None)
        return self._output(out_BTHK, positions_BT)

    # ---- decoding (see kv_cache.py for times, slots and masks)

    def prefill(self, x_BTD, positions_BT, mask_BTT, cache: MLALayer):
        q_BTHK, kv_BT1K = self.qkv(x_BTD, positions_BT)
        kv_B1TK = kv_BT1K.transpose(0, 2, 1, 3).astype(cache.kv.dtype)
        out_BTHK = shared_head_attention(q_BTHK, kv_B1TK, mask_BTT)
        return self._output(out_BTHK, positions_BT), MLALayer(kv_cache.store_prompt(cache.kv, kv_B1TK))

    def decode(self, x_B1D, positions_B1, time, starts_B, cache: MLALayer):
        q_B1HK, kv_B11K = self.qkv(x_B1D, positions_B1)
        size = cache.kv.shape[2]
        kv_B1SK = jax.lax.dynamic_update_slice_in_dim(cache.kv, kv_B11K.astype(cache.kv.dtype), time % size, axis=2)
        mask_B1S = kv_cache.visible_keys(time[None], kv_cache.slot_times(time, size), starts_B, None)
        out_B1HK = shared_head_attention(q_B1HK, kv_B1SK, mask_B1S)
        return self._output(out_B1HK, positions_B1), MLALayer(kv_B1SK)


class Block(nnx.Module):
    """Attention and MoE, each between a hyper-connection pre-mix and post-mix."""

    def __init__(self, cfg: DeepSeekV4Config, *, with_bias: bool, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        mixer = lambda: hyper.Mixer(cfg.hc_mult, cfg.hidden_size, rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps,
                                    iters=cfg.hc_sinkhorn_iters, rngs=rngs)
        self.hc_attn = mixer()
        self.attn_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, dtype=dtype, rngs=rngs)
        self.hc_ffn = mixer()
        self.ffn_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg, with_bias=with_bias, dtype=dtype, rngs=rngs)

    def step(self, h_BTHD, attend):
        """``(h_BTHD, info)``: ``attend(x_BTD)`` is the attention in its mode (plain, prefill,
        decode) and returns ``(out_BTD, cache)``; ``info`` holds the routing and the sub-layers'
        inputs and outputs (for tests and logs; XLA drops what no one reads)."""
        u_BTD, post_BTH, M_BTHH = self.hc_attn.pre(h_BTHD)
        attn_in_BTD = self.attn_norm(u_BTD)
        attn_out_BTD, cache = attend(attn_in_BTD)
        h_BTHD = self.hc_attn.post(h_BTHD, attn_out_BTD, post_BTH, M_BTHH)
        u_BTD, post_BTH, M_BTHH = self.hc_ffn.pre(h_BTHD)
        ffn_in_BTD = self.ffn_norm(u_BTD)
        ffn_out_BTD, experts_BTK, weights_BTK, entropy_BT = self.ffn(ffn_in_BTD)
        h_BTHD = self.hc_ffn.post(h_BTHD, ffn_out_BTD, post_BTH, M_BTHH)
        info = dict(attn_in=attn_in_BTD, attn_out=attn_out_BTD, ffn_in=ffn_in_BTD, ffn_out=ffn_out_BTD,
                    experts=experts_BTK, weights=weights_BTK, entropy=entropy_BT, cache=cache)
        return h_BTHD, info

    def __call__(self, carry, positions_BT):
        """The training form over ``(streams, per-token expert counts, per-token router entropy)``:
        the router statistics ride along with the streams through ``layers.run_blocks``."""
        h_BTHD, load_BTE, entropy_BT1 = carry
        h_BTHD, info = self.step(h_BTHD, lambda x: (self.attn(x, positions_BT), None))
        counts_BTE = jnp.sum(jax.nn.one_hot(info["experts"], load_BTE.shape[-1], dtype=jnp.float32), axis=-2)
        return h_BTHD, load_BTE + counts_BTE, entropy_BT1 + info["entropy"][..., None]


class DeepSeekV4(nnx.Module):
    """``model(ids_BT)`` returns float32 logits ``[B, T, vocab]``."""

    def __init__(self, cfg: DeepSeekV4Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg, self.dtype = cfg, dtype
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed = nnx.Embed(
            V, D, param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(layers.INIT_STD), ("vocab", "embed")),
            rngs=rngs)
        self.layers = nnx.List([Block(cfg, with_bias=cfg.has_router_bias(i), dtype=dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.hc_head = hyper.Head(cfg.hc_mult, D, rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, rngs=rngs)
        self.norm = layers.RMSNorm(D, cfg.rms_norm_eps)
        # Untied: the head is its own [V, D] table.
        self.lm_head = nnx.Param(layers.INIT_STD * jax.random.normal(rngs.params(), (V, D), jnp.float32),
                                 out_sharding=("vocab", "embed"))

    @property
    def stream_dtype(self):
        """float32 streams under float32 compute; the config's choice under half precision."""
        return jnp.float32 if jnp.dtype(self.dtype) == jnp.float32 else jnp.dtype(self.cfg.stream_dtype)

    def _streams(self, ids_BT):
        """Every stream starts as the token's embedding (no scaling)."""
        e_BTD = self.embed(ids_BT).astype(self.stream_dtype)
        return jnp.broadcast_to(e_BTD[:, :, None, :], (*ids_BT.shape, self.cfg.hc_mult, self.cfg.hidden_size))

    def _final(self, h_BTHD):
        return self.norm(self.hc_head(h_BTHD))

    def hidden(self, ids_BT, positions_BT=None, *, remat: str = "none", scan_layers: bool = False):
        """The final-normed states ``[B, T, D]`` (float32) and the router metrics: ``expert_load``
        ``[E]`` (fraction of routed slots per expert, averaged over layers) and ``router_entropy``."""
        cfg = self.cfg
        B, T = ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), ids_BT.shape)
        carry = (self._streams(ids_BT), jnp.zeros((B, T, cfg.n_routed_experts), jnp.float32),
                 jnp.zeros((B, T, 1), jnp.float32))
        h_BTHD, load_BTE, entropy_BT1 = layers.run_blocks(self.layers, carry, positions_BT, remat=remat,
                                                          scan=scan_layers)
        L, K = cfg.num_hidden_layers, cfg.num_experts_per_tok
        metrics = {"expert_load": jnp.sum(load_BTE, axis=(0, 1)) / (B * T * K * L),
                   "router_entropy": jnp.sum(entropy_BT1) / (B * T * L)}
        return self._final(h_BTHD), family.Aux(losses={}, metrics=metrics)

    def output_projection(self):
        """``(table_VD, cap, dtype)``: the head is a plain matmul (no soft-cap)."""
        return self.lm_head[...], 0.0, self.dtype

    def logits(self, x_BTD):
        head_VD = self.lm_head[...].astype(self.dtype)
        return jnp.einsum("btd,vd->btv", x_BTD.astype(self.dtype), head_VD, preferred_element_type=jnp.float32)

    def __call__(self, ids_BT, positions_BT=None):
        return self.logits(self.hidden(ids_BT, positions_BT)[0])

    def inspect(self, ids_BT, positions_BT=None):
        """``(logits_BTV, intermediates)``: one plain forward that also returns, per layer, the
        routing (``layer{i}_experts`` / ``_weights`` ``[B, T, k]``) and the sub-layers' inputs and
        outputs, named as ``fixtures/nanowhale/intermediates.npz`` names them."""
        T = ids_BT.shape[1]
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), ids_BT.shape)
        h_BTHD = self._streams(ids_BT)
        out = {"embed": h_BTHD[:, :, 0]}
        for i, block in enumerate(self.layers):
            h_BTHD, info = block.step(h_BTHD, lambda x, attn=block.attn: (attn(x, positions_BT), None))
            for name in ("experts", "weights"):
                out[f"layer{i}_{name}"] = info[name]
            out[f"layer{i}_attn_in_after_attn_norm"] = info["attn_in"]
            out[f"layer{i}_attn_out"] = info["attn_out"]
            out[f"layer{i}_ffn_in_after_ffn_norm"] = info["ffn_in"]
            out[f"layer{i}_ffn_out"] = info["ffn_out"]
            out[f"layer{i}_out_hc_state"] = h_BTHD
        out["hc_head_out"] = self.hc_head(h_BTHD)
        out["final_norm_out"] = x_BTD = self.norm(out["hc_head_out"])
        return self.logits(x_BTD), out

    # ---- decoding: init_cache, prefill once, then decode_step per token

    def init_cache(self, batch: int, max_len: int, dtype=None) -> family.Cache:
        """An empty cache of ``max_len`` time steps: per layer, the shared K=V head only."""
        dtype = dtype or self.dtype
        shape = (batch, 1, max_len, self.cfg.head_dim)
        return family.Cache(layers=tuple(MLALayer(jnp.zeros(shape, dtype)) for _ in self.layers),
                            length=jnp.zeros((), jnp.int32), starts_B=jnp.zeros((batch,), jnp.int32))

    def prefill(self, ids_BT, cache: family.Cache, starts_B=None):
        """The left-padded prompt (row b's real tokens from time ``starts_B[b]``) in one pass into an
        empty cache; returns the last position's logits ``[B, V]`` and the cache."""
        B, T = ids_BT.shape
        starts_B = jnp.zeros((B,), jnp.int32) if starts_B is None else jnp.asarray(starts_B, jnp.int32)
        times_T = jnp.arange(T, dtype=jnp.int32)
        positions_BT = times_T[None, :] - starts_B[:, None]
        mask_BTT = kv_cache.visible_keys(times_T, times_T, starts_B, None)
        h_BTHD, caches = self._streams(ids_BT), []
        for block, layer_cache in zip(self.layers, cache.layers):
            attend = lambda x, attn=block.attn, c=layer_cache: attn.prefill(x, positions_BT, mask_BTT, c)
            h_BTHD, info = block.step(h_BTHD, attend)
            caches.append(info["cache"])
        logits_BV = self.logits(self._final(h_BTHD[:, -1:]))[:, 0]
        return logits_BV, family.Cache(tuple(caches), jnp.asarray(T, jnp.int32), starts_B)

    def decode_step(self, ids_B, cache: family.Cache):
        """One token per row at time ``cache.length``: its logits ``[B, V]`` and the updated cache."""
        time = cache.length
        positions_B1 = (time - cache.starts_B)[:, None]
        h_B1HD, caches = self._streams(ids_B[:, None]), []
        for block, layer_cache in zip(self.layers, cache.layers):
            attend = lambda x, attn=block.attn, c=layer_cache: attn.decode(x, positions_B1, time, cache.starts_B, c)
            h_B1HD, info = block.step(h_B1HD, attend)
            caches.append(info["cache"])
        logits_BV = self.logits(self._final(h_B1HD))[:, 0]
        return logits_BV, family.Cache(tuple(caches), time + 1, cache.starts_B)
