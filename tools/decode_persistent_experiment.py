"""Experiment (2026-11-21), not shipped: figures in docs/PERFORMANCE.md, "Persistent decode kernel".
The whole ToyLM decode step in one Pallas (Triton) kernel: its programs loop over the layers (one
copy of the code, warm in the instruction cache), the phases of a layer (Q/K/V + RoPE, attention,
O projection, gate/up + SiLU, down) separated by a grid-wide barrier on an atomic counter (all
programs resident: programs <= SMs), each program's weight tile contiguous and fetched between its
arrival at the barrier and its wait. Run on the device machine:

PYTHONPATH=$PWD python tools/decode_persistent_experiment.py OUTDIR item...
  item: check | barrier | b<batch>[:p<programs>][:w<warps>][:a<attn block>][:m1 (O projection in attention)][:e1 (fetch before arriving)]
        t<same> (per-phase timeline from %globaltimer) | P<same> (profiler: kernels a step)
PYTHONPATH=$PWD python tools/decode_persistent_experiment.py cpucheck   (every (layer, phase) as its own interpreted call)
"""
import functools, json, math, pathlib, sys, time, traceback
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.experimental import pallas as pl
from flax import nnx
import decode_restructure_experiment as V
from jaxlm.models.toylm import ToyLM, ToyLMConfig
from jaxlm import generate as G

def next_pow2(n):
    return 1 << max(0, (n - 1).bit_length())


def now(after):
    """%globaltimer (ns, low 32 bits), comparable across SMs; read once ``after`` is known (the asm
    is marked pure, so its argument is what orders it)."""
    from jax.experimental.pallas import triton as plt
    return plt.elementwise_inline_asm("mov.u32 $0, %globaltimer_lo;", args=[jnp.full((1,), after, jnp.int32)], constraints="=r,r",
                                      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)])[0]


def _spin_barrier(counter_ref, target, spin):
    """The barrier microbenchmark's: spin on atomics, or on volatile loads then one atomic (stale reads: unsafe)."""
    from jax.experimental.pallas import triton as plt
    plt.debug_barrier()
    plt.atomic_add(counter_ref, 0, 1)
    read = (lambda _=None: plt.atomic_add(counter_ref, 0, 0)) if spin == "atomic" else (
        lambda _=None: plt.load(counter_ref.at[0], volatile=True))
    lax.while_loop(lambda v: v < target, read, read())
    if spin != "atomic":
        plt.atomic_add(counter_ref, 0, 0)
    plt.debug_barrier()


def barrier_bench():
    """Per call of `rounds` barriers, each with a store before and a neighbour's load after; errors: stale loads."""
    res = []
    for spin in ("atomic", "volatile"):
        for P in (16, 64, 132):
            for rounds in (10, 1000):
                f = _barrier_call(P, rounds, spin)
                cnt, _, err = f(); jax.block_until_ready(err)
                ts = []
                for _ in range(5):
                    t = time.perf_counter(); jax.block_until_ready(f()); ts.append(time.perf_counter() - t)
                res.append(dict(spin=spin, P=P, rounds=rounds, errors=int(err.sum()), us_per_call=round(sorted(ts)[2] * 1e6, 1)))
    return dict(event="barrier", runs=res)


def _barrier_kernel(_c, _s, counter_ref, scratch_ref, err_ref, *, rounds, spin):
    pid = pl.program_id(0); P = pl.num_programs(0)
    def body(r, err):
        slot = lax.rem(r, jnp.int32(2))
        scratch_ref[slot, pid] = r * P + pid
        _spin_barrier(counter_ref, (r + 1) * P, spin)
        nxt = jnp.where(pid + 1 == P, 0, pid + 1)
        return err + (scratch_ref[slot, nxt] != r * P + nxt).astype(jnp.int32)
    err_ref[pid] = lax.fori_loop(0, rounds, body, jnp.int32(0))

