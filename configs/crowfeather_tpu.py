"""Crowfeather-50m on a Cloud / Colab TPU slice of 8 devices (v5e-8, v6e-8; v2-8, v3-8 cores): the
recipe of ``crowfeather.py``, FSDP over all devices.

Parameters and optimizer state are sharded over the devices and the float32 logits computed in
chunks; compute is bf16 over float32 master weights; attention is splash attention. The card's
131,072 tokens a step (16 x 4096 x 2 accumulation) stay: PER_DEVICE sequences per device per
micro-batch, the rest accumulated. PER_DEVICE is the largest that compiles within a v5e chip's
HBM both alone and in a v5e-8 (README "TPU presets"). On another number of devices keep
PER_DEVICE and the tokens per step: ``jaxlm.tpu.scale_overrides`` gives the two overrides.
"""

from crowfeather import get_config as crowfeather_config
from jaxlm import tpu

PER_DEVICE = 4


def get_config():
    cfg = tpu.preset(crowfeather_config(), PER_DEVICE, out_dir="runs/crowfeather_tpu")
    cfg.train.loss_chunk = 1024
    return cfg
