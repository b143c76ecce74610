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
from jaxlm import tpu

PER_DEVICE = 8


def get_config():
    cfg = tpu.preset(llama_think_config(), PER_DEVICE, out_dir="runs/llama_think_tpu")
    return cfg
