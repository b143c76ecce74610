"""Foreign state_dict keys <-> jaxlm parameter paths, for every family: entries, plans, key maps, tensors.

A *plan* says, for each key of a foreign state_dict, what it is: a :class:`KeyEntry`. Kinds:

- ``param``: one tensor -> one jaxlm parameter, or several (a fused matrix such as q|k|v, split
  along the PyTorch rows in ``targets`` order); ``transpose``: PyTorch ``(out, in)`` -> Flax
  ``(in, out)``.
- ``stack``: one of many keys that together make one jaxlm array (the experts of a MoE layer,
  ``layers.3.ffn.experts.{0..E-1}.w1.weight`` -> ``blocks/3/moe/w1`` of shape ``[E, in, out]``):
  the key is slice ``index`` of ``count`` along axis 0 of each target (a stacked key may be fused
  and transposed too; both apply to the slice).
- ``tied``: a tensor equal to the parameter in ``targets`` (an output head tied to the embedding):
  checked equal, dropped, written back as that parameter. A family with an untied head simply
  lists its head as a ``param``.
- ``buffer``: a non-parameter (RoPE table, causal mask) kept verbatim for the way back;
  ``kept``: a key the user's key map sets aside (``null``).

**The naming-module protocol.** Each family names its foreign checkpoints in one module, whose
import path is ``Family.naming`` (``jaxlm/models/family.py``); generic code (``converted``,
``hf_layout``, the CLI) finds the modules through the registry ``jaxlm.models.all_families()`` and
calls only these (and never imports a family module itself):

- ``FAMILY: str``, the registered family name.
- ``claim(shapes: dict[str, tuple], fields: dict) -> (float, str)``: how surely a file with these
  (prefix-stripped) keys and shapes and these cfg / config.json fields is one of this family, in
  0..1, and a short reason (what fits or what does not). The best claim at or above
  :data:`CLAIM_THRESHOLD` reads the file; :func:`match_fraction` helps.
- ``config_from_fields(fields, shapes, source, overrides=()) -> (cfg, ConfigReport)``: the family
  config from the foreign fields (config.json, a ``.pt``'s cfg) and the tensor shapes, with
  ``FIELD=VALUE`` overrides; a contradiction between fields and shapes is a one-line
  :class:`CheckpointError`. :func:`build_config` does the generic part (types, overrides, validate).
- ``entries(cfg) -> list[KeyEntry]``: the default layout, in state_dict order, used to write a
  checkpoint that did not come from a foreign file and, unless ``plan`` is given, to read one.
- ``fields_for_torch(cfg, original, report=None) -> dict``: the cfg dict / config.json written out:
  ``original`` (the fields read in, or None) updated with ``cfg``'s values.

Optional, for a family whose files come in many namings (ToyLM):

- ``plan(shapes, key_map, cfg) -> Plan`` (``cfg`` may be None: ``inspect`` still shows the
  mapping when the config cannot be built); the default is :func:`plan_from_entries` over
  ``entries(cfg)``.
- ``hints(state_dict) -> (fields, notes)``: fields read off tensors (a RoPE theta off ``inv_freq``).
- ``conventions_in_fields(fields)``, ``conventions_for_torch(cfg, original, baseline=None)``: config
  fields the foreign cfg does not carry, written beside it (default: none).
- ``NAMINGS`` (names) and ``entries(cfg, naming)``: other key namings ``to-torch --naming`` writes.
- ``DISPLAY``: the family's name in messages (default ``FAMILY``).
- ``NATIVE_FORMATS``: ``{suffix: module}`` for files of the family's own that are neither a ``.pt``
  nor a ``.safetensors`` (Llama Think: ``{".bin": llama2c_bin}``, the C runner's model.bin). Each
  module offers ``matches(path) -> bool`` (by content), ``read_object(path) -> {"model": state_dict,
  "model_args" or "cfg": fields}`` (read like a ``.pt`` of that form), ``write_object(top, path)``
  (``top``: what ``converted.to_torch_object`` makes) and ``NOTE``, a line said whenever the format
  is read or written (e.g. that it is lossy). ``converted.read_file`` asks every family's formats
  about a file it does not otherwise know (one that matches, else the one its suffix names, whose
  reader then says what is wrong with the file); ``tools.torch_port to-bin`` writes with the
  source family's format for the destination's suffix.

The user key map (``--key-map FILE``): JSON ``{their_name_or_regex: our_path | [paths] (fused) |
null (keep aside) | "tied"}``; regex groups fill ``{1}`` or ``\\1`` in the path. It is consulted
before the family's own names, and its keys are left out of the claims.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import re
import typing
from typing import Any

import numpy as np

from jaxlm.errors import CheckpointError, ConfigError

CLAIM_THRESHOLD = 0.2
KINDS = ("param", "stack", "tied", "buffer", "kept")


@dataclasses.dataclass
class KeyEntry:
    """What one state_dict key is (see the module docstring for the kinds)."""

    name: str                      # the key as the file has it
    kind: str                      # "param" | "stack" | "tied" | "buffer" | "kept"
    targets: list[str] = dataclasses.field(default_factory=list)  # jaxlm paths, in PyTorch row order
    transpose: bool = False        # (out, in) -> (in, out)
    role: str = ""                 # for reports: q, qkv, gate_up, attn_norm, expert, key map, ...
    index: int | None = None       # stack: this key's position along axis 0 of the targets
    count: int | None = None       # stack: how many keys the targets stack

    @classmethod
    def from_record(cls, record: dict) -> "KeyEntry":
        """An entry from its JSON record (a stored layout); fields added later take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def param(name: str, targets, *, role: str = "", transpose: bool | None = None) -> KeyEntry:
    """A ``param`` entry; a kernel (path ending ``/kernel``) is transposed unless told otherwise."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if transpose is None:
        transpose = all(t.endswith("/kernel") for t in targets)
    return KeyEntry(name, "param", targets, transpose, role)


def stack(names: list[str], targets, *, role: str = "", transpose: bool = True) -> list[KeyEntry]:
    """The entries of ``names`` (in stacking order) that together make the arrays ``targets``."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return [KeyEntry(n, "stack", list(targets), transpose, role, index=i, count=len(names))
            for i, n in enumerate(names)]


