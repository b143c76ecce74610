"""The DeepSeek-V4 (nanowhale) config: the Hugging Face ``config.json`` field names, plus jaxlm's own.

Shape and convention fields keep the names of upstream's ``configuration_deepseek_v4.py`` so that
a ``config.json`` maps onto them one to one (``jaxlm/formats/deepseek_v4.py``); the defaults are
nanowhale-100m's. Fields the upstream forward pass never reads (``num_key_value_heads``,
``n_shared_experts``, ``sliding_window``, ``compress_*``, ``index_*``, MTP) are not here: the
architecture always has one shared K=V head and one shared expert
(``fixtures/nanowhale/SPEC.md`` section 1).
"""

from __future__ import annotations

import dataclasses

from jaxlm import config as C
from jaxlm.errors import ConfigError
from jaxlm.models import family

SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
MOE_DISPATCH = ("ragged", "dense_capacity")
STREAM_DTYPES = ("float32", "bfloat16")


# Hashable because the model keeps its config as static graph data, which jit hashes.
@dataclasses.dataclass(unsafe_hash=True)
class DeepSeekV4Config:
    vocab_size: int = 129280
    hidden_size: int = 320
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    head_dim: int = 96
    qk_rope_head_dim: int = 32           # RoPE on the LAST dims of each head
    q_lora_rank: int = 160
    o_groups: int = 2
    o_lora_rank: int = 80
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 640     # per routed expert and for the shared expert
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    swiglu_limit: float = 0.0            # 0: routed experts do not clamp
    num_hash_layers: int = 0             # layers below this have no router bias
    hc_mult: int = 4                     # hyper-connection streams
    hc_sinkhorn_iters: int = 2
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    # jaxlm's own (not in config.json).
    # "ragged": tokens sorted by expert, one grouped matmul (jax.lax.ragged_dot) per projection;
    # "dense_capacity": a fixed [experts, capacity] buffer and a batched matmul.
    moe_dispatch: str = "ragged"
    # dense_capacity slots per expert = factor x tokens x k / experts (at most tokens); 0: tokens,
    # so no token is ever dropped and both paths compute the same function. Below that, the
    # assignments beyond an expert's capacity are dropped (not what upstream computes).
    moe_capacity_factor: float = 0.0
    # dtype of the hyper-connection streams between sub-layers under a half-precision compute
    # dtype. The mixers, the Sinkhorn, RMS statistics, the gate and softmax are float32 always.
    stream_dtype: str = "float32"

    family = "deepseek_v4"
    SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts",
                    "moe_intermediate_size", "num_hash_layers", "hc_mult")

    @property
    def max_seq_len(self) -> int:
        """The RoPE table's length upstream, so the hard context limit."""
        return self.max_position_embeddings

    def validate(self) -> None:
        path = getattr(self, "_config_path", "model.")
        C.positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                   "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
                   "moe_intermediate_size", "routed_scaling_factor", "hc_mult", "hc_sinkhorn_iters",
                   "rms_norm_eps", "rope_theta", "max_position_embeddings")
        C.non_negative(self, "qk_rope_head_dim", "swiglu_limit", "num_hash_layers", "hc_eps",
                       "moe_capacity_factor")
        C.choice(self, "scoring_func", SCORING_FUNCS)
        C.choice(self, "moe_dispatch", MOE_DISPATCH)
        C.choice(self, "stream_dtype", STREAM_DTYPES)
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"{path}num_experts_per_tok = {self.num_experts_per_tok}: must be <= "
                              f"{path}n_routed_experts ({self.n_routed_experts})")
        if self.qk_rope_head_dim > self.head_dim or self.qk_rope_head_dim % 2:
            raise ConfigError(f"{path}qk_rope_head_dim = {self.qk_rope_head_dim}: must be even and <= "
                              f"{path}head_dim ({self.head_dim})")
        if self.num_attention_heads % self.o_groups:
            raise ConfigError(f"{path}o_groups = {self.o_groups}: must divide {path}num_attention_heads "
                              f"({self.num_attention_heads})")
        if self.tie_word_embeddings:
            raise ConfigError(f"{path}tie_word_embeddings = True: DeepSeek-V4 has an untied lm_head; set False")

    # ---- structure

    def has_router_bias(self, i: int) -> bool:
        return i >= self.num_hash_layers

    def layer_kinds(self) -> list[str]:
        return ["mla+moe" if self.has_router_bias(i) else "mla+moe(no bias)" for i in range(self.num_hidden_layers)]

    def loss_terms(self) -> family.HeadLoss:
        return family.HeadLoss()  # plain cross-entropy: no z-loss, no balance loss (SPEC 3.9)

    # ---- counting

    def _hc_rows(self) -> int:
        return (2 + self.hc_mult) * self.hc_mult

    def _attention_matmul_params(self) -> int:
        D, inner = self.hidden_size, self.num_attention_heads * self.head_dim
        return (self.q_lora_rank * D + inner * self.q_lora_rank + self.head_dim * D
                + self.o_groups * self.o_lora_rank * (inner // self.o_groups) + D * self.o_groups * self.o_lora_rank)

    def _expert_params(self) -> int:
        return 3 * self.moe_intermediate_size * self.hidden_size

    def param_count(self) -> int:
        """Every tensor of the safetensors file, router biases and unused ``attn_sink`` included."""
        D, H, E = self.hidden_size, self.hc_mult, self.n_routed_experts
        total = 2 * self.vocab_size * D + D + H * H * D + H + 1
        for i in range(self.num_hidden_layers):
            total += self._attention_matmul_params() + self.q_lora_rank + self.head_dim + self.num_attention_heads
            total += 2 * D                                           # attn_norm, ffn_norm
            total += E * D + (E if self.has_router_bias(i) else 0)   # gate
            total += (E + 1) * self._expert_params()                 # routed + shared experts
            total += 2 * (self._hc_rows() * H * D + self._hc_rows() + 3)
        return total

    def matmul_param_count(self) -> int:
        """Parameters a token goes through in matmuls: k of the routed experts, the untied head."""
        D, H = self.hidden_size, self.hc_mult
        per_layer = (self._attention_matmul_params() + self.n_routed_experts * D
                     + (self.num_experts_per_tok + 1) * self._expert_params() + 2 * self._hc_rows() * H * D)
        return self.num_hidden_layers * per_layer + self.vocab_size * D + H * H * D

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N_matmul plus causal attention (forward + backward = 3x forward):
        ``12 x heads x head_dim x (T+1)/2`` per layer (QK^T and AV over the mean key count)."""
        attention = 12.0 * self.num_attention_heads * self.head_dim * (seq_len + 1) / 2
        return 6.0 * self.matmul_param_count() + self.num_hidden_layers * attention

    def flops_note(self) -> str:
        return ("mla+moe: 6 x (q/kv/o low-rank projections + gate + top-k and shared experts + HC mixers) "
                "+ causal attention over one shared K=V head; the elementwise stream mixing is not counted")
