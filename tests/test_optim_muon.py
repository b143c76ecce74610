"""Muon + AdamW against the original Llama Think optimizer steps, a float64 ToyLM reference, invariants."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import fixture_dir
from jaxlm.config import OptimConfig
from jaxlm.errors import ConfigError
from jaxlm.optim import build_optimizer, muon_adamw, newton_schulz, param_labels, path_name, schedules
from jaxlm.optim.muon import NS_NORM_SAFETY, ns_coefficient_rows

# ----------------------------------------------------------------- Llama Think golden steps

# train.py's Muon(...) call (manifest.json -> muon_golden.hyperparameters), in OptimConfig terms.
LLAMA_THINK = OptimConfig(
    lr=0.02, adamw_lr=0.002, momentum=0.95, nesterov=True, ns_steps=5, muon_scale="llama_think",
    muon_weight_decay=0.01, weight_decay=0.01, b1=0.9, b2=0.99, eps=1e-8, grad_clip=0.0,
    schedule="constant", warmup_steps=0,
    adamw_patterns=("tok_embeddings", "output"), conv_patterns=("conv1d",))


def _torch_to_flax(x):
    """(out, in) -> (in, out); conv1d (C, 1, K) -> nnx.Conv (K, 1, C). Its own inverse."""
    return np.transpose(x) if x.ndim in (2, 3) else x


@pytest.fixture(scope="module")
def golden():
    folder = fixture_dir("llama_think")
    data = np.load(folder / "muon_golden.npz")
    manifest = json.loads((folder / "manifest.json").read_text())["muon_golden"]
    names = [p["name"] for p in manifest["params"]]
    assert [p["group"] for p in manifest["params"]] == ["muon"] * 4 + ["adamw"] * 2
    return data, manifest, names


def _run_golden(tx, data, names):
    """Feed the three gradients; yield (step, params in torch layout, opt state) after each."""
    params = {n: jnp.asarray(_torch_to_flax(data[f"init.p{i}"])) for i, n in enumerate(names)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in (1, 2, 3):
        grads = {n: jnp.asarray(_torch_to_flax(data[f"grad.step{step}.p{i}"])) for i, n in enumerate(names)}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        yield step, {n: _torch_to_flax(np.asarray(params[n])) for n in names}, state


def _assert_rel(got, want, what, tol=1e-5):
    # Max-norm relative error. Measured: <= 4e-7 on the parameters; each single convention error
    # (no Nesterov, ToyLM scale, conv not viewed as (C, K), AdamW decay off, b2, eps, ...) gives >= 6e-5.
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def test_llama_think_golden_ctor(golden):
    """Group lrs as constructed (0.02 Muon, 0.002 AdamW), through build_optimizer."""
    data, _, names = golden
    params = {n: jnp.zeros(_torch_to_flax(data[f"init.p{i}"]).shape) for i, n in enumerate(names)}
    labels = param_labels(params, LLAMA_THINK.adamw_patterns)
    assert [labels[n] for n in names] == ["muon"] * 4 + ["adamw"] * 2
    tx, learning_rates = build_optimizer(LLAMA_THINK, params, total_steps=3)
    assert learning_rates["muon"](0) == pytest.approx(0.02) and learning_rates["adamw"](2) == pytest.approx(0.002)
    for step, got, _ in _run_golden(tx, data, names):
        for i, n in enumerate(names):
            _assert_rel(got[n], data[f"ctor.after_step{step}.p{i}"], f"ctor step {step} {n}")


def test_llama_think_golden_loop(golden):
    """train.py's loop: both groups follow the warmup-cosine lr(it) for it = 500, 501, 502."""
    data, manifest, names = golden
    loop = manifest["scenarios"]["loop"]
    cfg = dataclasses.replace(LLAMA_THINK, schedule="cosine", warmup_steps=500, planned_steps=10_000,
                              final_lr_fraction=0.0)
    lr_of_iteration = schedules.schedule_from_config(cfg, cfg.lr, total_steps=10_000)
    first = loop["iterations_used_for_get_lr"][0]
    resumed = lambda count: lr_of_iteration(count + first)  # the optimizer's count starts at 0
    for k, (muon_lr, adamw_lr) in enumerate(loop["lr_per_step_per_group"]):
        assert float(resumed(k)) == pytest.approx(muon_lr, rel=1e-7) and muon_lr == adamw_lr

    tx = muon_adamw(cfg, muon_lr=resumed, adamw_lr=resumed)
    for step, got, state in _run_golden(tx, data, names):
        for i, n in enumerate(names):
            _assert_rel(got[n], data[f"loop.after_step{step}.p{i}"], f"loop step {step} {n}")

    # State after step 3: Muon momentum buffers, AdamW first and second moments.
    momentum = optax.tree.get(state, "momentum")
    mu, nu = optax.tree.get(state, "mu"), optax.tree.get(state, "nu")
    for i, n in enumerate(names[:4]):
        _assert_rel(_torch_to_flax(np.asarray(momentum[n])),
                    data[f"loop.state_after_step3.p{i}.momentum_buffer"], f"momentum {n}")
    for i, n in enumerate(names[4:], start=4):
        _assert_rel(_torch_to_flax(np.asarray(mu[n])), data[f"loop.state_after_step3.p{i}.exp_avg"], f"exp_avg {n}")
        _assert_rel(_torch_to_flax(np.asarray(nu[n])), data[f"loop.state_after_step3.p{i}.exp_avg_sq"],
                    f"exp_avg_sq {n}")
    assert int(optax.tree.get(state, "ScaleByAdamState").count) == loop["adamw_state_step_after_3"][4]


