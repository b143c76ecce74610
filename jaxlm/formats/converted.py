"""A checkpoint in jaxlm's form, and the way between it and a PyTorch ``.pt`` / ``.safetensors`` file.

``Converted`` holds the parameters as jaxlm paths (``blocks/0/attn/q/kernel``, Flax layout, in
the dtype they were stored in: bf16 stays bf16), the optimizer moments as slots in the same
layout, the step, the jaxlm model config, and — when it came from PyTorch — the *layout*: a JSON
description of the original file (its top-level keys, the state_dict names and their order and
dtypes, the optimizer's param groups, the foreign cfg) so that writing it back reproduces the
file's structure and, unless training changed them, every tensor bit for bit.

Reading a ``.pt`` goes: find the parts of the dict (state_dict, cfg, step, optimizers) ->
pick the family whose naming module claims the keys and cfg (``keymap.choose``) -> build the config from cfg fields and tensor shapes
-> name every key (the family's plan) -> check every parameter is filled with the right shape ->
transpose/split/stack into jaxlm arrays. Families are reached only through their naming modules
(the protocol in ``keymap.py``), found through the registry in ``jaxlm.models``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from jaxlm.errors import CheckpointError
from jaxlm.formats import optimizer_state as opt_io
from jaxlm.formats import keymap, safetensors_file, skeleton, torch_pt

MODEL_KEYS = ("model", "model_state_dict", "state_dict", "model_state", "module", "net", "weights", "params")
# model_args before config: nanoGPT-style files (llama2.c's among them) keep the model's fields in
# model_args and the whole training script's globals, which lack some of them, in config.
CFG_KEYS = ("cfg", "model_args", "config", "model_config", "model_cfg", "args", "hparams", "hyper_parameters",
            "hyperparameters", "params_config")
STEP_KEYS = ("step", "global_step", "iter_num", "iteration", "steps", "train_step", "num_steps")
DEFAULT_OPTIMIZER_KEY = "optimizer"
CONVENTIONS_KEY = "conventions"  # jaxlm's open-convention fields, written beside the card's cfg


@dataclasses.dataclass
class Converted:
    family: str
    model_cfg: Any                                   # e.g. ToyLMConfig
    params: dict[str, np.ndarray]                    # "blocks/0/attn/q/kernel" -> array (Flax layout)
    step: int | None = None
    slots: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)  # momentum / mu / nu
    layout: dict | None = None                       # how to write the original file back (JSON)
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # tensors kept for the way back
    notes: list[str] = dataclasses.field(default_factory=list)
    source: str = ""
    run_config: dict | None = None                   # the jaxlm run's config, when read from a run
    # Drops the source file's pages from memory once its tensors have been copied (see torch_pt.load_mapped).
    release: Callable[[], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def has_optimizer(self) -> bool:
        return any(self.slots.values())


# ----------------------------------------------------------------------------- trees


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (keys turned to str)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def param_shapes(model_cfg) -> dict[str, tuple]:
    """Every weight path (parameters and Buffer variables) of the model ``model_cfg`` describes, with
    its (Flax) shape; nothing allocated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlm.models import build_model
    from jaxlm.models.family import Buffer
    # jax.eval_shape, not nnx.eval_shape: the latter shards by the logical axis names when a mesh is
    # set (as it is when --init_from runs), and those names are not mesh axes.
    abstract = jax.eval_shape(lambda: nnx.state(build_model(model_cfg, rngs=nnx.Rngs(0), dtype=jnp.float32),
                                                  (nnx.Param, Buffer)))
    return {path: tuple(leaf.shape) for path, leaf in flatten(nnx.to_pure_dict(abstract)).items()}


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray)


def _dtype_name(array: np.ndarray) -> str:
    return np.dtype(array.dtype).name


def _np_dtype(dtype_name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)


def cast(array: np.ndarray, dtype_name: str | None) -> np.ndarray:
    if dtype_name is None or _dtype_name(array) == dtype_name:
        return array
    return np.asarray(array).astype(_np_dtype(dtype_name))


def _torch_tensor(entry, flat: dict, dtype_name: str | None, lazy: bool):
    """One PyTorch tensor from jaxlm arrays; ``lazy``: computed only when the writer needs its bytes."""
    if not lazy:
        return cast(keymap.to_torch(entry, flat), dtype_name)
    shape = keymap.expected_torch_shape(entry, {t: tuple(flat[t].shape) for t in entry.targets})
    dtype = _np_dtype(dtype_name) if dtype_name else flat[entry.targets[0]].dtype
    return torch_pt.LazyTensor(shape, dtype, lambda: cast(keymap.to_torch(entry, flat), dtype_name))


