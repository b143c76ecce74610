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

import json
import pathlib
import time

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm import config as C
from jaxlm.errors import CheckpointError

# Fields that may change between the runs of one directory without changing what is
# trained: how often to log/save/sample, whether to resume, and the device layout.
RESUMABLE_CHANGES = ("resume", "train.log_every", "train.sample_prompt", "train.sample_tokens",
                     "train.eval_every", "train.eval_batches", "data.num_workers", "checkpoint.", "mesh.")


class Checkpointer:
    def __init__(self, cfg: C.Config):
        self.cfg = cfg
        self.out_dir = pathlib.Path(cfg.out_dir).expanduser().resolve()
        self.directory = self.out_dir / "checkpoints"
        ck = cfg.checkpoint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ck.keep,
            keep_period=ck.keep_every or None,
            enable_async_checkpointing=ck.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.last_save_time = time.monotonic()

    # ---------------------------------------------------------------- config guard

    def check_config(self) -> None:
        """Refuse to continue a directory that holds another config's run; record ours."""
        path = self.out_dir / "config.json"
        ours = C.to_dict(self.cfg)
        if path.exists() and self.cfg.resume:
            theirs = json.loads(path.read_text())
            diffs = [k for k in _flat_diff(theirs, ours) if not k.startswith(RESUMABLE_CHANGES)]
            if diffs:
                raise CheckpointError(
                    f"{self.out_dir} holds a run of another config (differs in {', '.join(diffs[:5])}); "
                    "use a new out_dir, or --config.resume=false to start over there")
        if jax.process_index() == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(C.to_json(self.cfg))

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
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.last_save_time = time.monotonic()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # ---------------------------------------------------------------- restore

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state, data_iterator=None, log=print):
        """The newest checkpoint that restores cleanly, or None; damaged ones are reported and skipped."""
        if not self.cfg.resume:
            return None, None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                items = {"state": ocp.args.StandardRestore(abstract_state)}
                if data_iterator is not None:
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                return step, restored["state"]
            except Exception as error:  # noqa: BLE001 - any failure means "not a usable checkpoint"
                log(f"checkpoint {self.directory / str(step)} is damaged ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}); falling back to an older one")
        return None, None


def _flat_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _flat_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
