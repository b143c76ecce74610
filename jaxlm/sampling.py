"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Pure functions on ``[B, V]`` float32 logits, usable inside ``jit``. The order is the
Hugging Face one: repetition penalty, temperature, top-k, top-p, then sampling; greedy
decoding takes the arg-max after the repetition penalty.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Hashable: it is a static argument of the jitted decode loop."""

    temperature: float = 0.8
    top_k: int = 0                   # 0: no top-k filter
    top_p: float = 1.0               # 1: no nucleus filter
    repetition_penalty: float = 1.0  # 1: none
    greedy: bool = False             # arg-max (also what temperature 0 means)

    def validate(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature = {self.temperature}: must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k = {self.top_k}: must be >= 0 (0 disables the filter)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p = {self.top_p}: must be in (0, 1] (1 disables the filter)")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty = {self.repetition_penalty}: must be > 0 (1 means none)")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def apply_repetition_penalty(logits_BV, seen_BV, penalty: float):
    """CTRL / Hugging Face rule: for tokens already in the context, divide a positive
    logit by the penalty and multiply a negative one."""
    if penalty == 1.0:
        return logits_BV
    penalised = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalised, logits_BV)


def filter_top_k(logits_BV, k: int):
    """Keep the ``k`` largest logits (ties with the k-th are kept too)."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def filter_top_p(logits_BV, p: float):
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches ``p``.

    Over the distribution sorted by decreasing probability, a token is kept while the mass
    *before* it is below ``p`` (so the token that crosses ``p`` is in); the most likely token
    is always kept. Tokens tied with the last kept one are kept too.
    """
    if p >= 1.0:
        return logits_BV
    sorted_BV = jnp.sort(logits_BV, axis=-1)[..., ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = (mass_before_BV < p).at[..., 0].set(True)
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


def sampling_logits(logits_BV, seen_BV, cfg: SamplingConfig):
    """The logits whose softmax is the distribution ``next_token`` samples (not for greedy)."""
    logits_BV = apply_repetition_penalty(logits_BV.astype(jnp.float32), seen_BV, cfg.repetition_penalty)
    logits_BV = logits_BV / cfg.temperature
    return filter_top_p(filter_top_k(logits_BV, cfg.top_k), cfg.top_p)


def next_token(logits_BV, seen_BV, rng, cfg: SamplingConfig):
    """The next token ids ``[B]`` under ``cfg``; ``seen_BV`` marks the ids already in each row's context."""
    if cfg.is_greedy:
        logits_BV = apply_repetition_penalty(logits_BV.astype(jnp.float32), seen_BV, cfg.repetition_penalty)
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, sampling_logits(logits_BV, seen_BV, cfg), axis=-1).astype(jnp.int32)
