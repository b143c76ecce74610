"""ToyLM: the Crowfeather-50m / Shard-40m-v1 architecture (``specs/toylm.md``).

A pre-norm decoder with tied embeddings, RMSNorm (weight ``w``), RoPE on Q and K,
Gemma-style alternating sliding-window / global attention (last layer global),
SwiGLU MLPs and a final-logit soft-cap. The conventions the upstream code never
published (RoPE pairing and theta, which layer parity slides, the window edge,
embedding scaling) are config fields whose defaults follow the spec.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from jaxlm import config as C
from jaxlm.errors import ConfigError
from jaxlm.models import family, kv_cache, layers


# Hashable because the model keeps its config as static graph data, which jit hashes;
# a config is only changed while it is being loaded, before any model is built.
@dataclasses.dataclass(unsafe_hash=True)
class ToyLMConfig:
    # Shape: the field names are the upstream ``Config``'s.
    vocab_size: int = 8192
    dim: int = 512
    n_layers: int = 12
    n_heads: int = 8
    head_dim: int = 64
    mlp_hidden: int = 2048
    max_seq_len: int = 8192
    attention_pattern: str = "gemma4"      # "gemma4" (alternating, last global) or "all_global"
    sliding_window: int = 1024
    lm_head_logit_cap: float = 30.0        # 0 disables the soft-cap
    z_loss_weight: float = 1e-4
    # Open conventions (not published upstream); defaults as in specs/toylm.md.
    z_loss_form: str = "mean_sq"           # "mean_sq": mean(lse^2) (PaLM); "sq_mean": mean(lse)^2
    rope_theta: float = 10000.0
    rope_pairing: str = "rotate_half"      # or "interleaved"
    sliding_parity: str = "even"           # which layer indices slide (the last layer never does)
    window_includes_query: bool = True     # True: keys t-W+1..t; False: keys t-W..t
    embed_scale: bool = False              # multiply embeddings by sqrt(dim)
    norm_eps: float = 1e-5

    family = "toylm"
    SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "mlp_hidden")

    def validate(self) -> None:
        C.positive(self, "vocab_size", "dim", "n_layers", "n_heads", "head_dim", "mlp_hidden",
                   "max_seq_len", "sliding_window", "rope_theta", "norm_eps")
        C.non_negative(self, "lm_head_logit_cap", "z_loss_weight")
        C.choice(self, "attention_pattern", ("gemma4", "all_global"))
        C.choice(self, "z_loss_form", ("mean_sq", "sq_mean"))
        C.choice(self, "rope_pairing", ("rotate_half", "interleaved"))
        C.choice(self, "sliding_parity", ("even", "odd"))
        path = getattr(self, "_config_path", "model.")
        if self.n_heads * self.head_dim != self.dim:
            raise ConfigError(
                f"{path}n_heads * {path}head_dim = {self.n_heads} * {self.head_dim} = "
                f"{self.n_heads * self.head_dim}: must equal {path}dim ({self.dim})")
        if self.head_dim % 2:
            raise ConfigError(f"{path}head_dim = {self.head_dim}: must be even for RoPE")
        if self.sliding_window > self.max_seq_len:
            raise ConfigError(
                f"{path}sliding_window = {self.sliding_window}: must be <= {path}max_seq_len ({self.max_seq_len})")

    # ---- the attention pattern

    def layer_window(self, i: int) -> int | None:
        """Keys visible to a query in layer i (``None``: global attention)."""
        if self.attention_pattern == "all_global" or i == self.n_layers - 1:
            return None
        slides = (i % 2 == 0) if self.sliding_parity == "even" else (i % 2 == 1)
        if not slides:
            return None
        return self.sliding_window if self.window_includes_query else self.sliding_window + 1

    def layer_kinds(self) -> list[str]:
        return ["global" if self.layer_window(i) is None else "sliding" for i in range(self.n_layers)]

    def layer_descriptions(self) -> list[str]:
        return [kind if kind == "global" else f"{kind}({self.layer_window(i)})"
                for i, kind in enumerate(self.layer_kinds())]

    def loss_terms(self) -> family.HeadLoss:
        return family.HeadLoss(z_weight=self.z_loss_weight, z_form=self.z_loss_form)

    # ---- counting

    def param_count(self) -> int:
        attn = 4 * self.dim * self.n_heads * self.head_dim
        mlp = 3 * self.dim * self.mlp_hidden
        norms = (2 * self.n_layers + 1) * self.dim
        return self.vocab_size * self.dim + self.n_layers * (attn + mlp) + norms

    def matmul_param_count(self) -> int:
        """Parameters used in matmuls per token, including the tied output head."""
        per_layer = 4 * self.dim * self.n_heads * self.head_dim + 3 * self.dim * self.mlp_hidden
        return self.n_layers * per_layer + self.vocab_size * self.dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N_matmul plus attention (forward + backward = 3x forward).

        Attention forward per token and layer is 2 matmuls (QK^T, AV) x 2 FLOPs x heads x
        head_dim x the mean number of keys a query sees: (T+1)/2 for causal global layers,
        mean(min(t+1, W)) for sliding ones.
        """
        flops = 6.0 * self.matmul_param_count()
        for i in range(self.n_layers):
            flops += 12.0 * self.n_heads * self.head_dim * mean_keys_per_query(seq_len, self.layer_window(i))
        return flops

    def flops_note(self) -> str:
        return ""


