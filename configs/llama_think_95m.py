"""Llama Think 95M (seeds/002, 003): the hybrid family at 95,715,408 parameters, Muon + AdamW, warmup-cosine.

The recipe as the upstream ``train.py`` runs it (``fixtures/llama_think/SPEC.md`` §11), which differs
from its README in two places:

* AdamW's lr: the training loop writes ``lr(it)`` into every parameter group at each iteration,
  so AdamW follows the same schedule with the same peak, 0.02; the README's (and the optimizer
  constructor's) 0.002 is never used for a step.
* The split: Muon takes every >= 2-D tensor but the embedding (the tied head), the 3-D GDN conv
  kernel included (its update scale is that of its 2-D view); AdamW takes the embedding and every
  1-D tensor (all norms, the residual/sublayer scales, ``A_log``, ``dt_bias``), all with weight
  decay 0.01, as Muon's tensors.

Muon: momentum 0.95 Nesterov on the gradient + momentum mix, 5 quintic Newton-Schulz steps,
update scale sqrt(max/min side); AdamW betas (0.9, 0.99), eps 1e-8; global-norm clip 1.0; lr
0 -> 0.02 over 500 iterations, then a cosine to 0 at 10,000 (the upstream loop runs iterations
0..10,000 inclusive, the last at lr 0). Batch: 64 x 1024 per GPU x 8 accumulation x 4 GPUs, i.e.
256 sequences a micro-batch x 8 here (2,097,152 tokens a step). Data: FineWeb sample-10BT
tokenized with the Llama-2 SentencePiece model (32,000 ids; put ``tokenizer.model`` at
``data.tokenizer``).
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig
from jaxlm.models.hybrid import HybridConfig

PEAK_LR = 0.02
PLANNED_STEPS = 10_000


def get_config() -> Config:
    return Config(
        model=HybridConfig(),  # the defaults are the released model_args: 95,715,408 parameters
        train=TrainConfig(steps=PLANNED_STEPS + 1, batch_size=256, seq_len=1024, grad_accum=8,
                          compute_dtype="bfloat16", log_every=10, sample_prompt="The history of",
                          sample_tokens=80),
        optim=OptimConfig(name="muon", lr=PEAK_LR, adamw_lr=PEAK_LR, momentum=0.95, nesterov=True, ns_steps=5,
                          ns_coefficients="quintic", muon_scale="llama_think", muon_weight_decay=0.01,
                          weight_decay=0.01, adamw_patterns=("embed",), conv_patterns=("conv",),
                          b1=0.9, b2=0.99, eps=1e-8, grad_clip=1.0, schedule="cosine", warmup_steps=500,
                          final_lr_fraction=0.0, planned_steps=PLANNED_STEPS),
        data=DataConfig(source="hf://HuggingFaceFW/fineweb/sample/10BT", tokenizer="checkpoints/llama_think/tokenizer.model",
                        vocab_size=32000, eos_token="</s>"),
        checkpoint=CheckpointConfig(every_steps=500, every_minutes=30, keep=3),
        out_dir="runs/llama_think_95m",
    )
