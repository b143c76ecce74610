"""A run killed, interrupted, moved and copied still tells its whole story.

The metrics log (``metrics.jsonl``) and TensorBoard hold every logged step across resumes and
kills (flushed as logged); ``loss.png`` is drawn from the whole run's log; Ctrl-C saves and exits
130; a moved or a copied run directory resumes (to the same bits); a finished run re-run says so
in one line and changes nothing.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, read_until, xla_flags

CONFIG = """
from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig
from jaxlm.models.toylm import ToyLMConfig

def get_config():
    return Config(
        model=ToyLMConfig(vocab_size=384, dim=32, n_layers=2, n_heads=2, head_dim=16, mlp_hidden=64,
                          max_seq_len=64, sliding_window=16),
        train=TrainConfig(steps=STEPS, batch_size=4, seq_len=32, log_every=2, eval_batches=1,
                          compute_dtype="float32"),
        optim=OptimConfig(lr=0.02, warmup_steps=2),
        data=DataConfig(source="pydoc", vocab_size=384, tokenizer_train_docs=300, cache_dir=CACHE),
        checkpoint=CheckpointConfig(every_steps=4, keep=2),
        out_dir=OUT,
    )
"""
STEPS = 20


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}


def _command(config, out):
    return [sys.executable, "-m", "jaxlm.train", "--config", str(config), f"--config.out_dir={out}"]


def _run_until(config, out, line_start: str, sig) -> tuple[int, str]:
    """Start training, send ``sig`` once a line starting with ``line_start`` is printed."""
    process = subprocess.Popen(_command(config, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    seen = read_until(process, lambda line: line.startswith(line_start))
    process.send_signal(sig)
    rest = process.communicate(timeout=120)[0]
    return process.returncode, "".join(seen) + rest


def _finish(config, out) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(config, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _tensorboard_scalars(out: pathlib.Path) -> dict[str, set[int]]:
    """``tag -> steps`` over every TensorBoard event file of the run (TFRecord framing read here)."""
    from tensorboardX.proto.event_pb2 import Event
    found: dict[str, set[int]] = {}
    for path in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            if i + 12 + length + 4 > len(data):
                break  # a record cut by the kill
            event = Event.FromString(data[i + 12:i + 12 + length])
            for value in event.summary.value:
                found.setdefault(value.tag, set()).add(event.step)
            i += 12 + length + 4
    return found


def _tree(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_kill_interrupt_move_copy_finish_and_rerun(tmp_path):
    config = tmp_path / "story.py"
    config.write_text(CONFIG.replace("STEPS", str(STEPS)).replace("CACHE", repr(str(tmp_path / "cache")))
                      .replace("OUT", repr(str(tmp_path / "unused"))))
    first = tmp_path / "first"

    # 1. kill -9 mid-run: what was logged is on disk, in both logs.
    code, text = _run_until(config, first, "train step 6:", signal.SIGKILL)
    assert code == -signal.SIGKILL, text
    from jaxlm.monitor import read_metrics
    logged = [s for s, _ in read_metrics(first)["train/loss"]]
    assert {2, 4, 6} <= set(logged), text
    assert {2, 4, 6} <= _tensorboard_scalars(first)["train/loss"]

    # 2. Ctrl-C: saves the current step, says so, exits 130.
    code, text = _run_until(config, first, "train step 10:", signal.SIGINT)
    assert code == 130, text
    assert "stopped by signal" in text  # (it resumed if a checkpoint had finished before the kill)
    saved = max(int(p.name) for p in (first / "checkpoints").iterdir() if p.name.isdigit())
    assert 10 <= saved < STEPS

    # 3. The directory is copied, then moved: both resume where it stopped.
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, copy)
    moved = tmp_path / "moved"
    first.rename(moved)
    done = _finish(config, moved)
    assert f"resumed from {moved / 'checkpoints' / str(saved)}" in done.stdout
    _finish(config, copy)

    # 4. Every logged step of the whole run is in the metrics log and in TensorBoard.
    every = set(range(2, STEPS + 1, 2))
    metrics = read_metrics(moved)
    assert {s for s, _ in metrics["train/loss"]} == every
    assert every <= _tensorboard_scalars(moved)["train/loss"]
    assert [s for s, _ in metrics["eval/loss"]] == [STEPS]
    assert all(np.isfinite(v) for _, v in metrics["train/loss"])
    # ... and the step re-done after the kill logged the same loss (deterministic resume).
    assert len({round(v, 6) for s, v in metrics["train/loss"] if s == 6}) == 1
    assert (moved / "loss.png").stat().st_size > 0

    # 5. The copy ended with the same bits as the moved run.
    from jaxlm.checkpoint import restore_run
    import jax
    a, b = (jax.tree.leaves(restore_run(d)[1]["params"]) for d in (moved, copy))
    assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b, strict=True))

    # 6. A finished run re-run: one line, exit 0, nothing in the directory changes.
    before = _tree(moved)
    again = _finish(config, moved)
    assert [line for line in again.stdout.splitlines() if "already trained to step" in line], again.stdout
    assert "resumed from" not in again.stdout and "held-out loss" not in again.stdout
    assert again.stderr.strip() == "", again.stderr[-2000:]
    assert _tree(moved) == before



def test_the_plot_is_drawn_from_every_process_of_the_run(tmp_path, monkeypatch):
    """Two processes (a resume) log into one run directory; the second's plot has both's steps,
    a step re-done after a kill once, and a line torn by a kill does not break the log."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    from jaxlm.monitor import METRICS_FILE, Monitor, read_metrics

    first = Monitor(tmp_path, total_steps=10, enabled=True)
    for step in (2, 4, 6):
        first.log(step, {"loss": 10.0 - step})
    # killed: no close(); the last record was cut in the middle
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 8, "train/lo')
    plotted = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, label=None, **kw: plotted.__setitem__(label, (list(x), list(y))))
    second = Monitor(tmp_path, total_steps=10, initial_step=4, enabled=True)
    for step in (6, 8, 10):  # resumed from the checkpoint of step 4: step 6 is logged again
        second.log(step, {"loss": 10.0 - step})
    second.log(10, {"loss": 3.5}, prefix="eval")
    png = second.close()
    assert png == tmp_path / "loss.png" and png.stat().st_size > 0
    assert plotted["train/loss"] == ([2, 4, 6, 8, 10], [8.0, 6.0, 4.0, 2.0, 0.0])
    assert plotted["eval/loss"] == ([10], [3.5])
    assert read_metrics(tmp_path)["train/loss"][-1] == (10, 0.0)
