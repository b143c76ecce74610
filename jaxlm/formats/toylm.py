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
resolves it. PyTorch ``(out, in)`` -> Flax ``(in, out)``: every transpose happens here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from jaxlm import config as C
from jaxlm.errors import CheckpointError, ConfigError
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
# Non-parameters that a PyTorch model may register: RoPE tables and causal masks.
BUFFER = re.compile(r"(?:^|\.)(?:inv_freq|freqs_cis|freqs|cos_cached|sin_cached|cos_cache|sin_cache|"
                    r"rope_cos|rope_sin|cos|sin|masked_bias|causal_mask|mask|attn_mask)$")
BUFFER_NDIM = re.compile(r"(?:^|\.)(?:attn|attention|self_attn)\.bias$")  # nanoGPT's causal mask (4-D)


def strip_prefixes(name: str) -> str:
    """``module._orig_mod.layers.0.x`` -> ``layers.0.x`` (DDP and torch.compile wrappers)."""
    name = re.sub(r"(^|\.)_orig_mod\.", r"\1", name)
    while name.startswith("module."):
        name = name[len("module."):]
    return name


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
    if BUFFER.search(name) or (BUFFER_NDIM.search(name) and ndim >= 2):
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


@dataclasses.dataclass
class KeyEntry:
    """What one state_dict key is: a parameter (or several, fused), the tied head, or a buffer."""

    name: str                      # the key as the file has it
    kind: str                      # "param" | "tied" | "buffer" | "kept" (key-mapped to null)
    targets: list[str] = dataclasses.field(default_factory=list)  # jaxlm paths, in PyTorch row order
    transpose: bool = False        # (out, in) -> (in, out)
    role: str = ""                 # for reports: q, qkv, gate_up, attn_norm, user map, ...


def load_key_map(path) -> dict[str, Any]:
    """A ``--key-map`` JSON file: ``{their_name_or_regex: our_path | [paths] (fused) | null | "tied"}``."""
    import json
    import pathlib
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"key map {path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"key map {path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"key map {path}: expected a JSON object {{their_name: our_path}}")
    return data


def _expand(match: re.Match, template: str) -> str:
    """``blocks/{1}/attn/q/kernel`` or ``blocks/\\1/...`` filled from a regex match."""
    template = re.sub(r"\{(\w+)\}", lambda g: match.group(int(g[1]) if g[1].isdigit() else g[1]), template)
    return match.expand(template)


def _user_targets(name: str, stripped: str, key_map: dict) -> tuple[bool, Any]:
    """(matched, value) of the key-map entry naming this key exactly, else the first full regex match."""
    for pattern, value in key_map.items():
        if pattern in (name, stripped):
            return True, value
    for pattern, value in key_map.items():
        try:
            compiled = re.compile(pattern)
        except re.error:
            continue
        for candidate in (name, stripped):
            m = compiled.fullmatch(candidate)
            if m:
                if isinstance(value, str) and value != "tied":
                    value = _expand(m, value)
                elif isinstance(value, list):
                    value = [_expand(m, v) for v in value]
                return True, value
    return False, None


@dataclasses.dataclass
class Plan:
    entries: list[KeyEntry]
    unmatched: list[tuple[str, tuple]]      # (name, shape) of keys nothing explains
    family: str
    notes: list[str]


def plan_keys(shapes: dict[str, tuple], key_map: dict | None = None) -> Plan:
    """Assign every key a role (before the config is known: fused-or-not gate by its layer's keys)."""
    key_map = key_map or {}
    stripped = {name: strip_prefixes(name) for name in shapes}
    entries, unmatched, notes = [], [], []
    roles = {}
    for name, shape in shapes.items():
        matched, value = _user_targets(name, stripped[name], key_map)
        if matched:
            if value is None:
                entries.append(KeyEntry(name, "kept", role="key map: null"))
            elif value == "tied":
                entries.append(KeyEntry(name, "tied", role="key map: tied"))
            else:
                targets = [value] if isinstance(value, str) else list(value)
                entries.append(KeyEntry(name, "param", targets, all(t.endswith("/kernel") for t in targets),
                                        role="key map"))
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
            out.append(KeyEntry(entry.name, "tied", role="head"))
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


def expected_torch_shape(entry: KeyEntry, param_shapes: dict[str, tuple]) -> tuple:
    parts = [param_shapes[t] for t in entry.targets]
    if entry.transpose:
        parts = [s[::-1] for s in parts]
    if len(parts) == 1:
        return tuple(parts[0])
    return (sum(p[0] for p in parts),) + tuple(parts[0][1:])


