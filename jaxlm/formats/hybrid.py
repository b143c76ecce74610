"""Llama Think in PyTorch: ``state_dict`` keys <-> jaxlm parameter paths, ``model_args`` <-> HybridConfig.

Keys are those of the upstream ``model.py`` (``fixtures/llama_think/SPEC.md`` §5-§8, §12), in its
module order; ``torch.compile``'s ``_orig_mod.`` prefix is stripped on the way in. Linear weights
``(out, in)`` become Flax ``(in, out)`` kernels; the depthwise conv ``(C, 1, K)`` becomes the Flax
kernel ``(K, 1, C)`` (the same reversal of axes). ``output.weight`` is the embedding itself (tied).
The CSA layers' ``local_mask`` / ``comp_mask`` are constant buffers: not parameters, recomputed
for a checkpoint that never had them, kept verbatim otherwise. The key names and the field names
are the upstream's, so the tables below are the whole mapping.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxlm.errors import CheckpointError
from jaxlm.formats import llama2c_bin
from jaxlm.formats.keymap import ConfigReport, KeyEntry, build_config, match_fraction, strip_prefixes, to_flax, to_torch
from jaxlm.models.hybrid import HybridConfig
from jaxlm.models.hybrid.config import LAYER_KINDS

FAMILY = "hybrid"
DISPLAY = "Llama Think (hybrid)"
# Files of this family that are neither a .pt nor a .safetensors (keymap's protocol): the C runner's model.bin.
NATIVE_FORMATS = {".bin": llama2c_bin}
# jaxlm's own switches, never written into an upstream model_args (ModelArgs(**model_args) would refuse them).
JAXLM_ONLY = ("gdn_chunk", "llama2c_lossy")

# model_args in train.py's order (SPEC §12); norm_eps and hidden_dim are ModelArgs defaults it omits.
MODEL_ARGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "multiple_of", "max_seq_len",
              "dropout", "rope_base", "partial_rotary_factor", "layer_types", "window_size", "csa_stride",
              "csa_local_window", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
              "linear_value_head_dim", "linear_conv_kernel_dim", "attnres_block_size", "hyper_connections",
              "mc_segment_size", "mc_ssc_top_k", "mc_detach_cached_states", "loop_max_steps", "loop_kl_beta",
              "loop_exit_threshold", "loop_mc_enabled", "loop_mc_top_k", "loop_mc_detach")
OPTIONAL_ARGS = ("norm_eps", "hidden_dim")

# (torch leaf under layers.i., jaxlm leaf under blocks/i/, transposed) per mixer kind, in module order.
_MIXER_KEYS = {
    "linear": [("attention.dt_bias", "attention/dt_bias", False), ("attention.A_log", "attention/A_log", False),
               ("attention.in_proj_qkv.weight", "attention/in_proj_qkv/kernel", True),
               ("attention.conv1d.weight", "attention/conv1d", True),
               ("attention.in_proj_z.weight", "attention/in_proj_z/kernel", True),
               ("attention.in_proj_b.weight", "attention/in_proj_b/kernel", True),
               ("attention.in_proj_a.weight", "attention/in_proj_a/kernel", True),
               ("attention.norm.weight", "attention/norm/w", False),
               ("attention.out_proj.weight", "attention/out_proj/kernel", True)],
    "full": [("attention.wq.weight", "attention/wq/kernel", True), ("attention.wk.weight", "attention/wk/kernel", True),
             ("attention.wv.weight", "attention/wv/kernel", True), ("attention.wo.weight", "attention/wo/kernel", True),
             ("attention.q_norm.weight", "attention/q_norm/w", False),
             ("attention.k_norm.weight", "attention/k_norm/w", False)],
}
_MIXER_KEYS["csa"] = _MIXER_KEYS["full"] + [
    ("attention.compress_k.weight", "attention/compress_k/kernel", True),
    ("attention.compress_v.weight", "attention/compress_v/kernel", True),
    ("attention.blend_gate.weight", "attention/blend_gate/kernel", True)]
_BLOCK_KEYS = [("feed_forward.w1.weight", "feed_forward/gate/kernel", True),
               ("feed_forward.w2.weight", "feed_forward/down/kernel", True),
               ("feed_forward.w3.weight", "feed_forward/up/kernel", True),
               ("ffn_norm.weight", "ffn_norm/w", False)]
_HC_KEYS = [("hc_attn.residual_scale", "attn_residual_scale", False),
            ("hc_attn.sublayer_scale", "attn_sublayer_scale", False),
            ("hc_ffn.residual_scale", "ffn_residual_scale", False),
            ("hc_ffn.sublayer_scale", "ffn_sublayer_scale", False)]
MASKS = ("local_mask", "comp_mask")

# Keys only this family has: what ``claim`` looks for.
_OWN = (r"layers\.\d+\.attention\.(in_proj_qkv|in_proj_z|in_proj_a|in_proj_b|conv1d|out_proj)\.weight",
        r"layers\.\d+\.attention\.(dt_bias|A_log|local_mask|comp_mask)",
        r"layers\.\d+\.attention\.(compress_k|compress_v|blend_gate)\.weight",
        r"layers\.\d+\.hc_(attn|ffn)\.(residual|sublayer)_scale")
_SHARED = (r"tok_embeddings\.weight", r"output\.weight", r"norm\.weight",
           r"layers\.\d+\.(attention_norm|ffn_norm)\.weight", r"layers\.\d+\.feed_forward\.w[123]\.weight",
           r"layers\.\d+\.attention\.(wq|wk|wv|wo|q_norm|k_norm|norm)\.weight")


# ----------------------------------------------------------------------------- keys


def entries(cfg: HybridConfig) -> list[KeyEntry]:
    """Every key of the upstream ``state_dict``, in its order (buffers included)."""
    out = [KeyEntry("tok_embeddings.weight", "param", ["embed/embedding"], False, role="embed")]
    for i, kind in enumerate(cfg.layer_types):
        key, path = f"layers.{i}.", f"blocks/{i}/"
        out.append(KeyEntry(f"{key}attention_norm.weight", "param", [f"{path}attention_norm/w"], role="attention_norm"))
        if kind == "csa":
            out += [KeyEntry(f"{key}attention.{mask}", "buffer", role=mask) for mask in MASKS]
        rows = _MIXER_KEYS[kind] + _BLOCK_KEYS + (_HC_KEYS if cfg.hyper_connections else [])
        out += [KeyEntry(key + leaf, "param", [path + target], transpose, role=leaf) for leaf, target, transpose in rows]
    out.append(KeyEntry("norm.weight", "param", ["norm/w"], role="final_norm"))
    out.append(KeyEntry("output.weight", "tied", ["embed/embedding"], role="head (tied)"))
    return out


def param_shapes(cfg: HybridConfig) -> dict[str, tuple]:
    """The jaxlm parameter shapes (Flax layout) of ``cfg``, by path."""
    D, V, F = cfg.dim, cfg.vocab_size, cfg.ffn_dim
    H, G, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    C, K, Hv = cfg.gdn_conv_channels, cfg.linear_conv_kernel_dim, cfg.linear_num_value_heads
    Vd = cfg.gdn_value_dim
    shapes = {"embed/embedding": (V, D), "norm/w": (D,)}
    for i, kind in enumerate(cfg.layer_types):
        p = f"blocks/{i}/"
        shapes.update({p + "attention_norm/w": (D,), p + "ffn_norm/w": (D,), p + "feed_forward/gate/kernel": (D, F),
                       p + "feed_forward/up/kernel": (D, F), p + "feed_forward/down/kernel": (F, D)})
        if cfg.hyper_connections:
            shapes.update({p + leaf: (D,) for _, leaf, _ in _HC_KEYS})
        a = p + "attention/"
        if kind == "linear":
            shapes.update({a + "dt_bias": (Hv,), a + "A_log": (Hv,), a + "in_proj_qkv/kernel": (D, C),
                           a + "conv1d": (K, 1, C), a + "in_proj_z/kernel": (D, Vd), a + "in_proj_b/kernel": (D, Hv),
                           a + "in_proj_a/kernel": (D, Hv), a + "norm/w": (cfg.linear_value_head_dim,),
                           a + "out_proj/kernel": (Vd, D)})
        else:
            shapes.update({a + "wq/kernel": (D, 2 * H * d), a + "wk/kernel": (D, G * d), a + "wv/kernel": (D, G * d),
                           a + "wo/kernel": (H * d, D), a + "q_norm/w": (d,), a + "k_norm/w": (d,)})
            if kind == "csa":
                shapes.update({a + "compress_k/kernel": (G * d, G * d), a + "compress_v/kernel": (G * d, G * d),
                               a + "blend_gate/kernel": (D, H * d)})
    return shapes


def mask_buffers(cfg: HybridConfig) -> dict[str, np.ndarray]:
    """The CSA layers' constant additive masks (0 visible, -inf not), as the upstream module registers them."""
    T, S, W = cfg.max_seq_len, cfg.csa_stride, cfg.csa_local_window
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    c = np.arange(-(-T // S))[None, :]
    local = np.where((j <= i) & (i - W < j), 0.0, -np.inf).astype(np.float32)[None, None]
    comp = np.where(i >= (c + 1) * S, 0.0, -np.inf).astype(np.float32)[None, None]
    return {"local_mask": local, "comp_mask": comp}


def _torch_shape(entry: KeyEntry, shapes: dict[str, tuple]) -> tuple:
    shape = shapes[entry.targets[0]]
    return tuple(reversed(shape)) if entry.transpose else shape


def check_keys(shapes: dict[str, tuple], cfg: HybridConfig, source: str = "checkpoint") -> None:
    """Refuse a state_dict whose keys or shapes are not ``cfg``'s, naming the first difference."""
    got = {strip_prefixes(k): tuple(v) for k, v in shapes.items()}
    ours = param_shapes(cfg)
    masks = mask_buffers(cfg)
    for entry in entries(cfg):
        if entry.kind == "tied" and entry.name not in got:
            continue
        if entry.name not in got:
            raise CheckpointError(f"{source}: key {entry.name!r} missing (a Llama Think checkpoint of this config "
                                  f"has it; is the file of another model?)")
        want = masks[entry.role].shape if entry.kind == "buffer" else _torch_shape(entry, ours)
        if got[entry.name] != tuple(want):
            raise CheckpointError(f"{source}: {entry.name} has shape {got[entry.name]}, the config says {tuple(want)}")
    extra = sorted(set(got) - {e.name for e in entries(cfg)})
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} key(s) no Llama Think layer has, e.g. {extra[0]!r}")


def params_from_state_dict(state_dict: dict, cfg: HybridConfig, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Flat ``{jaxlm path: array}`` of the parameters in an upstream ``state_dict`` (buffers left out)."""
    tensors = {strip_prefixes(k): np.asarray(v) for k, v in state_dict.items()}
    check_keys({k: v.shape for k, v in tensors.items()}, cfg, source)
    shapes = param_shapes(cfg)
    flat = {}
    for entry in entries(cfg):
        if entry.kind == "param":
            flat.update(to_flax(entry, tensors[entry.name], shapes))
        elif entry.kind == "tied" and entry.name in tensors:
            if not np.array_equal(tensors[entry.name], tensors["tok_embeddings.weight"]):
                raise CheckpointError(f"{source}: output.weight differs from tok_embeddings.weight; Llama Think ties "
                                      "them (a checkpoint with an untied head is not this model)")
    return flat


def state_dict_from_params(flat: dict, cfg: HybridConfig, buffers: dict | None = None) -> dict[str, np.ndarray]:
    """The upstream ``state_dict`` (no prefix) of jaxlm parameters: ``output.weight`` the same array as
    the embedding, mask buffers from ``buffers`` (stripped key -> array) where given, else recomputed."""
    flat = {k: np.asarray(v) for k, v in flat.items()}
    buffers = {strip_prefixes(k): v for k, v in (buffers or {}).items()}
    masks = mask_buffers(cfg)
    out = {}
    for entry in entries(cfg):
        if entry.kind == "param":
            out[entry.name] = to_torch(entry, flat)
        elif entry.kind == "tied":
            out[entry.name] = out["tok_embeddings.weight"]
        else:
            out[entry.name] = buffers.get(entry.name, masks[entry.role])
    return out


# ----------------------------------------------------------------------------- the config


def claim(shapes: dict[str, tuple], fields: dict) -> tuple[float, str]:
    """How surely these keys are Llama Think's: its own keys (GDN, CSA, hyper-connections) decide."""
    own = match_fraction(shapes, _OWN)
    known = match_fraction(shapes, _OWN + _SHARED)
    if own == 0.0:
        return 0.0, "no Gated DeltaNet, CSA or hyper-connection keys"
    score = known if "layer_types" in fields or own > 0.05 else known / 2
    return score, f"{known:.0%} of the keys are Llama Think's ({own:.0%} GDN/CSA/hyper-connection keys)"


def _layer_types_from_keys(shapes: dict[str, tuple]) -> tuple[str, ...]:
    kinds = {}
    for name in map(strip_prefixes, shapes):
        parts = name.split(".")
        if parts[0] == "layers" and len(parts) > 3 and parts[2] == "attention":
            i = int(parts[1])
            if parts[3] == "in_proj_qkv":
                kinds[i] = "linear"
            elif parts[3] == "compress_k":
                kinds[i] = "csa"
            elif parts[3] == "wq":
                kinds.setdefault(i, "full")
    return tuple(kinds[i] for i in sorted(kinds))


def _dims_from_shapes(stripped: dict[str, tuple], fields: dict) -> dict:
    """The sizes the tensors fix (the GDN key heads taken equal to the value heads unless given)."""
    dims = {}
    find = lambda pattern: next((shape for name, shape in stripped.items() if re.fullmatch(pattern, name)), None)
    embed = stripped.get("tok_embeddings.weight")
    if embed is not None:
        dims["vocab_size"], dims["dim"] = int(embed[0]), int(embed[1])
    kinds = _layer_types_from_keys(stripped)
    if kinds:
        dims["layer_types"], dims["n_layers"] = kinds, len(kinds)
    q_norm, wq, wk = (find(rf"layers\.\d+\.attention\.{n}\.weight") for n in ("q_norm", "wq", "wk"))
    if q_norm and wq and wk:
        d = int(q_norm[0])
        dims["n_heads"], dims["n_kv_heads"] = int(wq[0]) // (2 * d), int(wk[0]) // d
        dim = fields.get("dim", dims.get("dim"))
        dims["head_dim"] = None if dim is not None and dim // dims["n_heads"] == d else d
    w1 = find(r"layers\.\d+\.feed_forward\.w1\.weight")
    if w1 and "dim" in dims:
        dims["hidden_dim"] = None if HybridConfig(dim=dims["dim"], hidden_dim=None).ffn_dim == w1[0] else int(w1[0])
    a_log, norm, qkv, conv = (find(rf"layers\.\d+\.attention\.{n}") for n in
                              ("A_log", "norm\\.weight", "in_proj_qkv\\.weight", "conv1d\\.weight"))
    if a_log and norm and qkv and conv:
        hv, dv = int(a_log[0]), int(norm[0])
        hk = int(fields.get("linear_num_key_heads", hv))
        dims.update(linear_num_value_heads=hv, linear_value_head_dim=dv, linear_num_key_heads=hk,
                    linear_key_head_dim=(int(qkv[0]) - hv * dv) // (2 * hk), linear_conv_kernel_dim=int(conv[-1]))
    mask = find(r"layers\.\d+\.attention\.local_mask")
    if mask:
        dims["max_seq_len"] = int(mask[-1])
    return dims


def config_from_fields(fields: dict, shapes: dict[str, tuple], source: str = "checkpoint", overrides=()):
    """``(HybridConfig, ConfigReport)`` from a checkpoint's ``model_args`` and its tensor shapes.

    A missing field is read off the tensors where they fix it (``dim``, ``vocab_size``,
    ``layer_types``) or takes the ModelArgs default; a layer kind this code does not know, or a field
    the tensors contradict, is one line of :class:`CheckpointError`.
    """
    fields = dict(fields or {})
    report = ConfigReport()
    kinds = fields.get("layer_types")
    if kinds is not None:
        unknown = [k for k in kinds if k not in LAYER_KINDS]
        if unknown:
            raise CheckpointError(f"{source}: model_args layer_types names layer kind {unknown[0]!r}, which jaxlm's "
                                  f"Llama Think does not implement (known: {', '.join(LAYER_KINDS)})")
    stripped = {strip_prefixes(k): tuple(v) for k, v in shapes.items()}
    ours = {f.name for f in dataclasses.fields(HybridConfig)}
    values = {k: v for k, v in fields.items() if k in ours}
    report.ignored = {k: v for k, v in fields.items() if k not in ours}
    for name, size in _dims_from_shapes(stripped, values).items():
        if name not in values:
            values[name] = report.inferred[name] = size
    cfg = build_config(HybridConfig, values, source, overrides, report)
    if stripped:
        check_keys(stripped, cfg, source)
    return cfg, report


def fields_for_torch(cfg: HybridConfig, original: dict | None = None, report=None) -> dict:
    """The ``model_args`` written into a ``.pt``: ``original``'s keys and order with ``cfg``'s values
    where they differ (unchanged values keep their type and form), or train.py's 31 keys."""
    values = dataclasses.asdict(cfg)
    values["layer_types"] = tuple(cfg.layer_types)
    if original is None:
        out = {name: values[name] for name in MODEL_ARGS}
        defaults = HybridConfig()
        out.update({name: values[name] for name in OPTIONAL_ARGS if values[name] != getattr(defaults, name)})
        return out
    out = {}
    for name, value in original.items():
        if name in JAXLM_ONLY:
            continue
        if name not in values:
            out[name] = value
            continue
        mine = values[name]
        same = (tuple(value) == mine) if name == "layer_types" and value is not None else value == mine
        out[name] = value if same else mine
    return out