@dataclasses.dataclass
class Plan:
    entries: list[KeyEntry]
    unmatched: list[tuple[str, tuple]]      # (name, shape) of keys nothing explains
    naming: str                             # e.g. "hf", "meta", "nanogpt", "custom", or the family's own
    notes: list[str]

    @property
    def family(self) -> str:  # the name older callers use
        return self.naming


@dataclasses.dataclass
class ConfigReport:
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)    # their field -> ours
    ignored: dict[str, Any] = dataclasses.field(default_factory=dict)    # fields jaxlm has no use for
    # ... of which these hold the upstream default (a feature left off): nothing a user must hear about
    at_default: dict[str, Any] = dataclasses.field(default_factory=dict)
    inferred: dict[str, Any] = dataclasses.field(default_factory=dict)   # ours, from tensors or assumed


# ----------------------------------------------------------------------------- names


def strip_prefixes(name: str) -> str:
    """``module._orig_mod.layers.0.x`` -> ``layers.0.x`` (DDP and torch.compile wrappers)."""
    name = re.sub(r"(^|\.)_orig_mod\.", r"\1", name)
    while name.startswith("module."):
        name = name[len("module."):]
    return name


# Non-parameters that a PyTorch model may register: RoPE tables and causal masks.
BUFFER = re.compile(r"(?:^|\.)(?:inv_freq|freqs_cis|freqs|cos_cached|sin_cached|cos_cache|sin_cache|"
                    r"rope_cos|rope_sin|cos|sin|masked_bias|causal_mask|mask|attn_mask)$")
BUFFER_NDIM = re.compile(r"(?:^|\.)(?:attn|attention|self_attn)\.bias$")  # nanoGPT's causal mask (4-D)


def is_buffer(name: str, ndim: int) -> bool:
    return bool(BUFFER.search(name) or (BUFFER_NDIM.search(name) and ndim >= 2))


def load_key_map(path) -> dict[str, Any]:
    """A ``--key-map`` JSON file: ``{their_name_or_regex: our_path | [paths] (fused) | null | "tied"}``."""
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


def as_key_map(key_map) -> dict | None:
    """A key map given as a dict, a JSON file path, or None."""
    if key_map is None or isinstance(key_map, dict):
        return key_map
    return load_key_map(key_map)


