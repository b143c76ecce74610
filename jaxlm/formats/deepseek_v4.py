"""DeepSeek-V4 (nanowhale) in the Hugging Face layout: safetensors keys <-> jaxlm parameter paths,
``config.json`` <-> :class:`~jaxlm.models.deepseek_v4.DeepSeekV4Config`.

Keys are those of upstream's ``modeling_deepseek_v4.py`` (``fixtures/nanowhale/SPEC.md`` section
2), in its module order. Linear weights are PyTorch ``(out, in)`` and become Flax ``(in, out)``
kernels here; the per-expert ``ffn.experts.{e}.w{1,2,3}.weight`` are stacked on a leading
``experts`` axis (a "stack" entry per key: the key's ``experts.{e}`` is its row of the stack).
``attn_sink`` and ``ffn.gate.bias`` are model variables that training does not update; they are
read and written like the parameters. The RoPE table ``freqs_cis`` is never in the file.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxlm.errors import CheckpointError
from jaxlm.formats import keymap
from jaxlm.formats.keymap import ConfigReport, KeyEntry, strip_prefixes
from jaxlm.models.deepseek_v4 import DeepSeekV4Config

FAMILY = "deepseek_v4"
DISPLAY = "DeepSeek-V4"

# config.json fields that the architecture reads, with its names (the config's own fields).
_HF_FIELDS = tuple(f.name for f in dataclasses.fields(DeepSeekV4Config)
                   if f.name not in ("moe_dispatch", "moe_capacity_factor", "stream_dtype"))


# ----------------------------------------------------------------------------- keys


def _param(name: str, target: str, transpose: bool, role: str) -> KeyEntry:
    return keymap.param(name, target, role=role, transpose=transpose)


def entries(cfg: DeepSeekV4Config) -> list[KeyEntry]:
    """Every key of the file, in upstream's module (``state_dict``) order."""
    out = [_param("model.hc_head_fn", "hc_head/fn", True, "hc_head_fn"),
           _param("model.hc_head_base", "hc_head/base", False, "hc_head_base"),
           _param("model.hc_head_scale", "hc_head/scale", False, "hc_head_scale"),
           _param("model.embed_tokens.weight", "embed/embedding", False, "embed")]
    for i in range(cfg.num_hidden_layers):
        key, path = f"model.layers.{i}.", f"layers/{i}/"
        for sub in ("attn", "ffn"):
            out.append(_param(f"{key}hc_{sub}_fn", f"{path}hc_{sub}/fn", True, f"hc_{sub}_fn"))
        for sub in ("attn", "ffn"):
            out.append(_param(f"{key}hc_{sub}_base", f"{path}hc_{sub}/base", False, f"hc_{sub}_base"))
        for sub in ("attn", "ffn"):
            out.append(_param(f"{key}hc_{sub}_scale", f"{path}hc_{sub}/scale", False, f"hc_{sub}_scale"))
        out.append(_param(f"{key}attn.attn_sink", f"{path}attn/attn_sink", False, "attn_sink (unused)"))
        for name, transpose in (("wq_a", True), ("q_norm", False), ("wq_b", True), ("wkv", True),
                                ("kv_norm", False), ("wo_a", True), ("wo_b", True)):
            leaf = "kernel" if transpose else "w"
            out.append(_param(f"{key}attn.{name}.weight", f"{path}attn/{name}/{leaf}", transpose, name))
        out.append(_param(f"{key}ffn.gate.weight", f"{path}ffn/gate/kernel", True, "gate"))
        if cfg.has_router_bias(i):
            out.append(_param(f"{key}ffn.gate.bias", f"{path}ffn/gate/bias", False, "gate bias"))
        stacks = {w: keymap.stack([f"{key}ffn.experts.{e}.{w}.weight" for e in range(cfg.n_routed_experts)],
                                  f"{path}ffn/experts/{w}", role=f"expert {w}")
                  for w in ("w1", "w2", "w3")}
        for e in range(cfg.n_routed_experts):   # module order: expert by expert
            out += [stacks[w][e] for w in ("w1", "w2", "w3")]
        for w, ours in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            out.append(_param(f"{key}ffn.shared_expert.{w}.weight", f"{path}ffn/shared_expert/{ours}/kernel", True,
                              f"shared expert {w}"))
        out.append(_param(f"{key}attn_norm.weight", f"{path}attn_norm/w", False, "attn_norm"))
        out.append(_param(f"{key}ffn_norm.weight", f"{path}ffn_norm/w", False, "ffn_norm"))
    out.append(_param("model.norm.weight", "norm/w", False, "final_norm"))
    out.append(_param("lm_head.weight", "lm_head", False, "head"))
    return out


