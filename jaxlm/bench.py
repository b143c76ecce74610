"""Throughput, MFU, memory and compile time: ``python -m jaxlm.bench --config crowfeather.py``.

    python -m jaxlm.bench --config crowfeather.py                        # the train step as configured
    python -m jaxlm.bench --config crowfeather.py --batch 16,32 --torch  # + the PyTorch ToyLM, same device
    python -m jaxlm.bench --config crowfeather.py --variants plain,chunked,fused,scan
    python -m jaxlm.bench --config crowfeather.py --max_batch --variants remat
    python -m jaxlm.bench --config crowfeather.py --mode decode          # or --mode data

The train mode times the real step (``jaxlm.train.jit_train_step`` over ``jaxlm.state.plan_state``:
the configured optimizer, clipping, loss and fast paths) on synthetic tokens. MFU is the model's
``flops_per_token(seq)`` x tokens/s over the device's peak (``jaxlm.hardware``; ``--peak_tflops``
overrides). Each row runs in a process of its own: its peak memory is its own, a row that runs out
of memory does not end the others, and JAX (which reserves most of a GPU's memory when it starts)
and PyTorch never share the device. ``--torch`` times ``tools/torch_port`` (a repository checkout
is needed for it) through ``tools.torch_port.bench_torch``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

from jaxlm import config as C  # light: no JAX, so the worker processes start fast
from jaxlm.errors import ArgumentParser, ConfigError, non_negative_int, positive_float, positive_int, positive_ints

RESULT_TAG = "BENCH_RESULT "

# Named fast-path settings of ``cfg.train``, for before/after rows (``--variants``). "config" is the
# config as it is; each other preset starts from it and sets only what it names.
VARIANTS = {
    "config": {},
    "plain": {"fused_loss": False, "loss_chunk": 0, "remat": "none", "scan_layers": False},
    "chunked": {"fused_loss": False, "loss_chunk": 1024, "remat": "none", "scan_layers": False},
    "fused": {"fused_loss": True, "remat": "none", "scan_layers": False},
    "scan": {"fused_loss": True, "remat": "none", "scan_layers": True},
    "remat": {"fused_loss": True, "remat": "full", "scan_layers": False},
    "remat_dots": {"fused_loss": True, "remat": "dots", "scan_layers": False},
    "xla_attention": {"attention": "xla"},   # XLA's attention instead of cuDNN flash (memory grows as T^2)
}


# --------------------------------------------------------------------------- the JAX train step


def apply_variant(cfg, variant: str):
    """``cfg`` with the named preset's train fields set; returns the attention implementation asked for."""
    settings = dict(VARIANTS[variant])
    attention = settings.pop("attention", None)
    for name, value in settings.items():
        setattr(cfg.train, name, value)
    return attention


def time_train_step(cfg, *, steps: int, repeats: int, warmup: int, attention: str | None = None,
                    profile_dir: str | None = None, hlo_path: str | None = None) -> dict:
    """Compile and time ``cfg``'s train step; step time is the median over ``repeats`` blocks of ``steps``.
    ``attention`` forces an attention implementation ("xla", "cudnn") for this step."""
    from jaxlm.models import layers

    with layers.ATTENTION.scope(attention):
        return _time_train_step(cfg, steps=steps, repeats=repeats, warmup=warmup, profile_dir=profile_dir,
                                hlo_path=hlo_path)


