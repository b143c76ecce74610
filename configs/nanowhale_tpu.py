"""nanowhale-100m on a Cloud / Colab TPU slice of 8 devices (v5e-8, v6e-8; v2-8, v3-8 cores): the
recipe of ``nanowhale_100m.py``, FSDP over all devices.

Parameters and AdamW's moments are sharded over the devices; compute is bf16 as the card trains,
with the hyper-connection streams, mixers, Sinkhorn, norms' statistics, router and softmax in
float32 (``model.stream_dtype``, docs/PERFORMANCE.md "nanowhale bf16"); attention is splash
attention. The card's 65,536 tokens a step (8 x 2048 x 4 accumulation) stay: PER_DEVICE sequences
per device per micro-batch, the rest accumulated. PER_DEVICE holds, by GiB of HBM per device, the
largest that compiles within it on Colab's slices (16 GiB: a v5e chip alone and in a v5e-8; 8 GiB: a
v2-8's cores; README "TPU presets"). On another slice, ``jaxlm.tpu.slice_overrides`` gives the
overrides that keep the sequences per device that fit it and the tokens per step.
"""

from nanowhale_100m import get_config as nanowhale_config
from jaxlm import tpu

# Sequences per device per micro-batch by GiB of HBM per device: the largest --compile_for fits.
PER_DEVICE = {16: 4, 8: 2}


def get_config():
    return tpu.preset(nanowhale_config(), PER_DEVICE, out_dir="runs/nanowhale_tpu")