def apply_overrides(conv: Converted, overrides) -> Converted:
    """``FIELD=VALUE`` strings applied to the model config of an already converted checkpoint."""
    if not overrides:
        return conv
    import typing

    from jaxlm import config as C
    from jaxlm.errors import ConfigError
    types = typing.get_type_hints(type(conv.model_cfg))
    changes = {}
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep or name not in types:
            raise CheckpointError(f"--set {item!r}: expected FIELD=VALUE with a field of "
                                  f"{type(conv.model_cfg).__name__} ({', '.join(types)})")
        changes[name] = C.parse_value(text, types[name])
    conv.model_cfg = dataclasses.replace(conv.model_cfg, **changes)
    try:
        conv.model_cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"--set: {e}") from None
    if param_shapes(conv.model_cfg) != {k: tuple(v.shape) for k, v in conv.params.items()}:
        raise CheckpointError("--set changes the parameter shapes; only the conventions can be changed here")
    return conv


# ----------------------------------------------------------------------------- analysis


@dataclasses.dataclass
class Analysis:
    """What a foreign checkpoint holds and how each part maps; ``problems`` says what blocks conversion."""

    source: str
    top: Any
    family: str = ""                                # set by the family's claim (keymap.choose)
    claims: list = dataclasses.field(default_factory=list)  # (score, family, reason), best first
    model_key: str | None = None
    cfg_key: str | None = None
    step_key: str | None = None
    optimizer_keys: list[str] = dataclasses.field(default_factory=list)
    state_dict: dict = dataclasses.field(default_factory=dict)
    shapes: dict[str, tuple] = dataclasses.field(default_factory=dict)
    plan: Any = None
    cfg_fields: dict = dataclasses.field(default_factory=dict)
    cfg_class: str | None = None                    # "config.Config" when cfg was a pickled object
    model_cfg: Any = None
    cfg_report: Any = None
    param_shapes: dict[str, tuple] = dataclasses.field(default_factory=dict)
    step: int | None = None
    conventions: dict = dataclasses.field(default_factory=dict)   # the file's jaxlm "conventions" entry
    hinted: dict = dataclasses.field(default_factory=dict)        # fields read off buffers (rope_theta)
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def _cfg_fields(value) -> tuple[dict, str | None]:
    if isinstance(value, torch_pt.PickledConfig):
        return dict(value.fields), value.origin
    if isinstance(value, dict):
        return dict(value), None
    return {}, None


