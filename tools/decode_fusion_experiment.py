"""Fused decode kernels (jaxlm/models/decode_kernels.py) against the XLA step on GPU: correctness, speed, profiles.

python tools/decode_fusion_experiment.py OUTDIR items...   items: check | [prof=]b<batch>:<auto|xla|fused>[:<knob><value>...]
knobs: r row tile, c column tile, i inner tile, k split-K columns, p RoPE split, w warps, s stages, a attention block,
m attention kernel min rows x heads; nonorm (timing only: skips the norm).
"""
import json, pathlib, sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxlm.models.toylm import ToyLM, ToyLMConfig
from jaxlm.models import decode_kernels as dk, kv_cache
from jaxlm import generate as G

out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
log = open(out / "fused.jsonl", "a")
def emit(**kw):
    print(json.dumps(kw, default=str), flush=True); log.write(json.dumps(kw, default=str) + "\n"); log.flush()
emit(event="env", jax=jax.__version__, device=jax.devices()[0].device_kind)
CF = ToyLMConfig()

def check():
    m = ToyLM(CF, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    g, p = G.inference_params(m); m = nnx.merge(g, p)
    B = 16
    ids = jax.random.randint(jax.random.key(1), (B, 80), 0, CF.vocab_size)
    full = jax.jit(lambda x: m(x))(ids)
    res = {}
    for impl in ("xla", "fused"):
        dk.IMPLEMENTATION_OVERRIDE = impl; jax.clear_caches()
        pre = jax.jit(lambda i, c: m.prefill(i, c)); dec = jax.jit(lambda i, c: m.decode_step(i, c))
        lg, cache = pre(ids[:, :16], m.init_cache(B, 96)); logits = []
        for t in range(16, 80):
            lg, cache = dec(ids[:, t], cache); logits.append(lg)
        res[impl] = (jnp.stack(logits, 1), cache, m.decode_implementation(cache))
    rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
    f, x = res["fused"][0], res["xla"][0]
    emit(event="check", impls=[res[k][2] for k in res], fused_vs_xla_rel=rel(f, x), fused_vs_full_rel=rel(f, full[:, 16:80]),
         xla_vs_full_rel=rel(x, full[:, 16:80]), argmax_agree=float((f.argmax(-1) == x.argmax(-1)).mean()),
         cache_rel=max(rel(a, b) for a, b in zip(res["fused"][1].keys, res["xla"][1].keys)))
    dk.IMPLEMENTATION_OVERRIDE = None

KNOBS = {"m": (kv_cache, "PALLAS_MIN_ROW_HEADS"), "k": (dk, "SPLIT_INNER"), "r": (dk, "ROW_TILE"), "c": (dk, "COLUMN_TILE"), "i": (dk, "INNER_TILE"), "p": (dk, "ROPE_SPLIT"),
         "w": (dk, "WARPS"), "s": (dk, "STAGES"), "a": (kv_cache, "PALLAS_BLOCK")}

_NORMED = dk._normed_projections
def _no_norm(x_ref, norm_ref, eps, *weights):   # timing diagnosis only: the norm's cost
    x = x_ref[...].astype(weights[0].dtype)
    return [dk._round(jnp.dot(x, w, preferred_element_type=jnp.float32), w.dtype) for w in weights]

def bench(spec, profile=False):
    parts = spec.split(":")
    dk._normed_projections = _no_norm if "nonorm" in parts else _NORMED
    parts = [p for p in parts if p != "nonorm"]
    batch, decode = int(parts[0][1:]), parts[1]
    saved = {k: getattr(*v) for k, v in KNOBS.items()}
    for part in parts[2:]:
        setattr(*KNOBS[part[0]], int(part[1:]))
    jax.clear_caches()
    try:
        r = G.benchmark_decode(CF, batch, prompt_len=16, new_tokens=256, repeats=5,
                               decode=None if decode == "auto" else decode)
        emit(event="bench", spec=spec, **{k: r[k] for k in ("rows", "decode", "attention", "tokens_per_s", "ms_per_step",
                                                             "compile_s", "peak_bytes", "cache_bytes")})
        if profile:
            trace(batch, spec)
    finally:
        for k, v in KNOBS.items(): setattr(*v, saved[k])
        dk.IMPLEMENTATION_OVERRIDE = None; kv_cache.IMPLEMENTATION_OVERRIDE = None

def trace(batch, spec, steps=32):
    import gzip
    m = ToyLM(CF, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    g, p = G.inference_params(m)
    rows = dk.padded_rows(batch)
    samp = G.SamplingConfig(greedy=True)
    st = G._prefill(g, p, jnp.zeros((rows, 16), jnp.int32) + 5, jnp.zeros((rows,), jnp.int32), jax.random.key(0),
                    cache_len=288, sampling=samp, eos_id=-1)
    comp = G._decode_chunk.lower(g, p, st, steps=steps, sampling=samp, eos_id=-1).compile()
    st, _ = comp(p, st); jax.block_until_ready(st)
    d = pathlib.Path(f"/tmp/prof_{time.time()}")
    with jax.profiler.trace(str(d)):
        for _ in range(2):
            st, toks = comp(p, st)
        jax.block_until_ready(toks)
    tr = next(d.glob("plugins/profile/*/*.trace.json.gz"))
    ev = json.load(gzip.open(tr))["traceEvents"]
    pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = sorted([e for e in ev if e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), "")], key=lambda e: e["ts"])
    n = 2 * steps
    names = {}
    for e in dev:
        v = names.setdefault(e["name"], [0, 0.0]); v[0] += 1; v[1] += e.get("dur", 0)
    span = (dev[-1]["ts"] + dev[-1].get("dur", 0) - dev[0]["ts"]) if dev else 0
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:25]
    emit(event="profile", spec=spec, kernels_per_step=len(dev) / n, span_us_per_step=span / n,
         busy_us_per_step=sum(e.get("dur", 0) for e in dev) / n,
         top=[(k[:60], round(v[0] / n, 2), round(v[1] / n, 2)) for k, v in top])
    mid = len(dev) // 2   # one layer's kernels in order, with gaps
    emit(event="sequence", spec=spec, seq=[(e["name"][:40], round(e["ts"] - dev[mid]["ts"], 2), e.get("dur")) for e in dev[mid:mid + 24]])

for item in sys.argv[2:]:
    t0 = time.time()
    try:
        if item == "check": check()
        elif item.startswith("prof="): bench(item[5:], profile=True)
        else: bench(item)
    except Exception:
        emit(event="error", item=item, err=traceback.format_exc()[-2500:])
    emit(event="done", item=item, seconds=round(time.time() - t0, 1))
