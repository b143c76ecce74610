"""The Llama Think config files: counts, the recipe as the upstream code runs it, the Muon/AdamW split."""

import dataclasses
import importlib

import jax
import numpy as np
from flax import nnx

from jaxlm import config as C
from jaxlm.models import family
from jaxlm.models.hybrid import FAMILY, HybridConfig, HybridLM
from jaxlm.optim.partition import param_labels


def _config(name):
    return C.validate(importlib.import_module(f"configs.{name}").get_config())


def test_95m_config_file_is_the_released_model_and_recipe():
    cfg = _config("llama_think_95m")
    assert cfg.model.param_count() == 95_715_408
    assert isinstance(cfg.model, family.FamilyConfig) and FAMILY.config is HybridConfig
    o = cfg.optim
    assert (o.name, o.lr, o.adamw_lr, o.momentum, o.nesterov, o.ns_steps) == ("muon", 0.02, 0.02, 0.95, True, 5)
    assert (o.muon_scale, o.weight_decay, o.muon_weight_decay, o.b1, o.b2, o.grad_clip) == (
        "llama_think", 0.01, 0.01, 0.9, 0.99, 1.0)
    assert (o.schedule, o.warmup_steps, o.planned_steps, o.final_lr_fraction) == ("cosine", 500, 10_000, 0.0)
    assert cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len == 64 * 32 * 1024


def test_muon_adamw_split_is_the_upstream_one():
    """SPEC §11: 140 Muon tensors (77,225,472 elements, the 3-D conv kernels included), 138 AdamW
    tensors (18,489,936: the embedding and every 1-D tensor)."""
    cfg = _config("llama_think_95m")
    params = nnx.state(nnx.eval_shape(lambda: HybridLM(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)
    labels, leaves = jax.tree.leaves(param_labels(params, cfg.optim.adamw_patterns)), jax.tree.leaves(params)
    count = lambda group: (sum(label == group for label in labels),
                           sum(int(np.prod(p.shape)) for p, label in zip(leaves, labels) if label == group))
    assert count("muon") == (140, 77_225_472)
    assert count("adamw") == (138, 18_489_936)


def test_tiny_config_file_is_the_fixture_shape():
    cfg = _config("llama_think_tiny")
    assert cfg.model.param_count() == 207_016
    assert cfg.model.rotary_dim == 4 and cfg.model.ffn_dim == 128 and cfg.model.gdn_conv_channels == 144


def test_the_family_record_builds_the_model_through_the_registry():
    from jaxlm import models
    models.register(FAMILY)
    cfg = _config("llama_think_tiny").model
    assert models.config_class("hybrid") is HybridConfig
    model = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0), dtype=jax.numpy.float32))
    assert isinstance(model, family.FamilyModel) and model.cfg is cfg
    assert FAMILY.naming == "jaxlm.formats.hybrid" and importlib.import_module(FAMILY.naming).FAMILY == "hybrid"


def test_without_hyper_connections_the_blocks_are_plain_residuals():
    """What a model.bin can express (CSA read as full attention, no scales): the config says so and counts so."""
    base = _config("llama_think_tiny").model
    plain = dataclasses.replace(base, hyper_connections=False, layer_types=("linear", "linear", "full", "full") * 2)
    hc = 4 * base.dim * base.n_layers                                   # the residual/sublayer scales
    kv = base.n_kv_heads * base.head_size
    csa = 2 * (2 * kv * kv + base.dim * base.n_heads * base.head_size)  # compressors + blend gate, 2 layers
    assert plain.param_count() == base.param_count() - hc - csa
    shapes = nnx.eval_shape(lambda: HybridLM(plain, rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(shapes, nnx.Param))) == plain.param_count()
