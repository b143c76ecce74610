"""Crowfeather-50m on one host with N GPUs: data parallel over all of them.

The card's 131,072 tokens per optimizer step are kept: 16 sequences x 2 accumulation steps
are split over the GPUs (16 must be divisible by N; for 3, 5, 6 or 7 GPUs set
--config.train.batch_size to a multiple). A 54.5M model fits on every GPU, so pure data
parallelism is fastest; use --config.mesh.fsdp=N --config.mesh.data=1 to shard parameters
and optimizer state when memory, not speed, is the limit.
"""

from crowfeather import get_config as crowfeather_config
from jaxlm.config import MeshConfig


def get_config():
    cfg = crowfeather_config()
    cfg.mesh = MeshConfig(data=-1, fsdp=1, tensor=1)
    return cfg
