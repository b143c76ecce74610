"""Text generation from a model: the whole decode loop runs inside one ``jit``.

This first version recomputes the prefix at every step over a fixed-size buffer
(so it compiles once); the KV-cached decoder replaces the inner call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.sampling import SamplingConfig, next_token


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "max_new_tokens", "sampling"))
def _decode(graphdef, params, buffer_BL, rng, *, prompt_len, max_new_tokens, sampling):
    model = nnx.merge(graphdef, params)
    vocab = model.cfg.vocab_size
    seen_BV = jax.vmap(lambda row: jnp.zeros(vocab, bool).at[row].set(True))(buffer_BL[:, :prompt_len])

    def step(i, carry):
        buffer_BL, seen_BV, rng = carry
        position = prompt_len + i
        logits_BLV = model(buffer_BL)
        logits_BV = jax.lax.dynamic_index_in_dim(logits_BLV, position - 1, axis=1, keepdims=False)
        rng, sub = jax.random.split(rng)
        token_B = next_token(logits_BV, seen_BV, sub, sampling)
        buffer_BL = jax.lax.dynamic_update_index_in_dim(buffer_BL, token_B, position, axis=1)
        seen_BV = seen_BV | jax.nn.one_hot(token_B, vocab, dtype=bool)
        return buffer_BL, seen_BV, rng

    buffer_BL, _, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buffer_BL, seen_BV, rng))
    return buffer_BL


def generate(model, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingConfig, seed: int = 0,
             eos_id: int | None = None) -> list[int]:
    """New token ids continuing ``prompt_ids`` (cut at the first EOS)."""
    max_len = model.cfg.max_seq_len
    prompt_ids = list(prompt_ids)[-(max_len - max_new_tokens):] or [0]
    buffer = np.zeros((1, len(prompt_ids) + max_new_tokens), np.int32)
    buffer[0, :len(prompt_ids)] = prompt_ids
    graphdef, params = nnx.split(model, nnx.Param)
    out = _decode(graphdef, params, jnp.asarray(buffer), jax.random.key(seed), prompt_len=len(prompt_ids),
                  max_new_tokens=max_new_tokens, sampling=sampling)
    new = np.asarray(out)[0, len(prompt_ids):].tolist()
    if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id)]
    return new