def _time_train_step(cfg, *, steps, repeats, warmup, profile_dir, hlo_path) -> dict:
    import jax
    import numpy as np

    from jaxlm import sharding
    from jaxlm.state import plan_state
    from jaxlm.train import jit_train_step

    t = cfg.train
    mesh = sharding.make_mesh(cfg.mesh)
    plan = plan_state(cfg, mesh)
    rng = np.random.default_rng(cfg.seed)
    with sharding.use_mesh(mesh):  # as train.py: the mesh and the activation layouts
        state = plan.init(cfg)
        batches = [sharding.global_batch(
            rng.integers(0, cfg.model.vocab_size, (t.grad_accum, t.batch_size, t.seq_len + 1), dtype=np.int32),
            mesh, batch_axis=1) for _ in range(2)]
        start = time.perf_counter()
        step = jit_train_step(plan, cfg).lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - start
        estimate = _memory_estimate(step)
        hlo_text = step.as_text()
        attention_calls = attention_kernels(hlo_text)
        if hlo_path:
            with open(hlo_path, "w") as f:
                f.write(hlo_text)
        losses = []
        for i in range(warmup):
            state, metrics = step(state, batches[i % 2])
            losses.append(float(metrics["loss"]))
        block_times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(steps):
                state, metrics = step(state, batches[i % 2])
            jax.block_until_ready((state, metrics))
            block_times.append((time.perf_counter() - start) / steps)
        losses.append(float(metrics["loss"]))
        stats = jax.devices()[0].memory_stats() or {}
        profile = None
        if profile_dir:
            jax.profiler.start_trace(profile_dir)
            for i in range(2):
                state, metrics = step(state, batches[i % 2])
            jax.block_until_ready((state, metrics))
            jax.profiler.stop_trace()
            profile = summarize_profile(profile_dir, steps=2)
    return {
        "step_s": sorted(block_times)[len(block_times) // 2], "step_s_all": block_times,
        "compile_s": compile_s, "peak_bytes": stats.get("peak_bytes_in_use"), "estimate_bytes": estimate,
        "capacity_bytes": stats.get("bytes_limit"), "first_loss": losses[0], "last_loss": losses[-1],
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "platform": jax.default_backend(),
        "versions": f"jax {jax.__version__}", "profile": profile, "attention_calls": attention_calls,
    }


def attention_kernels(hlo_text: str) -> dict:
    """What the compiled step calls for attention: cuDNN fused-attention custom calls (forward and
    backward) by target, with the sliding windows in their backend configs."""
    import collections

    targets = re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', hlo_text)
    windows = re.findall(r'"sliding_window_length":\s*"?(\d+)', hlo_text)
    return {"cudnn_calls": dict(collections.Counter(targets)),
            "sliding_window_length": dict(collections.Counter(windows))}


def _memory_estimate(compiled) -> int | None:
    """Bytes XLA plans for the step: arguments + outputs not aliased to them + temporaries."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def plan_max_batch(cfg, *, probe=(8, 16)) -> dict:
    """Largest micro-batch whose step fits: XLA's planned memory is affine in the batch, so two
    compiles (no run) give its slope and intercept; the device's byte limit gives the rest."""
    import jax

    from jaxlm import sharding
    from jaxlm.state import plan_state
    from jaxlm.train import jit_train_step

    sizes = {}
    mesh = sharding.make_mesh(cfg.mesh)
    for batch in probe:
        cfg.train.batch_size = batch
        plan = plan_state(cfg, mesh)
        tokens = jax.ShapeDtypeStruct((cfg.train.grad_accum, batch, cfg.train.seq_len + 1), "int32",
                                      sharding=sharding.batch_sharding(mesh, batch_axis=1))
        with sharding.use_mesh(mesh):
            sizes[batch] = _memory_estimate(jit_train_step(plan, cfg).lower(plan.abstract, tokens).compile())
    (b0, m0), (b1, m1) = sorted(sizes.items())
    per_row = (m1 - m0) / (b1 - b0)
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    fits = int((limit * 0.97 - (m0 - per_row * b0)) // per_row) if limit and per_row > 0 else None
    return {"probe_bytes": sizes, "bytes_per_row": per_row, "bytes_limit": limit, "max_batch": fits}


def summarize_profile(trace_dir: str, steps: int) -> dict:
    """GPU kernel time per op class and the top kernels, per step, from a ``jax.profiler`` trace."""
    import glob

    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        return {"error": f"no trace written under {trace_dir}"}
    data = ProfileData.from_file(paths[-1])
    by_kernel: dict[str, list] = {}
    lines_seen = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lines_seen.append(line.name)
            if "stream" not in line.name.lower():   # the per-stream kernel lines, not XLA's op/module summaries
                continue
            for event in line.events:
                by_kernel.setdefault(event.name, []).append(event.duration_ns / 1e6)
    by_class: dict[str, float] = {}
    for name, durations in by_kernel.items():
        by_class[op_class(name)] = by_class.get(op_class(name), 0.0) + sum(durations) / steps
    top = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:40]
    # per kernel: ms per step, calls per step, and the shortest / longest call (ms)
    return {"ms_per_step_by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
            "top_kernels": [(name[:120], round(sum(d) / steps, 3), len(d) // steps, round(min(d), 3), round(max(d), 3))
                            for name, d in top],
            "gpu_busy_ms_per_step": sum(sum(d) for d in by_kernel.values()) / steps, "lines": lines_seen}


def op_class(kernel: str) -> str:
    """A coarse class of a GPU kernel from its name (cuBLAS/CUTLASS, cuDNN, XLA fusions, copies)."""
    k = kernel.lower()
    if any(s in k for s in ("fmha", "flash", "cudnn", "sdpa", "attention")):
        return "attention"
    if any(s in k for s in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "_dot", "dot_")):
        return "matmul"
    if any(s in k for s in ("memcpy", "memset", "copy")):
        return "copy"
    if "reduce" in k or "reduction" in k:
        return "reduction fusion"
    if "triton" in k:
        return "triton fusion"
    if any(s in k for s in ("fusion", "loop_", "input_", "wrapped_")):
        return "elementwise fusion"
    return "other"


# --------------------------------------------------------------------------- rows in subprocesses


def worker_main(spec: dict) -> dict:
    """One row, run in this (child) process: ``spec`` says what to time."""
    if spec["impl"] == "torch":
        raise ValueError("torch rows run in tools.torch_port.bench_torch")

    cfg = C.load_config(spec["config"], spec["overrides"])
    attention = apply_variant(cfg, spec["variant"])
    C.validate(cfg)
    if spec.get("max_batch"):
        return plan_max_batch(cfg)
    return time_train_step(cfg, steps=spec["steps"], repeats=spec["repeats"], warmup=spec["warmup"],
                           attention=attention, profile_dir=spec.get("profile_dir"), hlo_path=spec.get("hlo_path"))


EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit)\b.*:")


