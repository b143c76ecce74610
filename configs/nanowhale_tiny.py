"""A tiny nanowhale: the shape of the golden fixtures (``fixtures/nanowhale/config.json``,
184,385 parameters), trained in a few minutes on a CPU on CPython's docs, no download.

Every structural feature of nanowhale-100m is kept (one shared K=V head, 4 routed experts + 1
shared, top-2 sqrt-softplus routing with the bias, 4 Sinkhorn-mixed streams, the untied head);
the recipe is nanowhale-100m's (AdamW, warmup-cosine) at a small scale, in float32.
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig
from jaxlm.models.deepseek_v4 import DeepSeekV4Config

STEPS = 300


def get_config() -> Config:
    return Config(
        model=DeepSeekV4Config(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               head_dim=32, qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16,
                               moe_intermediate_size=48, max_position_embeddings=128),
        train=TrainConfig(steps=STEPS, batch_size=8, seq_len=128, grad_accum=1, compute_dtype="float32",
                          log_every=25, eval_batches=4, sample_prompt="The for statement is used to",
                          sample_tokens=40),
        optim=OptimConfig(name="adamw", lr=3e-3, b1=0.9, b2=0.95, weight_decay=0.1, schedule="cosine",
                          warmup_steps=round(0.03 * STEPS), planned_steps=STEPS, grad_clip=1.0),
        data=DataConfig(source="pydoc", vocab_size=320, heldout_fraction=0.05),
        checkpoint=CheckpointConfig(every_steps=100, keep=2),
        out_dir="runs/nanowhale_tiny",
    )
