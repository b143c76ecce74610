"""Shard-40m-v1 anneal (seeds/001, phase 2): 20,000 steps on a math/code/prose mix, from the pretrain.

    python -m jaxlm.train --config shard_anneal.py --init_from models/pretrain.pt \\
        --config.data.tokenizer=models/tokenizer.json

The card names the mix (OpenWebMath, FineWeb-Edu carryover, NuminaMath, MetaMathQA, ArXiv,
Cosmopedia, AI2 ARC) but publishes no weights: ``WEIGHTS`` below is our default, a choice and
not the card's (prose kept near a third so the anneal does not forget the pretrain
distribution, math-heavy otherwise). Change them here or per run. Weights are shares of
tokens. The pretrain stopped at step 47,500 of 100,000 without decaying, so the anneal is the
WSD decay: the pretrain's peak learning rate, no warmup, linear decay to zero over the
20,000 steps.

Sources are read from the Hugging Face hub. Set ``JAXLM_ANNEAL_DATA=/dir`` to read local
copies instead, ``/dir/<name>`` for each name of ``SOURCES`` (any layout jaxlm reads: a
hub-like Parquet tree, JSON lines, a prepared TFDS dataset is named with ``tfds:`` here).
The hub ids are as known offline and not verified by a download; ArXiv has no canonical
hub dataset named by the card.
"""

import os

from jaxlm.config import DataSource
from shard import get_config as shard_pretrain_config  # noqa: E402 (configs/ is on the path)

STEPS = 20_000
INIT_FROM = "models/pretrain.pt"      # the card's pretrain checkpoint (step 47,500); pass it as --init_from
LOCAL_DATA_ENV = "JAXLM_ANNEAL_DATA"

WEIGHTS = {  # our default; the card publishes none
    "fineweb_edu": 0.30,
    "open_web_math": 0.20,
    "cosmopedia": 0.15,
    "numina_math": 0.12,
    "metamathqa": 0.10,
    "arxiv": 0.08,
    "ai2_arc": 0.05,
}

SOURCES = {  # name: (hub location, text field or "{field}" template)
    "fineweb_edu": ("hf://HuggingFaceFW/fineweb-edu/sample/10BT", "text"),
    "open_web_math": ("hf://open-web-math/open-web-math", "text"),
    "cosmopedia": ("hf://HuggingFaceTB/cosmopedia/data", "text"),
    "numina_math": ("hf://AI-MO/NuminaMath-CoT", "{problem}\n\n{solution}"),
    "metamathqa": ("hf://meta-math/MetaMathQA@refs%2Fconvert%2Fparquet/default/train", "{query}\n\n{response}"),
    "arxiv": ("hf://ccdv/arxiv-summarization@refs%2Fconvert%2Fparquet/section/train", "{article}"),
    "ai2_arc": ("hf://allenai/ai2_arc/ARC-Challenge", "Question: {question}\nAnswer: {answerKey}"),
}


def mixture(weights: dict[str, float] = WEIGHTS) -> tuple[DataSource, ...]:
    local = os.environ.get(LOCAL_DATA_ENV)
    return tuple(DataSource(os.path.join(local, name) if local else hub, weight=weights[name], text_column=column)
                 for name, (hub, column) in SOURCES.items())


def get_config():
    cfg = shard_pretrain_config()
    cfg.out_dir = "runs/shard_anneal"
    cfg.train.steps = STEPS
    cfg.optim.warmup_steps = 0
    cfg.optim.decay_fraction = 1.0
    cfg.optim.decay_shape = "linear"
    cfg.optim.final_lr_fraction = 0.0
    cfg.optim.planned_steps = STEPS
    cfg.data.source = mixture()
    cfg.data.tokenizer = "models/tokenizer.json"  # the card's tokenizer: the pretrain's vocabulary
    cfg.data.heldout_fraction = 0.001
    return cfg