def mean_keys_per_query(seq_len: int, window: int | None) -> float:
    """Average number of keys a causal query attends to, over positions 0..seq_len-1."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    full = window * (window + 1) / 2            # positions 0..W-1 see t+1 keys
    return (full + (seq_len - window) * window) / seq_len


class Attention(nnx.Module):
    def __init__(self, cfg: ToyLMConfig, window: int | None, *, dtype, rngs: nnx.Rngs):
        self.cfg, self.window = cfg, window
        inner = cfg.n_heads * cfg.head_dim
        self.q = layers.dense(cfg.dim, inner, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k = layers.dense(cfg.dim, inner, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.v = layers.dense(cfg.dim, inner, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.o = layers.dense(inner, cfg.dim, ("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD, positions_BT):
        q_BTHK, k_BTHK, v_BTHK = self.qkv(x_BTD, positions_BT)
        out_BTHK = layers.causal_attention(q_BTHK, k_BTHK, v_BTHK, window=self.window)
        return self.o(out_BTHK.reshape(*x_BTD.shape[:2], -1))

    def qkv(self, x_BTD, positions_BT):
        """Rotated queries and keys, and values, ``[B, T, H, K]``."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        split = lambda y: y.reshape(B, T, cfg.n_heads, cfg.head_dim)
        q_BTHK, k_BTHK, v_BTHK = split(self.q(x_BTD)), split(self.k(x_BTD)), split(self.v(x_BTD))
        q_BTHK = layers.rope(q_BTHK, positions_BT, theta=cfg.rope_theta, pairing=cfg.rope_pairing)
        k_BTHK = layers.rope(k_BTHK, positions_BT, theta=cfg.rope_theta, pairing=cfg.rope_pairing)
        return q_BTHK, k_BTHK, v_BTHK

    # ---- decoding with a KV cache (see kv_cache.py)

    def init_cache(self, batch: int, max_len: int, dtype) -> kv_cache.KVLayer:
        """Empty keys and values: a ring of the window for a sliding layer, ``max_len`` slots for a global one."""
        slots = max_len if self.window is None else min(self.window, max_len)
        shape = (batch, self.cfg.n_heads, slots, self.cfg.head_dim)
        return kv_cache.KVLayer(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def prefill(self, x_BTD, positions_BT, mask_BTT, cache: kv_cache.KVLayer):
        """Attend over the prompt itself, then store its keys and values in the empty cache."""
        B, T, _ = x_BTD.shape
        q_BTHK, k_BTHK, v_BTHK = self.qkv(x_BTD, positions_BT)
        to_cache = lambda y: y.transpose(0, 2, 1, 3).astype(cache.keys.dtype)
        k_BHTK, v_BHTK = to_cache(k_BTHK), to_cache(v_BTHK)
        out_BTHK = kv_cache.masked_attention(q_BTHK, k_BHTK, v_BHTK, mask_BTT)
        return (self.o(out_BTHK.reshape(B, T, -1)),
                kv_cache.KVLayer(kv_cache.store_prompt(cache.keys, k_BHTK), kv_cache.store_prompt(cache.values, v_BHTK)))

    def decode(self, x_B1D, positions_B1, time, starts_B, cache: kv_cache.KVLayer):
        """One new token per row at ``time``: store its key and value, attend over the cache."""
        B = x_B1D.shape[0]
        q_B1HK, k_B1HK, v_B1HK = self.qkv(x_B1D, positions_B1)
        out_BHK, keys, values = kv_cache.attend_one_token(
            q_B1HK[:, 0], k_B1HK[:, 0], v_B1HK[:, 0], cache.keys, cache.values, time, starts_B, window=self.window)
        return self.o(out_BHK.reshape(B, 1, -1)), kv_cache.KVLayer(keys, values)


class Block(nnx.Module):
    def __init__(self, cfg: ToyLMConfig, window: int | None, *, dtype, rngs: nnx.Rngs):
        self.attn_norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, window, dtype=dtype, rngs=rngs)
        self.mlp_norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = layers.SwiGLU(cfg.dim, cfg.mlp_hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD, positions_BT):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))

    def prefill(self, x_BTD, positions_BT, mask_BTT, cache):
        attn_BTD, cache = self.attn.prefill(self.attn_norm(x_BTD), positions_BT, mask_BTT, cache)
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), cache

    def decode(self, x_B1D, positions_B1, time, starts_B, cache):
        attn_B1D, cache = self.attn.decode(self.attn_norm(x_B1D), positions_B1, time, starts_B, cache)
        x_B1D = x_B1D + attn_B1D
        return x_B1D + self.mlp(self.mlp_norm(x_B1D)), cache