def _barrier_call(P, rounds, spin, warps=4):
    from jax.experimental.pallas import triton as plt
    f = pl.pallas_call(functools.partial(_barrier_kernel, rounds=rounds, spin=spin), grid=(P,),
                       out_shape=(jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((2, P), jnp.int32),
                                  jax.ShapeDtypeStruct((P,), jnp.int32)),
                       input_output_aliases={0: 0, 1: 1},
                       compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1))
    return jax.jit(lambda: f(jnp.zeros((1,), jnp.int32), jnp.zeros((2, P), jnp.int32)))


MASKED = V.MASKED


def arrive(cnt_ref):
    from jax.experimental.pallas import triton as plt
    plt.debug_barrier()                      # every thread's stores issued before arriving
    return plt.atomic_add(cnt_ref, 0, 1)


def wait(cnt_ref, ordinal):
    """Spin until every program has arrived ``ordinal`` times (acq_rel atomics: their stores are visible)."""
    from jax.experimental.pallas import triton as plt
    target = ordinal * pl.num_programs(0)      # the counter only grows: ordinal counts from the first step
    read = lambda _=None: plt.atomic_add(cnt_ref, 0, 0)
    seen = lax.while_loop(lambda v: v < target, read, read())
    plt.debug_barrier()
    return seen
T = 16            # output columns per program in the projections
VT = 64           # vocabulary rows per program in the head
PHASES = ("qkv", "attend", "out_proj", "gate_up", "down")