# ----------------------------------------------------------------- ToyLM: float64 reference

def _reference_toylm_muon(w_oi, m_oi, g_oi, lr, wd, beta, nesterov=True):
    """specs/toylm.md's Muon step on one torch-layout (out, in) matrix, float64 NumPy."""
    m_oi = beta * m_oi + g_oi
    u = g_oi + beta * m_oi if nesterov else m_oi
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / (np.linalg.norm(x) + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if u.shape[0] > u.shape[1] else x
    fan_out, fan_in = w_oi.shape
    w_oi = w_oi * (1 - lr * wd) - lr * max(1.0, fan_out / fan_in) ** 0.5 * x
    return w_oi, m_oi


def _reference_adamw(w, m, v, g, t, lr, wd, b1, b2, eps):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w = w * (1 - lr * wd) - lr / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)
    return w, m, v


def test_toylm_muon_matches_float64_reference():
    cfg = OptimConfig(lr=2e-3, adamw_lr=5e-4, muon_scale="toylm", muon_weight_decay=0.1, weight_decay=0.05,
                      b1=0.9, b2=0.95, eps=1e-8, grad_clip=0.0, schedule="constant", warmup_steps=0)
    rng = np.random.default_rng(0)
    # Flax (in, out) layout: q square, gate widening (scale 2), down narrowing (scale 1),
    # and a stacked (layers, in, out) kernel whose matrices must be orthogonalised one by one.
    shapes = {"embed/embedding": (40, 16), "blocks/0/attn/q/kernel": (16, 16),
              "blocks/0/mlp/gate/kernel": (16, 64), "blocks/0/mlp/down/kernel": (64, 16),
              "stacked/mlp/up/kernel": (3, 16, 48), "blocks/0/norm/w": (16,)}
    # float32-representable starting values, so both sides start from the same point
    params64 = {k: rng.normal(0, 0.05, s).astype(np.float32).astype(np.float64) for k, s in shapes.items()}
    grads64 = [{k: rng.normal(0, 1.0, s) for k, s in shapes.items()} for _ in range(3)]
    labels = param_labels(params64, cfg.adamw_patterns)
    assert labels == {k: ("adamw" if k.startswith("embed") or k.endswith("/w") else "muon") for k in shapes}

    tx, _ = build_optimizer(cfg, params64, total_steps=3)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params64.items()}
    state = tx.init(params)
    ref, our_change = dict(params64), {k: np.zeros(s) for k, s in shapes.items()}
    moments = {k: [np.zeros(s), np.zeros(s)] for k, s in shapes.items()}
    for t, g64 in enumerate(grads64, start=1):
        updates, state = jax.jit(tx.update)({k: jnp.asarray(v, jnp.float32) for k, v in g64.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k in shapes:
            our_change[k] += np.asarray(updates[k], np.float64)
            if labels[k] == "adamw":
                ref[k], *moments[k] = _reference_adamw(ref[k], *moments[k], g64[k], t, 5e-4, 0.05, 0.9, 0.95, 1e-8)
                continue
            # The reference works in torch layout: transpose each (in, out) matrix to (out, in).
            w, m, g = (np.swapaxes(x, -1, -2) for x in (ref[k], moments[k][0], g64[k]))
            stepped = [_reference_toylm_muon(w[j], m[j], g[j], 2e-3, 0.1, 0.95) for j in np.ndindex(w.shape[:-2])]
            ref[k] = np.swapaxes(np.stack([s[0] for s in stepped]).reshape(w.shape), -1, -2)
            moments[k][0] = np.swapaxes(np.stack([s[1] for s in stepped]).reshape(w.shape), -1, -2)

    for k in shapes:
        # Compare the summed updates (the parameters would hide them under their own float32
        # rounding). float32 against float64 measures <= 8e-7 of the largest change (float32
        # epsilon 6e-8 grown through 5 Newton-Schulz iterations); 5e-6 leaves room for other
        # BLAS orders, while the scale 2 of the gate, a missed Nesterov term or a transposed
        # orientation would all be errors of order 1.
        want = ref[k] - params64[k]
        err = np.abs(our_change[k] - want).max() / np.abs(want).max()
        assert err < 5e-6, f"{k}: error {err:.2e} relative to the float64 reference"


# ----------------------------------------------------------------- the ToyLM split, batching

def _crowfeather_shapes():
    dim, mlp, vocab = 512, 2048, 8192
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    blocks = {i: {"attn_norm": {"w": s(dim)}, "mlp_norm": {"w": s(dim)},
                  "attn": {p: {"kernel": s(dim, dim)} for p in "qkvo"},
                  "mlp": {"gate": {"kernel": s(dim, mlp)}, "up": {"kernel": s(dim, mlp)},
                          "down": {"kernel": s(mlp, dim)}}} for i in range(12)}
    return {"embed": {"embedding": s(vocab, dim)}, "blocks": blocks, "final_norm": {"w": s(dim)}}


def test_crowfeather_split():
    params = _crowfeather_shapes()
    assert sum(x.size for x in jax.tree.leaves(params)) == 54_538_752  # specs/toylm.md
    labels = param_labels(params, OptimConfig().adamw_patterns)
    flat = [lab for lab in jax.tree.leaves(labels)]
    assert flat.count("muon") == 84 and flat.count("adamw") == 26  # embedding + 25 norms
    assert labels["embed"]["embedding"] == "adamw" and labels["blocks"][3]["attn"]["o"]["kernel"] == "muon"


def test_newton_schulz_is_batched_over_leaves():
    """84 matrices of two shapes (512x512 and, wide, 512x2048) -> 2 batched NS chains of 5x3 matmuls."""
    params = _crowfeather_shapes()
    tx, _ = build_optimizer(OptimConfig(), params, total_steps=1000)
    state = jax.eval_shape(tx.init, params)
    jaxpr = jax.make_jaxpr(tx.update)(params, state, params)

    def count(eqns):
        n = 0
        for e in eqns:
            n += e.primitive.name == "dot_general"
            for sub in jax.core.jaxprs_in_params(e.params):
                n += count(sub.eqns)
        return n
    assert count(jaxpr.jaxpr.eqns) == 2 * 5 * 3


def test_stacked_kernel_equals_separate_layers():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(4, 24, 40)).astype(np.float32)
    cfg = OptimConfig(grad_clip=0.0, schedule="constant", warmup_steps=0)
    stacked = {"layers/kernel": jnp.asarray(g)}
    separate = {f"layer{i}/kernel": jnp.asarray(g[i]) for i in range(4)}
    out = []
    for tree in (stacked, separate):
        tx, _ = build_optimizer(cfg, tree, total_steps=1)
        out.append(tx.update(tree, tx.init(tree), tree)[0])
    np.testing.assert_allclose(out[0]["layers/kernel"], np.stack([out[1][f"layer{i}/kernel"] for i in range(4)]),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("name, steps, low, high", [
    ("quintic", 5, 0.65, 1.2),          # Keller Jordan: singular values land in ~[0.68, 1.13]
    ("polar_express", 5, 0.84, 1.16),   # tighter at the bottom (measured [0.86, 1.14])
    ("cubic", 30, 1 - 1e-5, 1 + 1e-5),  # the classic iteration converges to the polar factor
])
def test_coefficient_sets_orthogonalise(name, steps, low, high):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 32, 96)) * np.linspace(0.05, 1, 32)[:, None]   # condition number ~20
    out = newton_schulz(jnp.asarray(x, jnp.float32), ns_coefficient_rows(name, steps), NS_NORM_SAFETY.get(name, 1.0))
    sv = np.linalg.svd(np.asarray(out, np.float64), compute_uv=False)
    assert low <= sv.min() and sv.max() <= high, (sv.min(), sv.max())


