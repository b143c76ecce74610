"""The nanowhale config files load, validate and count themselves as the card and fixtures say."""

import json

from conftest import fixture_dir
from jaxlm.config import load_config
from jaxlm.models import get, register
from jaxlm.models.deepseek_v4 import FAMILY, DeepSeekV4


def test_family_record():
    # register() stands in for the built-in list until jaxlm/models/__init__.py names the package.
    register(FAMILY)
    family = get("deepseek_v4")
    assert family.model is DeepSeekV4 and family.naming == "jaxlm.formats.deepseek_v4"


def test_nanowhale_100m_recipe():
    cfg = load_config("nanowhale_100m.py")
    assert cfg.model.family == FAMILY.name and FAMILY.config is type(cfg.model)
    assert cfg.model.param_count() == 110_369_621
    assert (cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum) == (8, 2048, 4)
    o = cfg.optim
    assert (o.name, o.lr, o.b1, o.b2, o.weight_decay, o.schedule) == ("adamw", 6e-4, 0.9, 0.95, 0.1, "cosine")
    assert o.warmup_steps == round(0.03 * cfg.train.steps)


def test_nanowhale_tiny_is_the_fixture_shape():
    cfg = load_config("nanowhale_tiny.py")
    fixture = json.loads((fixture_dir("nanowhale") / "manifest.json").read_text())
    assert cfg.model.param_count() == fixture["files"]["model.safetensors"]["total_parameters"]
    for name, value in fixture["config"].items():
        if hasattr(cfg.model, name) and name not in ("bos_token_id", "eos_token_id"):
            assert getattr(cfg.model, name) == value, name


def test_config_and_model_follow_the_contract():
    from flax import nnx
    from jaxlm.models.family import FamilyConfig, FamilyModel, HeadLoss
    cfg = load_config("nanowhale_tiny.py").model
    assert isinstance(cfg, FamilyConfig) and cfg.loss_terms() == HeadLoss()
    assert set(cfg.SHAPE_FIELDS) <= set(cfg.__dataclass_fields__)
    assert cfg.layer_kinds() == ["mla+moe"] * cfg.num_hidden_layers and cfg.flops_note()
    model = nnx.eval_shape(lambda: DeepSeekV4(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(model, FamilyModel)
