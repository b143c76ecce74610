"""The family registry: family name -> :class:`jaxlm.models.family.Family`.

Generic code looks families up here by name and calls them only through the contract in
``family.py``. A built-in family is one package under ``jaxlm/models/`` and one line in
``_BUILT_IN``; any other (a user's, a test's) calls :func:`register` with its ``Family``.
"""

from __future__ import annotations

import importlib

from jaxlm.errors import ConfigError
from jaxlm.models.family import Family

# Packages whose ``FAMILY`` is registered on first use (imported lazily: a family's code is
# loaded only when a config or checkpoint of it is met).
_BUILT_IN = {
    "toylm": "jaxlm.models.toylm",
    "hybrid": "jaxlm.models.hybrid",
    "deepseek_v4": "jaxlm.models.deepseek_v4",
}
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known by its name (again: the newer definition wins)."""
    FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    if name not in FAMILIES and name in _BUILT_IN:
        register(importlib.import_module(_BUILT_IN[name]).FAMILY)
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    return sorted(set(_BUILT_IN) | set(FAMILIES))


def all_families() -> list[Family]:
    return [get(name) for name in names()]


def family_of(model_cfg) -> str:
    return model_cfg.family


def config_class(family: str):
    return get(family).config


def build_model(model_cfg, *, rngs, dtype):
    """Instantiate the model class of ``model_cfg``'s family."""
    return get(family_of(model_cfg)).model(model_cfg, rngs=rngs, dtype=dtype)


def config_from_dict(data: dict):
    """Rebuild a full ``Config`` from its JSON dict, resolving the model family."""
    from jaxlm import config as C
    family = data.get("model", {}).get("family")
    return C.from_dict(data, config_class(family))
