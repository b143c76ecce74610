"""``inspect``: what a checkpoint holds and what would map to what, without converting anything."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from jaxlm.errors import CheckpointError
from jaxlm.formats import converted, optimizer_state, read_checkpoint, safetensors_file, torch_pt


def _size(path: pathlib.Path) -> str:
    if path.is_file():
        return f"{path.stat().st_size / 1e6:,.1f} MB"
    return f"{sum(p.stat().st_size for p in path.rglob('*') if p.is_file()) / 1e6:,.1f} MB"


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, torch_pt.PickledConfig):
        return f"pickled {value.origin} object ({len(value.fields)} fields)"
    if optimizer_state.is_torch_optimizer(value):
        groups = value["param_groups"]
        keys = sorted({k for s in value["state"].values() if isinstance(s, dict) for k in s})
        return (f"optimizer state: {len(groups)} groups of {', '.join(str(len(g.get('params', []))) for g in groups)} "
                f"parameters; per-parameter {', '.join(keys) or 'nothing (never stepped)'}")
    if isinstance(value, dict):
        arrays = sum(isinstance(v, np.ndarray) for v in value.values())
        return f"dict of {len(value)}" + (f" ({arrays} tensors)" if arrays else "")
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return repr(value)[:80]


def inspect(path, *, key_map=None, overrides=(), family=None) -> str:
    """The report printed by ``python -m tools.torch_port inspect FILE`` (a path or a Hub id)."""
    from jaxlm.formats import hf_layout, hub, orbax_export, run_dir
    path = hub.resolve(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    lines = [f"file        {path} ({_size(path)})"]
    if path.is_dir() and hf_layout.is_hf_dir(path) and not orbax_export.is_export(path) and run_dir.locate(path) is None:
        tensors, config, metadata, shards = hf_layout.read_dir(path)
        lines.append(f"kind        Hugging Face directory, {len(shards)} safetensors file{'s' if len(shards) > 1 else ''}")
        top = converted.tensors_object(tensors, config, metadata)  # as read_checkpoint reads it
    elif path.is_dir():
        conv = read_checkpoint(path, key_map=key_map, overrides=overrides, family=family)
        lines.append("kind        jaxlm directory")
        lines += _jaxlm_lines(conv)
        return "\n".join(lines)
    elif torch_pt.is_torch_zip(path):
        top = torch_pt.load(path)
    elif safetensors_file.is_safetensors(path):
        top, metadata = converted.safetensors_object(path)  # as read_checkpoint reads it
        lines.append(f"metadata    {metadata}")
    else:  # a family's own format (a llama2.c model.bin), or the "not a checkpoint" error
        family, fmt = converted.native_format_of(path, family)
        top = fmt.read_object(path)
        lines.append(f"note        {fmt.NOTE}")
    an = converted.analyze(top, str(path), key_map=key_map, overrides=overrides, family=family)
    if isinstance(top, dict) and an.model_key is not None:
        for key, value in top.items():
            lines.append(f"top-level   {key!s:<12} {_describe(value)}")
    if an.cfg_fields:
        kind = f"pickled {an.cfg_class} object" if an.cfg_class else "dict"
        lines.append(f"cfg ({kind}): " + ", ".join(f"{k}={v!r}" for k, v in an.cfg_fields.items()))
    if an.cfg_report is not None:
        report = an.cfg_report
        if report.renamed:
            lines.append("renamed     " + ", ".join(f"{k} -> {v}" for k, v in report.renamed.items()))
        lines.append("ignored     " + (", ".join(f"{k}={v!r}" for k, v in report.ignored.items()) or "(none)"))
        if report.at_default:
            lines.append("at default  " + ", ".join(f"{k}={v!r}" for k, v in report.at_default.items()))
        if report.inferred:
            lines.append("inferred    " + ", ".join(f"{k}={v}" for k, v in report.inferred.items()))
    lines.append(f"family      {an.family}" + (f", {an.plan.naming} naming" if an.plan and an.plan.naming else ""))
    for score, name, reason in an.claims:
        lines.append(f"claim       {name:<12} {score:.2f}  {reason}")
    for note in an.notes:
        lines.append(f"note        {note}")
    lines.append("mapping")
    width = max((len(n) for n in an.shapes), default=10)
    for entry in an.plan.entries if an.plan else []:
        array = an.state_dict[entry.name]
        targets = " + ".join(entry.targets)
        what = {
            "param": targets + (" (transposed)" if entry.transpose else ""),
            "stack": f"{targets} [{entry.index} of {entry.count}]" + (" (transposed)" if entry.transpose else ""),
            "tied": f"tied to {targets}: dropped if equal to it",
            "buffer": "buffer: kept for the way back",
            "kept": "key map null: kept for the way back",
        }[entry.kind]
        lines.append(f"  {entry.name:<{width}} {str(tuple(array.shape)):<14} {str(array.dtype):<9} -> {what}")
    for name, shape in an.plan.unmatched if an.plan else []:
        lines.append(f"  {name:<{width}} {str(shape):<14} {str(an.state_dict[name].dtype):<9} -> UNMATCHED")
    if an.model_cfg is not None:
        fields = ", ".join(f"{f.name}={getattr(an.model_cfg, f.name)!r}" for f in dataclasses.fields(an.model_cfg))
        lines.append(f"jaxlm       {type(an.model_cfg).__name__}({fields})")
    if an.step is not None:
        lines.append(f"step        {an.step}")
    if an.problems:
        lines += [f"problem     {p}" for p in an.problems]
    else:
        lines.append("status      converts cleanly (to-orbax)")
    return "\n".join(lines)


def _jaxlm_lines(conv) -> list[str]:
    fields = ", ".join(f"{f.name}={getattr(conv.model_cfg, f.name)!r}" for f in dataclasses.fields(conv.model_cfg))
    lines = [f"jaxlm       {type(conv.model_cfg).__name__}({fields})"]
    if conv.step is not None:  # as for a file: no step line where none is recorded
        lines.append(f"step        {conv.step}")
    for name, array in sorted(conv.params.items()):
        lines.append(f"  {name:<40} {str(tuple(array.shape)):<14} {array.dtype}")
    for slot, values in conv.slots.items():
        lines.append(f"optimizer   {slot}: {len(values)} tensors")
    if conv.layout:
        lines.append(f"torch       layout of {conv.layout.get('family_naming')} naming kept for to-torch")
    lines.append(f"family      {conv.family}")
    lines += [f"note        {n}" for n in conv.notes]
    return lines