def tile_params(params, cfg, dtype):
    """Weights stacked over layers and cut into the tiles the programs read, each contiguous."""
    H, K, D, F = cfg.n_heads, cfg.head_dim, cfg.dim, cfg.mlp_hidden
    ls = params["layers"]; st = lambda k: jnp.stack([l[k] for l in ls])
    cols = lambda w, n: jnp.moveaxis(w.reshape(w.shape[0], w.shape[1], n, T), 2, 1)   # [L, in, n*T] -> [L, n, in, T]
    Q = K // 4
    qkv = st("qkv").reshape(len(ls), D, 3, H, 2, 2, Q)   # [L, D, kind, head, rope half, part, Q]
    qkv = qkv.transpose(0, 2, 3, 5, 4, 1, 6).reshape(len(ls), 6 * H, 2, D, Q)   # program (kind, head, part): both halves
    gu = st("gu").reshape(len(ls), D, 2, F // T, T).transpose(0, 3, 2, 1, 4)          # [L, F/T, gate|up, D, T]
    return dict(n1=st("n1"), qkv=qkv.astype(dtype), o=cols(st("o"), D // T).astype(dtype), n2=st("n2"), gu=gu.astype(dtype),
                down=cols(st("down"), D // T).astype(dtype), o_rows=st("o").astype(dtype), nf=params["nf"], embed=params["embed"].astype(dtype))


def make_kernel(cfg, S, sizes, B, BP, dtype, n_programs, attn_block, only=None, timed=False, merge_o=False, early=False):
    """only=(layer, phase): run that phase alone (the interpreter's check); None: the whole step."""
    H, K, D, F, L, Vn = cfg.n_heads, cfg.head_dim, cfg.dim, cfg.mlp_hidden, cfg.n_layers, cfg.vocab_size
    eps, cap = cfg.norm_eps, cfg.lm_head_logit_cap
    prec = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    dot = lambda a, b: jnp.dot(a.astype(dtype), b, preferred_element_type=jnp.float32, precision=prec)
    Q = K // 4           # columns per rope half a program computes
    interpret = only is not None
    AB = 8 if only is not None else min(attn_block, next_pow2(S))   # the interpreter cannot read past the end

    n_alias = 9 if interpret else 4    # the interpreter's calls hand every scratch buffer on
    FC = min(512, F)                  # the down projection's inner chunk (smem holds [rows, FC])

    def kernel(*refs):
        (inv_ref, starts_ref, time_ref, win_ref, size_ref, n1, wqkv, wo, n2, wgu, wd, nf_ref,
         emb_ref, wo_rows) = refs[:14]
        kc, vc, cnt, xb, kvb, ab, hb, lb, ob, *tb = refs[14 + n_alias:]   # after the aliased inputs
        tb = tb[0] if timed else None
        pid = pl.program_id(0)
        t = time_ref[0]
        real_rows = (jnp.arange(BP) < B)[:, None]

        def rows(ref, cols=slice(None), *lead):   # the real rows only: padding rows are never read
            if interpret:
                return ref[(*lead, slice(None), cols)]
            from jax.experimental.pallas import triton as plt
            return plt.load(ref.at[(*lead, slice(None), cols)], mask=real_rows, other=0)

        def normed(x, w):
            return x * lax.rsqrt(jnp.mean(x * x, axis=1, keepdims=True) + eps) * w[None, :]

        # Each phase: fetch(l) loads this program's weight tiles (issued before the barrier wait,
        # so their latency overlaps it), compute(l, w) uses them once the inputs are ready.
        tile = lambda n: jnp.minimum(pid, n - 1)     # idle programs fetch a valid tile, unused

        def fetch_qkv(l):
            i = tile(6 * H)
            return wqkv[l, i, 0], wqkv[l, i, 1]

        def qkv(l, w):           # 6H programs: (q|k|v, head, part): Q columns of each rope half
            @pl.when(pid < 6 * H)
            def _():
                kind = pid // (2 * H); h = (pid // 2) % H; part = pid % 2
                xn = normed(rows(xb), n1[l])
                y1 = dot(xn, w[0]); y2 = dot(xn, w[1])
                cs, sn = inv_ref[0, :, pl.ds(part * Q, Q)], inv_ref[1, :, pl.ds(part * Q, Q)]   # cos, sin [BP, Q]
                rot = kind < 2
                o1 = jnp.where(rot, y1 * cs - y2 * sn, y1)
                o2 = jnp.where(rot, y2 * cs + y1 * sn, y2)
                col = h * K + part * Q
                kvb[kind, :, pl.ds(col, Q)] = o1          # kvb[0] holds q
                kvb[kind, :, pl.ds(col + K // 2, Q)] = o2

        def attend_unit(l, w, unit):   # (row, head): online softmax over the written slots, new key merged
            b = unit // H; h = unit % H
            start = starts_ref[b]; win = win_ref[l]; size = size_ref[l]; slot = t % size
            k_new = kvb[1, b, pl.ds(h * K, K)].astype(kc.dtype)
            v_new = kvb[2, b, pl.ds(h * K, K)].astype(vc.dtype)
            q = kvb[0, b, pl.ds(h * K, K)].astype(kc.dtype).astype(jnp.float32) * (1.0 / math.sqrt(K))

            def body(j, carry):
                acc, mx, tot = carry
                s = j * AB + jnp.arange(AB, dtype=jnp.int32)
                st = t - (t - s + size) % size
                vis = (s < size) & (st >= start) & (st <= t) & (t - st < win)
                is_new = (s == slot)[:, None]
                if interpret:
                    kk = kc[l, b, h, pl.ds(j * AB, AB), :]; vv = vc[l, b, h, pl.ds(j * AB, AB), :]
                else:
                    from jax.experimental.pallas import triton as plt
                    ld = (vis & (s != slot))[:, None]
                    kk = plt.load(kc.at[l, b, h, pl.ds(j * AB, AB), :], mask=ld, other=0)
                    vv = plt.load(vc.at[l, b, h, pl.ds(j * AB, AB), :], mask=ld, other=0)
                kk = jnp.where(is_new, k_new[None, :], kk).astype(jnp.float32)
                vv = jnp.where(is_new, v_new[None, :], vv).astype(jnp.float32)
                sc = jnp.where(vis, jnp.sum(kk * q[None, :], axis=1), MASKED)
                new_mx = jnp.maximum(mx, jnp.max(sc))
                r = jnp.exp(mx - new_mx)
                p = jnp.where(vis, jnp.exp(sc - new_mx), 0.0)
                return acc * r + jnp.sum(p[:, None] * vv, axis=0), new_mx, tot * r + jnp.sum(p)

            n_blocks = (jnp.minimum(t + 1, size) + AB - 1) // AB
            init = (jnp.zeros((K,), jnp.float32), jnp.float32(MASKED), jnp.float32(0.0))
            acc, _, tot = lax.fori_loop(0, n_blocks, body, init)
            if merge_o:      # this head's share of the O projection, summed by its readers
                out = (acc / tot).astype(dtype).astype(jnp.float32)
                ob[h, b, :] = jnp.sum(out[:, None] * w.astype(jnp.float32), axis=0)
            else:
                ab[b, pl.ds(h * K, K)] = acc / tot
            kc[l, b, h, pl.ds(slot, 1), :] = k_new[None, :]
            vc[l, b, h, pl.ds(slot, 1), :] = v_new[None, :]

        def attend(l, w):
            for j in range(-(-B * H // n_programs)):
                unit = pid + j * n_programs
                pl.when(unit < B * H)(functools.partial(attend_unit, l, w, unit))

        def x_attn(cols=slice(None)):   # the residual stream after attention
            x = rows(xb, cols)
            if merge_o:
                for h in range(H):
                    x = x + rows(ob, cols, h)
            return x

        def out_proj(l, w):      # D/T programs: x[:, cols] += attn @ Wo[:, cols]
            @pl.when(pid < D // T)
            def _():
                c = pid * T
                xb[:, pl.ds(c, T)] = rows(xb, pl.ds(c, T)) + dot(rows(ab), w)

        def fetch_gu(l):
            i = tile(F // T)
            return wgu[l, i, 0], wgu[l, i, 1]

        def gate_up(l, w):       # F/T programs: silu(gate) * up of T hidden units
            @pl.when(pid < F // T)
            def _():
                xn = normed(x_attn(), n2[l])
                g = dot(xn, w[0]); u = dot(xn, w[1])
                hb[:, pl.ds(pid * T, T)] = (g * jax.nn.sigmoid(g) * u).astype(hb.dtype)

        def fetch_down(l):
            i = tile(D // T)
            return tuple(wd[l, i, pl.ds(c * FC, FC), :] for c in range(F // FC))

        def down(l, w):          # D/T programs: x[:, cols] += h @ Wd[:, cols], in chunks of FC
            @pl.when(pid < D // T)
            def _():
                c = pid * T
                y = sum(dot(rows(hb, pl.ds(j * FC, FC)), w[j]) for j in range(F // FC))
                xb[:, pl.ds(c, T)] = x_attn(pl.ds(c, T)) + y

        def head(w):             # V/VT programs: soft-capped logits of VT tokens
            @pl.when(pid < Vn // VT)
            def _():
                c = pid * VT
                xn = normed(rows(xb), nf_ref[...]).astype(dtype)
                y = jnp.dot(xn, w.T, preferred_element_type=jnp.float32, precision=prec)
                lb[:, pl.ds(c, VT)] = cap * jnp.tanh(y / cap) if cap else y
        fetch_head = lambda: emb_ref[pl.ds(tile(Vn // VT) * VT, VT), :]

        none = lambda l: None
        if merge_o:        # programs of one head (n_programs % H == 0) fetch its rows of Wo
            phases = ((fetch_qkv, qkv), (lambda l: wo_rows[l, pl.ds((pid % H) * K, K), :], attend),
                      (fetch_gu, gate_up), (fetch_down, down))
        else:
            phases = ((fetch_qkv, qkv), (none, attend), (lambda l: wo[l, tile(D // T)], out_proj),
                      (fetch_gu, gate_up), (fetch_down, down))
        base = t * (len(phases) * L + timed)     # ordinals of the barriers before this step
        if interpret:
            layer, ph = only
            head(fetch_head()) if ph == len(phases) else phases[ph][1](layer, phases[ph][0](layer))
            return
        if timed:
            tb[0, pid, pl.ds(1, 1)] = now(pid)

        def sync(ordinal, fetch):   # arrive, fetch the next phase's weights, then wait for the others
            if early:
                w = fetch()
            arrived = arrive(cnt)
            if timed:
                tb[ordinal, pid, pl.ds(0, 1)] = now(arrived)
            if not early:
                w = fetch()
            seen = wait(cnt, base + ordinal)
            if timed:
                tb[ordinal, pid, pl.ds(1, 1)] = now(seen)
            return w

        def layer_body(l, w):
            for k, (_, compute) in enumerate(phases):
                compute(l, w)
                nxt = phases[k + 1][0] if k + 1 < len(phases) else (lambda _: fetch_qkv(jnp.minimum(l + 1, L - 1)))
                w = sync(l * len(phases) + k + 1, functools.partial(nxt, l))
            return w
        lax.fori_loop(0, L, layer_body, fetch_qkv(0))
        head(fetch_head())
        if timed:
            sync(L * len(phases) + 1, lambda: None)
    return kernel


def make_step(cfg, sizes, B, dtype, programs=128, warps=4, attn_block=64, interpret=False, timed=False, merge_o=0, early=0):
    H, K, D, F, L = cfg.n_heads, cfg.head_dim, cfg.dim, cfg.mlp_hidden, cfg.n_layers
    BP = max(16, next_pow2(B))
    inv_freq = cfg.rope_theta ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    wins = jnp.array([cfg.layer_window(i) or 2 ** 30 for i in range(L)], jnp.int32)
    n_ord = (4 if merge_o else 5) * L + timed    # barriers a step
    S = max(sizes)
    size_arr = jnp.array(sizes, jnp.int32)

    def call(only, head, state):
        kernel = make_kernel(cfg, S, sizes, B, BP, dtype, programs, attn_block, only, timed, bool(merge_o), bool(early))
        out_shape = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in state]
        n_alias = len(state) if interpret else 4     # on GPU the scratch outputs start uninitialised
        state = state[:n_alias]
        params = {}
        if not interpret:
            from jax.experimental.pallas import triton as plt
            params["compiler_params"] = plt.CompilerParams(num_warps=warps, num_stages=1)
        return pl.pallas_call(kernel, grid=(programs,), out_shape=out_shape, interpret=interpret,
                              input_output_aliases={len(head) + j: j for j in range(len(state))},
                              name="decode_step", **params)(*head, *state)

    def step(tp, cache, tok, time, starts):
        """tp: tile_params(...); cache: (keys [L, B, H, S, K], values, barrier counter [1])."""
        x = jnp.pad(tp["embed"][tok].astype(jnp.float32), ((0, BP - B), (0, 0)))
        ang = (time - starts).astype(jnp.float32)[:, None] * inv_freq
        rope = jnp.pad(jnp.stack([jnp.cos(ang), jnp.sin(ang)]), ((0, 0), (0, BP - B), (0, 0)))
        head = [rope, jnp.pad(starts.astype(jnp.int32), (0, BP - B)), jnp.reshape(time, (1,)).astype(jnp.int32),
                wins, size_arr] + [tp[k] for k in ("n1", "qkv", "o", "n2", "gu", "down", "nf", "embed", "o_rows")]
        state = [cache[0], cache[1], cache[2], x,
                 jnp.zeros((3, BP, D), jnp.float32), jnp.zeros((BP, D), jnp.float32), jnp.zeros((BP, F), dtype),
                 jnp.zeros((BP, cfg.vocab_size), jnp.float32), jnp.zeros((H, BP, D), jnp.float32)]
        if timed:
            state.append(jnp.zeros((n_ord + 1, programs, 2), jnp.int32))
        if interpret:
            n = 4 if merge_o else 5
            for l in range(L):
                for ph in range(n):
                    state = list(call((l, ph), head, state))
            state = list(call((0, n), head, state))
        else:
            state = list(call(None, head, state))
        out = (state[7][:B], (state[0], state[1], state[2]))
        return out + (state[9],) if timed else out

    # the barrier counter at decode time ``time``: every step adds n_ord arrivals of every program
    step.counter = lambda time: jnp.reshape(time * n_ord * programs, (1,)).astype(jnp.int32)
    return step


def build(batch, steps, dtype=jnp.bfloat16, cfg=None, seed=0, **kw):
    cfg = cfg or ToyLMConfig()
    model = ToyLM(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    g, p = G.inference_params(model)
    ids = jax.random.randint(jax.random.key(1), (batch, 16), 0, cfg.vocab_size, jnp.int32)
    st = G._prefill(g, p, ids, jnp.zeros((batch,), jnp.int32), jax.random.key(0), cache_len=G.bucket(16 + steps),
                    sampling=G.SamplingConfig(greedy=True), eos_id=-1)
    sizes = [c.shape[2] for c in st.cache.keys]
    tp = tile_params(V.extract(model, dtype), cfg, dtype)
    step = make_step(cfg, sizes, batch, dtype, **kw)
    return model, (g, p), st, tp, stacked(st.cache, sizes) + (step.counter(st.cache.length),), step


def stacked(cache, sizes):
    """Every layer's cache in one [L, B, H, max size, K] array (the ring of a sliding layer at its start)."""
    pad = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, max(sizes) - c.shape[2]), (0, 0)))
    return jnp.stack([pad(c) for c in cache.keys]), jnp.stack([pad(c) for c in cache.values])


def check(interpret, **kw):
    cfg = ToyLMConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, head_dim=16, mlp_hidden=128, max_seq_len=256, sliding_window=8)
    with jax.default_matmul_precision("highest"):
        # head_dim 16 gives 4 columns a rope half: too narrow for Triton's dot, fine for the interpreter
        model, (g, p), st, tp, cache, step = build(2, 24, jnp.float32, cfg, interpret=interpret, programs=32, **kw)
        pc, tok, tm, err = st.cache, st.token_B, st.cache.length, 0.0
        m = nnx.merge(g, p)
        sj = jax.jit(step)
        for _ in range(20):
            ref, pc = jax.jit(m.decode_step)(tok, pc)
            got, cache = sj(tp, cache, tok, tm, st.cache.starts_B)
            err = max(err, float(jnp.abs(ref - got).max()))
            tok = jnp.argmax(ref, -1).astype(jnp.int32); tm = tm + 1
        cerr = max(float(jnp.abs(k - cache[0][l, :, :, :k.shape[2]]).max()) for l, k in enumerate(pc.keys))
    return err, cerr


def timeline(batch, **kw):
    """Per phase: the slowest program's work and the barrier's latency after the last arrival (µs), layer 1 and the median."""
    model, _, st, tp, cache, step = build(batch, 256, timed=True, **kw)
    f = jax.jit(step)
    tok, tm = st.token_B, st.cache.length
    for _ in range(4):
        logits, cache, Tm = f(tp, cache, tok, tm, st.cache.starts_B)
        tok = jnp.argmax(logits, -1).astype(jnp.int32); tm = tm + 1
    Tm = np.asarray(Tm).astype(np.int64)
    n = Tm.shape[0] - 1
    start, arrive, leave = Tm[:-1, :, 1], Tm[1:, :, 0], Tm[1:, :, 1]
    work = (arrive - start).max(1) / 1e3
    bar = (leave.max(1) - arrive.max(1)) / 1e3
    kinds = {}
    for k in range(n):
        names = [p for p in PHASES if not (kw.get("merge_o") and p == "out_proj")]
        kinds.setdefault(names[k % len(names)] if k < n - 1 else "head", []).append((work[k], bar[k]))
    total = (Tm[-1, :, 0].max() - Tm[0, :, 1].min()) / 1e3
    return dict(event="timeline", batch=batch, kw=kw, kernel_us=round(float(total), 1),
                per_kind={k: dict(first_work=round(float(v[0][0]), 2), work_us=round(float(np.median([a for a, _ in v])), 2),
                                  barrier_us=round(float(np.median([b for _, b in v])), 2)) for k, v in kinds.items()})


def bench(batch, steps=256, **kw):
    model, _, st, tp, cache0, step = build(batch, steps, **kw)
    run = V.loop_fn(step, steps)
    args = lambda: (tp, jax.tree.map(jnp.copy, cache0), st.token_B, st.cache.length, st.cache.starts_B)
    t0 = time.perf_counter(); comp = run.lower(*args()).compile(); cs = time.perf_counter() - t0
    _, _, _, toks = comp(*args()); toks = np.asarray(toks)
    hlo = comp.as_text()
    copies = [l.strip()[:160] for l in hlo.splitlines() if " copy(" in l or "copy-start" in l]
    ts = []
    for _ in range(5):
        a = args(); jax.block_until_ready(a); t0 = time.perf_counter(); r = comp(*a); jax.block_until_ready(r); ts.append(time.perf_counter() - t0)
    ms = float(np.median(ts)) / steps * 1e3
    _, _, st2, p2, step2, _ = V.build(set(), batch, steps)
    ref = np.asarray(V.loop_fn(step2, steps)(p2, tuple((st2.cache.keys[i], st2.cache.values[i]) for i in range(12)),
                                            st2.token_B, st2.cache.length, st2.cache.starts_B)[3])
    return dict(event="bench", batch=batch, kw=kw, ms_per_step=round(ms, 4), tokens_per_s=round(batch / ms * 1e3),
                compile_s=round(cs, 1), copies=copies[:6], token_agreement=float((ref[:batch] == toks[:batch]).mean()),
                first=toks[0, :12].tolist(), ref_first=ref[0, :12].tolist())


def profile(batch, steps=64, **kw):
    """Kernels of the decode loop by name, per step (µs), from a profiler trace."""
    import gzip
    model, _, st, tp, cache0, step = build(batch, steps, **kw)
    comp = V.loop_fn(step, steps).lower(tp, cache0, st.token_B, st.cache.length, st.cache.starts_B).compile()
    args = lambda: (tp, jax.tree.map(jnp.copy, cache0), st.token_B, st.cache.length, st.cache.starts_B)
    jax.block_until_ready(comp(*args()))
    d = pathlib.Path(f"/tmp/m2prof_{time.time()}")
    a = args(); jax.block_until_ready(a)
    with jax.profiler.trace(str(d)):
        jax.block_until_ready(comp(*a))
    ev = json.load(gzip.open(next(d.glob("plugins/profile/*/*.trace.json.gz"))))["traceEvents"]
    pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = sorted((e for e in ev if e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), "")), key=lambda e: e["ts"])
    by = {}
    for e in dev:
        by.setdefault(e["name"][:60], []).append(e.get("dur", 0))
    span = (dev[-1]["ts"] + dev[-1].get("dur", 0) - dev[0]["ts"]) / steps
    return dict(event="profile", batch=batch, kw=kw, span_us_per_step=round(span, 1), kernels_per_step=len(dev) / steps,
                by_name=sorted(((k, round(sum(v) / steps, 2), len(v)) for k, v in by.items()), key=lambda x: -x[1])[:12])


KNOBS = {"p": "programs", "w": "warps", "a": "attn_block", "m": "merge_o", "e": "early"}

if __name__ == "__main__":
    if sys.argv[1] == "cpucheck":
        for m in (0, 1):
            print(f"merge_o={m}: max |logit err|, max |cache err|:", check(True, merge_o=m))
        sys.exit()
    if sys.argv[1] == "lower":
        _, _, st, tp, cache, step = build(int(sys.argv[2]), 256, timed="t" in sys.argv[3:], merge_o="m" in sys.argv[3:])
        txt = jax.jit(step).trace(tp, cache, st.token_B, st.cache.length, st.cache.starts_B).lower(lowering_platforms=("cuda",)).as_text()
        print("lowered", len(txt)); sys.exit()
    out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
    log = open(out / "mega2.jsonl", "a")
    def emit(**kw):
        s = json.dumps(kw, default=str); log.write(s + "\n"); log.flush(); print(s, flush=True)
    emit(event="env", jax=jax.__version__, device=jax.devices()[0].device_kind)
    for item in sys.argv[2:]:
        try:
            if item == "barrier":
                emit(**barrier_bench()); continue
            if item == "check":
                for m in (0, 1):
                    e, c = check(False, merge_o=m); emit(event="check", merge_o=m, max_abs_logit_err=e, max_abs_cache_err=c)
                continue
            fn = {"t": timeline, "P": profile}.get(item[0], bench); parts = item.lstrip("tP").split(":")
            kw = {KNOBS[p[0]]: int(p[1:]) for p in parts[1:]}
            emit(**fn(int(parts[0][1:]), **kw))
        except Exception:
            emit(event="error", item=item, err=traceback.format_exc()[-2500:])
