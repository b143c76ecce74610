"""Llama Think 95M on a Cloud / Colab TPU slice of 8 devices (v5e-8, v6e-8; v2-8, v3-8 cores): the
recipe of ``llama_think_95m.py``, FSDP over all devices.

Parameters and optimizer state are sharded over the devices; compute is bf16 over float32 master
weights; attention is splash attention. The card's 2,097,152 tokens a step (256 x 1024 x 8
accumulation) stay: PER_DEVICE sequences per device per micro-batch, the rest accumulated.
PER_DEVICE is the largest that compiles within a v5e chip's HBM both alone and in a v5e-8 (README
"TPU presets"). On another number of devices keep PER_DEVICE and the tokens per step:
``jaxlm.tpu.scale_overrides`` gives the two overrides.
"""

from llama_think_95m import get_config as llama_think_config
from jaxlm.config import MeshConfig
from jaxlm.tpu import PRESET_DEVICES   # the 8 devices a TPU preset is written for

PER_DEVICE = 8


def get_config():
    cfg = llama_think_config()
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
    cfg.mesh = MeshConfig(data=1, fsdp=-1, tensor=1)
    cfg.train.batch_size = PRESET_DEVICES * PER_DEVICE
    cfg.train.grad_accum = tokens_per_step // (cfg.train.batch_size * cfg.train.seq_len)
    cfg.out_dir = "runs/llama_think_tpu"
    return cfg
