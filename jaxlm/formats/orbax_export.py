"""The export directory: a converted checkpoint as one Orbax composite checkpoint.

Layout of ``DST`` (written by ``python -m tools.torch_port to-orbax SRC.pt DST``)::

    DST/export/      JSON: format tag, family, the jaxlm model config, step, notes, and the
                     PyTorch layout (key names, cfg, optimizer groups) for the way back
    DST/params/      parameters by jaxlm path, Flax layout, in their stored dtype (bf16 stays bf16;
                     training upcasts to float32 master weights when it starts)
    DST/optimizer/   optimizer moments by slot (momentum / mu / nu) and path, when the source had them
    DST/extras/      tensors kept verbatim for the way back (RoPE/mask buffers, unknown entries)
    DST/tokenizer.json   copied from next to the source, when there

``jaxlm.load(DST)`` builds the model from it; ``--init_from DST`` continues training from it.
"""

from __future__ import annotations

import pathlib
import shutil

import orbax.checkpoint as ocp

from jaxlm import config as C
from jaxlm.errors import CheckpointError
from jaxlm.formats.converted import Converted, flatten, nest
from jaxlm.models import config_class

FORMAT = "jaxlm-export"
VERSION = 1


def is_export(directory) -> bool:
    return (pathlib.Path(directory) / "export").is_dir() and (pathlib.Path(directory) / "params").is_dir()


def save(conv: Converted, directory, *, tokenizer=None, overwrite: bool = False) -> pathlib.Path:
    directory = pathlib.Path(directory).expanduser().resolve()
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{directory} exists and is not empty; choose a new directory (or --force)")
        shutil.rmtree(directory)
    elif directory.exists():
        directory.rmdir()  # Orbax creates it, atomically
    meta = {"format": FORMAT, "version": VERSION, "family": conv.family, "model": C.to_dict(conv.model_cfg),
            "step": conv.step, "source": conv.source, "notes": conv.notes, "layout": conv.layout}
    items = {"export": ocp.args.JsonSave(meta), "params": ocp.args.StandardSave(nest(conv.params))}
    if conv.has_optimizer:
        items["optimizer"] = ocp.args.StandardSave({slot: nest(values) for slot, values in conv.slots.items()})
    if conv.extras:
        items["extras"] = ocp.args.StandardSave(dict(conv.extras))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory, ocp.args.Composite(**items))
    if tokenizer is not None and pathlib.Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, directory / "tokenizer.json")
    return directory


def load(directory, *, with_optimizer: bool = True) -> Converted:
    directory = pathlib.Path(directory).expanduser().resolve()
    if not is_export(directory):
        raise CheckpointError(f"{directory}: not a jaxlm export directory (no export/ and params/ inside)")
    items = {"export": ocp.args.JsonRestore(), "params": ocp.args.StandardRestore()}
    if with_optimizer and (directory / "optimizer").is_dir():
        items["optimizer"] = ocp.args.StandardRestore()
    if (directory / "extras").is_dir():
        items["extras"] = ocp.args.StandardRestore()
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(directory, ocp.args.Composite(**items))
    except Exception as error:  # noqa: BLE001 - Orbax/tensorstore raise many types for a damaged directory
        raise CheckpointError(f"{directory}: the export cannot be read ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:160]})") from None
    meta = restored["export"]
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: export/ is not a {FORMAT} description")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{directory}: written by a newer jaxlm (export version {meta['version']}); upgrade jaxlm")
    model_data = dict(meta["model"])
    family = model_data.pop("family", meta["family"])
    model_cfg = C.dataclass_from_dict(config_class(family), model_data, "model.")
    optimizer = restored.get("optimizer") or {} if with_optimizer else {}
    return Converted(
        family=family, model_cfg=model_cfg, params=flatten(restored["params"]), step=meta.get("step"),
        slots={slot: flatten(tree) for slot, tree in optimizer.items()}, layout=meta.get("layout"),
        extras=dict(restored.get("extras") or {}), notes=list(meta.get("notes", [])), source=str(directory))
