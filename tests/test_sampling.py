"""Sampling semantics on fixed logit vectors: exact filters, and the distributions actually drawn.

Statistical checks draw N = 20,000 samples (one row each, one call). The empirical frequency of a
token of probability q has standard deviation sqrt(q (1 - q) / N) <= 0.5 / sqrt(N) = 0.0035, so
a max-abs tolerance of 0.02 (over 5.6 standard deviations in the worst cell, < 1e-7 chance per
cell for a correct sampler) separates "right" from "wrong distribution" (the filtered-out mass
here is >= 0.1, the penalty moves probabilities by > 0.05). The seed is fixed: the tests are
deterministic; the tolerance says they would also pass for any other seed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.sampling import (SamplingConfig, apply_repetition_penalty, filter_top_k, filter_top_p, next_token,
                            sampling_logits)

N = 20_000
TOL = 0.02
# Positive and negative logits, all distinct.
LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.4, 0.1, -0.3, -0.8, -1.1, -2.0, -2.5, -3.0], np.float32)
V = len(LOGITS)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def nucleus(probs, p):
    """Reference top-p: the most likely tokens until their mass reaches p, renormalised."""
    order = np.argsort(-probs)
    keep = np.zeros_like(probs, bool)
    mass = 0.0
    for token in order:
        keep[token] = True
        mass += probs[token]
        if mass >= p:
            break
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


def draw(cfg, seen=None, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (N, V))
    seen = jnp.zeros((N, V), bool) if seen is None else jnp.broadcast_to(jnp.asarray(seen), (N, V))
    tokens = np.asarray(next_token(logits, seen, jax.random.key(seed), cfg))
    return np.bincount(tokens, minlength=V) / N


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_top_p_samples_the_renormalised_nucleus(temperature):
    cfg = SamplingConfig(temperature=temperature, top_p=0.9)
    want = nucleus(softmax(LOGITS / temperature), 0.9)
    assert 3 <= (want > 0).sum() < V - 3            # a real cut: tokens on both sides
    # The filtered distribution itself, exactly.
    got = np.asarray(jax.nn.softmax(sampling_logits(jnp.asarray(LOGITS)[None], jnp.zeros((1, V), bool), cfg)))[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # And what is drawn: nothing outside the nucleus, frequencies within tolerance.
    freq = draw(cfg)
    assert freq[want == 0].sum() == 0
    assert np.abs(freq - want).max() < TOL


def test_top_p_keeps_at_least_one_token_and_the_crossing_one():
    logits = jnp.asarray(LOGITS)[None]
    only_best = np.isfinite(np.asarray(filter_top_p(logits, 1e-9)))[0]
    assert only_best.tolist() == [True] + [False] * (V - 1)
    probs = softmax(LOGITS)
    # p exactly at the first token's mass keeps it alone; just above also keeps the second.
    assert np.isfinite(np.asarray(filter_top_p(logits, float(probs[0]) * 0.999))).sum() == 1
    assert np.isfinite(np.asarray(filter_top_p(logits, float(probs[0]) * 1.001))).sum() == 2


def test_top_k_then_top_p():
    kept = np.isfinite(np.asarray(filter_top_k(jnp.asarray(LOGITS)[None], 3)))[0]
    assert kept.tolist() == [True] * 3 + [False] * (V - 3)
    cfg = SamplingConfig(temperature=1.0, top_k=5, top_p=0.9)
    top5 = np.where(np.arange(V) < 5, softmax(LOGITS), 0.0)
    want = nucleus(top5 / top5.sum(), 0.9)
    assert np.abs(draw(cfg) - want).max() < TOL


def test_repetition_penalty_is_the_ctrl_rule():
    seen = np.zeros(V, bool)
    seen[[0, 2, 6, 9]] = True                       # two positive and two negative logits
    got = np.asarray(apply_repetition_penalty(jnp.asarray(LOGITS)[None], jnp.asarray(seen)[None], 1.3))[0]
    want = LOGITS.copy()
    for i in np.flatnonzero(seen):
        want[i] = LOGITS[i] / 1.3 if LOGITS[i] > 0 else LOGITS[i] * 1.3
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] < LOGITS[0] and got[6] < LOGITS[6] and got[9] < LOGITS[9]  # seen tokens always lose

    # Its effect on what is drawn (with temperature), and on greedy choice.
    cfg = SamplingConfig(temperature=0.8, repetition_penalty=1.3)
    freq = draw(cfg, seen)
    np.testing.assert_array_less(np.abs(freq - softmax(want / 0.8)), TOL)
    assert softmax(LOGITS / 0.8)[0] - softmax(want / 0.8)[0] > 0.05   # the penalty visibly moved mass
    greedy = SamplingConfig(greedy=True, repetition_penalty=1.3)
    seen_best = np.zeros(V, bool)
    seen_best[0] = True                                 # 2.0 / 1.3 = 1.54 > 1.5: still the best
    assert int(next_token(jnp.asarray(LOGITS)[None], jnp.asarray(seen_best)[None], None, greedy)[0]) == 0
    greedy = SamplingConfig(greedy=True, repetition_penalty=1.4)  # 2.0 / 1.4 = 1.43 < 1.5
    assert int(next_token(jnp.asarray(LOGITS)[None], jnp.asarray(seen_best)[None], None, greedy)[0]) == 1


def test_greedy_and_temperature_zero_take_the_argmax():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
    seen = jnp.zeros((2, V), bool)
    for cfg in (SamplingConfig(greedy=True), SamplingConfig(temperature=0.0, top_p=0.5)):
        assert next_token(logits, seen, jax.random.key(0), cfg).tolist() == [0, V - 1]


def test_same_seed_same_samples():
    cfg = SamplingConfig(temperature=1.0, top_p=0.95)
    assert (draw(cfg, seed=3) == draw(cfg, seed=3)).all()
    assert (draw(cfg, seed=3) != draw(cfg, seed=4)).any()


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
                                          ("repetition_penalty", 0.0)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**{field: value}).validate()
