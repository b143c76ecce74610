"""A tiny Llama Think: the golden fixtures' shape (``fixtures/llama_think/README.md``, 207,016
parameters), every feature of the 95M model on (two periods of linear, linear, csa, full; GQA;
partial RoPE with the odd-width edge case; hyper-connections), for tests and CPU runs on CPython's
docs with no download. The recipe is the 95M one's (``llama_think_95m.py``) at a small scale, float32.
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig
from jaxlm.models.hybrid import HybridConfig

STEPS = 300


def get_config() -> Config:
    return Config(
        model=HybridConfig(dim=40, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=208,
                           layer_types=("linear", "linear", "csa", "full") * 2, linear_num_key_heads=2,
                           linear_num_value_heads=2, linear_key_head_dim=24, linear_value_head_dim=24),
        train=TrainConfig(steps=STEPS, batch_size=8, seq_len=208, grad_accum=1, compute_dtype="float32",
                          log_every=25, eval_batches=4, sample_prompt="The for statement is used to",
                          sample_tokens=40),
        optim=OptimConfig(name="muon", lr=0.02, adamw_lr=0.02, momentum=0.95, nesterov=True, ns_steps=5,
                          muon_scale="llama_think", muon_weight_decay=0.01, weight_decay=0.01,
                          adamw_patterns=("embed",), b1=0.9, b2=0.99, grad_clip=1.0, schedule="cosine",
                          warmup_steps=30, planned_steps=STEPS),
        # The fixture's 256 ids hold a byte-level tokenizer with no room for a special token, so no
        # EOS between documents (a byte-level BPE needs 256 ids + one per special token).
        data=DataConfig(source="pydoc", vocab_size=256, eos_token="", heldout_fraction=0.05),
        checkpoint=CheckpointConfig(every_steps=100, keep=2),
        out_dir="runs/llama_think_tiny",
    )
