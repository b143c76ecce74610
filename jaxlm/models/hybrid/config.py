"""The Llama Think configuration (``fixtures/llama_think/SPEC.md`` §1): its shape, kinds and counts.

Field names are the upstream ``ModelArgs``'s, so a checkpoint's ``model_args`` maps onto this
dataclass one to one. The upstream branches that the released model leaves switched off
(dropout, attention residuals, memory caching, looping) are kept as fields so a ``model_args``
round-trips unchanged, and ``validate`` refuses any value that would switch one on.
"""

from __future__ import annotations

import dataclasses

from jaxlm import config as C
from jaxlm.errors import ConfigError
from jaxlm.models import family

# Upstream layer type -> this package's layer kind (what ``--dry_run`` prints).
LAYER_KINDS = {"linear": "gdn", "csa": "csa", "full": "full"}

_REAL_PATTERN = ("linear", "linear", "csa", "full") * 4


# Hashable: the model keeps its config as static graph data, which jit hashes.
@dataclasses.dataclass(unsafe_hash=True)
class HybridConfig:
    dim: int = 576
    n_layers: int = 16
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int | None = None            # None: dim // n_heads
    vocab_size: int = 32000
    hidden_dim: int | None = None          # None: 2/3 of 4*dim, rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-6
    max_seq_len: int = 1024
    dropout: float = 0.0
    rope_base: float = 20000.0
    partial_rotary_factor: float = 0.5
    layer_types: tuple[str, ...] = _REAL_PATTERN
    window_size: int = 256                 # stored upstream, used by no layer kind here
    csa_stride: int = 4
    csa_local_window: int = 64
    linear_num_key_heads: int = 9
    linear_num_value_heads: int = 9
    linear_key_head_dim: int = 112
    linear_value_head_dim: int = 112
    linear_conv_kernel_dim: int = 4
    attnres_block_size: int = 0
    hyper_connections: bool = True
    mc_segment_size: int = 0
    mc_ssc_top_k: int = 2
    mc_detach_cached_states: bool = True
    loop_max_steps: int = 1
    loop_kl_beta: float = 0.1
    loop_exit_threshold: float = 0.9
    loop_mc_enabled: bool = False
    loop_mc_top_k: int = 2
    loop_mc_detach: bool = True
    # jaxlm's own: the GDN training chunk (the upstream code's 64; any power of two computes
    # the same function, it only trades intra-chunk work against scan steps).
    gdn_chunk: int = 64
    # jaxlm's own: compute what llama2.c's run.c computes from a model.bin (CSA layers as full
    # attention with their own wq/wk/wv/wo, residuals as plain sums). Reading a model.bin sets it;
    # on a checkpoint read normally (``--set llama2c_lossy=true``) the CSA compressors and the
    # residual scales stay in the state, unused, so the switch changes no shape.
    llama2c_lossy: bool = False

    family = "hybrid"
    SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "hidden_dim",
                    "multiple_of", "layer_types", "linear_num_key_heads", "linear_num_value_heads",
                    "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "hyper_connections")

    def validate(self) -> None:
        C.positive(self, "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "norm_eps",
                   "max_seq_len", "rope_base", "partial_rotary_factor", "csa_stride", "csa_local_window",
                   "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                   "linear_value_head_dim", "linear_conv_kernel_dim", "gdn_chunk")
        path = getattr(self, "_config_path", "model.")
        if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.n_layers:
            raise ConfigError(f"{path}layer_types has {len(self.layer_types)} entries: must name one kind for each "
                              f"of the {path}n_layers = {self.n_layers} layers")
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_KINDS:
                raise ConfigError(f"{path}layer_types[{i}] = {kind!r}: unknown layer kind; known: "
                                  + ", ".join(map(repr, LAYER_KINDS)))
        for name, off in (("dropout", 0.0), ("attnres_block_size", 0), ("mc_segment_size", 0),
                          ("loop_max_steps", 1)):
            if getattr(self, name) != off:
                C.fail(self, name, f"only {off!r} is supported (the released model leaves this branch off)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"{path}n_heads = {self.n_heads}: must be a multiple of {path}n_kv_heads "
                              f"({self.n_kv_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(f"{path}linear_num_value_heads = {self.linear_num_value_heads}: must be a multiple "
                              f"of {path}linear_num_key_heads ({self.linear_num_key_heads})")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"{path}dim = {self.dim}: must be a multiple of {path}n_heads ({self.n_heads}) "
                              f"when {path}head_dim is None")
        if self.gdn_chunk & (self.gdn_chunk - 1):
            C.fail(self, "gdn_chunk", "must be a power of two")

    # ---- derived sizes (SPEC §1)

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        r0 = int(self.head_size * self.partial_rotary_factor)
        return max(2, r0 - r0 % 2)

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def gdn_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def gdn_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def gdn_conv_channels(self) -> int:
        return 2 * self.gdn_key_dim + self.gdn_value_dim

    def layer_kinds(self) -> list[str]:
        return [LAYER_KINDS.get(t, t) for t in self.layer_types]

    def loss_terms(self) -> family.HeadLoss:
        return family.HeadLoss()   # plain cross-entropy: the upstream loss has no z-loss

    # ---- counting

    def _attention_matmul(self) -> int:
        d, H, G = self.head_size, self.n_heads, self.n_kv_heads
        return self.dim * 2 * H * d + 2 * self.dim * G * d + H * d * self.dim

    def _layer_params(self, kind: str) -> tuple[int, int]:
        """``(matmul params applied to every token, all params)`` of one layer's mixer."""
        d, G = self.head_size, self.n_kv_heads
        if kind == "linear":
            Hv, conv = self.linear_num_value_heads, self.gdn_conv_channels
            matmul = self.dim * (conv + self.gdn_value_dim + 2 * Hv) + self.gdn_value_dim * self.dim
            return matmul + conv * self.linear_conv_kernel_dim, (
                matmul + conv * self.linear_conv_kernel_dim + 2 * Hv + self.linear_value_head_dim)
        attn = self._attention_matmul() + 2 * d   # + q_norm, k_norm
        if kind == "csa":
            blend = self.dim * self.n_heads * d
            return self._attention_matmul() + blend, attn + blend + 2 * (G * d) ** 2
        return self._attention_matmul(), attn

    def param_count(self) -> int:
        D = self.dim
        per_block = 3 * D * self.ffn_dim + 2 * D + (4 * D if self.hyper_connections else 0)
        mixers = sum(self._layer_params(kind)[1] for kind in self.layer_types)
        return self.vocab_size * D + D + self.n_layers * per_block + mixers

    def matmul_param_count(self) -> float:
        """Parameters in matmuls per token, the tied head included; CSA's compressors act once a block."""
        per_token = sum(self._layer_params(kind)[0] for kind in self.layer_types)
        compress = sum(2 * (self.n_kv_heads * self.head_size) ** 2 / self.csa_stride
                       for kind in self.layer_types if kind == "csa")
        return self.n_layers * 3 * self.dim * self.ffn_dim + per_token + compress + self.vocab_size * self.dim

    def gdn_flops(self) -> float:
        """Forward FLOPs per token of one GDN layer's chunked delta rule (beside its projections)."""
        c, dk, dv = self.gdn_chunk, self.linear_key_head_dim, self.linear_value_head_dim
        return self.linear_num_value_heads * (6 * c * dk + 4 * c * dv + 6 * dk * dv)

    def csa_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of one CSA layer's two attentions (beside its projections)."""
        d, S = self.head_size, self.csa_stride
        blocks = sum(t // S for t in range(seq_len)) / seq_len   # visible blocks per query
        return 4 * self.n_heads * d * (mean_keys_per_query(seq_len, self.csa_local_window) + blocks)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N_matmul plus 3x the forward FLOPs of the token mixers."""
        mixers = 0.0
        for kind in self.layer_types:
            if kind == "linear":
                mixers += self.gdn_flops()
            elif kind == "csa":
                mixers += self.csa_flops(seq_len)
            else:
                mixers += 4 * self.n_heads * self.head_size * mean_keys_per_query(seq_len, None)
        return 6.0 * self.matmul_param_count() + 3.0 * mixers

    def flops_note(self) -> str:
        return ("GDN forward/token = Hv*(6*c*dk + 4*c*dv + 6*dk*dv) (c = chunk: QK^T, KK^T, the WY products, "
                "the state read by q and k and its update); CSA forward/token = 4*H*d*(mean(min(t+1, W)) "
                "+ mean(floor(t/S))) (local window + visible compressed blocks); full = 4*H*d*(T+1)/2; "
                "training = 6*N_matmul + 3x these")


def mean_keys_per_query(seq_len: int, window: int | None) -> float:
    """Average number of keys a causal query attends to, over positions 0..seq_len-1."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len