def test_bfloat16_newton_schulz_is_close():
    rng = np.random.default_rng(3)
    tree = {"w": jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)}
    outs = []
    for ns_dtype in ("float32", "bfloat16"):
        cfg = OptimConfig(ns_dtype=ns_dtype, grad_clip=0.0, schedule="constant", warmup_steps=0)
        tx, _ = build_optimizer(cfg, tree, total_steps=1)
        update = tx.update(tree, tx.init(tree), tree)[0]["w"]
        assert update.dtype == jnp.float32
        outs.append(np.asarray(update, np.float64))
    # bf16 moves each singular value within the quintic's band (measured 7% Frobenius difference),
    # but the direction stays: cosine similarity measured 0.997.
    cosine = np.sum(outs[0] * outs[1]) / np.linalg.norm(outs[0]) / np.linalg.norm(outs[1])
    assert cosine > 0.99, cosine


def test_update_scales():
    """Scale factors of a (in 16, out 64) kernel: ToyLM 2, Llama Think 2, Moonlight 0.2*8, none 1."""
    tree = {"w": jnp.asarray(np.random.default_rng(4).normal(size=(16, 64)), jnp.float32)}
    norms = {}
    for scale in ("toylm", "llama_think", "moonlight", "none"):
        cfg = OptimConfig(muon_scale=scale, grad_clip=0.0, schedule="constant", warmup_steps=0, lr=1.0)
        tx, _ = build_optimizer(cfg, tree, total_steps=1)
        norms[scale] = float(jnp.linalg.norm(tx.update(tree, tx.init(tree), tree)[0]["w"]))
    assert norms["toylm"] / norms["none"] == pytest.approx(2.0, rel=1e-5)
    assert norms["llama_think"] / norms["none"] == pytest.approx(2.0, rel=1e-5)
    assert norms["moonlight"] / norms["none"] == pytest.approx(1.6, rel=1e-5)
    # and the transposed kernel (in 64, out 16) narrows: ToyLM leaves it at 1
    tree_t = {"w": tree["w"].T}
    tx, _ = build_optimizer(OptimConfig(grad_clip=0.0, schedule="constant", warmup_steps=0, lr=1.0), tree_t, 1)
    assert float(jnp.linalg.norm(tx.update(tree_t, tx.init(tree_t), tree_t)[0]["w"])) == pytest.approx(
        norms["none"], rel=1e-5)


