"""Training metrics: a progress bar on the console, a TensorBoard event log, a loss-curve PNG.

Every logged metric is also appended to ``out_dir/metrics.jsonl`` and both logs are flushed as
they are written, so that a run killed at any moment keeps what it logged. The plot is drawn from
that file, i.e. from the whole run across every resume, not from this process's steps only.
"""

from __future__ import annotations

import json
import pathlib
import sys

import tqdm

METRICS_FILE = "metrics.jsonl"


class Monitor:
    """Writes on process 0 only, so that several hosts print and log once."""

    def __init__(self, out_dir: str | pathlib.Path, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.out_dir = pathlib.Path(out_dir)
        self.enabled = enabled
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             # None: no bar when stdout is not a terminal (CI logs, nohup)
                             disable=None if enabled else True, file=sys.stdout, mininterval=1.0)
        self.writer = None
        self.metrics_file = None
        if enabled:
            self.writer = _EventFile(self.out_dir / "tensorboard")
            path = self.out_dir / METRICS_FILE
            torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
            self.metrics_file = open(path, "a", encoding="utf-8")
            if torn:  # the last line of a killed run: end it, so that the next record stands alone
                self.metrics_file.write("\n")

    def advance(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        for name, value in metrics.items():
            self.history.setdefault(f"{prefix}/{name}", []).append((step, float(value)))
            if self.writer:
                self.writer.add_scalar(f"{prefix}/{name}", float(value), step)
        if self.writer:
            self.writer.flush()  # on disk now: a kill -9 keeps every logged step
        if self.metrics_file:
            self.metrics_file.write(json.dumps({"step": step, **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}})
                                    + "\n")
            self.metrics_file.flush()
        if self.enabled and prefix == "train":
            shown = {k: v for k, v in metrics.items() if k in ("loss", "grad_norm", "tokens_per_s", "mfu")
                     or k.startswith("lr")}
            self.bar.set_postfix({k: _short(v) for k, v in shown.items()}, refresh=False)
        if self.enabled:
            self.bar.write(f"{prefix} step {step}: " + "  ".join(f"{k} {_short(v)}" for k, v in metrics.items()))

    def print(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self, png_name: str = "loss.png") -> pathlib.Path | None:
        """Flush the logs and draw the loss curves (train and eval) into ``out_dir/loss.png``."""
        self.bar.close()
        if not self.enabled:
            return None
        if self.writer:
            self.writer.close()
        if self.metrics_file:
            self.metrics_file.close()
        curves = {k: v for k, v in read_metrics(self.out_dir).items() if k.endswith("/loss")}
        if not curves:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, points in curves.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, marker="o" if len(points) < 20 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        path = self.out_dir / png_name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


class _EventFile:
    """A TensorBoard event file written synchronously (tensorboardX's SummaryWriter queues events
    for a background thread, so that its flush() does not put the newest ones on disk)."""

    def __init__(self, directory: pathlib.Path):
        import socket
        import time
        from tensorboardX.record_writer import RecordWriter  # only the writing process needs it
        directory.mkdir(parents=True, exist_ok=True)
        self.file = RecordWriter(str(directory / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"))
        self._write(file_version="brain.Event:2")
        self.flush()

    def _write(self, **fields) -> None:
        import time
        from tensorboardX.proto.event_pb2 import Event
        self.file.write(Event(wall_time=time.time(), **fields).SerializeToString())

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.proto.summary_pb2 import Summary
        self._write(step=int(step), summary=Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]))

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(out_dir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric the run logged, ``name -> [(step, value)]`` in step order. A step logged twice
    (re-done after a kill, from the last checkpoint) counts once: its last value. A line cut by a
    kill is skipped."""
    path = pathlib.Path(out_dir) / METRICS_FILE
    series: dict[str, dict[int, float]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (ValueError, KeyError, TypeError):
                continue
            for name, value in record.items():
                series.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in series.items()}


def _short(value: float) -> str:
    value = float(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"
