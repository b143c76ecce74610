"""Crowfeather-50m on one GPU (A100/H100/H200): the card's recipe, the whole batch on one device."""

from crowfeather import get_config as crowfeather_config
from jaxlm.config import MeshConfig


def get_config():
    cfg = crowfeather_config()
    cfg.mesh = MeshConfig(data=1, fsdp=1, tensor=1)
    return cfg