class ToyLM(nnx.Module):
    """``model(ids_BT)`` returns soft-capped float32 logits ``[B, T, vocab]``."""

    def __init__(self, cfg: ToyLMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg, self.dtype = cfg, dtype
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.dim, param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(layers.INIT_STD), ("vocab", "embed")),
            rngs=rngs)
        self.blocks = nnx.List(
            [Block(cfg, cfg.layer_window(i), dtype=dtype, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)

    def hidden(self, ids_BT, positions_BT=None, *, remat: str = "none", scan_layers: bool = False):
        """The final-normed residual stream ``[B, T, dim]``; ``logits`` maps it to the vocabulary.

        The residual stream stays float32 (as under torch autocast); projections and
        attention run in the compute dtype. ``remat`` and ``scan_layers`` change how the
        blocks are computed, not what (see ``layers.run_blocks``).
        """
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        x_BTD = self._embed_tokens(ids_BT)
        x_BTD = layers.run_blocks(self.blocks, x_BTD, positions_BT, remat=remat, scan=scan_layers)
        return self.final_norm(x_BTD), family.NO_AUX

    def output_projection(self):
        """``(table_VD, cap, dtype)``: ``logits(x)`` is ``softcap(x @ table_VD.T, cap)`` with the
        product in ``dtype``, what a loss needs to fuse the head with the cross-entropy."""
        return self.embed.embedding[...], self.cfg.lm_head_logit_cap, self.dtype

    def logits(self, x_BTD):
        """Tied output head and soft-cap; float32 out, whatever the compute dtype."""
        table_VD = self.embed.embedding[...].astype(self.dtype)
        logits_BTV = jnp.einsum("btd,vd->btv", x_BTD.astype(self.dtype), table_VD,
                                preferred_element_type=jnp.float32)
        return softcap(logits_BTV, self.cfg.lm_head_logit_cap)

    def __call__(self, ids_BT, positions_BT=None):
        return self.logits(self.hidden(ids_BT, positions_BT)[0])

    # ---- decoding with a KV cache: init_cache, prefill once, then decode_step per token

    def init_cache(self, batch: int, max_len: int, dtype=None) -> family.Cache:
        """An empty cache for ``max_len`` time steps (prompt, left padding included, plus new tokens).

        ``dtype`` defaults to the compute dtype (bf16 halves what each decode step reads)."""
        dtype = dtype or self.dtype
        return family.Cache(layers=tuple(block.attn.init_cache(batch, max_len, dtype) for block in self.blocks),
                            length=jnp.zeros((), jnp.int32), starts_B=jnp.zeros((batch,), jnp.int32))

    def fast_decoder(self, batch: int, cache_dtype) -> family.FastDecoder | str:
        """The one-kernel CUDA decode step where it runs here, else why not."""
        from jaxlm.models.toylm import decode_kernel   # loaded only when asked: it builds CUDA code
        return decode_kernel.fast_decoder(self, batch, cache_dtype)

    def _embed_tokens(self, ids):
        """Token embeddings in float32 (the table may have been cast down for inference) and
        scaled when the config says so: the start of the residual stream, which stays float32."""
        x = self.embed(ids).astype(jnp.float32)
        return x * math.sqrt(self.cfg.dim) if self.cfg.embed_scale else x

    def prefill(self, ids_BT, cache: family.Cache, starts_B=None):
        """Run the prompt through the model in one pass into an empty cache.

        ``starts_B``: where each row's real tokens begin (left padding before them, masked and
        not counted in positions). Returns the last position's logits ``[B, V]`` and the cache.
        """
        B, T = ids_BT.shape
        starts_B = jnp.zeros((B,), jnp.int32) if starts_B is None else jnp.asarray(starts_B, jnp.int32)
        times_T = jnp.arange(T, dtype=jnp.int32)
        positions_BT = times_T[None, :] - starts_B[:, None]
        windows = {block.attn.window for block in self.blocks}
        masks = {w: kv_cache.visible_keys(times_T, times_T, starts_B, w) for w in windows}
        x_BTD, layer_caches = self._embed_tokens(ids_BT), []
        for block, layer_cache in zip(self.blocks, cache.layers):
            x_BTD, layer_cache = block.prefill(x_BTD, positions_BT, masks[block.attn.window], layer_cache)
            layer_caches.append(layer_cache)
        logits_BV = self.logits(self.final_norm(x_BTD[:, -1:]))[:, 0]
        return logits_BV, family.Cache(tuple(layer_caches), jnp.asarray(T, jnp.int32), starts_B)

    def decode_step(self, ids_B, cache: family.Cache):
        """Feed one token per row at time ``cache.length``; its logits ``[B, V]`` and the updated cache."""
        time = cache.length
        positions_B1 = (time - cache.starts_B)[:, None]
        x_B1D, layer_caches = self._embed_tokens(ids_B[:, None]), []
        for block, layer_cache in zip(self.blocks, cache.layers):
            x_B1D, layer_cache = block.decode(x_B1D, positions_B1, time, cache.starts_B, layer_cache)
            layer_caches.append(layer_cache)
        logits_BV = self.logits(self.final_norm(x_B1D))[:, 0]
        return logits_BV, family.Cache(tuple(layer_caches), time + 1, cache.starts_B)


def softcap(logits, cap: float):
    """Gemma-2 soft-cap ``cap * tanh(logits / cap)``; a cap of 0 leaves logits as they are."""
    if not cap:
        return logits
    return cap * jnp.tanh(logits / cap)
