"""Checkpoints from and for other tools: PyTorch ``.pt``, ``.safetensors``, jaxlm export and run directories.

Everything here works without torch installed, so ``jaxlm.load`` works from a plain install::

    from jaxlm import formats
    conv = formats.read_checkpoint("step_017500.pt")   # or .safetensors, an export or a run directory
    conv.model_cfg, conv.params, conv.slots, conv.step  # jaxlm config, Flax-layout arrays, optimizer moments
    formats.write_checkpoint(conv, "back.pt")           # the original layout, bit for bit
    formats.save_export(conv, "crowfeather_jax/")       # Orbax: for jaxlm.load and --init_from

Files: ``torch_pt`` (the .pt container and its restricted unpickler), ``safetensors_file``,
``skeleton`` (a file's non-tensor structure as JSON), ``<family>.py`` (PyTorch names <-> jaxlm
paths, cfg <-> config; ``toylm.py``), ``optimizer_state`` (torch optimizer <-> slots <-> optax),
``converted`` (the assembly), ``orbax_export``, ``run_dir``, ``train_state`` (``--init_from``).
"""

from __future__ import annotations

import pathlib

from jaxlm.errors import CheckpointError
from jaxlm.formats.converted import Converted, apply_overrides, read_file, to_torch_object, write_file


def _key_map(key_map):
    if key_map is None or isinstance(key_map, dict):
        return key_map
    from jaxlm.formats.toylm import load_key_map
    return load_key_map(key_map)


def read_checkpoint(path, *, key_map=None, overrides=(), with_optimizer: bool = True) -> Converted:
    """Any checkpoint jaxlm reads, in jaxlm's form.

    ``key_map``: a dict or a JSON file path ``{their_name_or_regex: our_path}``; ``overrides``:
    ``FIELD=VALUE`` strings for the model config (e.g. ``rope_pairing=interleaved``).
    """
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        return read_file(path, key_map=_key_map(key_map), overrides=overrides, weights_only=not with_optimizer)
    from jaxlm.formats import orbax_export, run_dir
    if orbax_export.is_export(path):
        return apply_overrides(orbax_export.load(path, with_optimizer=with_optimizer), overrides)
    if run_dir.locate(path) is not None:
        return apply_overrides(run_dir.load(path, with_optimizer=with_optimizer), overrides)
    if run_dir.is_inference_export(path):
        return apply_overrides(run_dir.load_inference_export(path), overrides)
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pt"))
    if len(weights) == 1:  # a Hugging Face style folder: model.safetensors + config.json
        return read_file(weights[0], key_map=_key_map(key_map), overrides=overrides, weights_only=not with_optimizer)
    raise CheckpointError(f"{path}: not a checkpoint directory (no jaxlm export, run, or single "
                          ".safetensors/.pt file inside)")


def write_checkpoint(conv: Converted, path, **kwargs) -> pathlib.Path:
    """A ``.pt`` or ``.safetensors`` file (see :func:`jaxlm.formats.converted.write_file`)."""
    return write_file(conv, path, **kwargs)


def save_export(conv: Converted, directory, **kwargs) -> pathlib.Path:
    from jaxlm.formats import orbax_export
    return orbax_export.save(conv, directory, **kwargs)


def init_train_state(source, cfg, state, **kwargs):
    """The train state ``{step, params, opt_state, rng}`` of ``--init_from`` (see ``train_state``)."""
    from jaxlm.formats.train_state import init_train_state as init
    return init(source, cfg, state, **kwargs)


__all__ = ["CheckpointError", "Converted", "init_train_state", "read_checkpoint", "save_export", "to_torch_object",
           "write_checkpoint"]
