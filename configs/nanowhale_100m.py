"""nanowhale-100m-base (seeds/004): DeepSeek-V4 at 110,369,621 parameters, AdamW, warmup-cosine.

Card: 5,000 steps of 8 x 2048 tokens x 4 accumulation (~2.6B tokens of FineWeb-edu), lr 6e-4,
cosine with 3% warmup, AdamW beta 0.9/0.95, weight decay 0.1, bf16 mixed precision. The
hyper-connection streams, mixers, Sinkhorn, RMS statistics, the gate and the softmax stay float32
under bf16 (``model.stream_dtype``). The card does not say where the cosine ends; here at 0.

The tokenizer is upstream's DeepSeek-V4 ``tokenizer.json`` (129,280 ids, eos
``<｜end▁of▁sentence｜>``): put the Hub repo's files (or at least ``tokenizer.json`` and
``tokenizer_config.json``) in ``data.tokenizer``'s directory.
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig
from jaxlm.models.deepseek_v4 import DeepSeekV4Config

STEPS = 5000


def get_config() -> Config:
    return Config(
        model=DeepSeekV4Config(),  # the defaults are nanowhale-100m's config.json
        train=TrainConfig(steps=STEPS, batch_size=8, seq_len=2048, grad_accum=4, compute_dtype="bfloat16",
                          log_every=50, sample_prompt="The meaning of life is", sample_tokens=80),
        optim=OptimConfig(name="adamw", lr=6e-4, b1=0.9, b2=0.95, weight_decay=0.1, schedule="cosine",
                          warmup_steps=round(0.03 * STEPS), final_lr_fraction=0.0, planned_steps=STEPS,
                          grad_clip=1.0),
        data=DataConfig(source="hf:HuggingFaceFW/fineweb-edu", tokenizer="checkpoints/nanowhale-100m-base",
                        vocab_size=129280, eos_token="<｜end▁of▁sentence｜>"),
        checkpoint=CheckpointConfig(every_steps=500, every_minutes=30, keep=3),
        out_dir="runs/nanowhale_100m",
    )