def expected_shapes(cfg: DeepSeekV4Config) -> dict[str, tuple]:
    """The PyTorch shape of every key."""
    V, D, n, d = cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    H, E, F, G, R = cfg.hc_mult, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.o_groups, cfg.o_lora_rank
    rows = (2 + H) * H
    by_role = {
        "hc_head_fn": (H, H * D), "hc_head_base": (H,), "hc_head_scale": (1,), "embed": (V, D),
        "hc_attn_fn": (rows, H * D), "hc_ffn_fn": (rows, H * D), "hc_attn_base": (rows,), "hc_ffn_base": (rows,),
        "hc_attn_scale": (3,), "hc_ffn_scale": (3,), "attn_sink (unused)": (n,),
        "wq_a": (cfg.q_lora_rank, D), "q_norm": (cfg.q_lora_rank,), "wq_b": (n * d, cfg.q_lora_rank),
        "wkv": (d, D), "kv_norm": (d,), "wo_a": (G * R, n * d // G), "wo_b": (D, G * R),
        "gate": (E, D), "gate bias": (E,), "expert w1": (F, D), "expert w3": (F, D), "expert w2": (D, F),
        "shared expert w1": (F, D), "shared expert w3": (F, D), "shared expert w2": (D, F),
        "attn_norm": (D,), "ffn_norm": (D,), "final_norm": (D,), "head": (V, D),
    }
    return {entry.name: by_role[entry.role] for entry in entries(cfg)}


def _stripped(tensors: dict) -> dict:
    return {strip_prefixes(name): value for name, value in tensors.items()}


def check_keys(shapes: dict[str, tuple], cfg: DeepSeekV4Config, source: str = "checkpoint") -> None:
    """One line for the first missing key, extra key or wrong shape."""
    expected = expected_shapes(cfg)
    shapes = {strip_prefixes(name): tuple(shape) for name, shape in shapes.items()}
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise CheckpointError(f"{source}: key {missing[0]} is missing ({len(missing)} missing in all); "
                              f"the file is not a complete DeepSeek-V4 checkpoint of this config")
    extra = [name for name in shapes if name not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]} {shapes[extra[0]]} ({len(extra)} extra in all); "
                              "it has no place in DeepSeek-V4 of this config")
    for name, shape in expected.items():
        if shapes[name] != tuple(shape):
            raise CheckpointError(f"{source}: {name} has shape {shapes[name]}, the config gives {tuple(shape)}")


def param_shapes(cfg: DeepSeekV4Config) -> dict[str, tuple]:
    """The jaxlm (Flax layout) shape of every variable the file holds."""
    torch_shapes, out = expected_shapes(cfg), {}
    for entry in entries(cfg):
        shape = torch_shapes[entry.name][::-1] if entry.transpose else torch_shapes[entry.name]
        out[entry.targets[0]] = (entry.count, *shape) if entry.kind == "stack" else tuple(shape)
    return out


