"""The loss against a float64 NumPy reference; chunked and whole computations agree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.loss import lm_loss
from jaxlm.models.toylm import ToyLM, ToyLMConfig

TINY = ToyLMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, head_dim=16, mlp_hidden=64,
                   max_seq_len=64, sliding_window=8, lm_head_logit_cap=5.0, z_loss_weight=0.1)


def reference(logits, targets, z_weight, form):
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    valid = targets >= 0
    ce = (lse - np.take_along_axis(logits, np.maximum(targets, 0)[..., None], -1)[..., 0])[valid].mean()
    z = (lse[valid] ** 2).mean() if form == "mean_sq" else lse[valid].mean() ** 2
    return ce + z_weight * z


@pytest.mark.parametrize("form", ["mean_sq", "sq_mean"])
def test_loss_matches_reference_with_ignored_targets(form):
    cfg = dataclasses.replace(TINY, z_loss_form=form)
    model = ToyLM(cfg, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 64, (2, 17))
    tokens[0, 5] = tokens[1, 16] = -100  # padding: ignored as a target
    loss, metrics = lm_loss(model, jnp.asarray(tokens))
    logits = np.asarray(model(jnp.asarray(np.maximum(tokens[:, :-1], 0))))
    assert np.abs(logits).max() <= 5.0  # the soft-cap bounds what the loss sees
    want = reference(logits, tokens[:, 1:], 0.1, form)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_chunked_loss_and_gradients_equal_whole():
    model = ToyLM(TINY, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 33)))
    graphdef, params = nnx.split(model, nnx.Param)

    def f(p, chunk):
        return lm_loss(nnx.merge(graphdef, p), tokens, chunk=chunk)[0]

    whole, g_whole = jax.value_and_grad(f)(params, 0)
    chunked, g_chunked = jax.value_and_grad(f)(params, 8)
    np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
