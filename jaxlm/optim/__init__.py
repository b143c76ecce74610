"""Optimizers: Muon for hidden matrices, AdamW for the rest, WSD / warmup-cosine schedules.

    tx, learning_rates = build_optimizer(cfg.optim, params, total_steps)

``muon`` holds the Muon transform, ``partition`` the Muon/AdamW split and ``build_optimizer``,
``schedules`` the learning-rate schedules.
"""

from jaxlm.optim.muon import NS_COEFFICIENTS, newton_schulz, orthogonalize, scale_by_muon, update_scale
from jaxlm.optim.partition import (adamw_group, build_optimizer, matrix_axes, muon_adamw, muon_group,
                                   param_labels, path_name)
from jaxlm.optim.schedules import (schedule_from_config, warmup_constant_schedule, warmup_cosine_schedule,
                                   wsd_schedule)

__all__ = [
    "NS_COEFFICIENTS", "adamw_group", "build_optimizer", "muon_adamw", "muon_group", "matrix_axes", "newton_schulz", "orthogonalize", "param_labels",
    "path_name", "scale_by_muon", "schedule_from_config", "update_scale", "warmup_constant_schedule",
    "warmup_cosine_schedule", "wsd_schedule",
]
