"""The export directory: a converted checkpoint as Orbax PyTree checkpoints plus one JSON file.

Layout of ``DST`` (written by ``python -m tools.torch_port to-orbax SRC.pt DST``)::

    DST/export.json      format tag, family, the jaxlm model config, step, notes, and the PyTorch
                         layout (key names, cfg, optimizer groups) for the way back
    DST/params/          Orbax: parameters by jaxlm path, Flax layout, in their stored dtype (bf16 stays
                         bf16; training upcasts to float32 master weights when it starts)
    DST/optimizer/       Orbax: optimizer moments by slot (momentum / mu / nu) and path, when there were any
    DST/extras/          Orbax: tensors kept verbatim for the way back (RoPE/mask buffers, unknown entries)
    DST/tokenizer.json   copied from next to the source, when there

Like ``python -m jaxlm.checkpoint export`` (``params/`` + a JSON file), so ``jaxlm.load(DST)`` and
``--init_from DST`` read it. Each part is saved by its own Orbax call, releasing the source's
pages in between, so converting holds about one part in memory rather than the whole file; the
directory appears under its name only when complete.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import orbax.checkpoint as ocp

from jaxlm import config as C
from jaxlm.errors import CheckpointError
from jaxlm.formats.converted import Converted, flatten, nest
from jaxlm.models import config_class

FORMAT = "jaxlm-export"
VERSION = 1
META_FILE = "export.json"


def is_export(directory) -> bool:
    directory = pathlib.Path(directory)
    return (directory / META_FILE).is_file() and (directory / "params").is_dir()


def _checkpointer() -> ocp.Checkpointer:
    # No zstd: weights barely compress, and compressing costs a second copy of every array in memory.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def save(conv: Converted, directory, *, tokenizer=None, overwrite: bool = False) -> pathlib.Path:
    directory = pathlib.Path(directory).expanduser().resolve()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise CheckpointError(f"{directory} exists and is not empty; choose a new directory (or --force)")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    parts = {"params": lambda: nest(conv.params)}
    if conv.has_optimizer:
        parts["optimizer"] = lambda: {slot: nest(values) for slot, values in conv.slots.items()}
    if conv.extras:
        parts["extras"] = lambda: dict(conv.extras)
    with _checkpointer() as checkpointer:
        for name, tree in parts.items():
            checkpointer.save(partial / name, ocp.args.PyTreeSave(tree()))
            if conv.release is not None:
                conv.release()
    meta = {"format": FORMAT, "version": VERSION, "family": conv.family, "model": C.to_dict(conv.model_cfg),
            "step": conv.step, "source": conv.source, "notes": conv.notes, "layout": conv.layout}
    (partial / META_FILE).write_text(json.dumps(meta, indent=1))
    if tokenizer is not None and pathlib.Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, partial / "tokenizer.json")
    if directory.exists():
        shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
    partial.rename(directory)
    return directory


def load(directory, *, with_optimizer: bool = True) -> Converted:
    directory = pathlib.Path(directory).expanduser().resolve()
    if not is_export(directory):
        raise CheckpointError(f"{directory}: not a jaxlm export directory (no {META_FILE} and params/ inside)")
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / META_FILE}: not JSON ({e}); the export is damaged") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META_FILE} is not a {FORMAT} description")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{directory}: written by a newer jaxlm (export version {meta['version']}); upgrade jaxlm")
    restored = {}
    names = ["params"] + (["optimizer"] if with_optimizer else []) + ["extras"]
    with _checkpointer() as checkpointer:
        for name in names:
            if (directory / name).is_dir():
                try:
                    restored[name] = checkpointer.restore(directory / name)
                except Exception as error:  # noqa: BLE001 - Orbax/tensorstore raise many types for damage
                    raise CheckpointError(f"{directory / name}: cannot be read ({type(error).__name__}: "
                                          f"{str(error).splitlines()[0][:160]}); the export is damaged") from None
    model_data = dict(meta["model"])
    family = model_data.pop("family", meta["family"])
    model_cfg = C.dataclass_from_dict(config_class(family), model_data, "model.")
    return Converted(
        family=family, model_cfg=model_cfg, params=flatten(restored["params"]), step=meta.get("step"),
        slots={slot: flatten(tree) for slot, tree in restored.get("optimizer", {}).items()},
        layout=meta.get("layout"), extras=dict(restored.get("extras") or {}), notes=list(meta.get("notes", [])),
        source=str(directory))
