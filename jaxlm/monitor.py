"""Training metrics: a progress bar on the console, a TensorBoard event log, a loss-curve PNG."""

from __future__ import annotations

import pathlib
import sys

import tqdm


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
        if enabled:
            from tensorboardX import SummaryWriter  # imported here: only the writing process needs it
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    def advance(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        for name, value in metrics.items():
            self.history.setdefault(f"{prefix}/{name}", []).append((step, float(value)))
            if self.writer:
                self.writer.add_scalar(f"{prefix}/{name}", float(value), step)
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
        curves = {k: v for k, v in self.history.items() if k.endswith("/loss")}
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


def _short(value: float) -> str:
    value = float(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"
