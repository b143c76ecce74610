"""``python -m tools.torch_port.bench``: conversion speed and peak memory on a full-size checkpoint.

Makes (once, with torch) a Crowfeather-shaped ``step_017500.pt``: 54,538,752 bf16 parameters under a
``_orig_mod.`` prefix, Muon momentum for the 84 matrices and AdamW moments for the embedding and the
25 norms in bf16, one optimizer with two param groups — about the 217 MB of Shard's ``pretrain.pt``.
Then times ``to-orbax`` and ``to-torch`` each in a fresh process (peak RSS is that process's own,
interpreter and imports included), checks the round trip bit for bit, and prints a Markdown table
(``--write`` appends it to docs/PERFORMANCE.md under "Conversion").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def make_checkpoint(path: pathlib.Path) -> None:
    import torch

    from tools.torch_port.toylm_torch import Config, ToyLM
    torch.manual_seed(0)
    model = ToyLM(Config()).to(torch.bfloat16)
    named = list(model.named_parameters())
    assert sum(p.numel() for _, p in named) == 54_538_752
    is_matrix = lambda n, p: p.ndim >= 2 and "embed" not in n
    muon_ids = [i for i, (n, p) in enumerate(named) if is_matrix(n, p)]
    adam_ids = [i for i, (n, p) in enumerate(named) if not is_matrix(n, p)]
    state = {}
    for i in muon_ids:
        state[i] = {"momentum_buffer": torch.randn_like(named[i][1]) * 1e-3}
    for i in adam_ids:
        p = named[i][1]
        state[i] = {"step": torch.tensor(17500.0), "exp_avg": torch.randn_like(p) * 1e-4,
                    "exp_avg_sq": torch.rand_like(p) * 1e-8}
    optimizer = {"state": state, "param_groups": [
        {"params": muon_ids, "use_muon": True, "lr": 2e-3, "momentum": 0.95, "weight_decay": 0.0},
        {"params": adam_ids, "use_muon": False, "lr": 5e-4, "betas": (0.9, 0.95), "eps": 1e-10, "weight_decay": 0.0}]}
    cfg = {f: getattr(model.cfg, f) for f in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "mlp_hidden",
                                              "max_seq_len", "attention_pattern", "sliding_window", "engram_enabled",
                                              "engram_slots", "engram_inject_layer", "optimizer", "lm_head_logit_cap",
                                              "z_loss_weight", "lr_schedule")}
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": cfg, "model": sd, "step": 17500, "optim": optimizer}, path)


def child(argv: list[str]) -> None:
    """Run one CLI command here and report its own time and this process's peak RSS."""
    start = time.perf_counter()
    from tools.torch_port.__main__ import main
    if argv == ["baseline"]:  # what the interpreter and the converter's imports alone take
        import jaxlm.formats.converted  # noqa: F401
        import jaxlm.formats.orbax_export  # noqa: F401
        argv = None
    imported = time.perf_counter()
    code = main(argv) if argv else 0
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"code": code, "import_s": imported - start, "convert_s": done - imported, "peak_bytes": peak}))


def measure(argv: list[str]) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tools.torch_port.bench", "--child", *argv], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def same_file_contents(a: pathlib.Path, b: pathlib.Path) -> bool:
    import torch
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)

    def same(u, v):
        if isinstance(u, torch.Tensor):
            return u.dtype == v.dtype and u.shape == v.shape and torch.equal(u.reshape(-1).view(torch.uint8),
                                                                              v.reshape(-1).view(torch.uint8))
        if isinstance(u, dict):
            return list(u) == list(v) and all(same(u[k], v[k]) for k in u)
        if isinstance(u, (list, tuple)):
            return len(u) == len(v) and all(same(s, t) for s, t in zip(u, v))
        return u == v

    return same(x, y)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.torch_port.bench")
    parser.add_argument("--dir", default="/tmp/jaxlm_convert_bench")
    parser.add_argument("--write", action="store_true", help="append the table to docs/PERFORMANCE.md")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0
    work = pathlib.Path(args.dir)
    src = work / "step_017500.pt"
    if not src.is_file():
        make_checkpoint(src)
    size = src.stat().st_size
    shutil.rmtree(work / "orbax", ignore_errors=True)
    (work / "back.pt").unlink(missing_ok=True)
    rows = [("to-orbax (.pt -> Orbax)", measure(["to-orbax", str(src), str(work / "orbax")])),
            ("to-torch (Orbax -> .pt)", measure(["to-torch", str(work / "orbax"), str(work / "back.pt")])),
            ("(interpreter + imports only)", measure(["baseline"]))]
    exact = same_file_contents(src, work / "back.pt")
    lines = [
        "## Conversion",
        "",
        f"{datetime.date.today().isoformat()}, {machine()}. `python -m tools.torch_port.bench`: a Crowfeather-shaped",
        f"checkpoint (54,538,752 bf16 parameters, Muon momentum + AdamW moments in bf16, `_orig_mod.` prefix),",
        f"{size / 1e6:,.1f} MB. Each command in a fresh process; peak RSS includes the interpreter and imports.",
        "",
        "| command | conversion | whole command | peak RSS | peak / file size |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['convert_s']:.1f} s | {r['wall_s']:.1f} s | {r['peak_bytes'] / 2**20:,.0f} MiB "
                     f"| {r['peak_bytes'] / size:.2f}x |")
    lines += ["", f"Round trip `.pt -> Orbax -> .pt`: every tensor {'bit-identical' if exact else 'DIFFERENT'}.",
              "Tensors are read memory-mapped; to-orbax saves parameters, optimizer moments and kept tensors in",
              "separate Orbax calls without zstd and drops the source's pages in between, and to-torch computes",
              "each PyTorch tensor only as the writer reaches it, so neither holds two copies of the whole file.",
              "Times are with the file in the page cache (a first, cold read adds the disk's read time).", ""]
    table = "\n".join(lines)
    print(table)
    if args.write:  # replaces this section if it is there, appends it otherwise; other sections stay
        doc = REPO / "docs" / "PERFORMANCE.md"
        text = doc.read_text() if doc.is_file() else "# Performance\n\nMeasured tables, with hardware and date.\n"
        start = text.find("\n## Conversion\n")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            text = text[:start] + (text[end:] if end >= 0 else "")
        doc.parent.mkdir(exist_ok=True)
        doc.write_text(text.rstrip("\n") + "\n\n" + table)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
