"""Learning-rate schedules: WSD and warmup-cosine, each with a linear warmup from 0.

A schedule maps the optimizer step (number of updates applied so far, 0-based) to the
learning rate of that update; it is jit-friendly (an optax schedule).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxlm.errors import ConfigError

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def _decay(shape: str, peak: float, final: float, steps: int) -> optax.Schedule:
    """From ``peak`` to ``final`` over ``steps``, then held at ``final``."""
    if shape == "linear":
        return optax.linear_schedule(peak, final, steps)
    if shape == "cosine":
        return optax.cosine_decay_schedule(peak, steps, alpha=final / peak if peak else 0.0)
    if shape == "1-sqrt":
        # Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").
        def one_minus_sqrt(count):
            progress = jnp.clip(jnp.asarray(count, jnp.float32) / steps, 0.0, 1.0)
            return final + (peak - final) * (1.0 - jnp.sqrt(progress))
        return one_minus_sqrt
    raise ConfigError(f"optim.decay_shape = {shape!r}: allowed: {', '.join(map(repr, DECAY_SHAPES))}")


def wsd_schedule(peak: float, *, warmup_steps: int, planned_steps: int, decay_fraction: float,
                 decay_shape: str = "linear", final_fraction: float = 0.0) -> optax.Schedule:
    """Warmup-stable-decay: linear 0 -> peak, constant, then decay over the last fraction."""
    decay_steps = round(decay_fraction * planned_steps)
    decay_start = planned_steps - decay_steps
    if warmup_steps > decay_start:
        raise ConfigError(f"optim.warmup_steps = {warmup_steps}: must be <= the start of the decay "
                          f"(step {decay_start} of {planned_steps} planned, decay_fraction {decay_fraction})")
    parts = [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)]
    boundaries = [warmup_steps]
    if decay_steps > 0:
        parts.append(_decay(decay_shape, peak, final_fraction * peak, decay_steps))
        boundaries.append(decay_start)
    return optax.join_schedules(parts, boundaries)


def warmup_cosine_schedule(peak: float, *, warmup_steps: int, planned_steps: int,
                           final_fraction: float = 0.0) -> optax.Schedule:
    """Linear 0 -> peak, then half a cosine down to ``final_fraction * peak`` at ``planned_steps``."""
    if warmup_steps >= planned_steps:
        raise ConfigError(f"optim.warmup_steps = {warmup_steps}: must be < the planned steps ({planned_steps})")
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, planned_steps,
                                              end_value=final_fraction * peak)


def warmup_constant_schedule(peak: float, *, warmup_steps: int) -> optax.Schedule:
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps),
                                 optax.constant_schedule(peak)], [warmup_steps])


def schedule_from_config(cfg, peak: float, total_steps: int) -> optax.Schedule:
    """The schedule ``cfg.schedule`` (a ``jaxlm.config.OptimConfig``) with the given peak."""
    planned = cfg.planned_steps or total_steps
    if planned <= 0:
        raise ConfigError(f"optim.planned_steps = {cfg.planned_steps}: the schedule needs > 0 steps "
                          f"(got total_steps {total_steps})")
    if cfg.schedule == "wsd":
        return wsd_schedule(peak, warmup_steps=cfg.warmup_steps, planned_steps=planned,
                            decay_fraction=cfg.decay_fraction, decay_shape=cfg.decay_shape,
                            final_fraction=cfg.final_lr_fraction)
    if cfg.schedule == "cosine":
        return warmup_cosine_schedule(peak, warmup_steps=cfg.warmup_steps, planned_steps=planned,
                                      final_fraction=cfg.final_lr_fraction)
    if cfg.schedule == "constant":
        return warmup_constant_schedule(peak, warmup_steps=cfg.warmup_steps)
    raise ConfigError(f"optim.schedule = {cfg.schedule!r}: allowed: 'wsd', 'cosine', 'constant'")
