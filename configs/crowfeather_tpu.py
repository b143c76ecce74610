"""Crowfeather-50m on a Colab / Cloud TPU with 8 cores (v2-8, v3-8, v5e-8).

8 cores, FSDP over all of them: a v2-8 core has 8 GiB of HBM, so parameters and optimizer
state are sharded and the float32 logits computed in chunks. The batch is the card's
(16 x 4096 x 2), 2 sequences per core per micro-batch.
"""

from crowfeather import get_config as crowfeather_config
from jaxlm.config import MeshConfig


def get_config():
    cfg = crowfeather_config()
    cfg.mesh = MeshConfig(data=1, fsdp=-1, tensor=1)
    cfg.train.loss_chunk = 1024
    cfg.out_dir = "runs/crowfeather_tpu"
    return cfg