def _expand(match: re.Match, template: str) -> str:
    """``blocks/{1}/attn/q/kernel`` or ``blocks/\\1/...`` filled from a regex match."""
    template = re.sub(r"\{(\w+)\}", lambda g: match.group(int(g[1]) if g[1].isdigit() else g[1]), template)
    return match.expand(template)


def user_targets(name: str, stripped: str, key_map: dict) -> tuple[bool, Any]:
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


def key_map_entry(name: str, value, tied_to: str = "embed/embedding") -> KeyEntry:
    """The entry a key-map value makes: null -> kept, "tied" -> tied to ``tied_to``, paths -> param."""
    if value is None:
        return KeyEntry(name, "kept", role="key map: null")
    if value == "tied":
        return KeyEntry(name, "tied", [tied_to], role="key map: tied")
    targets = [value] if isinstance(value, str) else list(value)
    return KeyEntry(name, "param", targets, all(t.endswith("/kernel") for t in targets), role="key map")


def key_mapped(shapes: dict[str, tuple], key_map: dict | None) -> set[str]:
    """The keys the user's key map explains (left out of the families' claims)."""
    if not key_map:
        return set()
    return {n for n in shapes if user_targets(n, strip_prefixes(n), key_map)[0]}


def plan_from_entries(entries: list[KeyEntry], shapes: dict[str, tuple], key_map: dict | None = None,
                      naming: str = "") -> Plan:
    """A plan that matches the file's keys (prefixes stripped) to a family's expected ``entries``.

    Keys of the user's key map come first; a key the entries do not name is a buffer if its name
    says so, else unmatched. Expected keys the file lacks are left to :func:`check_plan` (a tied
    head the file did not save is no loss).
    """
    key_map = key_map or {}
    by_name = {strip_prefixes(e.name): e for e in entries}
    tied_to = next((e.targets[0] for e in entries if e.kind == "tied" and e.targets), "embed/embedding")
    out, unmatched, notes = [], [], []
    for name, shape in shapes.items():
        stripped = strip_prefixes(name)
        matched, value = user_targets(name, stripped, key_map)
        if matched:
            out.append(key_map_entry(name, value, tied_to))
        elif stripped in by_name:
            out.append(dataclasses.replace(by_name[stripped], name=name))
        elif is_buffer(stripped, len(shape)):
            out.append(KeyEntry(name, "buffer", role="buffer"))
        else:
            unmatched.append((name, tuple(shape)))
    prefixes = sorted({n[: len(n) - len(strip_prefixes(n))] for n in shapes if strip_prefixes(n) != n})
    if prefixes:
        notes.append("stripped prefixes: " + ", ".join(repr(p) for p in prefixes))
    return Plan(out, unmatched, naming, notes)


def match_fraction(shapes: dict[str, tuple], patterns) -> float:
    """The share of keys (prefixes stripped) that fully match one of ``patterns`` (regexes or names)."""
    if not shapes:
        return 0.0
    compiled = [re.compile(p) if isinstance(p, str) else p for p in patterns]
    hits = sum(any(c.fullmatch(strip_prefixes(n)) for c in compiled) for n in shapes)
    return hits / len(shapes)


# ----------------------------------------------------------------------------- shapes and checks


def _slice_shape(entry: KeyEntry, shape: tuple) -> tuple:
    return tuple(shape[1:]) if entry.kind == "stack" else tuple(shape)


def expected_torch_shape(entry: KeyEntry, param_shapes: dict[str, tuple]) -> tuple:
    """The shape the file's tensor must have for ``entry`` (a stacked key: one slice)."""
    parts = [_slice_shape(entry, param_shapes[t]) for t in entry.targets]
    if entry.transpose:
        parts = [s[::-1] for s in parts]
    if len(parts) == 1:
        return tuple(parts[0])
    return (sum(p[0] for p in parts),) + tuple(parts[0][1:])


