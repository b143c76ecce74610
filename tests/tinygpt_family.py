"""tinygpt: a second model family defined entirely outside ``jaxlm/``, as a user would write one.

It exists to prove that the family contract (``jaxlm/models/family.py``) is enough: this one
module is the family's config, its model and its naming module, registered through the public
API (``jaxlm.models.register``), and ``tests/test_family_contract.py`` trains, resumes, decodes,
exports and converts it with nothing in ``jaxlm/`` or ``tools/`` knowing its name.

The architecture: a plain pre-norm GPT with learned positions and an *untied* output head. Every
block is attention + MLP, except block ``recurrent_layer``, whose mixer is a per-channel EMA
recurrence instead of attention::

    u_t = W_in x_t,   a = sigmoid(decay),   h_t = a * h_{t-1} + (1 - a) * u_t,   out_t = W_out h_t

so one model mixes two kinds of per-layer cache: keys and values (``kv_cache.KVLayer``) for the
attention blocks and the last state ``h`` (:class:`RecurrentState`) for the EMA block.
``hidden`` returns an auxiliary loss (``aux_l2``: a small penalty on the residual stream's
square) and a metric (``ema_decay``); ``tokens_seen`` is a :class:`family.Buffer` that counts the
tokens ``hidden`` has run over, so the train state carries a non-trained variable.

Its PyTorch naming (what the converter reads and writes)::

    wte.weight [V, D]   wpe.weight [max_seq_len, D]
    h.{i}.ln_1.weight [D]
    h.{i}.attn.qkv.weight [3D, D] (q|k|v rows)   h.{i}.attn.proj.weight [D, D]     attention blocks
    h.{i}.ema.in_proj.weight [D, D]   h.{i}.ema.decay [D]   h.{i}.ema.out_proj.weight [D, D]  the EMA block
    h.{i}.ln_2.weight [D]   h.{i}.mlp.fc.weight [F, D]   h.{i}.mlp.proj.weight [D, F]
    ln_f.weight [D]     lm_head.weight [V, D] (untied)
    tokens_seen []      the Buffer (a registered buffer in PyTorch: first in the state_dict)

Import it with this folder on ``sys.path`` (``import tinygpt_family``): importing registers it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import config as C
from jaxlm import models
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.formats import keymap
from jaxlm.models import family, kv_cache, layers

# ============================================================================= the config


# Hashable: the model keeps its config as static graph data, which jit hashes.
@dataclasses.dataclass(unsafe_hash=True)
class TinyGPTConfig:
    vocab_size: int = 256
    dim: int = 32
    n_layers: int = 3
    n_heads: int = 2
    mlp_hidden: int = 64
    max_seq_len: int = 64
    recurrent_layer: int = 1          # the block whose mixer is the EMA recurrence (-1: none)
    aux_l2_weight: float = 1e-3       # weight of the aux loss: mean square of the final residual stream
    norm_eps: float = 1e-5

    family = "tinygpt"
    SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "mlp_hidden", "max_seq_len", "recurrent_layer")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        C.positive(self, "vocab_size", "dim", "n_layers", "n_heads", "mlp_hidden", "max_seq_len", "norm_eps")
        C.non_negative(self, "aux_l2_weight")
        path = getattr(self, "_config_path", "model.")
        if self.dim % self.n_heads:
            raise ConfigError(f"{path}dim = {self.dim}: must be a multiple of {path}n_heads ({self.n_heads})")
        if not -1 <= self.recurrent_layer < self.n_layers:
            raise ConfigError(f"{path}recurrent_layer = {self.recurrent_layer}: must be -1 (none) or a block "
                              f"index 0..{self.n_layers - 1}")

    def layer_kinds(self) -> list[str]:
        return ["ema" if i == self.recurrent_layer else "attention" for i in range(self.n_layers)]

    def loss_terms(self) -> family.HeadLoss:
        return family.HeadLoss()   # no z-loss: the aux loss comes from the model instead

    # ---- counting

    def matmul_param_count(self) -> int:
        """Parameters of the matmuls a token goes through: every block's projections and the head
        (the embedding tables are looked up, not multiplied)."""
        mixers = sum(4 * self.dim * self.dim if kind == "attention" else 2 * self.dim * self.dim
                     for kind in self.layer_kinds())
        return mixers + self.n_layers * 2 * self.dim * self.mlp_hidden + self.dim * self.vocab_size

    def param_count(self) -> int:
        ema_decays = self.dim * self.layer_kinds().count("ema")
        norms = (2 * self.n_layers + 1) * self.dim
        tables = (self.vocab_size + self.max_seq_len) * self.dim
        return self.matmul_param_count() + ema_decays + norms + tables

    def flops_per_token(self, seq_len: int) -> float:
        """6 N_matmul, plus per attention layer 12 x dim x (T + 1) / 2 (QK^T and AV over the keys a
        causal query sees on average, forward + backward); the EMA recurrence is elementwise."""
        attention_layers = self.layer_kinds().count("attention")
        return 6.0 * self.matmul_param_count() + attention_layers * 12.0 * self.dim * (seq_len + 1) / 2

    def flops_note(self) -> str:
        return "ema: its two projections only (the recurrence h = a h + (1 - a) u is elementwise, not counted)"


# ============================================================================= the model


class RecurrentState(NamedTuple):
    """The EMA block's cache entry: the last state ``h_t`` ``[B, D]``, float32 (it accumulates)."""

    h_BD: jax.Array


