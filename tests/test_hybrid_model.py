"""The Llama Think (hybrid) model: counts, shapes, fixture parity, GDN and CSA numerics, caches, gradients.

The golden files are the upstream PyTorch code's (``../shared/fixtures/llama_think``); the GDN and
CSA references below are float64 NumPy restatements of SPEC §6-§7, independent of the model code.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_dir
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.formats import hybrid as fh
from jaxlm.formats import torch_pt
from jaxlm.loss import lm_loss
from jaxlm.models.hybrid import HybridConfig, HybridLM, csa, gdn
from jaxlm.optim.partition import path_name

REAL_PARAMS = 95_715_408
TINY_PARAMS = 207_016


def _tiny(**changes):
    base = dict(dim=40, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=208,
                layer_types=("linear", "linear", "csa", "full") * 2, linear_num_key_heads=2,
                linear_num_value_heads=2, linear_key_head_dim=24, linear_value_head_dim=24)
    return HybridConfig(**{**base, **changes})


def _param_shapes(model_fn):
    abstract = nnx.eval_shape(model_fn)
    return {path_name(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param))}


def _load(cfg, flat, dtype=jnp.float32):
    """The model with the given parameters (built abstractly: no random init to pay for)."""
    model = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(flat[path_name(p)]), state))
    return model


def _random_model(cfg, seed, dtype=jnp.float32):
    """A model with NumPy-drawn weights: matrices N(0, 0.02^2), the conv U(-0.5, 0.5), and every 1-D
    tensor (norms, scales, decay parameters) N(0, 0.2^2) so that no convention hides behind a zero."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if "conv1d" in path_name(path):
            return rng.uniform(-0.5, 0.5, leaf.shape).astype(np.float32)
        return (rng.standard_normal(leaf.shape) * (0.2 if len(leaf.shape) == 1 else 0.02)).astype(np.float32)

    model = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    flat = {path_name(p): draw(p, leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
    return _load(cfg, flat, dtype)


@pytest.fixture(scope="module")
def golden():
    path = fixture_dir("llama_think")
    ck = torch_pt.load(path / "ckpt.pt")
    shapes = {k: tuple(v.shape) for k, v in ck["model"].items()}
    cfg, _ = fh.config_from_fields(ck["model_args"], shapes, "ckpt.pt")
    model = _load(cfg, fh.params_from_state_dict(ck["model"], cfg))
    return path, ck, cfg, model


@pytest.fixture(scope="module")
def forward(golden):
    """The fixture model's jitted forward on ``[2, 203]`` ids (one compile shared by the tests)."""
    graphdef, state = nnx.split(golden[3])
    run = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return lambda ids: np.asarray(run(state, jnp.asarray(ids, jnp.int32)))


# ----------------------------------------------------------------------------- counts and shapes


def test_real_config_counts_itself_and_its_shapes_are_the_upstream_state_dict():
    cfg = HybridConfig()
    assert cfg.param_count() == REAL_PARAMS
    shapes = _param_shapes(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(s)) for s in shapes.values()) == REAL_PARAMS
    assert shapes == fh.param_shapes(cfg)
    keys = json.loads((fixture_dir("llama_think") / "full_keys.json").read_text())
    assert keys["total_parameters"] == REAL_PARAMS
    listed = [(e["key"], tuple(e["shape"])) for e in keys["keys"]]
    assert len(listed) == 287
    # Every upstream key, in upstream order, maps onto a parameter of the right shape (after transposes).
    assert [fh.strip_prefixes(k) for k, _ in listed] == [e.name for e in fh.entries(cfg)]
    fh.check_keys(dict(listed), cfg, "full_keys.json")
    assert cfg.layer_kinds() == ["gdn", "gdn", "csa", "full"] * 4
    assert "GDN" in cfg.flops_note() and "CSA" in cfg.flops_note()
    assert 6 * REAL_PARAMS * 0.9 < cfg.flops_per_token(1024) < 6 * REAL_PARAMS * 1.2


def test_tiny_config_from_the_checkpoint(golden):
    _, ck, cfg, model = golden
    assert cfg.param_count() == TINY_PARAMS
    params = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == TINY_PARAMS
    assert fh.fields_for_torch(cfg, ck["model_args"]) == ck["model_args"]
    assert fh.fields_for_torch(cfg, None) == {**ck["model_args"], "layer_types": tuple(ck["model_args"]["layer_types"])}


def test_state_dict_round_trip_is_bit_exact(golden):
    _, ck, cfg, _ = golden
    flat = fh.params_from_state_dict(ck["model"], cfg)
    back = fh.state_dict_from_params(flat, cfg)
    original = {fh.strip_prefixes(k): v for k, v in ck["model"].items()}
    assert list(back) == list(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    assert back["output.weight"] is back["tok_embeddings.weight"]
    # The masks are recomputed exactly as the upstream module registers them.
    assert all(np.array_equal(fh.mask_buffers(cfg)[e.role], original[e.name]) for e in fh.entries(cfg)
               if e.kind == "buffer")


def test_unknown_layer_kind_is_one_clear_error(golden):
    _, ck, _, _ = golden
    with pytest.raises(ConfigError, match="'window'"):
        _tiny(layer_types=("linear", "window", "csa", "full") * 2).validate()
    args = {**ck["model_args"], "layer_types": ("linear", "mamba", "csa", "full") * 2}
    with pytest.raises(CheckpointError, match="'mamba'") as e:
        fh.config_from_fields(args, {k: v.shape for k, v in ck["model"].items()}, "ckpt.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="dropout"):
        _tiny(dropout=0.1).validate()


# ----------------------------------------------------------------------------- parity


def test_fixture_logits_and_loss(golden, forward):
    path = golden[0]
    ids = np.load(path / "input_ids.npy")
    targets = np.load(path / "targets.npy")
    logits = forward(ids)
    want = np.load(path / "logits.npy")
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    assert np.abs(logits - want).max() < 1e-5
    z = logits.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = targets != -1
    loss = -np.take_along_axis(logp, np.maximum(targets, 0)[..., None], axis=-1)[..., 0][keep].mean()
    assert abs(loss - json.loads((path / "loss.json").read_text())["loss"]) < 1e-5


def test_fixture_logits_in_bfloat16_compute(golden):
    """Mixed precision (bf16 matmuls, float32 params, norms, GDN state and softmax) stays near the golden logits."""
    path, ck, cfg, _ = golden
    model = _load(cfg, fh.params_from_state_dict(ck["model"], cfg), jnp.bfloat16)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, jnp.asarray(np.load(path / "input_ids.npy")))
    want = np.load(path / "logits.npy")
    assert logits.dtype == jnp.float32
    error = np.abs(np.asarray(logits) - want).max()
    assert 0 < error < 1e-2 * np.abs(want).max()


# ----------------------------------------------------------------------------- Gated DeltaNet


def _delta_rule_f64(q, k, v, g, beta):
    """SPEC §7.6 step by step in float64: decay, correct with the decayed state, read the new state."""
    B, T, H, K = q.shape
    M = np.zeros((B, H, K, v.shape[-1]))
    out = np.zeros((B, T, H, v.shape[-1]))
    for t in range(T):
        M = np.exp(g[:, t])[..., None, None] * M
        e = beta[:, t][..., None] * (v[:, t] - np.einsum("bhkv,bhk->bhv", M, k[:, t]))
        M = M + k[:, t][..., :, None] * e[..., None, :]
        out[:, t] = np.einsum("bhkv,bhk->bhv", M, q[:, t])
    return out, M


def _gdn_inputs(rng, B, T, H, K, V, slow=True):
    unit = lambda x: x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
    q = unit(rng.normal(size=(B, T, H, K))) / np.sqrt(K)
    k = unit(rng.normal(size=(B, T, H, K)))
    v = rng.normal(size=(B, T, H, V))
    g = -rng.uniform(0.0, 0.05 if slow else 2.0, size=(B, T, H))
    beta = rng.uniform(0.0, 1.0, size=(B, T, H))
    return q, k, v, g, beta


@pytest.mark.parametrize("T", [1, 65, 200])
def test_chunked_equals_recurrent_equals_float64_reference(T):
    rng = np.random.default_rng(T)
    args64 = _gdn_inputs(rng, 2, T, 3, 16, 12)
    args = [jnp.asarray(a, jnp.float32) for a in args64]
    chunked, state_c = jax.jit(gdn.chunked_delta_rule, static_argnames="chunk")(*args, chunk=64)
    recurrent, state_r = jax.jit(gdn.recurrent_delta_rule)(*args)
    ref, state_ref = _delta_rule_f64(*args64)
    assert np.abs(np.asarray(chunked) - np.asarray(recurrent)).max() <= 1e-5
    assert np.abs(np.asarray(state_c) - np.asarray(state_r)).max() <= 1e-5
    assert np.abs(np.asarray(chunked) - ref).max() <= 1e-5
    assert np.abs(np.asarray(state_c) - state_ref).max() <= 1e-5


def test_chunked_carries_a_given_state_and_chunk_size_does_not_matter():
    rng = np.random.default_rng(7)
    args = [jnp.asarray(a, jnp.float32) for a in _gdn_inputs(rng, 1, 120, 2, 8, 8, slow=False)]
    run = jax.jit(gdn.chunked_delta_rule, static_argnames="chunk")
    whole, _ = run(*args, chunk=64)
    small, _ = run(*args, chunk=16)
    first, state = run(*(a[:, :60] for a in args), chunk=64)     # halves that end mid-chunk
    second, _ = run(*(a[:, 60:] for a in args), chunk=64, state_BHKV=state)
    assert np.abs(np.asarray(whole) - np.asarray(small)).max() <= 1e-5
    assert np.abs(np.asarray(whole) - np.concatenate([first, second], axis=1)).max() <= 1e-5


def test_unit_lower_inverse_by_matmuls():
    rng = np.random.default_rng(3)
    for c in (8, 16, 64):
        a = np.tril(rng.normal(size=(2, c, c)) * 0.4, -1)
        inv = np.asarray(gdn.unit_lower_inverse(jnp.asarray(a, jnp.float32)))
        np.testing.assert_allclose(inv, np.linalg.inv(np.eye(c) + a), atol=2e-5)


# ----------------------------------------------------------------------------- CSA


def _csa_f64(layer: csa.CompressedSparseAttention, x):
    """SPEC §6 in float64 NumPy from the layer's own weights (dense masks: fine for a reference)."""
    cfg = layer.cfg
    W = lambda m: np.asarray(m.kernel[...], np.float64)
    T = x.shape[0]
    H, G, d, r, S = cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.rotary_dim, cfg.csa_stride
    norm = lambda y, w: y / np.sqrt((y * y).mean(-1, keepdims=True) + cfg.norm_eps) * (1 + np.asarray(w.w[...]))

    def rope(y, pos):
        f = 1.0 / cfg.rope_base ** (np.arange(0, r, 2) / r)
        a = pos[:, None, None] * f
        y1, y2 = y[..., : r // 2], y[..., r // 2:r]
        return np.concatenate([y1 * np.cos(a) - y2 * np.sin(a), y2 * np.cos(a) + y1 * np.sin(a), y[..., r:]], -1)

    qg = (x @ W(layer.wq)).reshape(T, H, 2, d)
    q = rope(norm(qg[:, :, 0], layer.q_norm), np.arange(T))
    gate = qg[:, :, 1].reshape(T, -1)
    khat = norm((x @ W(layer.wk)).reshape(T, G, d), layer.k_norm)
    v = (x @ W(layer.wv)).reshape(T, G, d)

    def attend(keys, values, allowed):
        out = np.zeros((T, H, d))
        for h in range(H):
            s = q[:, h] @ keys[:, h // (H // G)].T / np.sqrt(d)
            s = np.where(allowed, s, -np.inf)
            rows = allowed.any(-1)
            p = np.zeros_like(s)
            p[rows] = np.exp(s[rows] - s[rows].max(-1, keepdims=True))
            p[rows] /= p[rows].sum(-1, keepdims=True)
            out[:, h] = p @ values[:, h // (H // G)]
        return out.reshape(T, -1)

    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    local = attend(rope(khat, np.arange(T)), v, (j <= i) & (i - cfg.csa_local_window < j))
    n = -(-T // S)
    pad = lambda y: np.concatenate([y.reshape(T, -1), np.zeros((n * S - T, G * d))]).reshape(n, S, -1).mean(1)
    kc = (pad(khat) @ W(layer.compress_k)).reshape(n, G, d)
    vc = (pad(v) @ W(layer.compress_v)).reshape(n, G, d)
    kc = rope(kc, np.minimum(np.arange(n) * S + S // 2, T - 1))
    comp = attend(kc, vc, i >= (np.arange(n)[None, :] + 1) * S)
    b = 1 / (1 + np.exp(-(x @ W(layer.blend_gate))))
    ctx = (b * comp + (1 - b) * local) / (1 + np.exp(-gate))
    return ctx @ W(layer.wo), comp


def test_csa_equals_dense_reference_and_empty_rows_are_zero(golden):
    _, _, cfg, model = golden
    layer = model.blocks[2].attention
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 150, cfg.dim))
    out = jax.jit(lambda x: layer(x, jnp.arange(150)[None]))(jnp.asarray(x, jnp.float32))
    ref, comp_ref = _csa_f64(layer, x[0])
    assert np.abs(np.asarray(out[0]) - ref).max() < 1e-5
    assert np.all(comp_ref[: cfg.csa_stride] == 0)
    # The training form's compressed path (causal attention over blocks, queries moved a block
    # earlier) alone: the reference's, and exactly 0 where no block is visible.
    def compressed(x):
        q, _, k, v = layer.project(x, jnp.arange(150)[None])
        return layer.causal_compressed_attention(q, *layer.block_sums(k, v))
    comp = np.asarray(jax.jit(compressed)(jnp.asarray(x, jnp.float32)))[0].reshape(150, -1)
    assert np.abs(comp - comp_ref).max() < 1e-5 and np.all(comp[: cfg.csa_stride] == 0.0)
    # The compressed path alone: queries 0..S-1 see no block and give exactly 0 (not NaN, not a mean).
    q = jnp.asarray(rng.normal(size=(1, 8, cfg.n_heads, cfg.head_size)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(1, 2, cfg.n_kv_heads, cfg.head_size)), jnp.float32)
    visible = jnp.arange(2)[None, None, :] < (jnp.arange(8) // 4)[None, :, None]
    got = np.asarray(csa.empty_safe_attention(q, kv, kv, visible))
    assert np.all(got[0, :4] == 0.0) and np.all(np.isfinite(got)) and np.any(got[0, 4:] != 0)


# ----------------------------------------------------------------------------- caches


def _cached_logits(model, rows, steps, cache_dtype=jnp.float32):
    """Prefill left-padded prompts, then feed the last ``steps`` tokens one by one: ``[B, steps + 1, V]``."""
    B, length = len(rows), max(len(r) for r in rows)
    starts = np.array([length - len(r) for r in rows], np.int32)
    ids = np.zeros((B, length), np.int32)
    for b, r in enumerate(rows):
        ids[b, starts[b]:] = r
    prompt_len = length - steps
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda s, ids, cache, starts: nnx.merge(graphdef, s).prefill(ids, cache, starts))
    step = jax.jit(lambda s, tok, cache: nnx.merge(graphdef, s).decode_step(tok, cache))
    cache = model.init_cache(B, length + 1, cache_dtype)
    logits, cache = prefill(state, jnp.asarray(ids[:, :prompt_len]), cache, jnp.asarray(starts))
    out = [np.asarray(logits)]
    for t in range(prompt_len, length):
        logits, cache = step(state, jnp.asarray(ids[:, t]), cache)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1), starts, prompt_len


@pytest.mark.parametrize("lengths, steps", [((150, 137), 9), ((12, 9), 6)])
def test_cached_generation_equals_uncached_with_left_padding(golden, forward, lengths, steps):
    """Long rows (150 and 137 real tokens, the shorter left-padded by 13): the prefill crosses GDN chunk
    edges (64, 128) and fills the local-window ring past its 64 slots; decoding then crosses CSA
    block edges and runs the recurrent GDN on from the chunked state. Short rows: prompts of 6 and
    3 tokens, so CSA's half-filled blocks pass from the prefill to the decode steps."""
    _, _, cfg, model = golden
    rng = np.random.default_rng(11)
    rows = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    cached, starts, prompt_len = _cached_logits(model, rows, steps)
    # Uncached: each row alone and unpadded (right-padded to the shared shape; causal, so harmless).
    full = forward(np.stack([np.pad(r, (0, 203 - len(r))) for r in rows]))
    for b in range(len(rows)):
        first = prompt_len - 1 - starts[b]          # the position whose logits the prefill returns
        want = full[b, first:first + steps + 1]
        assert np.all(np.isfinite(cached[b]))
        assert np.abs(cached[b] - want).max() <= 1e-5, b


def test_cached_generation_in_bfloat16_stays_near_the_golden_logits(golden):
    """A bf16 model with a bf16 cache (GDN state and CSA sums float32) through prefill and decode steps."""
    path, ck, cfg, _ = golden
    model = _load(cfg, fh.params_from_state_dict(ck["model"], cfg), jnp.bfloat16)
    ids = np.load(path / "input_ids.npy")[:, :100]
    cached, _, _ = _cached_logits(model, list(ids), 10, cache_dtype=jnp.bfloat16)
    want = np.load(path / "logits.npy")[:, 89:100]
    assert np.all(np.isfinite(cached)) and np.abs(cached - want).max() < 1e-2 * np.abs(want).max()


def test_cached_generation_with_three_query_heads_per_kv_head_and_repeated_gdn_heads():
    """Other group sizes than the fixture's: GQA R = 3 (the real model's) and Hv = 2 Hk (q/k heads repeated)."""
    cfg = _tiny(dim=36, n_heads=6, n_kv_heads=2, head_dim=8, n_layers=3, layer_types=("linear", "csa", "full"),
                linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16,
                linear_value_head_dim=12, max_seq_len=96)
    model = _random_model(cfg, 4)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, cfg.vocab_size, 75), rng.integers(0, cfg.vocab_size, 69)]
    steps = 6
    cached, starts, prompt_len = _cached_logits(model, rows, steps)
    graphdef, params = nnx.split(model)
    full = np.asarray(jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(
        params, jnp.asarray(np.stack([np.pad(r, (0, 75 - len(r))) for r in rows]))))
    for b in range(2):
        first = prompt_len - 1 - starts[b]
        assert np.abs(cached[b] - full[b, first:first + steps + 1]).max() <= 1e-5, b


def test_real_config_traces_for_training_and_decoding():
    """The 95M shapes through the generic loss (fused head, scanned and rematerialised layers) and the cache."""
    cfg = HybridConfig()
    model = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p, ids: lm_loss(nnx.merge(graphdef, p, rest), ids, fused=True, scan_layers=True, remat="full")[0]
    value, grads = jax.eval_shape(jax.value_and_grad(loss), params, jax.ShapeDtypeStruct((2, 1025), jnp.int32))
    assert value.shape == ()
    assert [g.shape for g in jax.tree.leaves(grads)] == [p.shape for p in jax.tree.leaves(params)]
    cache = jax.eval_shape(lambda p, r: nnx.merge(graphdef, p, r).init_cache(2, 1100), params, rest)
    step = lambda p, r, c: nnx.merge(graphdef, p, r).decode_step(jnp.zeros(2, jnp.int32), c)
    logits, cache = jax.eval_shape(step, params, rest, cache)
    assert logits.shape == (2, cfg.vocab_size) and logits.dtype == jnp.float32
    assert cache.layers[0].state.shape == (2, 9, 112, 112) and cache.layers[0].state.dtype == jnp.float32


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_are_finite_under_jit(dtype):
    cfg = _tiny(n_layers=3, layer_types=("linear", "csa", "full"), max_seq_len=72)
    model = _random_model(cfg, 1, dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(0), (2, 71), 0, cfg.vocab_size)

    def loss(params):   # the generic loss, through output_projection (head and cross-entropy fused)
        return lm_loss(nnx.merge(graphdef, params, rest), ids, fused=True)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) == len(leaves)


def test_llama2c_lossy_mode_is_the_model_without_csa_and_scales_cached_and_uncached(golden):
    """``llama2c_lossy=True`` keeps every parameter but computes what run.c computes from a model.bin:
    the model whose CSA layers are full attention and whose residuals are plain sums, also through
    the decode cache (rows past the 64-token window, the GDN chunk edge at 64 crossed by the prefill)."""
    import dataclasses
    _, ck, cfg, _ = golden
    params = fh.params_from_state_dict(ck["model"], cfg)
    lossy = _load(dataclasses.replace(cfg, llama2c_lossy=True), params)
    plain_cfg = dataclasses.replace(cfg, hyper_connections=False,
                                    layer_types=tuple("full" if k == "csa" else k for k in cfg.layer_types))
    plain_shapes = fh.param_shapes(plain_cfg)
    plain = _load(plain_cfg, {k: v for k, v in params.items() if k in plain_shapes})
    rng = np.random.default_rng(5)
    rows = [rng.integers(0, cfg.vocab_size, n) for n in (72, 69)]
    ids = np.stack([np.pad(r, (0, 72 - len(r))) for r in rows]).astype(np.int32)
    run = lambda model: np.asarray(jax.jit(lambda s, x: nnx.merge(nnx.graphdef(model), s)(x))(nnx.state(model), ids))
    want, got = run(plain), run(lossy)
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(run(_load(cfg, params)) - got).max() > 1e-2   # the switch changes the function
    steps = 4
    cached, starts, prompt_len = _cached_logits(lossy, rows, steps)
    for b in range(len(rows)):
        first = prompt_len - 1 - starts[b]
        assert np.abs(cached[b] - want[b, first:first + steps + 1]).max() <= 1e-5, b
