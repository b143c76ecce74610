"""ToyLM against independent truth: the golden logits, a float64 NumPy reference, the card's counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlm
from conftest import fixture_dir
from jaxlm.models import layers
from jaxlm.models.toylm import ToyLM, ToyLMConfig

TINY = ToyLMConfig(vocab_size=256, dim=64, n_layers=4, n_heads=4, head_dim=16, mlp_hidden=192,
                   max_seq_len=256, sliding_window=12)


def test_crowfeather_shape_counts_exactly():
    cfg = ToyLMConfig()  # the defaults are the Crowfeather / Shard card
    assert cfg.param_count() == 54_538_752
    abstract = nnx.eval_shape(lambda: ToyLM(cfg, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 54_538_752
    assert cfg.layer_kinds() == ["sliding", "global"] * 6
    # 6 N_matmul (tied head included) + attention with causal halving and the 1024 window,
    # worked by hand: 327,155,712 + 6 x 12,585,984 (global) + 6 x 5,505,792 (sliding).
    assert cfg.flops_per_token(4096) == 435_706_368


def test_attention_pattern_options():
    odd = dataclasses.replace(TINY, sliding_parity="odd")
    assert TINY.layer_kinds() == ["sliding", "global", "sliding", "global"]
    assert odd.layer_kinds() == ["global", "sliding", "global", "global"]  # the last layer stays global
    assert dataclasses.replace(TINY, attention_pattern="all_global").layer_kinds() == ["global"] * 4
    assert dataclasses.replace(TINY, window_includes_query=False).layer_window(0) == 13


# ----------------------------------------------------------------------------- float64 reference


def np_rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_rope(x_THK, theta, pairing):
    T, _, K = x_THK.shape
    inv = theta ** (-np.arange(0, K, 2) / K)
    ang = np.arange(T)[:, None] * inv
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    if pairing == "rotate_half":
        a, b = x_THK[..., :K // 2], x_THK[..., K // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
    out = np.empty_like(x_THK)
    a, b = x_THK[..., 0::2], x_THK[..., 1::2]
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def np_attention(q_THK, k_THK, v_THK, window):
    """Loop-free but explicit: mask[t, s] = s <= t and t - s < window."""
    T, H, K = q_THK.shape
    scores = np.einsum("thk,shk->hts", q_THK, k_THK) / np.sqrt(K)
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (s <= t) & ((t - s) < (window if window else T + 1))
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shk->thk", p, v_THK)


def np_toylm(params, cfg, ids_T):
    """The spec's forward for one sequence in float64, from the Flax parameter dict."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"]["embedding"][ids_T]
    H, K = cfg.n_heads, cfg.head_dim
    for i, blk in enumerate(p["blocks"][j] for j in range(cfg.n_layers)):
        h = np_rmsnorm(x, blk["attn_norm"]["w"], cfg.norm_eps)
        q, k, v = (h @ blk["attn"][n]["kernel"] for n in "qkv")
        q, k, v = (y.reshape(len(ids_T), H, K) for y in (q, k, v))
        q, k = np_rope(q, cfg.rope_theta, cfg.rope_pairing), np_rope(k, cfg.rope_theta, cfg.rope_pairing)
        x = x + np_attention(q, k, v, cfg.layer_window(i)).reshape(len(ids_T), -1) @ blk["attn"]["o"]["kernel"]
        h = np_rmsnorm(x, blk["mlp_norm"]["w"], cfg.norm_eps)
        gate = h @ blk["mlp"]["gate"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ blk["mlp"]["up"]["kernel"])) @ blk["mlp"]["down"]["kernel"]
    x = np_rmsnorm(x, p["final_norm"]["w"], cfg.norm_eps)
    logits = x @ p["embed"]["embedding"].T
    return cfg.lm_head_logit_cap * np.tanh(logits / cfg.lm_head_logit_cap)


def random_model(cfg, seed=0):
    model = ToyLM(cfg, rngs=nnx.Rngs(seed))
    # Norm weights start at one; perturb them so that a wrong norm formula shows.
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    state = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(next(keys), a.shape) if a.ndim == 1 else a * 5, state)
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("seq_len", [9, 12, 31])  # below, at and above the window of 12
def test_forward_matches_float64_reference(parity, seq_len):
    cfg = dataclasses.replace(TINY, sliding_parity=parity)
    model = random_model(cfg)
    ids = np.random.default_rng(seq_len).integers(0, cfg.vocab_size, (2, seq_len))
    got = np.asarray(model(jnp.asarray(ids)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for b in range(2):
        want = np_toylm(params, cfg, ids[b])
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pairing", ["rotate_half", "interleaved"])
def test_rope_conventions_match_reference(pairing):
    x = np.random.default_rng(0).normal(size=(1, 7, 3, 8))
    got = layers.rope(jnp.asarray(x, jnp.float32), jnp.arange(7)[None], theta=500.0, pairing=pairing)
    np.testing.assert_allclose(np.asarray(got)[0], np_rope(x[0], 500.0, pairing), atol=1e-5)


@pytest.mark.parametrize("seq_len", [5, 8, 20])  # below, at and above a window of 8
def test_sliding_window_attention_matches_reference(seq_len):
    rng = np.random.default_rng(seq_len)
    q, k, v = (rng.normal(size=(1, seq_len, 2, 4)) for _ in range(3))
    for window in (8, None):
        got = layers.causal_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), window=window)
        np.testing.assert_allclose(np.asarray(got)[0], np_attention(q[0], k[0], v[0], window), atol=1e-5)


# ----------------------------------------------------------------------------- golden logits


def test_forward_matches_golden_logits():
    folder = fixture_dir("toylm")
    lm = jaxlm.load(folder / "toylm_tiny.pt")  # the converter (jaxlm/formats) reads the .pt without torch
    assert isinstance(lm.model, ToyLM) and lm.cfg.n_layers == 4
    ids = np.load(folder / "input_ids.npy")
    want = np.load(folder / "logits.npy")
    got = np.asarray(lm(jnp.asarray(ids)))
    assert got.dtype == np.float32 and got.shape == want.shape
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-4, f"max relative error {rel:.2e}"
