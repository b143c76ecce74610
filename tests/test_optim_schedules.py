"""Learning-rate schedules, point by point against values worked out by hand."""

import dataclasses
import math

import jax.numpy as jnp
import pytest

from jaxlm.config import OptimConfig
from jaxlm.errors import ConfigError
from jaxlm.optim import build_optimizer, warmup_cosine_schedule, wsd_schedule

# Crowfeather (specs/toylm.md): Muon 2e-3, AdamW 5e-4, warmup 1500, 100,000 planned, decay over the last 20%.
PEAK, WARMUP, PLANNED = 2e-3, 1500, 100_000
DECAY_START = 80_000
FINAL = 0.1  # a non-zero floor, so that "decays to the final fraction" is visible

# progress through the decay -> fraction of the way from peak to final still left
REMAINING = {
    "linear": lambda p: 1 - p,
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1 - math.sqrt(p),
}


def _close(got, want, peak=PEAK):
    # Schedules run in float32: 1e-6 of the peak absorbs the cancellation in 1 + cos(~pi).
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6 * peak)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_points(shape):
    lr = wsd_schedule(PEAK, warmup_steps=WARMUP, planned_steps=PLANNED, decay_fraction=0.2,
                      decay_shape=shape, final_fraction=FINAL)
    decayed = lambda p: PEAK * (FINAL + (1 - FINAL) * REMAINING[shape](p))
    _close(lr(0), 0.0)                         # warmup starts from 0
    _close(lr(WARMUP // 2), PEAK / 2)          # linear warmup
    _close(lr(WARMUP), PEAK)                   # warmup end
    _close(lr(50_000), PEAK)                   # stable
    _close(lr(DECAY_START), PEAK)              # decay start
    _close(lr(DECAY_START + 1), decayed(1 / 20_000))
    _close(lr(90_000), decayed(0.5))           # mid-decay: linear 0.55, cosine 0.55, 1-sqrt 0.3636 of peak
    _close(lr(95_000), decayed(0.75))
    _close(lr(PLANNED - 1), decayed(19_999 / 20_000))  # last step of the planned run
    _close(lr(PLANNED), PEAK * FINAL)
    _close(lr(PLANNED + 500), PEAK * FINAL)    # held at the floor past the plan


def test_mid_decay_values_differ_by_shape():
    """Hand numbers at 3/4 of the decay with final 0: 0.25, 0.1464, 0.1340 of the peak."""
    at = {s: float(wsd_schedule(1.0, warmup_steps=0, planned_steps=100, decay_fraction=0.4, decay_shape=s)(90))
          for s in REMAINING}
    assert at["linear"] == pytest.approx(0.25, rel=1e-6)
    assert at["cosine"] == pytest.approx(0.1464466, rel=1e-6)
    assert at["1-sqrt"] == pytest.approx(0.1339746, rel=1e-6)


def test_warmup_cosine_points():
    lr = warmup_cosine_schedule(0.02, warmup_steps=500, planned_steps=10_000, final_fraction=0.0)
    check = lambda step, want: _close(lr(step), want, peak=0.02)
    check(0, 0.0)
    check(250, 0.01)
    check(500, 0.02)
    check(502, 0.02 * 0.5 * (1 + math.cos(math.pi * 2 / 9500)))  # Llama Think's get_lr(502)
    check(5250, 0.01)                                            # half-way through the cosine
    check(9000, 0.02 * 0.5 * (1 + math.cos(math.pi * 8500 / 9500)))
    check(10_000, 0.0)
    check(12_000, 0.0)
    floor = warmup_cosine_schedule(1.0, warmup_steps=10, planned_steps=110, final_fraction=0.2)
    _close(floor(60), 0.6, peak=1.0)
    _close(floor(109), 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 99 / 100)), peak=1.0)
    _close(floor(110), 0.2, peak=1.0)


def test_wsd_without_decay_is_warmup_then_constant():
    lr = wsd_schedule(1.0, warmup_steps=10, planned_steps=100, decay_fraction=0.0)
    _close(lr(5), 0.5, peak=1.0)
    _close(lr(100), 1.0, peak=1.0)


def test_schedules_are_jit_friendly():
    lr = wsd_schedule(1.0, warmup_steps=10, planned_steps=100, decay_fraction=0.5, decay_shape="1-sqrt")
    counts = jnp.arange(0, 120, 7)
    values = jnp.stack([lr(c) for c in counts])
    assert bool(jnp.all(jnp.diff(values[2:]) <= 0)) and float(values.max()) == 1.0


def test_learning_rates_for_the_log():
    """build_optimizer reports each group's lr: Crowfeather's AdamW is 1/4 of Muon; an absolute lr wins."""
    cfg = OptimConfig(lr=PEAK, adamw_lr_ratio=0.25, warmup_steps=WARMUP, planned_steps=PLANNED,
                      decay_fraction=0.2, decay_shape="linear", final_lr_fraction=0.0)
    tree = {"w": jnp.ones((4, 4)), "embed": jnp.ones((8, 4))}
    _, learning_rates = build_optimizer(cfg, tree, total_steps=17_500)  # planned_steps, not the run, sets the shape
    assert set(learning_rates) == {"muon", "adamw"}
    assert learning_rates["muon"](WARMUP) == pytest.approx(2e-3)
    assert learning_rates["adamw"](WARMUP) == pytest.approx(5e-4)
    assert learning_rates["adamw"](90_000) == pytest.approx(2.5e-4)
    assert isinstance(learning_rates["muon"](3), float)
    _, absolute = build_optimizer(dataclasses.replace(cfg, adamw_lr=1e-3), tree, total_steps=17_500)
    assert absolute["adamw"](50_000) == pytest.approx(1e-3)
    # planned_steps None: the run's length is the plan
    _, own = build_optimizer(dataclasses.replace(cfg, planned_steps=None, warmup_steps=10), tree, total_steps=100)
    assert own["muon"](90) == pytest.approx(1e-3) and own["muon"](100) == 0.0


def test_impossible_schedules_name_the_field():
    with pytest.raises(ConfigError, match="warmup_steps"):
        wsd_schedule(1.0, warmup_steps=90, planned_steps=100, decay_fraction=0.2)
    with pytest.raises(ConfigError, match="warmup_steps"):
        warmup_cosine_schedule(1.0, warmup_steps=100, planned_steps=100)
    with pytest.raises(ConfigError, match="decay_shape"):
        build_optimizer(OptimConfig(decay_shape="exp", warmup_steps=0), {"w": jnp.ones((2, 2))}, 10)