def check_plan(plan: Plan, shapes: dict[str, tuple], param_shapes: dict[str, tuple], source: str,
               family: str) -> None:
    """Every jaxlm parameter filled exactly once, with the right shape; nothing left unexplained."""
    if plan.unmatched:
        listed = ", ".join(f"{n} {tuple(s)}" for n, s in plan.unmatched[:8])
        more = f" (+{len(plan.unmatched) - 8} more)" if len(plan.unmatched) > 8 else ""
        example = next(iter(param_shapes), "embed/embedding")
        raise CheckpointError(
            f"{source}: {len(plan.unmatched)} keys match no {family} parameter: {listed}{more}; map them with "
            f"--key-map FILE (JSON {{\"their_name_or_regex\": \"{example}\"}}, null to keep one aside)")
    filled: dict[tuple[str, int | None], str] = {}
    for entry in plan.entries:
        if entry.kind not in ("param", "stack"):
            continue
        for target in entry.targets:
            if target not in param_shapes:
                example = next(iter(p for p in param_shapes if "/" in p), next(iter(param_shapes), ""))
                raise CheckpointError(f"{source}: {entry.name} maps to {target}, which {family} does not have "
                                      f"(paths look like {example})")
            slot = (target, entry.index if entry.kind == "stack" else None)
            if slot in filled:
                raise CheckpointError(f"{source}: both {filled[slot]} and {entry.name} map to {target}"
                                      f"{'' if slot[1] is None else f' [{slot[1]}]'}; fix the names or the --key-map")
            filled[slot] = entry.name
            if entry.kind == "stack" and param_shapes[target][:1] != (entry.count,):
                raise CheckpointError(f"{source}: {entry.count} keys like {entry.name} stack into {target}, but "
                                      f"{family} with this cfg has {param_shapes[target][0]} of them (wrong cfg?)")
        want, got = expected_torch_shape(entry, param_shapes), tuple(shapes[entry.name])
        if want != got:
            raise CheckpointError(f"{source}: {entry.name} has shape {got}, but {family} with this cfg expects "
                                  f"{want} for {', '.join(entry.targets)}; shape mismatch (wrong cfg or key map?)")
    missing = []
    for path, shape in param_shapes.items():
        if (path, None) in filled:
            continue
        stacked = {i for (p, i) in filled if p == path and i is not None}
        if not stacked:
            missing.append(path)
        elif stacked != set(range(shape[0])):
            gaps = sorted(set(range(shape[0])) - stacked)
            missing.append(f"{path}[{', '.join(map(str, gaps[:4]))}{' ...' if len(gaps) > 4 else ''}]")
    if missing:
        raise CheckpointError(f"{source}: no key holds {', '.join(missing[:6])}"
                              f"{' ...' if len(missing) > 6 else ''} ({len(missing)} missing parameters); "
                              "map the keys that do with --key-map FILE")


# ----------------------------------------------------------------------------- tensors


