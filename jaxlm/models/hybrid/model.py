"""Llama Think: a pre-norm decoder whose layers mix tokens by Gated DeltaNet, CSA or full attention.

Each block (SPEC §8) is ``h' = (1 + r_a) h + (1 + s_a) Attn(norm(h))`` and
``h'' = (1 + r_f) h' + (1 + s_f) SwiGLU(norm(h'))`` with per-channel residual and sublayer scales
(plain sums when ``hyper_connections`` is off). Norms are ``(1 + w)`` RMSNorms, the embedding is
tied to the output head, and the logits are not capped.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from jaxlm.models import family, layers
from jaxlm.models.hybrid.attention import GatedAttention, PrefillContext
from jaxlm.models.hybrid.config import HybridConfig
from jaxlm.models.hybrid.csa import CompressedSparseAttention
from jaxlm.models.hybrid.gdn import GatedDeltaNet

MIXERS = {"linear": GatedDeltaNet, "csa": CompressedSparseAttention, "full": GatedAttention}


class Block(nnx.Module):
    def __init__(self, cfg: HybridConfig, kind: str, *, dtype, rngs: nnx.Rngs):
        self.kind = kind
        self.attention_norm = layers.RMSNorm(cfg.dim, cfg.norm_eps, offset=1.0)
        self.attention = MIXERS[kind](cfg, dtype=dtype, rngs=rngs)
        self.ffn_norm = layers.RMSNorm(cfg.dim, cfg.norm_eps, offset=1.0)
        self.feed_forward = layers.SwiGLU(cfg.dim, cfg.ffn_dim, dtype=dtype, rngs=rngs)
        # The upstream init redraws w3 (the linear "up" branch, not w2) with std 0.02 / sqrt(2 L).
        self.feed_forward.up.kernel[...] = self.feed_forward.up.kernel[...] / math.sqrt(2 * cfg.n_layers)
        self.hyper_connections = cfg.hyper_connections
        self.scaled = cfg.hyper_connections and not cfg.llama2c_lossy   # the lossy mode keeps, but skips, the scales
        if cfg.hyper_connections:
            scale = lambda: nnx.Param(jnp.zeros((cfg.dim,), jnp.float32), out_sharding=("norm",))
            self.attn_residual_scale, self.attn_sublayer_scale = scale(), scale()
            self.ffn_residual_scale, self.ffn_sublayer_scale = scale(), scale()

    def _add(self, h, out, residual, sublayer):
        """The residual update, in float32 (the residual stream's dtype)."""
        out = out.astype(jnp.float32)
        if not self.scaled:
            return h + out
        return (1.0 + residual[...]) * h + (1.0 + sublayer[...]) * out

    def _ffn(self, h):
        return self._add(h, self.feed_forward(self.ffn_norm(h)), getattr(self, "ffn_residual_scale", None),
                         getattr(self, "ffn_sublayer_scale", None))

    def _after_attention(self, h, a):
        h = self._add(h, a, getattr(self, "attn_residual_scale", None), getattr(self, "attn_sublayer_scale", None))
        return self._ffn(h)

    def __call__(self, h_BTD, positions_BT):
        return self._after_attention(h_BTD, self.attention(self.attention_norm(h_BTD), positions_BT))

    def prefill(self, h_BTD, ctx: PrefillContext, cache):
        x = self.attention_norm(h_BTD)
        if self.kind == "linear":
            a, cache = self.attention.prefill(x, ctx.valid_BT, cache)
        else:
            a, cache = self.attention.prefill(x, ctx, cache)
        return self._after_attention(h_BTD, a), cache

    def decode(self, h_B1D, positions_B1, time, starts_B, cache):
        x = self.attention_norm(h_B1D)
        if self.kind == "linear":
            a, cache = self.attention.decode(x, cache)
        else:
            a, cache = self.attention.decode(x, positions_B1, time, starts_B, cache)
        return self._after_attention(h_B1D, a), cache


class HybridLM(nnx.Module):
    """``model(ids_BT)`` returns float32 logits ``[B, T, vocab]`` (the family contract's model)."""

    def __init__(self, cfg: HybridConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        cfg.validate()
        self.cfg, self.dtype = cfg, dtype
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.dim, param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(layers.INIT_STD), ("vocab", "embed")),
            rngs=rngs)
        self.blocks = nnx.List([Block(cfg, kind, dtype=dtype, rngs=rngs) for kind in cfg.layer_types])
        self.norm = layers.RMSNorm(cfg.dim, cfg.norm_eps, offset=1.0)

    def _embed_tokens(self, ids):
        # The residual stream stays float32 whatever the compute dtype (as under torch autocast).
        return self.embed(ids).astype(jnp.float32)

    def hidden(self, ids_BT, positions_BT=None, *, remat: str = "none", scan_layers: bool = False):
        """The final-normed residual stream ``[B, T, dim]`` and no auxiliary losses.

        Rows start at index 0 (CSA's blocks are counted from there); ``positions_BT`` only rotate.
        """
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1], dtype=jnp.int32), ids_BT.shape)
        x_BTD = layers.run_blocks(self.blocks, self._embed_tokens(ids_BT), positions_BT, remat=remat,
                                  scan=scan_layers)
        return self.norm(x_BTD), family.NO_AUX

    def output_projection(self):
        """``(table_VD, 0.0, dtype)``: tied and uncapped, so the loss may fuse head and cross-entropy."""
        return self.embed.embedding[...], 0.0, self.dtype

    def logits(self, x_BTD):
        table_VD = self.embed.embedding[...].astype(self.dtype)
        return jnp.einsum("btd,vd->btv", x_BTD.astype(self.dtype), table_VD, preferred_element_type=jnp.float32)

    def __call__(self, ids_BT, positions_BT=None):
        return self.logits(self.hidden(ids_BT, positions_BT)[0])

    # ---- decoding: per layer a recurrent state (GDN), a ring + compressed blocks (CSA), or full K/V

    def init_cache(self, batch: int, max_len: int, dtype=None) -> family.Cache:
        """An empty cache for ``max_len`` time steps (left padding included); ``dtype``: of the
        cached keys, values and conv inputs (the GDN state and CSA's running sums stay float32)."""
        dtype = dtype or self.dtype
        return family.Cache(layers=tuple(block.attention.init_cache(batch, max_len, dtype) for block in self.blocks),
                            length=jnp.zeros((), jnp.int32), starts_B=jnp.zeros((batch,), jnp.int32))

    def prefill(self, ids_BT, cache: family.Cache, starts_B=None):
        """The left-padded prompt in one pass into an empty cache: last logits ``[B, V]`` and the cache."""
        B, T = ids_BT.shape
        starts_B = jnp.zeros((B,), jnp.int32) if starts_B is None else jnp.asarray(starts_B, jnp.int32)
        times_T = jnp.arange(T, dtype=jnp.int32)
        positions_BT = times_T[None, :] - starts_B[:, None]
        ctx = PrefillContext(positions_BT, times_T, starts_B, positions_BT >= 0)
        h, layer_caches = self._embed_tokens(ids_BT), []
        for block, layer_cache in zip(self.blocks, cache.layers):
            h, layer_cache = block.prefill(h, ctx, layer_cache)
            layer_caches.append(layer_cache)
        logits_BV = self.logits(self.norm(h[:, -1:]))[:, 0]
        return logits_BV, family.Cache(tuple(layer_caches), jnp.asarray(T, jnp.int32), starts_B)

    def decode_step(self, ids_B, cache: family.Cache):
        """One token per row at time ``cache.length``: its logits ``[B, V]`` and the updated cache."""
        time = cache.length
        positions_B1 = (time - cache.starts_B)[:, None]
        h, layer_caches = self._embed_tokens(ids_B[:, None]), []
        for block, layer_cache in zip(self.blocks, cache.layers):
            h, layer_cache = block.decode(h, positions_B1, time, cache.starts_B, layer_cache)
            layer_caches.append(layer_cache)
        logits_BV = self.logits(self.norm(h))[:, 0]
        return logits_BV, family.Cache(tuple(layer_caches), time + 1, cache.starts_B)
