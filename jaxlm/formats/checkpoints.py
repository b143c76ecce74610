"""Reading and writing any checkpoint jaxlm knows (the functions ``jaxlm.formats`` exports)."""

from __future__ import annotations

import pathlib

from jaxlm.errors import CheckpointError
from jaxlm.formats.converted import Converted, apply_overrides, read_file, write_file
from jaxlm.formats.hub import resolve
from jaxlm.formats.keymap import as_key_map


def read_checkpoint(path, *, key_map=None, overrides=(), with_optimizer: bool = True, filename: str | None = None,
                    family: str | None = None) -> Converted:
    """Any checkpoint jaxlm reads, in jaxlm's form.

    ``path``: a file, a directory (jaxlm export or run, Hugging Face layout) or a Hub id (``Org/Repo``
    with ``filename=``, or ``hf://Org/Repo/FILE``; see ``hub.resolve``). ``key_map``: a dict or a
    JSON file path ``{their_name_or_regex: our_path}``; ``overrides``: ``FIELD=VALUE`` strings for
    the model config (e.g. ``rope_pairing=interleaved``); ``family``: read a foreign file as this
    family's instead of asking every family's claim.
    """
    path = resolve(path, filename)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    key_map = as_key_map(key_map)
    if path.is_file():
        return read_file(path, key_map=key_map, overrides=overrides, weights_only=not with_optimizer, family=family)
    from jaxlm.formats import hf_layout, orbax_export, run_dir
    if orbax_export.is_export(path):
        return apply_overrides(orbax_export.load(path, with_optimizer=with_optimizer), overrides)
    if run_dir.locate(path) is not None:
        return apply_overrides(run_dir.load(path, with_optimizer=with_optimizer), overrides)
    if run_dir.is_inference_export(path):
        return apply_overrides(run_dir.load_inference_export(path), overrides)
    if hf_layout.is_hf_dir(path):
        from jaxlm.formats.converted import read_hf_dir
        return read_hf_dir(path, key_map=key_map, overrides=overrides, family=family)
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pt"))
    if len(weights) == 1:  # a folder with one checkpoint file (and perhaps its config.json)
        return read_file(weights[0], key_map=key_map, overrides=overrides, weights_only=not with_optimizer,
                         family=family)
    raise CheckpointError(f"{path}: not a checkpoint directory (no jaxlm export or run, no config.json with "
                          "model.safetensors or model.safetensors.index.json, no single .safetensors/.pt file)")


def write_checkpoint(conv: Converted, path, **kwargs) -> pathlib.Path:
    """A ``.pt`` or ``.safetensors`` file, or with ``layout="hf"`` (or a path without a suffix) a Hugging
    Face directory, sharded with ``max_shard_size="2GB"`` (see :func:`jaxlm.formats.converted.write_file`)."""
    return write_file(conv, path, **kwargs)


def save_export(conv: Converted, directory, **kwargs) -> pathlib.Path:
    from jaxlm.formats import orbax_export
    return orbax_export.save(conv, directory, **kwargs)
