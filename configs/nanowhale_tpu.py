"""nanowhale-100m on a Cloud / Colab TPU slice of 8 devices (v5e-8, v6e-8; v2-8, v3-8 cores): the
recipe of ``nanowhale_100m.py``, FSDP over all devices.

Parameters and AdamW's moments are sharded over the devices; compute is bf16 as the card trains,
with the hyper-connection streams, mixers, Sinkhorn, norms' statistics, router and softmax in
float32 (``model.stream_dtype``, docs/PERFORMANCE.md "nanowhale bf16"); attention is splash
attention. The card's 65,536 tokens a step (8 x 2048 x 4 accumulation) stay: PER_DEVICE sequences
per device per micro-batch, the rest accumulated. PER_DEVICE is the largest that compiles within a
v5e chip's HBM both alone and in a v5e-8 (README "TPU presets"). On another number of devices keep
PER_DEVICE and the tokens per step: ``jaxlm.tpu.scale_overrides`` gives the two overrides.
"""

from nanowhale_100m import get_config as nanowhale_config
from jaxlm import tpu

PER_DEVICE = 4


def get_config():
    cfg = tpu.preset(nanowhale_config(), PER_DEVICE, out_dir="runs/nanowhale_tpu")
    return cfg
