"""jaxlm's own directories read as a converted checkpoint: training runs and inference exports.

A run (``jaxlm/checkpoint.py``'s layout)::

    out_dir/config.json                  the run's config
    out_dir/checkpoints/<step>/state     {step, params, opt_state, rng} (Orbax PyTree)
    out_dir/checkpoints/<step>/config    the config again
    out_dir/torch_layout.json            the PyTorch layout, when the run began with --init_from a .pt
    out_dir/torch_extras.safetensors     and the tensors that layout keeps verbatim (buffers), if any

Only ``state`` and ``config`` are read (the data-iterator position needs grain and is of no use here).
An inference export (``python -m jaxlm.checkpoint export``): ``dst/params`` (Orbax), ``dst/config.json``,
``dst/tokenizer.json``, ``dst/inference_export.json`` (its step).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import orbax.checkpoint as ocp

from jaxlm import config as C
from jaxlm.errors import CheckpointError
from jaxlm.formats import safetensors_file
from jaxlm.formats.converted import Converted, flatten
from jaxlm.formats.optimizer_state import slots_from_optax
from jaxlm.models import config_class

TORCH_LAYOUT_FILE = "torch_layout.json"
TORCH_EXTRAS_FILE = "torch_extras.safetensors"  # the layout's verbatim tensors (buffers and the like)
EXPORT_FILE = "inference_export.json"  # an inference export's step (export.json is save_export's)


def _steps(checkpoints: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()
                  and (p / "state").is_dir())


def locate(path) -> tuple[pathlib.Path, pathlib.Path] | None:
    """(out_dir, step_dir) for a run directory (its newest step) or one of its step directories."""
    path = pathlib.Path(path).expanduser().resolve()
    if (path / "checkpoints").is_dir():
        steps = _steps(path / "checkpoints")
        if not steps:
            raise CheckpointError(f"{path}: a run directory without any finished checkpoint")
        return path, path / "checkpoints" / str(steps[-1])
    if (path / "state").is_dir() and path.name.isdigit():
        return path.parent.parent, path
    return None


def is_inference_export(path) -> bool:
    path = pathlib.Path(path)
    return (path / "params").is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").is_dir()


def _model_config(run_config: dict):
    model_data = dict(run_config["model"])
    family = model_data.pop("family")
    return family, C.dataclass_from_dict(config_class(family), model_data, "model.")


def load_inference_export(path) -> Converted:
    path = pathlib.Path(path).expanduser().resolve()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path / "params")
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"{path / 'params'}: cannot be read ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:160]})") from None
    run_config = json.loads((path / "config.json").read_text())
    family, model_cfg = _model_config(run_config)
    # The step the weights were trained to (older exports have none).
    export = path / EXPORT_FILE
    step = json.loads(export.read_text()).get("step") if export.is_file() else None
    return Converted(family=family, model_cfg=model_cfg, params={p: np.asarray(a) for p, a in flatten(params).items()},
                     step=step, source=str(path), run_config=run_config)


def _as_numpy(state_dir: pathlib.Path):
    """Restore arguments that read every array into host memory: a run saved sharded over N devices
    then reads in a process with any number of devices (Orbax would otherwise want the saved topology)."""
    import absl.logging
    import jax
    verbosity = absl.logging.get_verbosity()
    absl.logging.set_verbosity(absl.logging.ERROR)   # Orbax warns that the step's own metadata file is elsewhere
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            tree = checkpointer.metadata(state_dir).item_metadata
    finally:
        absl.logging.set_verbosity(verbosity)
    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                        is_leaf=lambda leaf: hasattr(leaf, "shape"))


def load(path, *, with_optimizer: bool = True) -> Converted:
    found = locate(path)
    if found is None:
        raise CheckpointError(f"{path}: not a jaxlm run directory (no checkpoints/<step>/state inside)")
    out_dir, step_dir = found
    try:
        items = {"state": ocp.args.PyTreeRestore(restore_args=_as_numpy(step_dir / "state"))}
        if (step_dir / "config").is_dir():
            items["config"] = ocp.args.JsonRestore()
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(step_dir, ocp.args.Composite(**items))
    except Exception as error:  # noqa: BLE001 - a damaged step directory fails in many ways
        raise CheckpointError(f"{step_dir}: cannot be read ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:160]})") from None
    run_config = restored.get("config")
    if run_config is None and (out_dir / "config.json").is_file():
        run_config = json.loads((out_dir / "config.json").read_text())
    if run_config is None:
        raise CheckpointError(f"{step_dir}: no config next to the checkpoint")
    family, model_cfg = _model_config(run_config)
    state = restored["state"]
    # The model's weights: its parameters and, where the family has any, its Buffer variables.
    weights = {**flatten(state["params"]), **flatten(state.get("buffers") or {})}
    params = {path.removesuffix("/value"): np.asarray(a) for path, a in weights.items()}
    slots, count = slots_from_optax(state["opt_state"]) if with_optimizer else ({}, None)
    layout_file = out_dir / TORCH_LAYOUT_FILE
    layout = json.loads(layout_file.read_text()) if layout_file.is_file() else None
    extras = safetensors_file.load(out_dir / TORCH_EXTRAS_FILE)[0] if (out_dir / TORCH_EXTRAS_FILE).is_file() else {}
    conv = Converted(family=family, model_cfg=model_cfg, params=params, step=int(np.asarray(state["step"])),
                     slots=slots, layout=layout, extras=extras, source=str(step_dir),
                     run_config=run_config)
    if count is not None and count != conv.step:
        conv.notes.append(f"optimizer count {count} differs from the step {conv.step}")
    return conv


def run_optim_config(run_config: dict):
    """The run's OptimConfig (for the hyperparameters and learning rates written into a .pt)."""
    data = dict(run_config.get("optim", {}))
    return C.dataclass_from_dict(C.OptimConfig, data, "optim.")
