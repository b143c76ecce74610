"""The family registry: family name -> (config class, model class).

Adding a family means one model file and one line here; train, checkpoint and the
converter look families up by name and need nothing else.
"""

from __future__ import annotations

from jaxlm.errors import ConfigError
from jaxlm.models import toylm

FAMILIES = {
    "toylm": (toylm.ToyLMConfig, toylm.ToyLM),
}


def family_of(model_cfg) -> str:
    return model_cfg.family


def config_class(family: str):
    try:
        return FAMILIES[family][0]
    except KeyError:
        raise ConfigError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}") from None


def build_model(model_cfg, *, rngs, dtype):
    """Instantiate the model class of ``model_cfg``'s family."""
    _, model_cls = FAMILIES[family_of(model_cfg)]
    return model_cls(model_cfg, rngs=rngs, dtype=dtype)


def config_from_dict(data: dict):
    """Rebuild a full ``Config`` from its JSON dict, resolving the model family."""
    from jaxlm import config as C
    family = data.get("model", {}).get("family")
    return C.from_dict(data, config_class(family))
