"""Experiment (2026-11-21), not shipped: figures in docs/PERFORMANCE.md, "Generation".
Decode-step restructurings measured against the shipped step; run on the device machine.
PYTHONPATH=$PWD python tools/decode_restructure_experiment.py OUTDIR item...   item: check | <variant>:b<batch> | prof:<variant>:b<batch>
variant = comma list of knobs: deferred, rows, cols, table   ("base" = none)
"""
import gzip, json, math, pathlib, sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxlm.models.toylm import ToyLM, ToyLMConfig, softcap
from jaxlm.models import kv_cache as KV
from jaxlm import generate as G

MASKED = KV._MASKED

def extract(model, dtype):
    g, p = G.inference_params(model)
    m = nnx.merge(g, p)
    mat = lambda lin: lin.kernel[...].astype(dtype)
    layers = []
    for b in m.blocks:
        a = b.attn
        layers.append(dict(n1=b.attn_norm.w[...], qkv=jnp.concatenate([mat(a.q), mat(a.k), mat(a.v)], 1), o=mat(a.o),
                           n2=b.mlp_norm.w[...], gu=jnp.concatenate([mat(b.mlp.gate), mat(b.mlp.up)], 1), down=mat(b.mlp.down)))
    return dict(embed=m.embed.embedding[...].astype(dtype), layers=layers, nf=m.final_norm.w[...])

def transposed(params, names=("qkv", "o", "gu", "down")):   # [out, in] matrices for row reductions
    t = dict(params); t["layers"] = [{k: (v.T if k in names else v) for k, v in l.items()} for l in params["layers"]]
    return t

def matmul(x, w, mode):
    """x [B, in] (any float), w [in, out] or [out, in] (rows) -> f32 [B, out]"""
    if mode == "dot":
        return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    xb = x.astype(w.dtype).astype(jnp.float32)
    if mode == "rows":
        return jnp.sum(xb[:, None, :] * w[None].astype(jnp.float32), axis=-1)
    return jnp.sum(xb[:, :, None] * w[None].astype(jnp.float32), axis=1)

