"""ToyLM in PyTorch: state_dict key names <-> jaxlm parameter paths, and the ``cfg`` <-> ToyLMConfig.

The upstream ``model.py`` that fixes the key names is not public, so names are recognised by
role rather than by one table. After the ``_orig_mod.`` (torch.compile) and ``module.``
(DDP) prefixes are stripped, a key is read as a container (``model.layers.3.``,
``layers.3.``, ``transformer.h.3.``, ``blocks.3.``), a sub-module (``self_attn`` /
``attention`` / ``attn``, ``mlp`` / ``feed_forward``) and a leaf whose name says its role,
which covers the three families this architecture is written in:

===============  ==============================  ===========================  ================================
role             Hugging Face                    Meta-Llama                   nanoGPT
===============  ==============================  ===========================  ================================
embedding        model.embed_tokens              tok_embeddings               transformer.wte
q, k, v, o       self_attn.{q,k,v,o}_proj        attention.w{q,k,v,o}         attn.c_attn (fused q|k|v), c_proj
gate, up, down   mlp.{gate,up,down}_proj         feed_forward.w1, w3, w2      mlp.c_fc (gate, or fused gate|up), c_proj
norms            input_layernorm,                attention_norm, ffn_norm,    ln_1, ln_2, ln_f
                 post_attention_layernorm, norm  norm
tied head        lm_head                         output                       lm_head
===============  ==============================  ===========================  ================================

A fused matrix (q|k|v, or gate|up) is recognised by its shape and split along the PyTorch
output rows in that order. A head equal to the embedding is dropped (ToyLM ties them); a head
that differs is an error. RoPE / mask buffers are kept verbatim for the way back. Anything
else is reported with its name and shape; a user key map (``{their_name_or_regex: our_path}``)
resolves it. The entries this module makes are transposed, split and checked by the generic
machinery in ``keymap.py``; this module is ToyLM's side of its naming protocol (``claim``,
``config_from_fields``, ``entries``, ``fields_for_torch``, ``plan``, ``hints``, the conventions).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from jaxlm.errors import CheckpointError
from jaxlm.formats import keymap
from jaxlm.formats.keymap import ConfigReport, KeyEntry, Plan, is_buffer, strip_prefixes
from jaxlm.models.toylm import ToyLMConfig

FAMILY = "toylm"

# ----------------------------------------------------------------------------- roles

_LEAF_WEIGHT = r"(?:weight|w|scale|g|gamma)"
# Any wrapper prefix (model., transformer., net., ...) before the numbered container.
_BLOCK = re.compile(r"^(?:[A-Za-z_]\w*\.)*?(?:layers|h|blocks|block|layer)\.(?P<layer>\d+)\.(?P<rest>.+)$")
_ATTN = r"(?:self_attn|attn|attention|self_attention|sa|mha)"
_MLP = r"(?:mlp|feed_forward|ffn|ff|feedforward|mlp_block|ffwd)"

# Order matters: the first pattern that matches names the role.
BLOCK_ROLES = [
    (rf"{_ATTN}\.(?:q_proj|wq|query|q|to_q|c_q|q_lin)\.weight", "q"),
    (rf"{_ATTN}\.(?:k_proj|wk|key|k|to_k|c_k|k_lin)\.weight", "k"),
    (rf"{_ATTN}\.(?:v_proj|wv|value|v|to_v|c_v|v_lin)\.weight", "v"),
    (rf"{_ATTN}\.(?:o_proj|wo|out_proj|c_proj|proj|out|dense|to_out|c_o|o|o_lin)\.weight", "o"),
    (rf"{_ATTN}\.(?:qkv_proj|wqkv|c_attn|qkv|in_proj|Wqkv|qkv_lin)\.weight|{_ATTN}\.in_proj_weight", "qkv"),
    (rf"{_MLP}\.(?:gate_up_proj|w13|w12|gate_up|c_fc12|fc12|wi)\.weight", "gate_up"),
    (rf"{_MLP}\.(?:gate_proj|w1|c_fc|fc1|gate|wi_0|w_gate|c_gate|fc_gate|gate_lin)\.weight", "gate?"),
    (rf"{_MLP}\.(?:up_proj|w3|c_fc2|fc3|up|wi_1|w_up|c_up|fc_up|up_lin)\.weight", "up"),
    (rf"{_MLP}\.(?:down_proj|w2|c_proj|fc2|down|wo|w_down|c_down|proj|fc_out|down_lin)\.weight", "down"),
    (rf"(?:input_layernorm|attention_norm|ln_1|attn_norm|norm1|ln1|pre_attn_norm|attn_ln|norm_1|rms_1|"
     rf"ln_attn|attention_layernorm|sa_norm|attn_rmsnorm)\.{_LEAF_WEIGHT}", "attn_norm"),
    (rf"(?:post_attention_layernorm|ffn_norm|ln_2|mlp_norm|norm2|ln2|pre_mlp_norm|ffn_ln|mlp_ln|norm_2|rms_2|"
     rf"ln_mlp|ff_norm|pre_ffn_norm|mlp_rmsnorm)\.{_LEAF_WEIGHT}", "mlp_norm"),
]
BLOCK_ROLES = [(re.compile(pattern + "$"), role) for pattern, role in BLOCK_ROLES]

_TOP = r"^(?:[A-Za-z_]\w*\.)*?"
TOP_ROLES = [
    (re.compile(_TOP + r"(?:embed_tokens|tok_embeddings|wte|embed|embedding|embeddings|tok_emb|token_embedding|"
                       r"token_emb|emb|word_embeddings)\.(?:weight|embedding)$"), "embed"),
    (re.compile(_TOP + rf"(?:norm|ln_f|final_norm|norm_f|final_layernorm|ln_out|final_ln|norm_out)\.{_LEAF_WEIGHT}$"),
     "final_norm"),
    (re.compile(_TOP + r"(?:lm_head|output|head|out_head|unembed|output_projection)\.weight$"), "head"),
]
def role_of(name: str, ndim: int) -> tuple[str, int | None] | None:
    """(role, layer) of a stripped key, or None. Roles: see BLOCK_ROLES / TOP_ROLES, "buffer"."""
    block = _BLOCK.match(name)
    if block:
        for pattern, role in BLOCK_ROLES:
            if pattern.match(block["rest"]):
                return role, int(block["layer"])
    else:  # model-level names only outside the blocks (a block's own "norm" is not the final norm)
        for pattern, role in TOP_ROLES:
            if pattern.match(name):
                return role, None
    if is_buffer(name, ndim):
        return "buffer", None
    return None


def role_targets(role: str, layer: int | None) -> list[str]:
    """jaxlm parameter paths of a role, in the order of the PyTorch rows of a fused matrix."""
    b = f"blocks/{layer}"
    return {
        "embed": ["embed/embedding"], "final_norm": ["final_norm/w"],
        "q": [f"{b}/attn/q/kernel"], "k": [f"{b}/attn/k/kernel"], "v": [f"{b}/attn/v/kernel"],
        "o": [f"{b}/attn/o/kernel"],
        "qkv": [f"{b}/attn/q/kernel", f"{b}/attn/k/kernel", f"{b}/attn/v/kernel"],
        "gate": [f"{b}/mlp/gate/kernel"], "up": [f"{b}/mlp/up/kernel"], "down": [f"{b}/mlp/down/kernel"],
        "gate_up": [f"{b}/mlp/gate/kernel", f"{b}/mlp/up/kernel"],
        "attn_norm": [f"{b}/attn_norm/w"], "mlp_norm": [f"{b}/mlp_norm/w"],
    }[role]


# Names written for a checkpoint that did not come from PyTorch (``to-torch --naming``).
NAMINGS = {
    "hf": {
        "embed": "model.embed_tokens.weight",
        "q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
        "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
        "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
        "down": "model.layers.{i}.mlp.down_proj.weight",
        "attn_norm": "model.layers.{i}.input_layernorm.weight",
        "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "final_norm": "model.norm.weight",
    },
    "meta": {
        "embed": "tok_embeddings.weight",
        "q": "layers.{i}.attention.wq.weight", "k": "layers.{i}.attention.wk.weight",
        "v": "layers.{i}.attention.wv.weight", "o": "layers.{i}.attention.wo.weight",
        "gate": "layers.{i}.feed_forward.w1.weight", "up": "layers.{i}.feed_forward.w3.weight",
        "down": "layers.{i}.feed_forward.w2.weight",
        "attn_norm": "layers.{i}.attention_norm.weight", "mlp_norm": "layers.{i}.ffn_norm.weight",
        "final_norm": "norm.weight",
    },
    "nanogpt": {
        "embed": "transformer.wte.weight",
        "qkv": "transformer.h.{i}.attn.c_attn.weight", "o": "transformer.h.{i}.attn.c_proj.weight",
        "gate_up": "transformer.h.{i}.mlp.c_fc.weight", "down": "transformer.h.{i}.mlp.c_proj.weight",
        "attn_norm": "transformer.h.{i}.ln_1.weight", "mlp_norm": "transformer.h.{i}.ln_2.weight",
        "final_norm": "transformer.ln_f.weight",
        "head": "lm_head.weight",  # nanoGPT ties by sharing the tensor, so both keys are saved
    },
}
# The order in which a PyTorch module registers them (= state_dict order).
BLOCK_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "attn_norm", "mlp_norm")


def family_of(names) -> str:
    """Which naming family most keys follow: hf, meta, nanogpt or custom."""
    votes = {"hf": 0, "meta": 0, "nanogpt": 0}
    for name in names:
        if re.match(r"model\.(layers\.\d+\.(self_attn|mlp)\.|embed_tokens)", name):
            votes["hf"] += 1
        elif re.match(r"(layers\.\d+\.(attention|feed_forward)\.|tok_embeddings)", name):
            votes["meta"] += 1
        elif re.match(r"transformer\.(h\.\d+\.|wte)", name):
            votes["nanogpt"] += 1
    best = max(votes, key=votes.get)
    return best if votes[best] else "custom"


# ----------------------------------------------------------------------------- the plan


def plan_keys(shapes: dict[str, tuple], key_map: dict | None = None) -> Plan:
    """Assign every key a role (before the config is known: fused-or-not gate by its layer's keys)."""
    key_map = key_map or {}
    stripped = {name: strip_prefixes(name) for name in shapes}
    entries, unmatched, notes = [], [], []
    roles = {}
    for name, shape in shapes.items():
        matched, value = keymap.user_targets(name, stripped[name], key_map)
        if matched:
            entries.append(keymap.key_map_entry(name, value))
            continue
        found = role_of(stripped[name], len(shape))
        if found is None:
            unmatched.append((name, tuple(shape)))
            entries.append(None)
            continue
        roles[name] = found
        entries.append(KeyEntry(name, "pending", role=found[0]))
    _resolve_mlp_roles(roles, shapes, notes)
    if not any(role == "embed" for role, _ in roles.values()):
        head = next((n for n, (role, _) in roles.items() if role == "head"), None)
        if head is not None:  # only the (tied) head was saved: it is the embedding
            roles[head] = ("embed", None)
            notes.append(f"no embedding key: the tied head {head} is taken as the embedding")
    out = []
    for entry in entries:
        if entry is None or entry.kind != "pending":
            if entry is not None:
                out.append(entry)
            continue
        role, layer = roles[entry.name]
        if role == "buffer":
            out.append(KeyEntry(entry.name, "buffer", role="buffer"))
        elif role == "head":
            out.append(KeyEntry(entry.name, "tied", ["embed/embedding"], role="head"))
        else:
            targets = role_targets(role, layer)
            out.append(KeyEntry(entry.name, "param", targets, targets[0].endswith("/kernel"), role=role))
    prefixes = sorted({n[: len(n) - len(s)] for n, s in stripped.items() if n != s})
    if prefixes:
        notes.append("stripped prefixes: " + ", ".join(repr(p) for p in prefixes))
    family = family_of(stripped.values())
    fused = sorted({e.role for e in out if e.role in ("qkv", "gate_up")})
    if fused:
        notes.append("fused matrices split: " + ", ".join({"qkv": "q|k|v", "gate_up": "gate|up"}[f] for f in fused))
    return Plan(out, unmatched, family, notes)


MLP_ROLES = ("gate?", "gate", "up", "down", "gate_up")


def _resolve_mlp_roles(roles: dict, shapes: dict, notes: list[str]) -> None:
    """Per layer: "gate?" (c_fc, w1, fc1) is fused gate|up unless the layer has a separate up matrix;
    and when the names give an impossible assignment (nanoGPT-SwiGLU's w1/w2/c_proj), the shapes
    decide: down is the (dim, hidden) matrix, the gate-named (or first) of the others is the gate."""
    embed = next((n for n, (role, _) in roles.items() if role == "embed"), None)
    dim = shapes[embed][1] if embed is not None and len(shapes[embed]) == 2 else None
    by_layer: dict[int, list[str]] = {}
    for name, (role, layer) in roles.items():
        if role in MLP_ROLES:
            by_layer.setdefault(layer, []).append(name)
    for layer, names in by_layer.items():
        has_up = any(roles[n][0] == "up" for n in names)
        resolved = {n: ("gate" if has_up else "gate_up") if roles[n][0] == "gate?" else roles[n][0] for n in names}
        fits = lambda n, r: dim is None or (shapes[n][0] == dim if r == "down" else shapes[n][-1] == dim)
        if (len(names) == 3 and dim is not None
                and (sorted(resolved.values()) != ["down", "gate", "up"] or not all(fits(n, r) for n, r in resolved.items()))):
            downs = [n for n in names if shapes[n][0] == dim and shapes[n][-1] != dim]
            ins = [n for n in names if shapes[n][-1] == dim and shapes[n][0] != dim]
            if len(downs) == 1 and len(ins) == 2:
                gate = next((n for n in ins if roles[n][0] in ("gate", "gate?")), ins[0])
                up = ins[1] if gate == ins[0] else ins[0]
                resolved = {downs[0]: "down", gate: "gate", up: "up"}
                notes.append(f"layer {layer}: MLP roles read from the shapes: gate {gate}, up {up}, down {downs[0]}")
        for name, role in resolved.items():
            roles[name] = (role, layer)


def dims_from_tensors(plan: Plan, shapes: dict[str, tuple]) -> dict[str, int]:
    """What the tensors say about the shape fields (vocab, dim, layers, hidden, attention width)."""
    dims: dict[str, int] = {}
    layers = set()
    for entry in plan.entries:
        if entry.kind != "param" or entry.role == "key map":
            continue
        shape = shapes[entry.name]
        if entry.role == "embed" and len(shape) == 2:
            dims["vocab_size"], dims["dim"] = shape
        if entry.targets[0].startswith("blocks/"):
            layers.add(int(entry.targets[0].split("/")[1]))
        if entry.role in ("gate", "up") and len(shape) == 2:
            dims["mlp_hidden"] = shape[0]
        if entry.role == "gate_up" and len(shape) == 2:
            dims["mlp_hidden"] = shape[0] // 2
        if entry.role == "q" and len(shape) == 2:
            dims["inner"] = shape[0]
        if entry.role == "qkv" and len(shape) == 2:
            dims["inner"] = shape[0] // 3
    if layers:
        dims["n_layers"] = max(layers) + 1
    return dims


def rope_theta_from_buffers(plan: Plan, state_dict: dict) -> tuple[float, str] | None:
    """RoPE theta read off a saved ``inv_freq`` (1-D) or ``freqs_cis`` (complex, [T, K/2]) buffer."""
    for entry in plan.entries:
        if entry.kind != "buffer":
            continue
        array = np.asarray(state_dict[entry.name])
        if entry.name.endswith("inv_freq") and array.ndim == 1 and array.size > 1:
            inv_freq = array.astype(np.float64)
        elif entry.name.endswith("freqs_cis") and array.ndim == 2 and np.iscomplexobj(array) and array.shape[0] > 1:
            inv_freq = np.angle(array[1]).astype(np.float64)
        else:
            continue
        if not np.all(inv_freq > 0):
            continue
        # inv_freq[j] = theta ** (-2j / K): the slope of log inv_freq over j is -(2/K) log theta.
        j = np.arange(inv_freq.size)
        slope = np.polyfit(j, np.log(inv_freq), 1)[0]
        theta = float(np.exp(-slope * inv_freq.size))
        for nice in (10_000.0, 100_000.0, 500_000.0, 1_000_000.0, 10_000_000.0):
            if abs(theta / nice - 1) < 0.02:
                theta = nice
        return theta, entry.name
    return None


def entries(cfg: ToyLMConfig, naming: str = "hf") -> list[KeyEntry]:
    """The state_dict of ``tools/torch_port``'s ToyLM (``hf``) or of another family's naming."""
    try:
        names = NAMINGS[naming]
    except KeyError:
        raise CheckpointError(f"unknown naming {naming!r}; choose one of {', '.join(NAMINGS)}") from None

    def entry(role, layer=None):
        name = names[role].format(i=layer)
        targets = role_targets(role, layer)
        return KeyEntry(name, "param", targets, targets[0].endswith("/kernel"), role=role)

    entries = [entry("embed")]
    for i in range(cfg.n_layers):
        entries += [entry(role, i) for role in BLOCK_ORDER if role in names]
    entries.append(entry("final_norm"))
    if "head" in names:
        entries.append(KeyEntry(names["head"], "tied", ["embed/embedding"], role="head"))
    return entries


# ----------------------------------------------------------------------------- the config

# The upstream Config's fields, in the order the card's checkpoints list them; the ones jaxlm
# has no use for keep these values when a jaxlm-trained model is written for PyTorch.
CARD_FIELDS = {
    "vocab_size": None, "dim": None, "n_layers": None, "n_heads": None, "head_dim": None, "mlp_hidden": None,
    "max_seq_len": None, "attention_pattern": None, "sliding_window": None,
    "engram_enabled": False, "engram_slots": 512, "engram_inject_layer": 2, "optimizer": "muon",
    "lm_head_logit_cap": None, "z_loss_weight": None, "lr_schedule": "wsd",
}
# jaxlm fields the upstream Config does not have (the unpublished conventions).
CONVENTION_FIELDS = ("z_loss_form", "rope_theta", "rope_pairing", "sliding_parity", "window_includes_query",
                     "embed_scale", "norm_eps")
# Other spellings of ToyLMConfig fields (nanoGPT, Meta ModelArgs, Hugging Face config.json).
SYNONYMS = {
    "n_layer": "n_layers", "num_hidden_layers": "n_layers", "num_layers": "n_layers",
    "n_head": "n_heads", "num_attention_heads": "n_heads", "num_heads": "n_heads",
    "n_embd": "dim", "hidden_size": "dim", "d_model": "dim", "embed_dim": "dim",
    "intermediate_size": "mlp_hidden", "hidden_dim": "mlp_hidden", "ffn_dim": "mlp_hidden", "d_ff": "mlp_hidden",
    "block_size": "max_seq_len", "max_position_embeddings": "max_seq_len", "context_length": "max_seq_len",
    "rms_norm_eps": "norm_eps", "layer_norm_eps": "norm_eps",
    "window_size": "sliding_window", "sliding_window_size": "sliding_window",
    "final_logit_softcapping": "lm_head_logit_cap", "logit_softcap": "lm_head_logit_cap", "logit_cap": "lm_head_logit_cap",
    "z_loss": "z_loss_weight", "z_loss_coef": "z_loss_weight",
    "rope_base": "rope_theta", "rotary_base": "rope_theta",
}


def config_from_fields(fields: dict, shapes: dict[str, tuple], source: str = "checkpoint", overrides=()):
    """(ToyLMConfig, ConfigReport) from a foreign cfg's fields, the tensors' shapes and ``FIELD=VALUE`` overrides."""
    return config_from_dims(fields, dims_from_tensors(plan_keys(shapes), shapes), overrides, source)


def config_from_dims(fields: dict, dims: dict[str, int], overrides=(), source: str = "checkpoint"):
    """:func:`config_from_fields` with the shape fields the tensors imply already read (``dims_from_tensors``)."""
    ours = {f.name for f in dataclasses.fields(ToyLMConfig)}
    report = ConfigReport()
    values: dict[str, Any] = {}
    for name, value in fields.items():
        target = name if name in ours else SYNONYMS.get(name)
        if target is None or target in values and name not in ours:
            at_default = name in CARD_FIELDS and CARD_FIELDS[name] is not None and CARD_FIELDS[name] == value
            (report.at_default if at_default else report.ignored)[name] = value
            continue
        if target != name:
            report.renamed[name] = target
        if value is not None:
            values[target] = value
    if fields.get("engram_enabled"):
        raise CheckpointError(f"{source}: cfg.engram_enabled = True: this checkpoint uses the Engram memory, "
                              "which ToyLM (the Crowfeather / Shard architecture) does not have")
    if fields.get("tie_word_embeddings") is False:
        raise CheckpointError(f"{source}: cfg.tie_word_embeddings = False, but ToyLM ties its output head")
    values.update(keymap.parse_overrides(ToyLMConfig, overrides))  # before inference: --set n_heads=8 decides head_dim

    for name in ("vocab_size", "dim", "n_layers", "mlp_hidden"):
        if name in dims and name not in values:
            values[name] = report.inferred[name] = dims[name]
    inner = dims.get("inner")
    if inner and "n_heads" not in values and "head_dim" not in values:
        head_dim = 64 if inner % 64 == 0 else inner
        values["head_dim"], values["n_heads"] = head_dim, inner // head_dim
        report.inferred["head_dim"] = f"{head_dim} (assumed: cfg has neither n_heads nor head_dim)"
        report.inferred["n_heads"] = inner // head_dim
    elif inner and "head_dim" not in values:
        values["head_dim"] = report.inferred["head_dim"] = inner // max(int(values["n_heads"]), 1)
    elif inner and "n_heads" not in values:
        values["n_heads"] = report.inferred["n_heads"] = inner // max(int(values["head_dim"]), 1)

    default_window = ToyLMConfig.sliding_window
    if "sliding_window" not in values and values.get("max_seq_len", default_window) < default_window:
        values["sliding_window"] = report.inferred["sliding_window"] = values["max_seq_len"]  # never binds
    cfg = keymap.build_config(ToyLMConfig, values, source)
    _check_dims(cfg, dims, source)
    return cfg, report


def _check_dims(cfg: ToyLMConfig, dims: dict[str, int], source: str) -> None:
    if "vocab_size" in dims and dims["vocab_size"] != cfg.vocab_size:
        raise CheckpointError(f"{source}: vocabulary mismatch: cfg.vocab_size = {cfg.vocab_size} but the embedding "
                              f"has {dims['vocab_size']} rows")
    for name in ("dim", "n_layers", "mlp_hidden"):
        if name in dims and dims[name] != getattr(cfg, name):
            raise CheckpointError(f"{source}: cfg.{name} = {getattr(cfg, name)} but the tensors say {dims[name]}")
    if "inner" in dims and dims["inner"] != cfg.n_heads * cfg.head_dim:
        raise CheckpointError(f"{source}: cfg n_heads x head_dim = {cfg.n_heads * cfg.head_dim} but the attention "
                              f"matrices are {dims['inner']} wide")


def fields_for_torch(cfg: ToyLMConfig, original: dict | None, report: dict | None = None) -> dict:
    """The cfg dict written into a ``.pt``: the original fields (updated), or the card's for a jaxlm model.

    Only the upstream Config's field names are written, so ``Config(**ck["cfg"])`` keeps working;
    the conventions jaxlm adds travel separately (see ``conventions_for_torch``).
    """
    values = dataclasses.asdict(cfg)
    if original is None:
        return {name: values[name] if default is None else default for name, default in CARD_FIELDS.items()}
    renamed = (report or {}).get("renamed", {})
    out = {}
    for name, value in original.items():
        ours = renamed.get(name, name)
        changed = ours in values and value is not None and value != values[ours]
        out[name] = values[ours] if changed else value  # unchanged values keep their type (10000 vs 10000.0)
    return out


def conventions_for_torch(cfg: ToyLMConfig, original: dict | None, baseline: dict | None = None) -> dict:
    """The open-convention fields the cfg dict does not carry: all of them for a jaxlm model; for a
    converted checkpoint only those changed since the conversion (``baseline``, default: the spec's
    defaults), so that a round trip adds nothing."""
    if original is None:
        return {name: getattr(cfg, name) for name in CONVENTION_FIELDS}
    defaults = ToyLMConfig()
    baseline = baseline or {}
    carried = set(original) | {SYNONYMS.get(k, k) for k in original}
    return {name: getattr(cfg, name) for name in CONVENTION_FIELDS
            if name not in carried and getattr(cfg, name) != baseline.get(name, getattr(defaults, name))}


def conventions_in_fields(fields: dict) -> dict:
    """The conventions a foreign cfg implies: its own values (under any spelling), else the spec's defaults."""
    defaults = ToyLMConfig()
    ours = {SYNONYMS.get(k, k): v for k, v in fields.items() if v is not None}
    return {name: ours.get(name, getattr(defaults, name)) for name in CONVENTION_FIELDS}


# ----------------------------------------------------------------------------- the naming protocol
# (see jaxlm/formats/keymap.py): claim, plan, hints; config_from_fields, entries and
# fields_for_torch are above.

DISPLAY = "ToyLM"
default_entries = entries  # the older name


def claim(shapes: dict[str, tuple], fields: dict) -> tuple[float, str]:
    """Mostly the key names (a Llama / Meta / nanoGPT-style block, with nothing the roles do not
    explain), partly the cfg fields (how many ToyLM knows under some spelling)."""
    weights = {n: s for n, s in shapes.items() if role_of(n, len(s)) != ("buffer", None)}
    known = [n for n, s in weights.items() if role_of(n, len(s)) is not None]
    strange = [n for n in weights if n not in set(known)]
    ours = {f.name for f in dataclasses.fields(ToyLMConfig)} | set(SYNONYMS) | set(CARD_FIELDS)
    field_names = [k for k in fields if not k.startswith("_")]
    field_share = sum(k in ours for k in field_names) / len(field_names) if field_names else 0.0
    reason = [f"{len(known)}/{len(weights)} keys named like a ToyLM block"]
    if strange:
        reason.append("not: " + ", ".join(strange[:3]) + (" ..." if len(strange) > 3 else ""))
    if field_names:
        reason.append(f"{round(field_share * len(field_names))}/{len(field_names)} cfg fields known")
    if fields.get("engram_enabled") or any(k in fields for k in ("n_routed_experts", "num_experts")):
        field_share = 0.0
    if not weights:
        return field_share, "; ".join(reason)
    key_share = len(known) / len(weights)
    if not any(role_of(n, len(s)) in (("embed", None), ("head", None)) for n, s in weights.items()):
        key_share *= 0.5
    score = 0.75 * key_share + 0.25 * field_share if field_names else key_share
    return score, "; ".join(reason)


def plan(shapes: dict[str, tuple], key_map: dict | None, cfg=None) -> Plan:
    """Keys named by role (no cfg needed): the key map first, then the roles, fused matrices by shape."""
    return plan_keys(shapes, key_map)


def hints(state_dict: dict) -> tuple[dict, list[str]]:
    """A RoPE theta read off a saved ``inv_freq`` / ``freqs_cis`` buffer."""
    found = rope_theta_from_buffers(plan_keys({n: tuple(a.shape) for n, a in state_dict.items()}), state_dict)
    if not found:
        return {}, []
    return {"rope_theta": found[0]}, [f"rope_theta = {found[0]:g}, read off the {found[1]} buffer"]