def to_flax(entry: KeyEntry, array: np.ndarray, param_shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The jaxlm arrays one PyTorch tensor holds (split if fused, transposed if a kernel).

    For a ``stack`` entry these are the slices at ``entry.index``; :class:`Assembler` puts them in place.
    """
    if len(entry.targets) == 1:
        parts = [array]
    else:
        rows = [_slice_shape(entry, param_shapes[t])[-1 if entry.transpose else 0] for t in entry.targets]
        parts = np.split(array, np.cumsum(rows)[:-1], axis=0)
    return {t: (p.T if entry.transpose else p) for t, p in zip(entry.targets, parts)}


def to_torch(entry: KeyEntry, flat: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch tensor of one entry, from jaxlm arrays (inverse of :func:`to_flax`)."""
    arrays = [flat[t][entry.index] if entry.kind == "stack" else flat[t] for t in entry.targets]
    parts = [a.T if entry.transpose else a for a in arrays]
    if len(parts) == 1:
        return np.asarray(parts[0], order="C")
    return np.asarray(np.concatenate(parts, axis=0), order="C")


class Assembler:
    """Collects :func:`to_flax` results: plain arrays as they are, stacked slices into one array each."""

    def __init__(self, param_shapes: dict[str, tuple]):
        self.param_shapes = param_shapes
        self.arrays: dict[str, np.ndarray] = {}
        self._stacks: dict[str, dict[int, np.ndarray]] = {}

    def add(self, entry: KeyEntry, array: np.ndarray) -> None:
        parts = to_flax(entry, array, self.param_shapes)
        if entry.kind != "stack":
            self.arrays.update(parts)
            return
        for target, part in parts.items():
            self._stacks.setdefault(target, {})[entry.index] = part

    def result(self, strict: bool = True) -> dict[str, np.ndarray]:
        """The arrays; a stack with slices missing raises (``strict``) or is left out."""
        out = dict(self.arrays)
        for target, slices in self._stacks.items():
            count = self.param_shapes[target][0]
            if sorted(slices) != list(range(count)):
                if strict:
                    raise CheckpointError(f"{target}: {len(slices)} of its {count} stacked keys found")
                continue
            out[target] = np.stack([slices[i] for i in range(count)])
        return out


# ----------------------------------------------------------------------------- configs


def parse_overrides(cls, overrides) -> dict:
    """``["FIELD=VALUE", ...]`` -> ``{FIELD: value}`` typed by the config class ``cls``."""
    from jaxlm import config as C
    types = typing.get_type_hints(cls)
    ours = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep:
            raise CheckpointError(f"--set {item!r}: expected FIELD=VALUE, e.g. rope_theta=500000")
        if name not in ours:
            raise CheckpointError(f"--set {name}: not a {cls.__name__} field; known: {', '.join(sorted(ours))}")
        values[name] = C.parse_value(text, types[name])
    return values


def build_config(cls, values: dict, source: str, overrides=(), report: ConfigReport | None = None):
    """``cls(**values)`` with ``FIELD=VALUE`` overrides applied first; ints written as floats (and the
    reverse) coerced, types checked, ``validate()`` run; every failure a one-line CheckpointError."""
    from jaxlm import config as C
    types = typing.get_type_hints(cls)
    ours = {f.name for f in dataclasses.fields(cls)}
    values = {**values, **parse_overrides(cls, overrides)}
    unknown = sorted(set(values) - ours)
    if unknown:
        raise CheckpointError(f"{source}: {', '.join(unknown)}: not {cls.__name__} fields")
    for name, value in list(values.items()):
        expected = types[name]
        if expected is int and isinstance(value, float) and value.is_integer():
            values[name] = int(value)
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif typing.get_origin(expected) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    for name, value in values.items():
        if not C._matches(value, types[name]):
            raise CheckpointError(f"{source}: cfg.{name} = {value!r}: expected {getattr(types[name], '__name__', types[name])}")
    cfg = cls(**values)
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: its cfg does not make a valid {cls.__name__}: {e}") from None
    return cfg


# ----------------------------------------------------------------------------- the families' modules


def naming_module(family: str):
    """The naming module of a registered family (CheckpointError when it has none)."""
    from jaxlm.models import get
    record = get(family)
    if not record.naming:
        raise CheckpointError(f"family {family!r} declares no naming module (Family.naming); it cannot read "
                              "or write foreign checkpoints")
    return importlib.import_module(record.naming)


def naming_modules() -> list:
    """Every registered family's naming module (families without one are skipped)."""
    from jaxlm.models import all_families
    return [importlib.import_module(f.naming) for f in all_families() if f.naming]


def display(names) -> str:
    return getattr(names, "DISPLAY", names.FAMILY)


def choose(shapes: dict[str, tuple], fields: dict, source: str, *, family: str | None = None,
           key_map: dict | None = None):
    """The naming module whose ``claim`` is best (or ``family``'s, when the user names it), and the claims.

    Keys the user's key map explains are left out of the claims. When no family reaches
    :data:`CLAIM_THRESHOLD` the error names the best candidates and why each did not fit.
    """
    if family is not None:
        return naming_module(family), []
    mapped = key_mapped(shapes, key_map)
    stripped = {strip_prefixes(n): tuple(s) for n, s in shapes.items() if n not in mapped}
    claims = []
    for names in naming_modules():
        try:
            score, reason = names.claim(stripped, fields)
        except Exception as error:  # noqa: BLE001 - one family's broken claim must not hide the others
            score, reason = 0.0, f"its claim failed ({type(error).__name__}: {error})"
        claims.append((float(score), names.FAMILY, reason, names))
    claims.sort(key=lambda c: -c[0])
    if not claims:
        raise CheckpointError(f"{source}: no registered family can read foreign checkpoints")
    if claims[0][0] < CLAIM_THRESHOLD:
        best = "; ".join(f"{name} {score:.2f} ({reason})" for score, name, reason, _ in claims[:3])
        raise CheckpointError(f"{source}: no model family claims this checkpoint ({len(shapes)} keys); best "
                              f"candidates: {best}; map its keys with --key-map FILE or name the family")
    return claims[0][3], [(score, name, reason) for score, name, reason, _ in claims]