def check_plan(plan: Plan, shapes: dict[str, tuple], param_shapes: dict[str, tuple], source: str) -> None:
    """Every jaxlm parameter filled exactly once, with the right shape; nothing left unexplained."""
    if plan.unmatched:
        listed = ", ".join(f"{n} {tuple(s)}" for n, s in plan.unmatched[:8])
        more = f" (+{len(plan.unmatched) - 8} more)" if len(plan.unmatched) > 8 else ""
        raise CheckpointError(
            f"{source}: {len(plan.unmatched)} keys match no ToyLM parameter: {listed}{more}; map them with "
            "--key-map FILE (JSON {\"their_name_or_regex\": \"blocks/0/attn/q/kernel\"}, null to keep one aside)")
    filled: dict[str, str] = {}
    for entry in plan.entries:
        if entry.kind != "param":
            continue
        for target in entry.targets:
            if target not in param_shapes:
                example = next(iter(p for p in param_shapes if p.startswith("blocks/")), "embed/embedding")
                raise CheckpointError(f"{source}: {entry.name} maps to {target}, which ToyLM does not have "
                                      f"(paths look like {example})")
            if target in filled:
                raise CheckpointError(f"{source}: both {filled[target]} and {entry.name} map to {target}; "
                                      "fix the names or the --key-map")
            filled[target] = entry.name
        want, got = expected_torch_shape(entry, param_shapes), tuple(shapes[entry.name])
        if want != got:
            raise CheckpointError(f"{source}: {entry.name} has shape {got}, but ToyLM with this cfg expects "
                                  f"{want} for {', '.join(entry.targets)}; shape mismatch (wrong cfg or key map?)")
    missing = [p for p in param_shapes if p not in filled]
    if missing:
        raise CheckpointError(f"{source}: no key holds {', '.join(missing[:6])}"
                              f"{' ...' if len(missing) > 6 else ''} ({len(missing)} missing parameters); "
                              "map the keys that do with --key-map FILE")


# ----------------------------------------------------------------------------- tensors


def to_flax(entry: KeyEntry, array: np.ndarray, param_shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The jaxlm arrays one PyTorch tensor holds (split if fused, transposed if a kernel)."""
    if len(entry.targets) == 1:
        parts = [array]
    else:
        rows = [param_shapes[t][-1] if entry.transpose else param_shapes[t][0] for t in entry.targets]
        parts = np.split(array, np.cumsum(rows)[:-1], axis=0)
    return {t: (p.T if entry.transpose else p) for t, p in zip(entry.targets, parts)}


def to_torch(entry: KeyEntry, flat: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch tensor of one entry, from jaxlm arrays (inverse of :func:`to_flax`)."""
    parts = [flat[t].T if entry.transpose else flat[t] for t in entry.targets]
    if len(parts) == 1:
        return np.asarray(parts[0], order="C")
    return np.asarray(np.concatenate(parts, axis=0), order="C")


def default_entries(cfg: ToyLMConfig, naming: str = "hf") -> list[KeyEntry]:
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
        entries.append(KeyEntry(names["head"], "tied", role="head"))
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


@dataclasses.dataclass
class ConfigReport:
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)    # their field -> ours
    ignored: dict[str, Any] = dataclasses.field(default_factory=dict)    # fields jaxlm has no use for
    inferred: dict[str, Any] = dataclasses.field(default_factory=dict)   # ours, from tensors or assumed


def _field_types() -> dict[str, Any]:
    import typing
    return typing.get_type_hints(ToyLMConfig)


def config_from_fields(fields: dict, dims: dict[str, int], overrides=(), source: str = "checkpoint"):
    """(ToyLMConfig, ConfigReport) from a foreign cfg's fields, the tensors' shapes and ``FIELD=VALUE`` overrides."""
    ours = {f.name for f in dataclasses.fields(ToyLMConfig)}
    report = ConfigReport()
    values: dict[str, Any] = {}
    for name, value in fields.items():
        target = name if name in ours else SYNONYMS.get(name)
        if target is None or target in values and name not in ours:
            report.ignored[name] = value
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

    types = _field_types()
    for item in overrides:  # before inference, so that --set n_heads=8 decides head_dim
        if "=" not in item:
            raise CheckpointError(f"--set {item!r}: expected FIELD=VALUE, e.g. rope_pairing=interleaved")
        name, text = item.split("=", 1)
        if name not in ours:
            raise CheckpointError(f"--set {name}: not a ToyLM config field; known: {', '.join(sorted(ours))}")
        values[name] = C.parse_value(text, types[name])

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

    for name, value in list(values.items()):  # ints written as floats (theta 1e4) and the like
        expected = types[name]
        if expected is int and isinstance(value, float) and value.is_integer():
            values[name] = int(value)
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
    cfg = ToyLMConfig(**values)
    for name, value in values.items():
        if not C._matches(value, types[name]):
            raise CheckpointError(f"{source}: cfg.{name} = {value!r}: expected {types[name].__name__}")
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: its cfg does not make a valid ToyLM: {e}") from None
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


def fields_for_torch(cfg: ToyLMConfig, original: dict | None, report: dict | None) -> dict:
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