def run_row(spec: dict, timeout: float) -> dict:
    """Run one row in a child process; its result, or the reason it has none."""
    if spec["impl"] == "torch":
        command = [sys.executable, "-m", "tools.torch_port.bench_torch", "--spec", json.dumps(spec)]
    else:
        command = [sys.executable, "-m", "jaxlm.bench", "--_worker", json.dumps(spec)]
    env = dict(os.environ)
    # A row is alone on the device: let JAX take (nearly) all of it, as a training run would be told to.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=os.getcwd())
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-60:]
    text = "\n".join(tail)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return {"error": "out of memory", "log": text}
    # XLA's messages span many lines (HLO follows them): name the exception's own line.
    raised = [line for line in tail if EXCEPTION_LINE.match(line)]
    reason = (raised or tail or [f"exit status {done.returncode}"])[-1]
    return {"error": "failed: " + reason[:200], "log": text}


# --------------------------------------------------------------------------- the table


def peak_flops(device_kind: str, override_tflops: float | None) -> float | None:
    from jaxlm.hardware import PEAK_BF16_FLOPS

    if override_tflops:
        return override_tflops * 1e12
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    return None


def complete(row: dict, flops_per_token: float, override_tflops: float | None) -> dict:
    """Add tokens/s and MFU to a timed row."""
    if "step_s" not in row:
        return row
    tokens = row["batch"] * row["seq"] * row["grad_accum"]
    row["tokens_per_s"] = tokens / row["step_s"]
    peak = peak_flops(row.get("device", ""), override_tflops)
    row["peak_flops"] = peak
    row["mfu"] = flops_per_token * row["tokens_per_s"] / (peak * row.get("devices", 1)) if peak else None
    return row