# ----------------------------------------------------------------- wiring

def test_grad_clip_is_part_of_the_optimizer():
    tree = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(8, 8)), jnp.float32), "b": jnp.ones(8)}
    grads = jax.tree.map(lambda x: 100.0 * x, tree)
    clipped = jax.tree.map(lambda g: g / optax.global_norm(grads), grads)
    # Muon and Adam are nearly blind to the gradient's scale; a large eps makes Adam see it.
    base = OptimConfig(schedule="constant", warmup_steps=0, eps=1.0)
    tx_clip, _ = build_optimizer(dataclasses.replace(base, grad_clip=1.0), tree, 1)
    tx_none, _ = build_optimizer(dataclasses.replace(base, grad_clip=0.0), tree, 1)
    with_clip = tx_clip.update(grads, tx_clip.init(tree), tree)[0]
    assert float(jnp.abs(with_clip["b"] - tx_none.update(clipped, tx_none.init(tree), tree)[0]["b"]).max()) < 1e-9
    assert float(jnp.abs(with_clip["b"] - tx_none.update(grads, tx_none.init(tree), tree)[0]["b"]).max()) > 1e-6


def test_nnx_optimizer_trains_a_module():
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(16, 8, rngs=rngs)
            self.proj = nnx.Linear(8, 16, use_bias=False, rngs=rngs)
            self.conv = nnx.Conv(8, 8, kernel_size=(3,), feature_group_count=8, rngs=rngs)

    model = Tiny(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    labels = {path_name(path): label for path, label in jax.tree_util.tree_leaves_with_path(param_labels(params))}
    assert labels == {"embed/embedding": "adamw", "conv/bias": "adamw", "proj/kernel": "muon", "conv/kernel": "muon"}
    tx, _ = build_optimizer(OptimConfig(lr=0.02, schedule="constant", warmup_steps=0), params, total_steps=10)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ids = jnp.arange(12) % 16

    def loss_fn(m):
        h = m.conv(m.embed(ids)[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(m.proj(h), (ids + 1) % 16).mean()

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_adamw_only():
    tree = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    tx, learning_rates = build_optimizer(OptimConfig(name="adamw", lr=1e-3, warmup_steps=0, schedule="constant"),
                                         tree, 5)
    assert set(learning_rates) == {"adamw"} and learning_rates["adamw"](3) == pytest.approx(1e-3)
    assert optax.tree.get(tx.init(tree), "mu")["w"].shape == (4, 4)


@pytest.mark.parametrize("change, field", [
    (dict(adamw_patterns=("embed(",)), "adamw_patterns"),
    (dict(conv_patterns=("[",)), "conv_patterns"),
    (dict(adamw_patterns=(".",)), "optim.name"),
    (dict(ns_coefficients="polar_express", ns_steps=6), "ns_steps"),
    (dict(ns_dtype="float16"), "ns_dtype"),
    (dict(warmup_steps=90), "warmup_steps"),
])
def test_config_errors_name_the_field(change, field):
    tree = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    with pytest.raises(ConfigError, match=field):
        build_optimizer(dataclasses.replace(OptimConfig(warmup_steps=0), **change), tree, total_steps=100)