def params_from_state_dict(tensors: dict, cfg: DeepSeekV4Config, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """``{jaxlm path: array}`` (Flax layout, the file's dtype) from the file's tensors."""
    tensors = _stripped(tensors)
    check_keys({name: np.shape(t) for name, t in tensors.items()}, cfg, source)
    assembler = keymap.Assembler(param_shapes(cfg))
    for entry in entries(cfg):
        assembler.add(entry, np.asarray(tensors[entry.name]))
    return {path: np.ascontiguousarray(a) for path, a in assembler.result().items()}


def state_dict_from_params(flat: dict, cfg: DeepSeekV4Config) -> dict[str, np.ndarray]:
    """The file's tensors (PyTorch layout, the params' dtype), in upstream's module order."""
    flat = {path: np.asarray(a) for path, a in flat.items()}
    return {entry.name: keymap.to_torch(entry, flat) for entry in entries(cfg)}


# ----------------------------------------------------------------------------- config.json


def _dims_from_shapes(shapes: dict[str, tuple]) -> dict[str, int]:
    """What the tensors fix, by field name (only what the keys present say)."""
    shapes = {strip_prefixes(name): tuple(shape) for name, shape in shapes.items()}
    dims: dict[str, int] = {}
    get = shapes.get
    if get("model.embed_tokens.weight"):
        dims["vocab_size"], dims["hidden_size"] = get("model.embed_tokens.weight")
    layers = {int(m[1]) for name in shapes for m in [re.match(r"model\.layers\.(\d+)\.", name)] if m}
    if layers:
        dims["num_hidden_layers"] = max(layers) + 1
    if get("model.hc_head_base"):
        dims["hc_mult"] = get("model.hc_head_base")[0]
    a = "model.layers.0."
    if get(a + "attn.wq_a.weight"):
        dims["q_lora_rank"] = get(a + "attn.wq_a.weight")[0]
    if get(a + "attn.wkv.weight"):
        dims["head_dim"] = get(a + "attn.wkv.weight")[0]
    if get(a + "attn.attn_sink"):
        dims["num_attention_heads"] = get(a + "attn.attn_sink")[0]
    if get(a + "attn.wo_a.weight") and "num_attention_heads" in dims and "head_dim" in dims:
        out_rows, group_in = get(a + "attn.wo_a.weight")
        groups = dims["num_attention_heads"] * dims["head_dim"] // max(group_in, 1)
        dims["o_groups"], dims["o_lora_rank"] = groups, out_rows // max(groups, 1)
    if get(a + "ffn.gate.weight"):
        dims["n_routed_experts"] = get(a + "ffn.gate.weight")[0]
    if get(a + "ffn.shared_expert.w1.weight"):
        dims["moe_intermediate_size"] = get(a + "ffn.shared_expert.w1.weight")[0]
    if get(a + "ffn.gate.weight"):   # hash layers (the first ones) have no router bias
        hash_layers = 0
        while hash_layers in layers and f"model.layers.{hash_layers}.ffn.gate.bias" not in shapes:
            hash_layers += 1
        dims["num_hash_layers"] = hash_layers
    return dims


def config_from_fields(fields: dict, shapes: dict[str, tuple], source: str = "checkpoint",
                       overrides=()) -> tuple[DeepSeekV4Config, ConfigReport]:
    """``(config, report)`` from a ``config.json``'s fields and the tensor shapes, ``FIELD=VALUE``
    overrides applied; a field that contradicts the tensors is an error naming it; one the file
    lacks is read off the tensors (or takes upstream's default)."""
    fields = dict(fields or {})
    report = ConfigReport()
    values = {name: fields[name] for name in _HF_FIELDS if fields.get(name) is not None}
    report.ignored = {k: v for k, v in fields.items() if k not in values}
    if "rope_theta" not in values and isinstance(fields.get("rope_parameters"), dict):
        theta = fields["rope_parameters"].get("rope_theta")
        if theta is not None:
            values["rope_theta"] = report.inferred["rope_theta"] = theta
    for name, value in _dims_from_shapes(shapes).items():
        if name not in values:
            values[name] = report.inferred[name] = value
        elif values[name] != value:
            raise CheckpointError(f"{source}: config.json {name} = {values[name]!r} but the tensors say {value}; "
                                  f"fix {name} in config.json")
    cfg = keymap.build_config(DeepSeekV4Config, values, source, overrides, report)
    check_keys(shapes, cfg, source)
    return cfg, report


# config.json fields upstream writes that the architecture does not read, at upstream's values
# for a model jaxlm made (nanowhale-100m's config.json, ``fixtures/nanowhale/full_config.json``).
def _upstream_extras(cfg: DeepSeekV4Config) -> dict:
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "compress_ratios": [0] * (cfg.num_hidden_layers + 1), "compress_rope_theta": 160000.0, "dtype": "float32",
        "hidden_act": "silu", "index_head_dim": 128, "index_n_heads": 64, "index_topk": 512,
        "initializer_range": 0.02, "model_type": "deepseek_v4", "n_shared_experts": 1,
        "nope_head_dim": cfg.head_dim - cfg.qk_rope_head_dim, "norm_topk_prob": True, "num_key_value_heads": 1,
        "num_nextn_predict_layers": 1, "pad_token_id": None, "sliding_window": 128, "topk_method": "noaux_tc",
        "use_cache": True,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "auto_map": {"AutoConfig": "configuration_deepseek_v4.DeepseekV4Config",
                     "AutoModelForCausalLM": "modeling_deepseek_v4.DeepseekV4ForCausalLM"},
    }


def fields_for_torch(cfg: DeepSeekV4Config, original: dict | None = None, report=None) -> dict:
    """The ``config.json`` to write: every original field kept (those of the config updated), or
    upstream's full set for a model that did not come from a file."""
    ours = {name: getattr(cfg, name) for name in _HF_FIELDS}
    if original is None:
        out = {**_upstream_extras(cfg), **ours}
        return dict(sorted(out.items(), key=lambda item: (item[0] == "auto_map", item[0])))
    out = {}
    for name, value in original.items():
        out[name] = ours[name] if name in ours and value is not None and value != ours[name] else value
    for name, value in ours.items():   # a field the original lacked but the config set apart from the default
        if name not in out and value != getattr(DeepSeekV4Config, name):
            out[name] = value
    if isinstance(out.get("rope_parameters"), dict):
        out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": cfg.rope_theta}
    return out


def claim(shapes: dict[str, tuple], fields: dict) -> tuple[float, str]:
    """How surely (0..1) these keys and fields are a nanowhale DeepSeek-V4 checkpoint, and why."""
    names = {strip_prefixes(name) for name in shapes}
    marks = [mark for mark in ("model.hc_head_fn", "model.layers.0.attn.wq_a.weight", "model.layers.0.attn.wo_a.weight",
                               "model.layers.0.ffn.shared_expert.w1.weight", "model.layers.0.hc_attn_fn")
             if mark in names]
    typed = (fields or {}).get("model_type") == FAMILY
    if not marks:
        return (0.3 if typed else 0.0), ("config.json says deepseek_v4 but no key has its names" if typed
                                          else "no DeepSeek-V4 (nanowhale) key names")
    score = 0.5 + 0.4 * len(marks) / 5 + (0.1 if typed else 0.0)
    return score, (f"keys {', '.join(marks)}" + (" and model_type deepseek_v4" if typed else ""))
