"""Checkpoints from and for other tools: PyTorch ``.pt``, ``.safetensors``, jaxlm export and run directories.

Everything here works without torch installed, so ``jaxlm.load`` works from a plain install::

    from jaxlm import formats
    conv = formats.read_checkpoint("step_017500.pt")   # or .safetensors, an export or a run directory
    conv.model_cfg, conv.params, conv.slots, conv.step  # jaxlm config, Flax-layout arrays, optimizer moments
    formats.write_checkpoint(conv, "back.pt")           # the original layout, bit for bit
    formats.save_export(conv, "crowfeather_jax/")       # Orbax: for jaxlm.load and --init_from

Files: ``torch_pt`` (the .pt container and its restricted unpickler), ``safetensors_file``,
``hf_layout`` (config.json + model.safetensors, sharded or not), ``hub`` (Hub ids -> local files),
``skeleton`` (a file's non-tensor structure as JSON), ``keymap`` (the generic key mapping and the
naming-module protocol), one naming module per family (PyTorch names <-> jaxlm paths, cfg <->
config; ``toylm.py``), ``optimizer_state`` (torch optimizer <-> slots <-> optax), ``converted``
(the assembly), ``orbax_export``, ``run_dir``, ``train_state`` (``--init_from``).
"""

from __future__ import annotations

from jaxlm.errors import CheckpointError
from jaxlm.formats.checkpoints import read_checkpoint, save_export, write_checkpoint
from jaxlm.formats.converted import Converted, to_torch_object
from jaxlm.formats.hub import resolve
from jaxlm.formats.train_state import init_train_state

__all__ = ["CheckpointError", "Converted", "init_train_state", "read_checkpoint", "resolve", "save_export",
           "to_torch_object", "write_checkpoint"]
