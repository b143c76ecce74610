"""Experiment (2026-11-21), not shipped: figures in docs/PERFORMANCE.md, "Generation".
XLA compiler-option sweep of the decode chunk; run on the device machine.
PYTHONPATH=$PWD python tools/decode_xla_flags_experiment.py OUTDIR VARIANT item...   items: b<batch> (bench), p<batch> (profile), h<batch> (HLO)
"""
import gzip, json, os, pathlib, sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
variant = sys.argv[2]; todo = sys.argv[3:]
from jaxlm.models.toylm import ToyLM, ToyLMConfig
from jaxlm import generate as G
CB = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
VARIANTS = {
    "base": {},
    "pdl": {"xla_gpu_enable_pdl": True},
    "exh": {"xla_gpu_exhaustive_tiling_search": True},
    "pdl_exh": {"xla_gpu_enable_pdl": True, "xla_gpu_exhaustive_tiling_search": True},
    "heroless": {"xla_gpu_experimental_enable_triton_heroless_priority_fusion": True},
    "mof": {"xla_gpu_unsupported_enable_triton_multi_output_fusion": True},
    "blr": {"xla_gpu_experimental_enable_fusion_block_level_rewriter": True},
    "alltriton": {"xla_gpu_experimental_all_fusions_with_triton": True},
    "cb": {"xla_gpu_enable_command_buffer": CB},
    "pdl_cb": {"xla_gpu_enable_pdl": True, "xla_gpu_enable_command_buffer": CB},
    "splitk2": {"xla_gpu_experimental_force_split_k": 2},
    "v2": {"xla_gpu_experimental_gemm_fusion_v2": True},
    "dsf": {"xla_gpu_enable_dynamic_slice_fusion": True},
}
opts = VARIANTS[variant]
log = open(out / "flags.jsonl", "a")
def emit(**kw):
    kw["variant"] = variant
    print(json.dumps(kw)[:3000], flush=True); log.write(json.dumps(kw) + "\n"); log.flush()
CF = ToyLMConfig()
model = ToyLM(CF, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
graphdef, params = G.inference_params(model)
samp = G.SamplingConfig(greedy=True)

def setup(batch, steps):
    rows = max(batch, 2)
    ids = jax.random.randint(jax.random.key(1), (rows, 16), 0, CF.vocab_size, jnp.int32)
    fresh = lambda: jax.block_until_ready(G._prefill(graphdef, params, ids, jnp.zeros((rows,), jnp.int32), jax.random.key(0),
                                          cache_len=G.bucket(16 + steps), sampling=samp, eos_id=-1))
    st = fresh()
    t0 = time.perf_counter()
    comp = G._decode_chunk.lower(graphdef, params, st, steps=steps, sampling=samp, eos_id=-1).compile(compiler_options=opts)
    return fresh, comp, time.perf_counter() - t0

def bench(batch):
    fresh, comp, cs = setup(batch, 256)
    _, toks = comp(params, fresh()); toks = np.asarray(toks)
    ts = []
    for _ in range(5):
        st = fresh(); t0 = time.perf_counter(); st, t = comp(params, st); jax.block_until_ready(t); ts.append(time.perf_counter() - t0)
    ms = float(np.median(ts)) / 256 * 1e3
    ref = pathlib.Path(f"/tmp/tokens_b{batch}.npy")
    agree = None
    if variant == "base": np.save(ref, toks)
    elif ref.exists(): agree = float((np.load(ref) == toks).mean())
    emit(event="bench", batch=batch, ms_per_step=round(ms, 4), tokens_per_s=round(batch / ms * 1e3), compile_s=round(cs, 1),
         all_ms=[round(x / 256 * 1e3, 4) for x in ts], token_agreement=agree)

def hlo(batch):
    _, comp, _ = setup(batch, 32)
    (out / f"{variant}_b{batch}.hlo.txt").write_text(comp.as_text())

def profile(batch, steps=32):
    fresh, comp, _ = setup(batch, steps)
    st = fresh(); st, _ = comp(params, st); jax.block_until_ready(st)
    d = pathlib.Path(f"/tmp/prof_{variant}_{batch}")
    with jax.profiler.trace(str(d)):
        for _ in range(2):
            st, toks = comp(params, st)
        jax.block_until_ready(toks)
    tr = next(d.glob("plugins/profile/*/*.trace.json.gz"))
    ev = json.load(gzip.open(tr))["traceEvents"]
    pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = sorted((e for e in ev if e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), "")), key=lambda e: e["ts"])
    n = len(dev); per = n / (2 * steps)
    span = (dev[-1]["ts"] + dev[-1].get("dur", 0) - dev[0]["ts"]) / (2 * steps)
    # one step in the middle: kernels in time order with durations and the gap before each
    k0 = int(per * steps)
    one = [(e["name"][:60], round(e.get("dur", 0), 2), round(e["ts"] - (dev[i - 1]["ts"] + dev[i - 1].get("dur", 0)), 2))
           for i, e in enumerate(dev[k0:k0 + int(round(per)) + 2], start=k0)]
    emit(event="profile", batch=batch, kernels_per_step=per, span_us_per_step=round(span, 1),
         busy_us_per_step=round(sum(e.get("dur", 0) for e in dev) / (2 * steps), 1))
    (out / f"{variant}_b{batch}_kernels.json").write_text(json.dumps(one))

for item in todo:
    t0 = time.time()
    try:
        {"b": bench, "p": profile, "h": hlo}[item[0]](int(item[1:]))
    except Exception:
        emit(event="error", item=item, err=traceback.format_exc()[-2000:])
    emit(event="done", item=item, seconds=round(time.time() - t0, 1))
