"""``--init_from``: a train state that starts from a converted checkpoint and continues its run.

The freshly initialised state (``train.init_state``) fixes every leaf's shape, dtype and
sharding; the checkpoint's parameters (upcast to the float32 master dtype) replace the fresh
ones and, when it carries optimizer state, its Muon momentum and AdamW moments fill the optax
state and every optax count — and the step counter — is set to the saved step, so the learning-
rate schedule continues where the PyTorch run stopped. A weights-only checkpoint starts the
optimizer fresh at step 0.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np

from jaxlm.errors import CheckpointError
from jaxlm.formats.checkpoints import read_checkpoint
from jaxlm.formats.optimizer_state import fill_optax
from jaxlm.formats import safetensors_file
from jaxlm.formats.run_dir import TORCH_EXTRAS_FILE, TORCH_LAYOUT_FILE
from jaxlm.optim import path_name

def _place(array, leaf):
    """``array`` cast to the leaf's dtype and laid out with the leaf's sharding (works multi-host)."""
    host = np.asarray(array).astype(leaf.dtype)
    if tuple(host.shape) != tuple(leaf.shape):
        raise CheckpointError(f"shape {host.shape} does not fit the model's {tuple(leaf.shape)}")
    return jax.make_array_from_callback(host.shape, leaf.sharding, lambda index: host[index])


def check_model_config(theirs, ours, source, log=print) -> None:
    if theirs.family != ours.family:
        raise CheckpointError(f"{source} holds a {theirs.family} model, the config a {ours.family} one")
    for field in dataclasses.fields(ours):
        a, b = getattr(theirs, field.name), getattr(ours, field.name)
        if a == b:
            continue
        if field.name == "vocab_size":
            raise CheckpointError(f"vocabulary mismatch: {source} has {a} tokens, the config "
                                  f"model.vocab_size = {b}; use the checkpoint's tokenizer and vocab size")
        # Shape fields (the family config's SHAPE_FIELDS) change parameter shapes: a mismatch is an
        # error. Others (window, conventions, soft-cap) only change the computation: the run's config wins.
        if field.name in type(ours).SHAPE_FIELDS:
            raise CheckpointError(f"{source} has model.{field.name} = {a}, the config {b}; "
                                  f"set --config.model.{field.name}={a}")
        log(f"note: {source} says model.{field.name} = {a!r}, the run config {b!r}; the run config is used "
            f"(--config.model.{field.name}={a!r} to follow the checkpoint)")


def init_train_state(source, cfg, state, *, key_map=None, out_dir=None, log=print):
    """``state`` (the fresh train state) with params, optimizer moments and step from ``source``."""
    conv = read_checkpoint(source, key_map=key_map)
    check_model_config(conv.model_cfg, cfg.model, source, log)

    def param(path, leaf):
        name = path_name(path)
        if name not in conv.params:
            raise CheckpointError(f"{source} has no parameter {name}")
        try:
            return _place(conv.params[name], leaf)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: parameter {name}: {e}") from None

    params = jax.tree_util.tree_map_with_path(param, state["params"])
    filled = {"params": params}
    if "buffers" in state:  # a family's Buffer variables are weights of the checkpoint too
        filled["buffers"] = jax.tree_util.tree_map_with_path(param, state["buffers"])
    opt_state, step = state["opt_state"], 0
    if conv.has_optimizer:
        step = int(conv.step or 0)
        opt_state, notes = fill_optax(state["opt_state"], conv.slots, step, _place)
        for note in notes:
            log(f"note: {note}")
        log(f"initialised from {source}: parameters and optimizer state at step {step:,}")
    else:
        log(f"initialised from {source}: parameters only (no optimizer state); the optimizer starts at step 0")
    for note in conv.notes:
        log(f"  {note}")
    if out_dir is not None and conv.layout and jax.process_index() == 0:
        # So that `to-torch` of this run writes the source's key names, cfg and optimizer layout back.
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / TORCH_LAYOUT_FILE).write_text(json.dumps(conv.layout))
        if conv.extras:
            safetensors_file.save(conv.extras, out / TORCH_EXTRAS_FILE)
    return {**state, **filled, "opt_state": opt_state, "step": _place(np.int32(step), state["step"])}