def _as_step(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if _is_array(value) and value.ndim == 0 and value.dtype.kind in "iuf":
        return int(value.item())
    return None


def _looks_like_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(_is_array(v) for v in value.values())


# A field name any model config has in some spelling (dim, n_embd, hidden_size, n_layers, vocab_size, ...):
# a cfg without one but with a sub-dict that has them is a whole training config.
_MODEL_FIELD = re.compile(r"^(?:dim|d_model|n_embd|hidden_size|vocab_size|n_layers?|num_(?:hidden_)?layers)$")


def find_parts(top, source: str) -> Analysis:
    """Which top-level keys hold the state_dict, cfg, step and optimizer state."""
    an = Analysis(source=source, top=top)
    if not isinstance(top, dict):
        raise CheckpointError(f"{source}: holds a {type(top).__name__}, not a checkpoint dict or state_dict")
    if _looks_like_state_dict(top):
        an.state_dict = top
        an.notes.append("the file is a bare state_dict (no cfg, step or optimizer)")
    else:
        an.model_key = next((k for k in MODEL_KEYS if _looks_like_state_dict(top.get(k))), None)
        if an.model_key is None:  # under another name: the largest dict of tensors
            found = [k for k, v in top.items() if _looks_like_state_dict(v)]
            an.model_key = max(found, key=lambda k: len(top[k]), default=None)
        if an.model_key is None:
            raise CheckpointError(f"{source}: no model state_dict in it (top-level keys: {', '.join(map(str, top))})")
        an.state_dict = top[an.model_key]
        an.cfg_key = next((k for k in CFG_KEYS if isinstance(top.get(k), (dict, torch_pt.PickledConfig))), None)
        an.step_key = next((k for k in STEP_KEYS if _as_step(top.get(k)) is not None), None)
        an.optimizer_keys = [k for k, v in top.items() if k != an.model_key and opt_io.is_optimizer_entry(v)]
    bad = [k for k, v in an.state_dict.items() if not _is_array(v)]
    if bad:
        raise CheckpointError(f"{source}: state_dict entries that are not tensors: {', '.join(bad[:5])}")
    an.shapes = {k: tuple(v.shape) for k, v in an.state_dict.items()}
    if an.cfg_key is not None:
        an.cfg_fields, an.cfg_class = _cfg_fields(top[an.cfg_key])
        # A whole training config may nest the model's fields one level down.
        if not any(_MODEL_FIELD.search(str(k)) for k in an.cfg_fields):
            for key, value in an.cfg_fields.items():
                nested, origin = _cfg_fields(value)
                if any(_MODEL_FIELD.search(str(k)) for k in nested):
                    an.notes.append(f"model fields taken from cfg.{key}")
                    an.cfg_fields = {**{k: v for k, v in an.cfg_fields.items() if k != key}, **nested}
                    an.cfg_class = origin or an.cfg_class
                    break
    if an.step_key is not None:
        an.step = _as_step(top[an.step_key])
    if an.model_key is not None and isinstance(top.get(CONVENTIONS_KEY), dict):
        an.conventions = dict(top[CONVENTIONS_KEY])
    return an


def analyze(top, source: str, *, key_map=None, overrides=(), family: str | None = None) -> Analysis:
    """Everything ``inspect`` shows; conversion stops at the first entry of ``problems``."""
    an = find_parts(top, source)
    key_map = keymap.as_key_map(key_map)
    fields = {**an.cfg_fields, **an.conventions}
    names, an.claims = keymap.choose(an.shapes, fields, source, family=family, key_map=key_map)
    an.family = names.FAMILY
    if an.claims:
        an.notes.append(f"family {an.family}: {an.claims[0][2]}"
                        + "".join(f"; {n} {s:.2f}" for s, n, _ in an.claims[1:3]))
    if an.cfg_key is None:
        an.notes.append("no cfg in the file: the shape was inferred from the tensors")
    if hasattr(names, "hints"):
        hinted, hint_notes = names.hints(an.state_dict)
        an.hinted = {k: v for k, v in hinted.items() if k not in fields}
        an.notes += [n for n in hint_notes if any(k in n for k in an.hinted)]
    try:
        an.model_cfg, an.cfg_report = names.config_from_fields({**fields, **an.hinted}, an.shapes, source,
                                                              overrides)
        an.param_shapes = param_shapes(an.model_cfg)
    except CheckpointError as error:
        an.problems.append(str(error))
    if an.model_cfg is not None or hasattr(names, "plan"):
        an.plan = _plan(names, an.shapes, key_map, an.model_cfg)
        an.notes += an.plan.notes
    if not an.problems:
        try:
            keymap.check_plan(an.plan, an.shapes, an.param_shapes, source, keymap.display(names))
            _check_tied(an, keymap.display(names))
        except CheckpointError as error:
            an.problems.append(str(error))
    return an


def _plan(names, shapes, key_map, model_cfg) -> keymap.Plan:
    if hasattr(names, "plan"):
        return names.plan(shapes, key_map, model_cfg)
    return keymap.plan_from_entries(names.entries(model_cfg), shapes, key_map, naming=names.FAMILY)


def _check_tied(an: Analysis, family: str) -> None:
    """A tied key must equal the parameter it is tied to (then it is dropped, and written back as it)."""
    for entry in an.plan.entries:
        if entry.kind != "tied":
            continue
        source = next((e for e in an.plan.entries if e.kind == "param" and e.targets == entry.targets), None)
        head, table = an.state_dict[entry.name], an.state_dict[source.name] if source else None
        same = (table is not None and head.shape == table.shape and head.dtype == table.dtype
                and np.array_equal(head.view(np.uint8), table.view(np.uint8)))
        what = "the embedding" if source is None or source.role == "embed" else source.name
        if not same:
            raise CheckpointError(
                f"{an.source}: {entry.name} differs from {what} {source.name if source else ''}, but {family} ties "
                f"it to {', '.join(entry.targets)}; this is not a {family} checkpoint (or map the key with --key-map)")
        an.notes.append(f"tied {entry.role or 'key'} {entry.name} equals {what}: dropped (written back on the way out)")


# ----------------------------------------------------------------------------- torch -> jaxlm


def from_torch_object(top, source: str, *, key_map=None, overrides=(), weights_only: bool = False,
                      family: str | None = None) -> Converted:
    """A ``torch.load``-shaped object (from :func:`torch_pt.load`) in jaxlm's form, with its layout.

    ``family``: read it as this family's checkpoint instead of asking every family's claim."""
    an = analyze(top, source, key_map=key_map, overrides=overrides, family=family)
    if an.problems:
        raise CheckpointError(an.problems[0])
    names = keymap.naming_module(an.family)
    assembler = keymap.Assembler(an.param_shapes)
    extras: dict[str, np.ndarray] = {}
    model_keys = []
    for entry in an.plan.entries:
        array = an.state_dict[entry.name]
        record = {**dataclasses.asdict(entry), "dtype": _dtype_name(array)}
        if entry.kind in ("param", "stack"):
            assembler.add(entry, array)
        elif entry.kind in ("buffer", "kept"):
            record["extra"] = _add_extra(extras, array)
        model_keys.append(record)
    params = assembler.result()
    notes = list(an.notes)
    report = dataclasses.asdict(an.cfg_report)
    if report["ignored"]:
        notes.append("ignored cfg fields (kept for the way back): "
                     + ", ".join(f"{k}={v!r}" for k, v in report["ignored"].items()))
    if report["inferred"]:
        notes.append("inferred: " + ", ".join(f"{k}={v}" for k, v in report["inferred"].items()))

    optimizers = [] if weights_only else _optimizer_list(an)
    step = an.step
    slots: dict[str, dict[str, np.ndarray]] = {}
    encoded_optimizers = {}
    if optimizers:
        infos = [opt_io.ParamInfo(e.name, an.shapes[e.name], e.role) for e in an.plan.entries
                 if e.kind in ("param", "stack")]
        by_name = {e.name: e for e in an.plan.entries}
        adam_step = opt_io.global_step_of([o for _, o in optimizers])
        step = step if step is not None else adam_step
        slot_parts: dict[str, keymap.Assembler] = {}
        for _, opt in optimizers:
            mapping = opt_io.assign_params(opt, infos, keymap.strip_prefixes, source)
            encoded_optimizers[id(opt)] = _encode_optimizer(opt, mapping, by_name, an.param_shapes,
                                                            slot_parts, extras, step or 0)
        # A stacked parameter's moments count only when every stacked key has them.
        slots = {slot: parts.result(strict=False) for slot, parts in slot_parts.items()}
        notes.append(f"optimizer state converted ({', '.join(f'{s}: {len(v)}' for s, v in slots.items())} "
                     f"tensors) at step {step}")
    elif an.optimizer_keys and weights_only:
        notes.append(f"optimizer state in {', '.join(an.optimizer_keys)} left out (--weights-only)")

    def hook(obj, path):
        if obj is an.state_dict and an.model_key is not None:
            attrs = getattr(obj, "__dict__", None) or {}
            return {"~model": {"odict": isinstance(obj, collections.OrderedDict),
                               "attrs": skeleton.encode(dict(attrs), lambda o, p: skeleton.NOT_HANDLED)}}
        if path == an.cfg_key and an.cfg_key is not None:
            return {"~cfg": None}
        if path == CONVENTIONS_KEY and an.conventions:
            return {"~conventions": None}
        if path == an.step_key and an.step_key is not None:
            value = top[an.step_key]
            return {"~global_step": {"dtype": _dtype_name(value) if _is_array(value) else type(value).__name__}}
        if id(obj) in encoded_optimizers:
            return {"~optimizer": encoded_optimizers[id(obj)]}
        if weights_only and path in an.optimizer_keys:
            return {"~dropped": None}
        if _is_array(obj):
            return {"~tensor": _add_extra(extras, obj)}
        return skeleton.NOT_HANDLED

    top_skeleton = skeleton.encode(top, hook) if an.model_key is not None else None
    if weights_only and isinstance(top_skeleton, dict):
        top_skeleton = {k: v for k, v in top_skeleton.items() if v != {"~dropped": None}}
    cfg_value = top[an.cfg_key] if an.cfg_key is not None else None
    layout = {
        "format": "torch",
        "bare": an.model_key is None,
        "family_naming": an.plan.naming,
        "top": top_skeleton,
        "model_keys": model_keys,
        # What the file itself implies; conventions set later (--set, a probe's finding) are written back.
        "conventions": _conventions_in(names, {**an.cfg_fields, **an.conventions, **an.hinted}),
        "cfg": {"fields": skeleton.encode(dict(an.cfg_fields), lambda o, p: skeleton.NOT_HANDLED)
                if an.cfg_key is not None else None,
                "class": an.cfg_class,
                "report": {k: skeleton.encode(v, lambda o, p: skeleton.NOT_HANDLED) for k, v in report.items()}},
    }
    if an.cfg_class:
        notes.append(f"cfg was a pickled {an.cfg_class} object: read as plain fields (written back as a dict)")
    if cfg_value is not None and _cfg_fields(cfg_value)[0] != an.cfg_fields:
        layout["cfg"]["nested_value"] = skeleton.encode(cfg_value, lambda o, p: skeleton.NOT_HANDLED)
    return Converted(family=an.family, model_cfg=an.model_cfg, params=params, step=step, slots=slots,
                     layout=layout, extras=extras, notes=notes, source=source)


def _optimizer_list(an: Analysis) -> list[tuple[str, dict]]:
    out = []
    for key in an.optimizer_keys:
        value = an.top[key]
        if opt_io.is_torch_optimizer(value):
            out.append((key, value))
        else:
            items = value.items() if isinstance(value, dict) else enumerate(value)
            out += [(f"{key}/{k}", v) for k, v in items]
    return out


def _add_extra(extras: dict, array: np.ndarray) -> str:
    name = f"e{len(extras)}"
    extras[name] = array
    return name


def _conventions_in(names, fields: dict) -> dict:
    return names.conventions_in_fields(fields) if hasattr(names, "conventions_in_fields") else {}


def _conventions_for(names, cfg, original, baseline=None) -> dict:
    return names.conventions_for_torch(cfg, original, baseline) if hasattr(names, "conventions_for_torch") else {}


def _entries(names, cfg, naming: str | None) -> list[keymap.KeyEntry]:
    """The family's layout for writing: its default, or the key naming ``naming`` (``to-torch --naming``)."""
    if naming is None:
        return names.entries(cfg)
    namings = getattr(names, "NAMINGS", {})
    if naming not in namings:
        raise CheckpointError(f"naming {naming!r}: the {names.FAMILY} family writes "
                              f"{', '.join(namings) or 'only its own key names'}")
    return names.entries(cfg, naming)


def _encode_optimizer(opt, mapping, entries, shapes, slots, extras, step) -> dict:
    """An optimizer state_dict's skeleton; its per-parameter moments go into ``slots``."""

    def hook(obj, path):
        parts = path.split("/")
        if len(parts) == 3 and parts[0] == "state":
            index = next((i for i in opt["state"] if str(i) == parts[1]), None)
            info = mapping.get(index)
            key = parts[2]
            if info is not None and _is_array(obj) and key in opt_io.SLOT_NAMES and tuple(obj.shape) == tuple(info.shape):
                slot = opt_io.SLOT_NAMES[key]
                slots.setdefault(slot, keymap.Assembler(shapes)).add(entries[info.name], obj)
                return {"~slot": {"slot": slot, "param": info.name, "dtype": _dtype_name(obj)}}
            if key in opt_io.STEP_NAMES and _as_step(obj) is not None:
                kind = _dtype_name(obj) if _is_array(obj) else type(obj).__name__
                return {"~step": {"dtype": kind, "offset": float(np.asarray(obj, np.float64)) - step}}
        if _is_array(obj):
            return {"~tensor": _add_extra(extras, obj)}
        return skeleton.NOT_HANDLED

    return skeleton.encode(opt, hook)


# ----------------------------------------------------------------------------- jaxlm -> torch


def _step_value(kind: str, value: float):
    if kind == "int":
        return int(round(value))
    if kind == "float":
        return float(value)
    return np.asarray(value, ml_dtypes.bfloat16 if kind == "bfloat16" else np.dtype(kind))


def to_torch_object(conv: Converted, *, naming: str | None = None, dtype: str | None = None,
                    optim_cfg=None, lrs: dict | None = None, lazy: bool = False) -> dict:
    """The object to ``torch.save``: the original layout when known (and ``naming`` not given), else the card's.

    ``dtype`` ("bfloat16", "float32") overrides the dtype of every floating tensor; by default
    each tensor gets the dtype it had in the original file (bf16), or keeps its own. ``lazy``: tensors
    are :class:`torch_pt.LazyTensor` computed as the writer reaches them (one in memory at a time).
    """
    names = keymap.naming_module(conv.family)
    if conv.layout and conv.layout.get("format") in ("torch", "hf") and naming is None:
        return _to_original_layout(conv, names, dtype, lrs, lazy)
    return _to_card_layout(conv, names, naming, dtype, optim_cfg, lrs, lazy)


def _layout_entries(model_keys) -> list[tuple[Any, str | None, str | None]]:
    """(KeyEntry, stored dtype, extra name) of each stored state_dict key."""
    entries = [keymap.KeyEntry.from_record(record) for record in model_keys]
    embed = next((e.targets for e in entries if e.kind == "param" and e.role == "embed"), [])
    for entry in entries:  # layouts stored before tied entries named their target: the embedding
        if entry.kind == "tied" and not entry.targets:
            entry.targets = list(embed)
    return [(e, record.get("dtype"), record.get("extra")) for e, record in zip(entries, model_keys)]


def _model_state_dict(conv: Converted, entries, dtype: str | None, odict: bool = True,
                      lazy: bool = False) -> dict:
    """The PyTorch state_dict; a tied key is its target's own tensor, so both share one storage."""
    sd = collections.OrderedDict() if odict else {}
    by_targets, tied = {}, {}
    for entry, stored_dtype, extra in entries:
        if entry.kind in ("param", "stack"):
            sd[entry.name] = _torch_tensor(entry, conv.params, dtype or stored_dtype, lazy)
            if entry.kind == "param":
                by_targets.setdefault(tuple(entry.targets), entry.name)
        elif entry.kind == "tied":
            sd[entry.name], tied[entry.name] = None, tuple(entry.targets)
        else:
            sd[entry.name] = conv.extras[extra]
    for name, targets in tied.items():
        if targets not in by_targets:
            raise CheckpointError(f"{name} is tied to {', '.join(targets)}, which no written key holds")
        sd[name] = sd[by_targets[targets]]
    return sd


def _to_original_layout(conv: Converted, names, dtype, lrs, lazy) -> dict:
    layout = conv.layout
    entries = _layout_entries(layout["model_keys"])
    sd = _model_state_dict(conv, entries, dtype, lazy=lazy)
    if layout.get("bare"):
        return sd
    cfg_info = layout.get("cfg") or {}
    original_fields = skeleton.decode(cfg_info["fields"], _no_markers) if cfg_info.get("fields") is not None else None
    report = skeleton.decode(cfg_info.get("report") or {}, _no_markers)
    if cfg_info.get("nested_value") is not None:  # a whole training config: written back as it was
        cfg_value = skeleton.decode(cfg_info["nested_value"], _no_markers)
    else:
        cfg_value = names.fields_for_torch(conv.model_cfg, original_fields, report)
    step = conv.step or 0

    def resolve(tag, payload):
        if tag == "~model":
            model = sd if payload.get("odict") else dict(sd)
            for key, value in skeleton.decode(payload.get("attrs") or {}, _no_markers).items():
                setattr(model, key, value)
            return model
        if tag == "~cfg":
            return cfg_value
        if tag == "~conventions":
            return _conventions_for(names, conv.model_cfg, None)
        if tag == "~global_step":
            return _step_value(payload["dtype"], step)
        if tag == "~tensor":
            return conv.extras[payload]
        if tag == "~optimizer":
            return _decode_optimizer(conv, payload, entries, dtype, step, lrs, lazy)
        raise CheckpointError(f"unknown marker {tag} in the stored layout; the export is damaged")

    top = skeleton.decode(layout["top"], resolve)
    conventions = _conventions_for(names, conv.model_cfg, original_fields, layout.get("conventions"))
    if conventions and isinstance(top, dict) and CONVENTIONS_KEY not in top:
        top[CONVENTIONS_KEY] = conventions
    return top


def _no_markers(tag, payload):
    raise CheckpointError(f"unexpected marker {tag} in a stored config")


def _decode_optimizer(conv, payload, layout_entries, dtype, step, lrs, lazy):
    entries = {entry.name: entry for entry, _, _ in layout_entries}

    def resolve(tag, p):
        if tag == "~slot":
            entry = entries[p["param"]]
            values = conv.slots.get(p["slot"], {})
            if not all(t in values for t in entry.targets):
                raise CheckpointError(f"the optimizer {p['slot']} of {p['param']} is missing from the converted state")
            return _torch_tensor(entry, values, dtype or p["dtype"], lazy)
        if tag == "~step":
            return _step_value(p["dtype"], step + p["offset"])
        if tag == "~tensor":
            return conv.extras[p]
        raise CheckpointError(f"unknown marker {tag} in the stored optimizer layout; the export is damaged")

    opt = skeleton.decode(payload, resolve)
    if lrs:
        for group in opt.get("param_groups", []):
            kind = "muon" if group.get("use_muon") or ("momentum" in group and "betas" not in group) else "adamw"
            if kind in lrs and "lr" in group:
                group["lr"] = lrs[kind]
    return opt


def _to_card_layout(conv: Converted, names, naming: str | None, dtype, optim_cfg, lrs, lazy) -> dict:
    entries = _entries(names, conv.model_cfg, naming)
    sd = _model_state_dict(conv, [(e, None, None) for e in entries], dtype, lazy=lazy)
    original = None
    if conv.layout and conv.layout.get("cfg", {}).get("fields") is not None:
        original = skeleton.decode(conv.layout["cfg"]["fields"], _no_markers)
    report = skeleton.decode((conv.layout or {}).get("cfg", {}).get("report") or {}, _no_markers)
    cfg = names.fields_for_torch(conv.model_cfg, original, report)
    if optim_cfg is not None and original is None:
        cfg["optimizer"], cfg["lr_schedule"] = optim_cfg.name, optim_cfg.schedule
    top = {"cfg": cfg, "model": sd}
    if conv.step is not None:  # a step not known (an inference export has none) is not written as 0
        top["step"] = int(conv.step)
    if conventions := _conventions_for(names, conv.model_cfg, None):
        top[CONVENTIONS_KEY] = conventions
    if conv.has_optimizer:
        top[DEFAULT_OPTIMIZER_KEY] = _default_optimizer(conv, entries, dtype, optim_cfg, lrs, lazy)
    return top


def _default_optimizer(conv, entries, dtype, optim_cfg, lrs, lazy) -> dict:
    """One state_dict with a Muon group and an AdamW group, parameters named (torch >= 2.5 style)."""
    state, groups = {}, {"muon": [], "adamw": []}
    params = [e for e in entries if e.kind in ("param", "stack")]
    for index, entry in enumerate(params):
        has = lambda slot: all(t in conv.slots.get(slot, {}) for t in entry.targets)
        if has("momentum"):
            state[index] = {"momentum_buffer": _torch_tensor(entry, conv.slots["momentum"], dtype, lazy)}
            groups["muon"].append(index)
        elif has("mu") and has("nu"):
            state[index] = {"step": np.asarray(float(conv.step or 0), np.float32),
                            "exp_avg": _torch_tensor(entry, conv.slots["mu"], dtype, lazy),
                            "exp_avg_sq": _torch_tensor(entry, conv.slots["nu"], dtype, lazy)}
            groups["adamw"].append(index)
        else:
            groups["adamw"].append(index)
    o = optim_cfg
    hyper = {
        "muon": {"use_muon": True} if o is None else {
            "use_muon": True, "momentum": o.momentum, "nesterov": o.nesterov, "ns_steps": o.ns_steps,
            "weight_decay": o.muon_weight_decay},
        "adamw": {"use_muon": False} if o is None else {
            "use_muon": False, "betas": (o.b1, o.b2), "eps": o.eps, "weight_decay": o.weight_decay},
    }
    param_groups = []
    for kind, ids in groups.items():
        if ids:
            group = {**hyper[kind], "params": ids, "param_names": [params[i].name for i in ids]}
            if lrs and kind in lrs:
                group["lr"] = lrs[kind]
            param_groups.append(group)
    return {"state": state, "param_groups": param_groups}


# ----------------------------------------------------------------------------- files


def read_file(path, *, key_map=None, overrides=(), weights_only: bool = False, family: str | None = None) -> Converted:
    """A ``.pt`` or ``.safetensors`` file (told apart by content) in jaxlm's form."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if torch_pt.is_torch_zip(path):
        obj, release = torch_pt.load_mapped(path)
        conv = from_torch_object(obj, str(path), key_map=key_map, overrides=overrides, weights_only=weights_only,
                                 family=family)
        conv.release = release
        return conv
    if safetensors_file.is_safetensors(path):
        return _from_safetensors(path, key_map, overrides, family)
    return _from_native(path, key_map, overrides, family)


def native_formats(family: str | None = None) -> list[tuple[str, str, Any]]:
    """``(family, suffix, format module)`` of every family's ``NATIVE_FORMATS`` (keymap's protocol)."""
    modules = [keymap.naming_module(family)] if family else keymap.naming_modules()
    return [(names.FAMILY, suffix, fmt) for names in modules
            for suffix, fmt in getattr(names, "NATIVE_FORMATS", {}).items()]


def native_format_of(path: pathlib.Path, family: str | None = None) -> tuple[str, Any]:
    """``(family, format module)`` for a family's own file format (a llama2.c model.bin...): the format
    that recognises the file, else the one its suffix names (whose reader then says what is wrong)."""
    if path.stat().st_size == 0:  # what an interrupted download or copy leaves
        raise CheckpointError(f"{path}: an empty file (0 bytes), not a checkpoint; copy or download it again")
    formats = native_formats(family)
    found = [f for f in formats if f[2].matches(path)] or [f for f in formats if f[1] == path.suffix]
    if len(found) != 1:
        known = ", ".join(f"{suffix} ({name})" for name, suffix, _ in formats)
        what = "several families' formats" if found else "neither a torch .pt (zip) nor a .safetensors file"
        raise CheckpointError(f"{path}: {what}" + (f", nor a family's own format ({known})" if known and not found
                                                   else "; name the family with --family"))
    name, _, fmt = found[0]
    return name, fmt


def _from_native(path: pathlib.Path, key_map, overrides, family) -> Converted:
    name, fmt = native_format_of(path, family)
    conv = from_torch_object(fmt.read_object(path), str(path), key_map=key_map, overrides=overrides, family=name)
    conv.notes.append(fmt.NOTE)
    return conv


def safetensors_object(path: pathlib.Path) -> tuple[dict, dict]:
    """``(the checkpoint dict, the file's metadata)`` of a ``.safetensors`` file: its tensors, the cfg of
    its metadata (else of the ``config.json`` beside it), its step and conventions."""
    tensors, metadata = safetensors_file.load(path)
    cfg = None
    if "cfg" not in metadata and (path.parent / "config.json").is_file():
        cfg = json.loads((path.parent / "config.json").read_text())
    return tensors_object(tensors, cfg, metadata), metadata


def tensors_object(tensors, cfg, metadata) -> dict:
    """The checkpoint dict of tensors with their cfg (else the one in the safetensors metadata), step and
    conventions, as ``analyze`` reads a ``.pt``."""
    if cfg is None and "cfg" in metadata:
        cfg = json.loads(metadata["cfg"])
    top = {"model": tensors} if cfg is None else {"cfg": cfg, "model": tensors}
    if "step" in metadata:  # a string; one that is not a number is no step (analyze ignores it)
        top["step"] = int(metadata["step"]) if metadata["step"].isdigit() else metadata["step"]
    if "conventions" in metadata:
        top[CONVENTIONS_KEY] = json.loads(metadata["conventions"])
    return top


def _from_safetensors(path: pathlib.Path, key_map, overrides, family=None) -> Converted:
    top, _ = safetensors_object(path)
    conv = from_torch_object(top, str(path), key_map=key_map, overrides=overrides, family=family)
    conv.layout["format"] = "safetensors"
    return conv


def read_hf_dir(path, *, key_map=None, overrides=(), family: str | None = None) -> Converted:
    """A Hugging Face directory (config.json + model.safetensors, or shards + index) in jaxlm's form."""
    from jaxlm.formats import hf_layout
    path = pathlib.Path(path).expanduser()
    tensors, config, metadata, shards = hf_layout.read_dir(path)
    conv = from_torch_object(tensors_object(tensors, config, metadata), str(path), key_map=key_map,
                             overrides=overrides, family=family)
    conv.layout["format"] = "hf"
    conv.layout["shards"] = len(shards)
    return conv


def _file_parts(conv: Converted, naming, dtype, optim_cfg, lrs) -> tuple[dict, dict, dict]:
    """(state_dict with each tensor once, cfg fields, conventions) for a safetensors file or directory;
    tensors are lazy: computed as the writer reaches them."""
    names = keymap.naming_module(conv.family)
    if conv.layout and naming is None:
        entries = _layout_entries(conv.layout["model_keys"])
    else:
        entries = [(e, None, None) for e in _entries(names, conv.model_cfg, naming)]
    sd = _model_state_dict(conv, entries, dtype, odict=False, lazy=True)
    obj = to_torch_object(conv, naming=naming, dtype=dtype, optim_cfg=optim_cfg, lrs=lrs, lazy=True)
    cfg = obj.get("cfg", {}) if isinstance(obj, dict) and isinstance(obj.get("cfg"), dict) else {}
    if not cfg and not (conv.layout and conv.layout.get("cfg", {}).get("fields")):
        cfg = names.fields_for_torch(conv.model_cfg, None)
    conventions = obj.get(CONVENTIONS_KEY) if isinstance(obj, dict) else None
    unique, seen = {}, set()
    for name, array in sd.items():  # safetensors cannot alias: a tied key is written once
        if id(array) not in seen:
            seen.add(id(array))
            unique[name] = array
    return unique, cfg, conventions or {}


def layout_of(path: pathlib.Path, layout: str | None = None) -> str:
    """What :func:`write_file` writes at ``path``: ``layout``, else by the suffix (none: a Hugging Face directory)."""
    if layout not in (None, "hf", "torch", "safetensors"):
        raise CheckpointError(f"layout {layout!r}: choose hf (a directory), torch (.pt) or safetensors")
    return layout or {".pt": "torch", ".pth": "torch", ".bin": "torch", ".safetensors": "safetensors"}.get(
        pathlib.Path(path).suffix, "hf")


def write_file(conv: Converted, path, *, naming: str | None = None, dtype: str | None = None,
               optim_cfg=None, lrs=None, layout: str | None = None, max_shard_size=None) -> pathlib.Path:
    """``.pt`` (the card's layout, or the original one), ``.safetensors`` (+ config.json next to it), or
    ``layout="hf"`` (or a path without a suffix): a Hugging Face directory, sharded at ``max_shard_size``."""
    path = pathlib.Path(path).expanduser()
    layout = layout_of(path, layout)
    if layout in ("hf", "safetensors"):
        sd, cfg, conventions = _file_parts(conv, naming, dtype, optim_cfg, lrs)
        metadata = {"format": "pt", "cfg": json.dumps(cfg)}
        if conv.step is not None:  # as in the .pt: the checkpoint's step, or none
            metadata["step"] = str(int(conv.step))
        if conventions:
            metadata["conventions"] = json.dumps(conventions)
        if layout == "hf":
            from jaxlm.formats import hf_layout
            return hf_layout.write_dir(sd, {**cfg, **conventions}, path, metadata=metadata,
                                       max_shard_size=max_shard_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors_file.save(sd, path, metadata)
        (path.parent / "config.json").write_text(json.dumps({**cfg, **conventions}, indent=2))
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return torch_pt.save(to_torch_object(conv, naming=naming, dtype=dtype, optim_cfg=optim_cfg, lrs=lrs, lazy=True),
                         path)
