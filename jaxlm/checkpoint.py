"""Orbax checkpoints of a training run: state, data position and config, with automatic resume.

Layout of a run directory::

    out_dir/config.json               the resolved config of the run (plain JSON)
    out_dir/checkpoints/<step>/state  params, optimizer state, step, rng (Orbax PyTree)
    out_dir/checkpoints/<step>/data   the Grain iterator position (JSON per process)
    out_dir/checkpoints/<step>/config the config again, so one checkpoint stands alone

Orbax writes each step into a temporary directory and renames it when complete, so
a run killed during a save leaves only finished checkpoints behind; saves run in a
background thread, so the train loop does not wait for the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import time

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm import config as C
from jaxlm.errors import CheckpointError, JaxlmError

# Fields that may change between the runs of one directory without changing what is
# trained: how often to log/save/sample, whether to resume, the device layout, and the
# speed knobs that change how (not what) the step computes.
# Where the run lives is not part of what it is: a moved or copied run directory resumes.
RESUMABLE_CHANGES = ("out_dir", "resume", "train.log_every", "train.sample_prompt", "train.sample_tokens",
                     "train.eval_every", "train.eval_batches", "train.remat", "train.scan_layers",
                     "train.loss_chunk", "train.fused_loss", "data.num_workers", "data.read_threads",
                     "checkpoint.", "mesh.")


class Checkpointer:
    def __init__(self, cfg: C.Config):
        self.cfg = cfg
        self.out_dir = pathlib.Path(cfg.out_dir).expanduser().resolve()
        self.directory = self.out_dir / "checkpoints"
        if not cfg.resume and self.directory.exists() and jax.process_index() == 0:
            # Starting over must not lose the old run: its checkpoints are moved aside.
            aside = self.out_dir / time.strftime("checkpoints.before-%Y%m%d-%H%M%S")
            self.directory.rename(aside)
            # The old run's logged metrics go with its checkpoints: the new run's plot starts afresh.
            from jaxlm.monitor import METRICS_FILE
            if (self.out_dir / METRICS_FILE).exists():
                (self.out_dir / METRICS_FILE).rename(aside / METRICS_FILE)
            print(f"resume=false: previous checkpoints moved to {aside}")
        self._manager = None
        self.last_save_time = time.monotonic()
        self.saving_step: int | None = None  # the step of the save in flight, for error messages

    @property
    def manager(self) -> ocp.CheckpointManager:
        """Made on first use, so that a refused config starts no Orbax thread."""
        if self._manager is None:
            ck = self.cfg.checkpoint
            options = ocp.CheckpointManagerOptions(
                max_to_keep=ck.keep,
                keep_period=ck.keep_every or None,
                enable_async_checkpointing=ck.async_save,
                cleanup_tmp_directories=True,  # what a killed save left behind is never a checkpoint
                create=True,
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    # ---------------------------------------------------------------- config guard

    def check_config(self, record: bool = True) -> None:
        """Refuse to continue a directory that holds another config's run; record ours (``record``)."""
        path = self.out_dir / "config.json"
        ours = C.to_dict(self.cfg)
        if path.exists() and self.cfg.resume:
            try:
                theirs = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise CheckpointError(f"{path}: unreadable ({type(error).__name__}); restore it from a copy, or "
                                      "use a new out_dir") from None
            diffs = [k for k in _flat_diff(theirs, ours) if not k.startswith(RESUMABLE_CHANGES)]
            if diffs:
                raise CheckpointError(
                    f"{self.out_dir} holds a run of another config (differs in {', '.join(diffs[:5])}); "
                    "use a new out_dir, or --config.resume=false to start over there")
        if record:
            self.record_config()

    def record_config(self) -> None:
        if jax.process_index() == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(C.to_json(self.cfg))

    # ---------------------------------------------------------------- save

    def should_save(self, step: int) -> bool:
        ck = self.cfg.checkpoint
        by_steps = ck.every_steps and step % ck.every_steps == 0
        by_time = ck.every_minutes and time.monotonic() - self.last_save_time >= 60 * ck.every_minutes
        return bool(by_steps or by_time)

    def save(self, step: int, state, data_iterator=None) -> None:
        if step in self.manager.all_steps():
            return
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(C.to_dict(self.cfg))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.saving_step = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:  # noqa: BLE001 - disk full, permissions, quota: all end the same way
            raise CheckpointError(self._save_failed(step, error)) from None
        self.last_save_time = time.monotonic()

    def wait(self) -> None:
        """Block until the background saves are on disk (a failed one is reported here)."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(self._save_failed(self.saving_step, error)) from None

    def _save_failed(self, step, error: Exception) -> str:
        first_line = (str(error).splitlines() or [""])[0][:200]
        return (f"could not write the checkpoint of step {step} to {self.directory} ({type(error).__name__}: "
                f"{first_line}); the previous checkpoints are intact: free space and re-run to resume")

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    # ---------------------------------------------------------------- restore

    def latest_step(self) -> int | None:
        if not self.directory.is_dir():
            return None
        return self.manager.latest_step()

    def restore_latest(self, abstract_state, data_iterator=None, log=print):
        """``(step, state, data_restored)`` of the newest checkpoint that restores cleanly,
        or ``(None, None, False)``.

        A damaged checkpoint (truncated, garbage, half deleted) is reported, moved to
        ``out_dir/damaged/<step>`` (kept for inspection, never deleted) and the next older
        one is tried, so that training re-does the lost steps and writes them anew. The data
        position is restored when the checkpoint holds one for this process layout (Grain
        saves one file per process); ``data_restored`` says whether it did.
        """
        if not self.cfg.resume:
            return None, None, False
        restored_data = {}

        def items_for(step):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            restored_data["yes"] = data_iterator is not None and self.has_data_position(step)
            if restored_data["yes"]:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            return items

        step, restored = restore_newest(self.manager, items_for, log, quarantine=self.out_dir / "damaged")
        if restored is None:
            return None, None, False
        return step, restored["state"], restored_data["yes"]

    def has_data_position(self, step: int) -> bool:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (self.directory / str(step) / "data" / name).is_file()


def restore_newest(manager, items_for, log=print, quarantine: pathlib.Path | None = None):
    """Try the checkpoints of ``manager`` from the newest down; ``(step, restored)`` or ``(None, None)``.

    ``items_for(step)`` gives the Orbax restore arguments of each item to read.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            with _draining_event_loops():
                return step, manager.restore(step, args=ocp.args.Composite(**items_for(step)))
        except Exception as error:  # noqa: BLE001 - any failure means "not a usable checkpoint"
            path = pathlib.Path(manager.directory) / str(step)
            log(f"checkpoint {path} is damaged ({_first_line(error)}); falling back to an older one")
            if quarantine is not None and jax.process_index() == 0:
                quarantine.mkdir(parents=True, exist_ok=True)
                path.rename(quarantine / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                manager.reload()
    return None, None


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that, closed with tasks still pending, first lets them finish.

    Orbax restores a checkpoint as one ``asyncio.gather`` of TensorStore reads on a fresh loop, and
    closes that loop as soon as the gather raises. In a damaged checkpoint the first bad array raises
    while the other reads are still in flight; when they complete, TensorStore hands their results to
    the closed loop, and each prints a traceback ("Event loop is closed", "Exception ignored in:
    <coroutine ...>") long after the failure was reported and handled. Waiting for them first keeps
    the fallback quiet (it costs at most the read a good checkpoint takes; bounded, so that a read
    that never ends cannot hang the run); the failure itself still propagates from the gather.
    """

    DRAIN_SECONDS = 120.0

    def close(self) -> None:
        pending = asyncio.all_tasks(self)
        if pending and not self.is_running() and not self.is_closed():
            done, _ = self.run_until_complete(asyncio.wait(pending, timeout=self.DRAIN_SECONDS))
            for task in done:  # their failures are the same damage, already reported: retrieved, not logged
                if not task.cancelled():
                    task.exception()
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingEventLoop()


@contextlib.contextmanager
def _draining_event_loops():
    """Loops made meanwhile (Orbax makes one per restore) are ``_DrainingEventLoop``."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _flat_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields both dicts have and disagree on (a field that one jaxlm
    version has and another lacks is not a difference of the run)."""
    keys = sorted(set(a) & set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _flat_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


# ------------------------------------------------------------------------ inference export


def restore_run(run_dir: str | pathlib.Path, step: int | None = None):
    """``(config, state)`` of a run directory's newest (or given) checkpoint, on one device."""
    from jaxlm.models import config_from_dict
    from jaxlm.state import plan_state
    from jaxlm.sharding import make_mesh

    run_dir = pathlib.Path(run_dir).expanduser().resolve()  # Orbax wants absolute paths
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a jaxlm run directory (no config.json)")
    try:
        cfg = config_from_dict(json.loads(config_path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: unreadable ({_first_line(error)}); not a jaxlm run directory") from None
    mesh = make_mesh(C.MeshConfig(data=1), devices=jax.devices()[:1])
    plan = plan_state(cfg, mesh)
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoints/ folder: train it first (python -m jaxlm.train)")
    manager = ocp.CheckpointManager(run_dir / "checkpoints", options=ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, create=False))
    try:
        steps = sorted(manager.all_steps())
        if step is not None and step not in steps:
            raise CheckpointError(f"{run_dir / 'checkpoints'} has no step {step}; its steps: "
                                  f"{', '.join(map(str, steps)) or 'none'}")
        items = {"state": ocp.args.StandardRestore(plan.abstract)}
        with jax.set_mesh(mesh):
            if step is not None:
                try:
                    return cfg, manager.restore(step, args=ocp.args.Composite(**items))["state"]
                except Exception as error:  # noqa: BLE001 - a damaged checkpoint, whatever Orbax raises
                    raise CheckpointError(f"{run_dir / 'checkpoints' / str(step)} is damaged "
                                          f"({_first_line(error)}); export another --step") from None
            found, restored = restore_newest(manager, lambda _: items)
    finally:
        manager.close()
    if restored is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'} holds no usable checkpoint: train it first")
    return cfg, restored["state"]


def export_inference(run_dir: str | pathlib.Path, dst: str | pathlib.Path, *, dtype: str = "float32",
                     step: int | None = None) -> pathlib.Path:
    """Write parameters only (no optimizer state), as float32 or bfloat16, with config and tokenizer.

    Layout: ``dst/params`` (Orbax), ``dst/config.json``, ``dst/tokenizer.json`` when the run has one,
    and ``dst/inference_export.json`` (the step the weights were trained to, so that a converted file keeps it).
    """
    import jax.numpy as jnp
    from flax import nnx
    from jaxlm.formats.run_dir import EXPORT_FILE

    cfg, state = restore_run(run_dir, step)
    # A family's Buffer variables belong to the model as much as its parameters: one tree of both.
    weights = nnx.merge_state(state["params"], state["buffers"]) if "buffers" in state else state["params"]
    params = nnx.to_pure_dict(weights)
    if dtype == "bfloat16":
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    elif dtype != "float32":
        raise CheckpointError(f"export dtype {dtype!r}: allowed 'float32', 'bfloat16'")
    dst = pathlib.Path(dst).expanduser().resolve()
    if (dst / "params").exists():
        raise CheckpointError(f"{dst / 'params'} already exists; choose a new destination")
    dst.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(dst / "params", params)
    (dst / "config.json").write_text(C.to_json(cfg))
    (dst / EXPORT_FILE).write_text(json.dumps({"step": int(state["step"]), "dtype": dtype}) + "\n")
    tokenizer = pathlib.Path(run_dir) / "tokenizer.json"
    if tokenizer.is_file():
        (dst / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return dst


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    from jaxlm.errors import ArgumentParser, non_negative_int
    parser = ArgumentParser(prog="python -m jaxlm.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="parameters only, for jaxlm.load and python -m jaxlm.generate")
    export.add_argument("run_dir")
    export.add_argument("dst")
    export.add_argument("--bf16", action="store_true", help="store bfloat16 weights (half the size)")
    export.add_argument("--step", type=non_negative_int, help="a given checkpoint step (default: the newest)")
    args = parser.parse_args(argv)
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only managers are not the user's
    try:
        dst = export_inference(args.run_dir, args.dst, dtype="bfloat16" if args.bf16 else "float32", step=args.step)
    except JaxlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a destination that cannot be written
        print(f"error: {error.filename or args.dst}: {error.strerror or error}; choose another destination",
              file=sys.stderr)
        return 2
    print(f"exported to {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
