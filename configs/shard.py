"""Shard-40m-v1 pretrain (seeds/001): the Crowfeather architecture and recipe, 100k planned steps.

The card gives the same shape, Muon for hidden 2-D weights, AdamW for embeddings and norms,
WSD, logit cap 30 and z-loss 1e-4; it does not give the batch, so Crowfeather's is used.
The anneal that followed is configs/shard_anneal.py.
"""

from crowfeather import get_config as crowfeather_config  # noqa: F401 (configs/ is on the path)


def get_config():
    cfg = crowfeather_config()
    cfg.out_dir = "runs/shard"
    return cfg
