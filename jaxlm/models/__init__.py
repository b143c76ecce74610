"""The family registry: family name -> :class:`jaxlm.models.family.Family`.

Generic code looks families up here by name and calls them only through the contract in
``family.py``. A built-in family is one package under ``jaxlm/models/`` and one line in
``_BUILT_IN``; any other (a user's, a test's) calls :func:`register` with its ``Family``. So that a
fresh process (``python -m jaxlm.checkpoint``, the converter) finds such a family too, a package
may declare an entry point in the group ``jaxlm.families`` (``name = "module:FAMILY"``), or the
environment may name modules to import in ``JAXLM_FAMILIES`` (comma-separated), which register
their families when imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os

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
    if name not in FAMILIES:
        _load_plugins()
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(names())}") from None


def _load_plugins() -> None:
    """Families from outside jaxlm: ``JAXLM_FAMILIES`` modules and ``jaxlm.families`` entry points."""
    for module in filter(None, (m.strip() for m in os.environ.get("JAXLM_FAMILIES", "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"JAXLM_FAMILIES names {module!r}, which cannot be imported ({error})") from None
    for entry in importlib.metadata.entry_points(group="jaxlm.families"):
        if entry.name not in FAMILIES:
            register(entry.load())


def built_in_names() -> list[str]:
    """The families that ship in jaxlm (each must be covered by the tests and presets that cover all)."""
    return sorted(_BUILT_IN)


def names() -> list[str]:
    _load_plugins()
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
