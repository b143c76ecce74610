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
from jaxlm.config import MeshConfig
from jaxlm.tpu import PRESET_DEVICES   # the 8 devices a TPU preset is written for

PER_DEVICE = 4


def get_config():
    cfg = crowfeather_config()
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
    cfg.mesh = MeshConfig(data=1, fsdp=-1, tensor=1)
    cfg.train.batch_size = PRESET_DEVICES * PER_DEVICE
    cfg.train.grad_accum = tokens_per_step // (cfg.train.batch_size * cfg.train.seq_len)
    cfg.train.loss_chunk = 1024
    cfg.out_dir = "runs/crowfeather_tpu"
    return cfg
