"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Pure functions on ``[B, V]`` float32 logits, usable inside ``jit``. The order is the
Hugging Face one: repetition penalty, temperature, top-k, top-p, then sampling.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8
    top_k: int = 0                   # 0: no top-k filter
    top_p: float = 1.0               # 1: no nucleus filter
    repetition_penalty: float = 1.0  # 1: none
    greedy: bool = False


def apply_repetition_penalty(logits_BV, seen_BV, penalty: float):
    """CTRL / Hugging Face rule: for tokens already in the context, divide a positive
    logit by the penalty and multiply a negative one."""
    if penalty == 1.0:
        return logits_BV
    penalised = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalised, logits_BV)


def filter_top_k(logits_BV, k: int):
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_BV = jax.lax.top_k(logits_BV, k)[0][..., -1:]
    return jnp.where(logits_BV < kth_BV, -jnp.inf, logits_BV)


def filter_top_p(logits_BV, p: float):
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits_BV
    sorted_BV = jnp.sort(logits_BV, axis=-1)[..., ::-1]
    cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # A sorted token is kept while the mass *before* it is still below p.
    keep_BV = (cumulative_BV - jax.nn.softmax(sorted_BV, axis=-1)) < p
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


def next_token(logits_BV, seen_BV, rng, cfg: SamplingConfig):
    """The next token ids ``[B]`` under ``cfg``."""
    logits_BV = apply_repetition_penalty(logits_BV.astype(jnp.float32), seen_BV, cfg.repetition_penalty)
    if cfg.greedy or cfg.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / cfg.temperature
    logits_BV = filter_top_p(filter_top_k(logits_BV, cfg.top_k), cfg.top_p)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)
