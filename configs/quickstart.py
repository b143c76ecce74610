"""A tiny ToyLM trained in about two minutes on a laptop CPU, with no download.

The corpus is the documentation text that ships with CPython (pydoc_data.topics); a
2,048-entry BPE tokenizer is trained on it on first run and cached. Same family and
recipe as Crowfeather (alternating sliding/global attention, soft-cap, z-loss,
Muon + AdamW, WSD), with small dimensions.
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig
from jaxlm.models.toylm import ToyLMConfig


def get_config() -> Config:
    return Config(
        model=ToyLMConfig(vocab_size=2048, dim=128, n_layers=4, n_heads=4, head_dim=32, mlp_hidden=384,
                          max_seq_len=512, sliding_window=64),
        train=TrainConfig(steps=300, batch_size=16, seq_len=128, grad_accum=1, compute_dtype="float32",
                          log_every=25, eval_batches=8, sample_prompt="The for statement is used to",
                          sample_tokens=40),
        optim=OptimConfig(name="muon", lr=0.02, adamw_lr_ratio=0.25, schedule="wsd", warmup_steps=30,
                          decay_fraction=0.3, grad_clip=1.0),
        data=DataConfig(source="pydoc", vocab_size=2048, heldout_fraction=0.05),
        checkpoint=CheckpointConfig(every_steps=100, keep=2),
        out_dir="runs/quickstart",
    )
