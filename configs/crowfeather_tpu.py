"""Crowfeather-50m on a Cloud / Colab TPU slice of 8 devices (v5e-8, v6e-8; v2-8, v3-8 cores): the
recipe of ``crowfeather.py``, FSDP over all devices.

Parameters and optimizer state are sharded over the devices and the float32 logits computed in
chunks; compute is bf16 over float32 master weights; attention is splash attention. The card's
131,072 tokens a step (16 x 4096 x 2 accumulation) stay: PER_DEVICE sequences per device per
micro-batch, the rest accumulated. PER_DEVICE holds, by GiB of HBM per device, the largest that
compiles within it on Colab's slices (16 GiB: a v5e chip alone and in a v5e-8; 8 GiB: a v2-8's
cores; README "TPU presets"). On another slice, ``jaxlm.tpu.slice_overrides`` gives the overrides
that keep the sequences per device that fit it and the tokens per step.
"""

from crowfeather import get_config as crowfeather_config
from jaxlm import tpu

# Sequences per device per micro-batch by GiB of HBM per device: the largest --compile_for fits.
PER_DEVICE = {16: 4, 8: 4}


def get_config():
    cfg = tpu.preset(crowfeather_config(), PER_DEVICE, out_dir="runs/crowfeather_tpu")
    cfg.train.loss_chunk = 1024
    return cfg