def format_table(rows: list[dict]) -> str:
    gib = lambda b: f"{b / 2**30:.1f}" if b else "-"
    head = ("| impl | variant | batch x seq x accum | step ms | tokens/s | MFU | peak mem GiB (XLA plan) "
            "| compile s | loss first→last |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        shape = f"{r['batch']} x {r['seq']} x {r['grad_accum']}"
        if "step_s" not in r:
            lines.append(f"| {r['impl']} | {r['variant']} | {shape} | {r.get('error', 'no result')} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        mem = gib(r.get("peak_bytes")) + (f" ({gib(r['estimate_bytes'])})" if r.get("estimate_bytes") else "")
        loss = f"{r['first_loss']:.3f}→{r['last_loss']:.3f}" if r.get("first_loss") is not None else "-"
        lines.append(f"| {r['impl']} | {r['variant']} | {shape} | {1e3 * r['step_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {mfu} | {mem} | {r['compile_s']:.1f} | {loss} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """jaxlm's fastest row over PyTorch's fastest, per batch shape."""
    out = []
    shapes = {(r["batch"], r["seq"], r["grad_accum"]) for r in rows}
    for shape in sorted(shapes):
        best = {}
        for r in rows:
            if (r["batch"], r["seq"], r["grad_accum"]) == shape and "tokens_per_s" in r:
                if r["tokens_per_s"] > best.get(r["impl"], {}).get("tokens_per_s", 0):
                    best[r["impl"]] = r
        if "jaxlm" in best and "torch" in best:
            j, t = best["jaxlm"], best["torch"]
            out.append(f"batch {shape[0]} x {shape[1]} x {shape[2]}: jaxlm ({j['variant']}) / PyTorch "
                       f"({t['variant']}) = {j['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s")
    return out


# --------------------------------------------------------------------------- modes


def train_mode(args, overrides: list[str]) -> int:

    cfg = C.load_config(args.config, overrides)
    t = cfg.train
    seq = args.seq or t.seq_len
    accum = args.grad_accum or t.grad_accum
    batches = list(args.batch) if args.batch else [t.batch_size]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    flops_per_token = cfg.model.flops_per_token(seq)
    shape_overrides = list(overrides) + [f"train.seq_len={seq}", f"train.grad_accum={accum}"]
    print(f"{datetime.date.today()}  {args.config}: {cfg.model.param_count():,} parameters, "
          f"{flops_per_token / 1e6:,.1f} MFLOP/token at seq {seq}", flush=True)

    rows = []

    def record(spec: dict, row: dict) -> dict:
        """Complete, print and keep one row; the JSON file is rewritten after every row."""
        row.update({k: spec[k] for k in ("impl", "variant", "batch", "seq", "grad_accum")})
        rows.append(complete(row, flops_per_token, args.peak_tflops))
        brief = {k: row.get(k) for k in ("tokens_per_s", "mfu", "step_s", "step_s_all", "compile_s", "peak_bytes",
                                         "estimate_bytes", "attention_calls", "error") if row.get(k) is not None}
        print(f"  {spec['impl']} {spec['variant']} batch {spec['batch']}: {json.dumps(brief)}", flush=True)
        if row.get("profile"):
            print("profile (ms per step): " + json.dumps(row["profile"], indent=1), flush=True)
        if row.get("log") and row.get("error") != "out of memory":
            print(row["log"], file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"date": str(datetime.date.today()), "host": platform.node(), "args": vars(args),
                           "flops_per_token": flops_per_token, "rows": rows}, f, indent=1, default=str)
        return row

    specs = []
    for variant in variants:
        if args.max_batch:
            plan_spec = {**_spec("jaxlm", variant, args, shape_overrides, batch=0, seq=seq, accum=accum),
                         "max_batch": True}
            plan = run_row(plan_spec, args.timeout)
            print(f"max batch ({variant}): {json.dumps(plan)}", flush=True)
            batch = plan.get("max_batch")
            while batch:  # the plan is an estimate: step down until the step runs
                spec = _spec("jaxlm", variant, args, shape_overrides, batch=batch, seq=seq, accum=accum)
                if record(spec, run_row(spec, args.timeout)).get("error") != "out of memory":
                    break
                batch = int(batch * 0.9)
        else:
            specs += [_spec("jaxlm", variant, args, shape_overrides, batch=b, seq=seq, accum=accum) for b in batches]
    if args.torch:
        for kernel in _torch_kernels(args.torch_attention):
            for batch in batches:
                spec = _spec("torch", kernel, args, shape_overrides, batch=batch, seq=seq, accum=accum)
                spec["config_dict"] = C.to_dict(cfg)
                specs.append(spec)
    if specs and args.profile:
        specs[0]["profile_dir"] = args.profile
    if specs and args.dump_hlo:
        specs[0]["hlo_path"] = args.dump_hlo
    for spec in specs:
        record(spec, run_row(spec, args.timeout))

    first = next((r for r in rows if "device" in r), {})
    peak = first.get("peak_flops")
    print()
    print(f"{datetime.date.today()}, {first.get('device', '?')} x{first.get('devices', 1)}, "
          f"{first.get('versions', '')}; MFU against {peak / 1e12:,.0f} TFLOP/s" if peak else
          f"{datetime.date.today()}, {first.get('device', '?')}; no peak known for MFU (give --peak_tflops)")
    print(format_table(rows))
    for line in ratios(rows):
        print(line)
    return 0


def compile_mode(args, overrides: list[str]) -> int:
    """``--compile_for``: each variant's (and ``--batch``'s) train step compiled for a TPU slice, not run
    (``jaxlm.tpu``); the last line says whether all of them fit."""
    from jaxlm import tpu
    from jaxlm.models import layers
    from jaxlm.train import jit_train_step

    tpu.prepare_host()   # before anything starts a JAX backend
    topology = tpu.resolve(args.compile_for)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    t = C.load_config(args.config, overrides).train
    shape = list(overrides) + [f"train.seq_len={args.seq or t.seq_len}",
                               f"train.grad_accum={args.grad_accum or t.grad_accum}"]
    worst = None
    for variant in variants:
        for batch in args.batch or [t.batch_size]:
            cfg = C.load_config(args.config, shape + [f"train.batch_size={batch}"])
            attention = apply_variant(cfg, variant)
            C.validate(cfg)
            with layers.ATTENTION.scope(attention):
                report = tpu.compile_report(cfg, topology, jit_train_step)
            print(f"\n{variant}, batch {batch}:\n{tpu.format_report(report)}", flush=True)
            if worst is None or report.over_bytes > worst[0].over_bytes:
                worst = (report, variant, batch)
    report, variant, batch = worst
    if len(variants) * len(args.batch or [0]) > 1:   # one line for all rows
        print("fits: every row" if report.fits else
              f"{tpu.DOES_NOT_FIT} {report.over_bytes / tpu.GiB:.2f} GiB per chip ({variant}, batch {batch})")
    return 0 if report.fits else tpu.EXIT_DOES_NOT_FIT


def _spec(impl, variant, args, overrides, *, batch, seq, accum) -> dict:
    return {"impl": impl, "variant": variant, "config": args.config, "batch": batch, "seq": seq,
            "grad_accum": accum, "overrides": list(overrides) + ([f"train.batch_size={batch}"] if batch else []),
            "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup}


def decode_mode(args, overrides: list[str]) -> int:
    import jax

    from jaxlm.generate import benchmark_decode

    cfg = C.load_config(args.config, overrides)
    rows = []
    for batch in list(args.batch) if args.batch else [1]:
        result = benchmark_decode(cfg.model, batch=batch, prompt_len=args.seq or 16)
        rows.append({"batch": batch, **result})
        print(f"  decode batch {batch}: {json.dumps(result, default=str)}", flush=True)
    print(f"\n{datetime.date.today()}, {jax.devices()[0].device_kind}, jax {jax.__version__}: greedy decoding, "
          f"random weights, prompt {args.seq or 16} tokens (jaxlm.generate.benchmark_decode)")
    print("| batch | decode step | tokens/s | ms per step | prefill ms | compile s | peak mem MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:,.0f}" if r.get("peak_bytes") else "-"
        step = f"XLA, {r['attention']} attention" if r["step"] == "xla" else r["step"]
        print(f"| {r['batch']} | {step} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.3f} | {r['prefill_ms']:.1f} | "
              f"{r['compile_s']:.1f} | {peak} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(datetime.date.today()), "mode": "decode", "rows": rows}, f, indent=1, default=str)
    return 0


def _torch_kernels(requested: str) -> list[str]:
    """The PyTorch attention kernels to time here: FlexAttention has no backward pass on a CPU
    (its rows would only fail), so without CUDA the flex kernels give way to plain SDPA."""
    kernels = [k.strip() for k in requested.split(",") if k.strip()]
    try:
        import torch
    except ImportError:
        print("torch: not installed here; the PyTorch rows are skipped (pip install torch)", flush=True)
        return []
    if torch.cuda.is_available():
        return kernels
    kept = [k for k in kernels if "flex" not in k] or ["sdpa"]
    if kept != kernels:
        print(f"torch: no CUDA device, and FlexAttention has no CPU backward pass: timing {','.join(kept)} "
              f"instead of {','.join(kernels)}", flush=True)
    return kept


def data_mode(args) -> int:
    try:
        from jaxlm.data import bench as data_bench
    except ImportError as error:
        print(f"data: not available here ({error}); the input pipeline needs jaxlm's data extras (grain)")
        return 0
    argv = ["--seq-len", str(args.seq or 4096), "--batch-size", str(args.batch[0] if args.batch else 16)]
    return data_bench.main(argv + (["--json", args.json] if args.json else []))


def parse_args(argv: list[str]):
    p = ArgumentParser(prog="python -m jaxlm.bench", description=__doc__.split("\n")[0],
                                epilog="Config fields can be overridden with --config.SECTION.FIELD=VALUE.")
    p.add_argument("--config", help="config name in configs/ (e.g. crowfeather.py) or a path")
    p.add_argument("--mode", choices=("train", "decode", "data"), default="train")
    p.add_argument("--batch", type=positive_ints, help="micro-batch size(s), comma-separated (default: the config's)")
    p.add_argument("--seq", type=positive_int, help="sequence length (default: the config's)")
    p.add_argument("--grad_accum", type=positive_int, help="micro-batches per step (default: the config's)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per block")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed blocks; the median block is reported")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps after compiling")
    p.add_argument("--variants", default="config", help=f"fast-path presets, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--max_batch", action="store_true", help="find the largest micro-batch that fits, then time it")
    p.add_argument("--peak_tflops", type=positive_float, help="peak bf16 TFLOP/s per device for MFU (default: jaxlm.hardware)")
    p.add_argument("--torch", action="store_true", help="also time the PyTorch ToyLM (tools/torch_port) on this device")
    p.add_argument("--torch_attention", default="flex,sdpa_flex",
                   help="PyTorch attention kernels to time: flex, sdpa, sdpa_flex (comma-separated)")
    p.add_argument("--profile", help="write a jax.profiler trace of the first row here and print where the time goes")
    p.add_argument("--dump_hlo", help="write the first row's optimised HLO here")
    p.add_argument("--timeout", type=positive_float, default=1800, help="seconds per row")
    p.add_argument("--json", help="also write every row here")
    p.add_argument("--compile_for", metavar="TPU_SLICE",
                   help="compile each row's train step for this TPU slice on this host instead of running it "
                        "(the [tpu] extra; see python -m jaxlm.train --help); exit status 3 if one does not fit")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args, overrides = C.parse_args_with_overrides(p, argv)
    if not args._worker and args.mode != "data" and not args.config:
        p.error("--config is required")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args._worker:
        result = worker_main(json.loads(args._worker))
        print(RESULT_TAG + json.dumps(result, default=str), flush=True)
        return 0
    from jaxlm.errors import JaxlmError
    try:
        if args.compile_for:
            return compile_mode(args, overrides)
        if args.mode == "decode":
            return decode_mode(args, overrides)
        if args.mode == "data":
            return data_mode(args)
        return train_mode(args, overrides)
    except JaxlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
