"""Crowfeather-50m (seeds/000): ToyLM 54.5M, Muon + AdamW, WSD over 100k planned steps.

Card: batch 16 x 4096 x 2 accumulation, peak lr 2e-3 (Muon) / 5e-4 (AdamW), warmup 1500,
linear decay over the last 20%, bf16, checkpoints every 2,500 steps, FineWeb-edu.
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig
from jaxlm.models.toylm import ToyLMConfig


def get_config() -> Config:
    return Config(
        model=ToyLMConfig(),  # the defaults are the card's shape: 54,538,752 parameters
        train=TrainConfig(steps=100_000, batch_size=16, seq_len=4096, grad_accum=2, compute_dtype="bfloat16",
                          log_every=50, sample_prompt="The capital of France is", sample_tokens=80),
        optim=OptimConfig(name="muon", lr=2e-3, adamw_lr_ratio=0.25, momentum=0.95, nesterov=True,
                          muon_scale="toylm", schedule="wsd", warmup_steps=1500, decay_fraction=0.2,
                          decay_shape="linear", final_lr_fraction=0.0, planned_steps=100_000, grad_clip=1.0),
        data=DataConfig(source="hf:HuggingFaceFW/fineweb-edu", vocab_size=8192),
        checkpoint=CheckpointConfig(every_steps=2500, every_minutes=30, keep=3),
        out_dir="runs/crowfeather",
    )