def norm(x, w, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w

def make_step(cfg, knobs, sizes, dtype):
    base_mode = "rows" if "rows" in knobs else "cols" if "cols" in knobs else "dot"
    mode_a = "rows" if "rowsA" in knobs else base_mode
    mode_m = "rows" if "rowsM" in knobs else base_mode
    deferred = "deferred" in knobs or "deferred2" in knobs
    H, K, D, F = cfg.n_heads, cfg.head_dim, cfg.dim, cfg.mlp_hidden
    windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    groups = sorted(set(sizes))
    inv_freq = cfg.rope_theta ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    def rope(x, cos, sin):   # x [B, H, K] f32; cos/sin [B, K/2]
        x1, x2 = x[..., :K // 2], x[..., K // 2:]
        c, s = cos[:, None], sin[:, None]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    def attend(q, kc, vc, time, starts, window, S):
        st = KV.slot_times(time, S)
        vis = (st[None] <= time) & (st[None] >= starts[:, None])
        if window is not None: vis = vis & (time - st[None] < window)
        sc = jnp.einsum("bhk,bhsk->bhs", q.astype(kc.dtype), kc, preferred_element_type=jnp.float32) / math.sqrt(K)
        sc = jnp.where(vis[:, None], sc, MASKED)
        p = jax.nn.softmax(sc, -1).astype(vc.dtype)
        return jnp.einsum("bhs,bhsk->bhk", p, vc, preferred_element_type=jnp.float32)
    def attend_new(q, kc, vc, k, v, time, starts, window, S):
        """deferred2: the cache as it was (the slot being replaced masked) plus the new key as one extra score."""
        st = KV.slot_times(time, S)
        vis = (st[None] < time) & (st[None] >= starts[:, None])
        if window is not None: vis = vis & (time - st[None] < window)
        sc = jnp.einsum("bhk,bhsk->bhs", q.astype(kc.dtype), kc, preferred_element_type=jnp.float32) / math.sqrt(K)
        sc = jnp.where(vis[:, None], sc, MASKED)
        sn = jnp.sum(q.astype(k.dtype).astype(jnp.float32) * k.astype(jnp.float32), -1, keepdims=True) / math.sqrt(K)
        p = jax.nn.softmax(jnp.concatenate([sc, sn], -1), -1).astype(vc.dtype)
        return (jnp.einsum("bhs,bhsk->bhk", p[..., :S], vc, preferred_element_type=jnp.float32)
                + p[..., S:].astype(jnp.float32) * v.astype(jnp.float32))
    def step(params, cache, tok, time, starts):
        B = tok.shape[0]
        x = params["embed"][tok].astype(jnp.float32)
        ang = (time - starts).astype(jnp.float32)[:, None] * inv_freq
        cos, sin = jnp.cos(ang), jnp.sin(ang)
        new = {g: [] for g in groups}
        for i, l in enumerate(params["layers"]):
            S = sizes[i]; slot = time % S
            h = norm(x, l["n1"], cfg.norm_eps)
            qkv = matmul(h, l["qkv"], mode_a)
            q, k, v = (qkv[:, j * H * K:(j + 1) * H * K].reshape(B, H, K) for j in range(3))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            k, v = k.astype(dtype), v.astype(dtype)
            if deferred:
                g = S; j = new[g].__len__()
                kc, vc = cache[g][j, 0], cache[g][j, 1]
                new[g].append(jnp.stack([k, v]))
                if "deferred2" in knobs:
                    att = attend_new(q, kc, vc, k, v, time, starts, windows[i], S)
                else:
                    here = (jnp.arange(S) == slot)[None, None, :, None]
                    kc = jnp.where(here, k[:, :, None], kc); vc = jnp.where(here, v[:, :, None], vc)
                    att = attend(q, kc, vc, time, starts, windows[i], S)
            else:
                kc = jax.lax.dynamic_update_slice_in_dim(cache[i][0], k[:, :, None], slot, 2)
                vc = jax.lax.dynamic_update_slice_in_dim(cache[i][1], v[:, :, None], slot, 2)
                cache = cache[:i] + ((kc, vc),) + cache[i + 1:]
                att = attend(q, kc, vc, time, starts, windows[i], S)
            x = x + matmul(att.reshape(B, H * K).astype(dtype), l["o"], mode_a)
            h = norm(x, l["n2"], cfg.norm_eps)
            gu = matmul(h, l["gu"], mode_m)
            act = (jax.nn.silu(gu[:, :F]) * gu[:, F:]).astype(dtype)
            x = x + matmul(act, l["down"], mode_m)
        if deferred:
            cache = dict(cache)
            for g in groups:
                upd = jnp.stack(new[g])[:, :, :, :, None]   # [L, 2, B, H, 1, K]
                cache[g] = jax.lax.dynamic_update_slice(cache[g], upd, (0, 0, 0, 0, time % g, 0))
        h = norm(x, params["nf"], cfg.norm_eps).astype(dtype)
        logits = softcap(jnp.dot(h, params["embed"].T, preferred_element_type=jnp.float32), cfg.lm_head_logit_cap)
        return logits, cache
    return step

def init_cache(cfg, knobs, sizes, B, dtype, pkg_cache):
    """The state of the package's prefilled cache in the variant's layout."""
    pairs = [(pkg_cache.keys[i], pkg_cache.values[i]) for i in range(cfg.n_layers)]
    if not knobs & {"deferred", "deferred2"}:
        return tuple(pairs)
    return {g: jnp.stack([jnp.stack(p) for p, s in zip(pairs, sizes) if s == g]) for g in sorted(set(sizes))}

def build(knobs, batch, steps, dtype=jnp.bfloat16, cfg=None, seed=0):
    cfg = cfg or ToyLMConfig()
    model = ToyLM(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    rows = max(batch, 2) if jax.default_backend() == "gpu" else batch
    g, p = G.inference_params(model)
    ids = jax.random.randint(jax.random.key(1), (rows, 16), 0, cfg.vocab_size, jnp.int32)
    st = G._prefill(g, p, ids, jnp.zeros((rows,), jnp.int32), jax.random.key(0), cache_len=G.bucket(16 + steps),
                    sampling=G.SamplingConfig(greedy=True), eos_id=-1)
    sizes = [c.shape[2] for c in st.cache.keys]
    params = extract(model, dtype)
    if "rows" in knobs: params = transposed(params)
    if "rowsA" in knobs: params = transposed(params, ("qkv", "o"))
    if "rowsM" in knobs: params = transposed(params, ("gu", "down"))
    step = make_step(cfg, knobs, sizes, dtype)
    return model, (g, p), st, params, step, sizes

def loop_fn(step, steps):
    @jax.jit
    def run(params, cache, tok, time, starts):
        def body(i, c):
            cache, tok, time, toks = c
            logits, cache = step(params, cache, tok, time, starts)
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            return cache, tok, time + 1, toks.at[:, i].set(tok)
        return jax.lax.fori_loop(0, steps, body, (cache, tok, time, jnp.zeros((tok.shape[0], steps), jnp.int32)))
    return jax.jit(run, donate_argnums=(1,))

def check(knobs):
    """float32 logits of the variant's step against the package's decode_step, CPU/GPU."""
    cfg = ToyLMConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, head_dim=16, mlp_hidden=128, max_seq_len=256, sliding_window=8)
    with jax.default_matmul_precision("highest"):
        model, (g, p), st, params, step, sizes = build(knobs, 2, 24, jnp.float32, cfg)
        cache = init_cache(cfg, knobs, sizes, 2, jnp.float32, st.cache)
        pc, tok, time, err = st.cache, st.token_B, st.cache.length, 0.0
        m = nnx.merge(g, p)
        for t in range(20):
            ref, pc = jax.jit(m.decode_step)(tok, pc)
            got, cache = jax.jit(step)(params, cache, tok, time, st.cache.starts_B)
            err = max(err, float(jnp.abs(ref - got).max()))
            tok = jnp.argmax(ref, -1).astype(jnp.int32); time = time + 1
    return err

def bench(knobs, batch, out, steps=256, prof=False, hlo=False):
    model, _, st, params, step, sizes = build(knobs, batch, steps)
    run = loop_fn(step, steps)
    fresh = lambda: init_cache(model.cfg, knobs, sizes, batch, jnp.bfloat16, jax.tree.map(jnp.copy, st.cache))
    args = lambda: (params, fresh(), st.token_B, st.cache.length, st.cache.starts_B)
    t0 = time.perf_counter(); comp = run.lower(*args()).compile({"xla_gpu_exhaustive_tiling_search": True} if "exh" in knobs else None); cs = time.perf_counter() - t0
    _, _, _, toks = comp(*args()); toks = np.asarray(toks)
    ts = []
    for _ in range(5):
        a = args(); jax.block_until_ready(a); t0 = time.perf_counter(); r = comp(*a); jax.block_until_ready(r); ts.append(time.perf_counter() - t0)
    ms = float(np.median(ts)) / steps * 1e3
    res = dict(event="bench", knobs=sorted(knobs), batch=batch, ms_per_step=round(ms, 4), tokens_per_s=round(batch / ms * 1e3),
               compile_s=round(cs, 1), temp_bytes=getattr(comp.memory_analysis(), "temp_size_in_bytes", None), tokens=toks[:, :64].tolist())
    if hlo:
        (out / f"{'_'.join(sorted(knobs)) or 'base'}_b{batch}.hlo.txt").write_text(comp.as_text())
    if prof:
        d = pathlib.Path(f"/tmp/vprof_{'_'.join(sorted(knobs))}_{batch}")
        with jax.profiler.trace(str(d)):
            r = comp(*args()); jax.block_until_ready(r)
        tr = next(d.glob("plugins/profile/*/*.trace.json.gz"))
        ev = json.load(gzip.open(tr))["traceEvents"]
        pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
        dev = sorted((e for e in ev if e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), "")), key=lambda e: e["ts"])
        per = len(dev) / steps; k0 = int(per * steps / 2)
        res.update(kernels_per_step=per, kernel_us_per_step=sum(e.get("dur", 0) for e in dev) / steps,
                   one_step=[(e["name"][:50], round(e.get("dur", 0), 2)) for e in dev[k0:k0 + int(round(per))]])
    return res

if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
    log = open(out / "variants.jsonl", "a")
    def emit(**kw):
        s = json.dumps(kw); log.write(s + "\n"); log.flush()
        kw.pop("tokens", None); kw.pop("one_step", None); print(json.dumps(kw), flush=True)
    emit(event="env", jax=jax.__version__, device=jax.devices()[0].device_kind)
    for item in sys.argv[2:]:
        try:
            if item == "check":
                for v in ["base", "deferred", "deferred2", "deferred2,rows", "rows"]:
                    emit(event="check", variant=v, max_abs_err=check(set(v.split(",")) - {"base"}))
                continue
            prof, hlo = item.startswith("prof:"), item.startswith("hlo:")
            v, b = item.removeprefix("prof:").removeprefix("hlo:").split(":")
            emit(**bench(set(v.split(",")) - {"base"}, int(b[1:]), out, prof=prof, hlo=hlo))
        except Exception:
            emit(event="error", item=item, err=traceback.format_exc()[-2500:])
