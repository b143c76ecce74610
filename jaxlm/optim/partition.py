"""Which parameter goes to Muon and which to AdamW, and the optimizer built from that split.

The split is decided from each leaf's path and shape, so it works on an ``nnx.State`` of
``nnx.Param`` and on a plain nested dict alike:

* a path matching one of ``adamw_patterns`` (embedding, output head) -> AdamW;
* otherwise >= 2-D -> Muon; 1-D and scalars (norms, biases, gates) -> AdamW.

A Muon leaf is read as matrices over its last two axes, Flax ``(..., in, out)``; leading axes
(stacked/scanned layers, experts) are batch axes. A leaf matching ``conv_patterns`` is a Flax
conv kernel ``(..., K, C_in/groups, C_out)`` and is read as one ``(K * C_in/groups, C_out)``
matrix — for the hybrid family's depthwise ``(K, 1, C)`` kernel that is ``(K, C)``, the
transpose of the ``(C, K)`` view its original PyTorch optimizer takes of the ``(C, 1, K)``
weight, so the orthogonalised update is the same.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from jaxlm.errors import ConfigError
from jaxlm.optim import muon, schedules

CONV_AXES = muon.MuonDimensionNumbers(reduction_axis=(-3, -2), output_axis=-1)


def path_name(path) -> str:
    """'blocks/0/attn/q/kernel' for a jax key path (an nnx.Param's trailing 'value' dropped)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    if parts and parts[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        parts.pop()
    return "/".join(parts)


def _compile(patterns: tuple[str, ...], field: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"optim.{field}: {pattern!r} is not a regular expression ({e})") from None
    return compiled


def param_labels(params, adamw_patterns: tuple[str, ...] = ("embed", "head")):
    """A tree like ``params`` with "muon" or "adamw" at each leaf (patterns: regexes searched in the path)."""
    compiled = _compile(adamw_patterns, "adamw_patterns")

    def label(path, leaf):
        name = path_name(path)
        if any(p.search(name) for p in compiled) or len(getattr(leaf, "shape", ())) < 2:
            return "adamw"
        return "muon"

    return jax.tree_util.tree_map_with_path(label, params)


def matrix_axes(conv_patterns: tuple[str, ...] = ("conv",)) -> muon.MatrixAxesFn:
    """``(path, shape) -> MuonDimensionNumbers`` for the Muon leaves (see the module docstring)."""
    compiled = _compile(conv_patterns, "conv_patterns")

    def axes(path, shape):
        if len(shape) >= 3 and any(p.search(path_name(path)) for p in compiled):
            return CONV_AXES
        return muon.KERNEL_AXES

    return axes


def adamw_group(cfg, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    # torch's AdamW decays p*(1 - lr*wd) with the scheduled lr; optax's adamw adds wd*p before
    # the lr scaling, which is the same update. Adam's update does not depend on p, so torch's
    # "decay first" order changes nothing. Not Nesterov-Adam, unlike optax.contrib.muon's.
    return optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def muon_group(cfg, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    return optax.chain(
        muon.scale_by_muon(momentum=cfg.momentum, nesterov=cfg.nesterov, ns_coefficients=cfg.ns_coefficients,
                           ns_steps=cfg.ns_steps, scale=cfg.muon_scale, ns_dtype=jnp.dtype(cfg.ns_dtype),
                           matrix_axes=matrix_axes(cfg.conv_patterns)),
        optax.add_decayed_weights(cfg.muon_weight_decay),  # p*(1 - lr*wd), as for AdamW
        optax.scale_by_learning_rate(learning_rate),
    )


def muon_adamw(cfg, muon_lr: optax.ScalarOrSchedule, adamw_lr: optax.ScalarOrSchedule):
    """Muon on the "muon" leaves of ``param_labels``, AdamW on the rest, each with its own lr."""
    _compile(cfg.conv_patterns, "conv_patterns")
    # Labels are a function of the tree (not a fixed tree) so that the nnx.State of
    # gradients and that of parameters both get them.
    return optax.partition({"muon": muon_group(cfg, muon_lr), "adamw": adamw_group(cfg, adamw_lr)},
                           lambda tree: param_labels(tree, cfg.adamw_patterns))


def build_optimizer(cfg, params, total_steps: int):
    """``(tx, learning_rates)`` for a ``jaxlm.config.OptimConfig``.

    ``tx`` covers the whole ``params`` tree (global-norm clipping first when ``cfg.grad_clip > 0``);
    ``learning_rates`` maps each group ("muon", "adamw") to ``step -> lr`` of the update applied
    at optimizer step ``step`` (0-based), for the training log.
    """
    cfg.validate()
    if cfg.name == "adamw":
        schedules_by_group = {"adamw": schedules.schedule_from_config(cfg, cfg.lr, total_steps)}
        tx = adamw_group(cfg, schedules_by_group["adamw"])
    else:
        if "muon" not in jax.tree.leaves(param_labels(params, cfg.adamw_patterns)):
            raise ConfigError("optim.name = 'muon': no parameter is >= 2-D outside optim.adamw_patterns; "
                              "use name='adamw' or narrow the patterns")
        adamw_peak = cfg.adamw_lr if cfg.adamw_lr is not None else cfg.lr * cfg.adamw_lr_ratio
        schedules_by_group = {"muon": schedules.schedule_from_config(cfg, cfg.lr, total_steps),
                              "adamw": schedules.schedule_from_config(cfg, adamw_peak, total_steps)}
        tx = muon_adamw(cfg, schedules_by_group["muon"], schedules_by_group["adamw"])
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    learning_rates = {group: (lambda step, s=s: float(s(step))) for group, s in schedules_by_group.items()}
    return tx, learning_rates