def ema_scan(u_BTD, a_D, h_BD):
    """``h_t = a h_{t-1} + (1 - a) u_t`` over the time axis from ``h_BD``: ``(h_BTD, last h_BD)``."""
    def step(h_BD, u_BD):
        h_BD = a_D * h_BD + (1.0 - a_D) * u_BD
        return h_BD, h_BD
    h_BD, h_TBD = jax.lax.scan(step, h_BD, u_BTD.swapaxes(0, 1))
    return h_TBD.swapaxes(0, 1), h_BD


class EMAMixer(nnx.Module):
    def __init__(self, cfg: TinyGPTConfig, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.in_proj = layers.dense(cfg.dim, cfg.dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        # Spread decays (a from 0.5 to ~0.95): some channels remember long, others short.
        self.decay = nnx.Param(jnp.linspace(0.0, 3.0, cfg.dim, dtype=jnp.float32), out_sharding=("mlp",))
        self.out_proj = layers.dense(cfg.dim, cfg.dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def _run(self, x_BTD, h_BD, real_BT=None):
        """The recurrence in float32; padding (``real_BT`` False) feeds zeros, so a state started at
        zero stays exactly zero until a row's first real token."""
        u_BTD = self.in_proj(x_BTD).astype(jnp.float32)
        if real_BT is not None:
            u_BTD = jnp.where(real_BT[..., None], u_BTD, 0.0)
        h_BTD, h_BD = ema_scan(u_BTD, jax.nn.sigmoid(self.decay[...]), h_BD)
        return self.out_proj(h_BTD.astype(self.dtype)), h_BD

    def __call__(self, x_BTD):
        return self._run(x_BTD, jnp.zeros((x_BTD.shape[0], x_BTD.shape[2]), jnp.float32))[0]

    def init_cache(self, batch: int, max_len: int, dtype) -> RecurrentState:
        return RecurrentState(jnp.zeros((batch, self.in_proj.in_features), jnp.float32))

    def prefill(self, x_BTD, mask_BTT, real_BT, cache: RecurrentState):
        out_BTD, h_BD = self._run(x_BTD, cache.h_BD, real_BT)
        return out_BTD, RecurrentState(h_BD)

    def decode(self, x_B1D, time, starts_B, cache: RecurrentState):
        out_B1D, h_BD = self._run(x_B1D, cache.h_BD)
        return out_B1D, RecurrentState(h_BD)


class Attention(nnx.Module):
    """Causal multi-head attention without positional rotation (positions are learned)."""

    def __init__(self, cfg: TinyGPTConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.q = layers.dense(cfg.dim, cfg.dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k = layers.dense(cfg.dim, cfg.dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.v = layers.dense(cfg.dim, cfg.dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.o = layers.dense(cfg.dim, cfg.dim, ("heads", "embed"), dtype=dtype, rngs=rngs)

    def _qkv(self, x_BTD):
        B, T, _ = x_BTD.shape
        split = lambda y: y.reshape(B, T, self.cfg.n_heads, self.cfg.head_dim)
        return split(self.q(x_BTD)), split(self.k(x_BTD)), split(self.v(x_BTD))

    def __call__(self, x_BTD):
        out_BTHK = layers.causal_attention(*self._qkv(x_BTD), window=None)
        return self.o(out_BTHK.reshape(*x_BTD.shape[:2], -1))

    def init_cache(self, batch: int, max_len: int, dtype) -> kv_cache.KVLayer:
        shape = (batch, self.cfg.n_heads, max_len, self.cfg.head_dim)
        return kv_cache.KVLayer(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def prefill(self, x_BTD, mask_BTT, real_BT, cache: kv_cache.KVLayer):
        B, T, _ = x_BTD.shape
        q_BTHK, k_BTHK, v_BTHK = self._qkv(x_BTD)
        to_cache = lambda y: y.transpose(0, 2, 1, 3).astype(cache.keys.dtype)
        k_BHTK, v_BHTK = to_cache(k_BTHK), to_cache(v_BTHK)
        out_BTHK = kv_cache.masked_attention(q_BTHK, k_BHTK, v_BHTK, mask_BTT)
        return (self.o(out_BTHK.reshape(B, T, -1)),
                kv_cache.KVLayer(kv_cache.store_prompt(cache.keys, k_BHTK), kv_cache.store_prompt(cache.values, v_BHTK)))

    def decode(self, x_B1D, time, starts_B, cache: kv_cache.KVLayer):
        q_B1HK, k_B1HK, v_B1HK = self._qkv(x_B1D)
        out_BHK, keys, values = kv_cache.attend_one_token(
            q_B1HK[:, 0], k_B1HK[:, 0], v_B1HK[:, 0], cache.keys, cache.values, time, starts_B, window=None)
        return self.o(out_BHK.reshape(x_B1D.shape[0], 1, -1)), kv_cache.KVLayer(keys, values)


class MLP(nnx.Module):
    def __init__(self, cfg: TinyGPTConfig, *, dtype, rngs: nnx.Rngs):
        self.fc = layers.dense(cfg.dim, cfg.mlp_hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.proj = layers.dense(cfg.mlp_hidden, cfg.dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD):
        return self.proj(jax.nn.gelu(self.fc(x_BTD)))


class Block(nnx.Module):
    """Pre-norm: ``x + mixer(norm_1(x))``, then ``x + mlp(norm_2(x))``; the mixer is attention or EMA."""

    def __init__(self, cfg: TinyGPTConfig, kind: str, *, dtype, rngs: nnx.Rngs):
        self.norm_1 = layers.RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = (EMAMixer if kind == "ema" else Attention)(cfg, dtype=dtype, rngs=rngs)
        self.norm_2 = layers.RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD):
        x_BTD = x_BTD + self.mixer(self.norm_1(x_BTD))
        return x_BTD + self.mlp(self.norm_2(x_BTD))

    def prefill(self, x_BTD, mask_BTT, real_BT, cache):
        mixed_BTD, cache = self.mixer.prefill(self.norm_1(x_BTD), mask_BTT, real_BT, cache)
        x_BTD = x_BTD + mixed_BTD
        return x_BTD + self.mlp(self.norm_2(x_BTD)), cache

    def decode(self, x_B1D, time, starts_B, cache):
        mixed_B1D, cache = self.mixer.decode(self.norm_1(x_B1D), time, starts_B, cache)
        x_B1D = x_B1D + mixed_B1D
        return x_B1D + self.mlp(self.norm_2(x_B1D)), cache


class TinyGPT(nnx.Module):
    """``model(ids_BT)`` returns float32 logits ``[B, T, vocab]``."""

    def __init__(self, cfg: TinyGPTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg, self.dtype = cfg, dtype
        table = lambda rows, axes: nnx.Embed(
            rows, cfg.dim, param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(layers.INIT_STD), axes), rngs=rngs)
        self.embed = table(cfg.vocab_size, ("vocab", "embed"))
        self.pos_embed = table(cfg.max_seq_len, (None, "embed"))
        self.blocks = nnx.List([Block(cfg, kind, dtype=dtype, rngs=rngs) for kind in cfg.layer_kinds()])
        self.final_norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = layers.dense(cfg.dim, cfg.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs)
        self.tokens_seen = family.Buffer(jnp.zeros((), jnp.int32))

    def _embed(self, ids_BT, positions_BT):
        # Left padding has negative positions; those rows are masked, any valid index stands in.
        positions_BT = jnp.clip(positions_BT, 0, self.cfg.max_seq_len - 1)
        return self.embed(ids_BT).astype(jnp.float32) + self.pos_embed(positions_BT).astype(jnp.float32)

    def hidden(self, ids_BT, positions_BT=None, *, remat: str = "none", scan_layers: bool = False):
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        x_BTD = layers.run_blocks(self.blocks, self._embed(ids_BT, positions_BT), remat=remat, scan=scan_layers)
        # A statistic outside the gradient, kept by the train state and its checkpoints.
        self.tokens_seen[...] = self.tokens_seen[...] + ids_BT.size
        aux = family.Aux(losses={"aux_l2": self.cfg.aux_l2_weight * jnp.mean(jnp.square(x_BTD))},
                         metrics={"ema_decay": self._mean_decay()})
        return self.final_norm(x_BTD), aux

    def _mean_decay(self):
        ema = [b.mixer for b in self.blocks if isinstance(b.mixer, EMAMixer)]
        return jnp.mean(jax.nn.sigmoid(ema[0].decay[...])) if ema else jnp.float32(0.0)

    def logits(self, x_BTD):
        """The untied head, float32 out whatever the compute dtype."""
        kernel_DV = self.head.kernel[...].astype(self.dtype)
        return jnp.einsum("btd,dv->btv", x_BTD.astype(self.dtype), kernel_DV, preferred_element_type=jnp.float32)

    def __call__(self, ids_BT, positions_BT=None):
        return self.logits(self.hidden(ids_BT, positions_BT)[0])

    # ---- decoding: one cache entry per block, of the block's own kind

    def init_cache(self, batch: int, max_len: int, dtype=None) -> family.Cache:
        dtype = dtype or self.dtype
        return family.Cache(layers=tuple(b.mixer.init_cache(batch, max_len, dtype) for b in self.blocks),
                            length=jnp.zeros((), jnp.int32), starts_B=jnp.zeros((batch,), jnp.int32))

    def prefill(self, ids_BT, cache: family.Cache, starts_B=None):
        B, T = ids_BT.shape
        starts_B = jnp.zeros((B,), jnp.int32) if starts_B is None else jnp.asarray(starts_B, jnp.int32)
        times_T = jnp.arange(T, dtype=jnp.int32)
        mask_BTT = kv_cache.visible_keys(times_T, times_T, starts_B, None)
        real_BT = times_T[None, :] >= starts_B[:, None]
        x_BTD, layer_caches = self._embed(ids_BT, times_T[None, :] - starts_B[:, None]), []
        for block, layer_cache in zip(self.blocks, cache.layers):
            x_BTD, layer_cache = block.prefill(x_BTD, mask_BTT, real_BT, layer_cache)
            layer_caches.append(layer_cache)
        logits_BV = self.logits(self.final_norm(x_BTD[:, -1:]))[:, 0]
        return logits_BV, family.Cache(tuple(layer_caches), jnp.asarray(T, jnp.int32), starts_B)

    def decode_step(self, ids_B, cache: family.Cache):
        time = cache.length
        x_B1D = self._embed(ids_B[:, None], (time - cache.starts_B)[:, None])
        layer_caches = []
        for block, layer_cache in zip(self.blocks, cache.layers):
            x_B1D, layer_cache = block.decode(x_B1D, time, cache.starts_B, layer_cache)
            layer_caches.append(layer_cache)
        logits_BV = self.logits(self.final_norm(x_B1D))[:, 0]
        return logits_BV, family.Cache(tuple(layer_caches), time + 1, cache.starts_B)


# ============================================================================= the naming module
# (the protocol in jaxlm/formats/keymap.py: FAMILY, claim, config_from_fields, entries, fields_for_torch)

FAMILY = "tinygpt"
DISPLAY = "TinyGPT"
KEY_PATTERNS = [r"tokens_seen", r"wte\.weight", r"wpe\.weight", r"ln_f\.weight", r"lm_head\.weight",
                r"h\.\d+\.(?:ln_1|ln_2)\.weight", r"h\.\d+\.attn\.(?:qkv|proj)\.weight",
                r"h\.\d+\.ema\.(?:in_proj\.weight|decay|out_proj\.weight)", r"h\.\d+\.mlp\.(?:fc|proj)\.weight"]
_LAYER = re.compile(r"^h\.(\d+)\.")


def claim(shapes: dict[str, tuple], fields: dict) -> tuple[float, str]:
    """The share of keys in tinygpt's naming; learned positions (``wpe``) and an EMA block are what
    tell it from another GPT, so without both the claim is halved."""
    share = keymap.match_fraction(shapes, KEY_PATTERNS)
    own = "wpe.weight" in shapes and any(".ema." in n for n in shapes)
    return share if own else share / 2, f"{share:.0%} of keys named like tinygpt" + ("" if own else "; no wpe / ema keys")


def entries(cfg: TinyGPTConfig) -> list[keymap.KeyEntry]:
    """The state_dict, in the order a PyTorch TinyGPT registers its modules."""
    # A module's own buffers come before its children's tensors in a PyTorch state_dict.
    out = [keymap.param("tokens_seen", "tokens_seen", role="buffer", transpose=False),
           keymap.param("wte.weight", "embed/embedding", role="embed"),
           keymap.param("wpe.weight", "pos_embed/embedding", role="positions")]
    for i, kind in enumerate(cfg.layer_kinds()):
        h, b = f"h.{i}", f"blocks/{i}"
        out.append(keymap.param(f"{h}.ln_1.weight", f"{b}/norm_1/w", role="norm"))
        if kind == "attention":
            out += [keymap.param(f"{h}.attn.qkv.weight", [f"{b}/mixer/{p}/kernel" for p in "qkv"], role="qkv"),
                    keymap.param(f"{h}.attn.proj.weight", f"{b}/mixer/o/kernel", role="o")]
        else:
            out += [keymap.param(f"{h}.ema.in_proj.weight", f"{b}/mixer/in_proj/kernel", role="ema_in"),
                    keymap.param(f"{h}.ema.decay", f"{b}/mixer/decay", role="ema_decay"),
                    keymap.param(f"{h}.ema.out_proj.weight", f"{b}/mixer/out_proj/kernel", role="ema_out")]
        out += [keymap.param(f"{h}.ln_2.weight", f"{b}/norm_2/w", role="norm"),
                keymap.param(f"{h}.mlp.fc.weight", f"{b}/mlp/fc/kernel", role="fc"),
                keymap.param(f"{h}.mlp.proj.weight", f"{b}/mlp/proj/kernel", role="proj")]
    return out + [keymap.param("ln_f.weight", "final_norm/w", role="norm"),
                  keymap.param("lm_head.weight", "head/kernel", role="head")]


def config_from_fields(fields: dict, shapes: dict[str, tuple], source: str = "checkpoint", overrides=()):
    """The config from the cfg fields, with the shape fields the tensors imply; a cfg field that
    contradicts a tensor is a one-line CheckpointError."""
    ours = {f.name for f in dataclasses.fields(TinyGPTConfig)}
    report = keymap.ConfigReport()
    values = {k: v for k, v in fields.items() if k in ours}
    report.ignored = {k: v for k, v in fields.items() if k not in ours}
    implied = {}
    if "wte.weight" in shapes:
        implied["vocab_size"], implied["dim"] = shapes["wte.weight"]
    if "wpe.weight" in shapes:
        implied["max_seq_len"] = shapes["wpe.weight"][0]
    layer_ids = {int(m[1]) for m in map(_LAYER.match, shapes) if m}
    if layer_ids:
        implied["n_layers"] = max(layer_ids) + 1
    if "h.0.mlp.fc.weight" in shapes:
        implied["mlp_hidden"] = shapes["h.0.mlp.fc.weight"][0]
    recurrent = sorted(int(_LAYER.match(n)[1]) for n in shapes if ".ema.decay" in n)
    implied["recurrent_layer"] = recurrent[0] if recurrent else -1
    for name, value in implied.items():
        if name in values and values[name] != value:
            raise CheckpointError(f"{source}: cfg.{name} = {values[name]} but the tensors say {value}")
        if name not in values:
            values[name] = report.inferred[name] = value
    if "n_heads" not in values:
        raise CheckpointError(f"{source}: cfg has no n_heads, which the tensors cannot tell; "
                              "give it with --set n_heads=N")
    return keymap.build_config(TinyGPTConfig, values, source, overrides), report


def fields_for_torch(cfg: TinyGPTConfig, original: dict | None, report: dict | None = None) -> dict:
    """The cfg dict written into a ``.pt``: the original fields updated with the config's values."""
    values = dataclasses.asdict(cfg)
    if original is None:
        return values
    return {name: values.get(name, value) for name, value in original.items()}


# ============================================================================= registration

RECORD = family.Family(name=FAMILY, config=TinyGPTConfig, model=TinyGPT, naming=__name__)


def register() -> family.Family:
    return models.register(RECORD)


register()
