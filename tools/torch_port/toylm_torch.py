"""ToyLM in PyTorch, following ``specs/toylm.md``, for PyTorch users of what jaxlm trained.

    from tools.torch_port.toylm_torch import ToyLM
    model = ToyLM.from_checkpoint("model.pt")          # any layout jaxlm reads; cfg and conventions included
    logits, _ = model(ids)                              # as the card's loader: (capped logits, loss or None)

or, the card's way, from a ``.pt`` that ``python -m tools.torch_port to-torch`` wrote::

    ck = torch.load("model.pt", weights_only=True)
    model = ToyLM(Config(**ck["cfg"], **ck.get("conventions", {})))
    model.load_state_dict(ck["model"])

The state_dict uses Hugging Face names (``model.layers.0.self_attn.q_proj.weight``); the open
conventions (RoPE pairing and theta, which layers slide, the window edge, embedding scaling,
z-loss form) are Config fields with jaxlm's names and defaults, so the two agree on logits.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class Config:
    # the upstream Config's fields (as the card's checkpoints list them)
    vocab_size: int = 8192
    dim: int = 512
    n_layers: int = 12
    n_heads: int = 8
    head_dim: int = 64
    mlp_hidden: int = 2048
    max_seq_len: int = 8192
    attention_pattern: str = "gemma4"
    sliding_window: int = 1024
    engram_enabled: bool = False
    engram_slots: int = 512
    engram_inject_layer: int = 2
    optimizer: str = "muon"
    lm_head_logit_cap: float = 30.0
    z_loss_weight: float = 1e-4
    lr_schedule: str = "wsd"
    # the conventions upstream never published (jaxlm's ToyLMConfig names and defaults)
    z_loss_form: str = "mean_sq"
    rope_theta: float = 10000.0
    rope_pairing: str = "rotate_half"
    sliding_parity: str = "even"
    window_includes_query: bool = True
    embed_scale: bool = False
    norm_eps: float = 1e-5

    def layer_window(self, i: int) -> int | None:
        """Keys a query of layer i sees (None: all earlier ones); the last layer is always global."""
        if self.attention_pattern == "all_global" or i == self.n_layers - 1:
            return None
        slides = (i % 2 == 0) if self.sliding_parity == "even" else (i % 2 == 1)
        if not slides:
            return None
        return self.sliding_window if self.window_includes_query else self.sliding_window + 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rope(x_BHTK, positions_T, theta: float, pairing: str):
    """Rotary embedding in float32: rotate_half pairs i with i + K/2, interleaved pairs 2i with 2i+1."""
    K = x_BHTK.shape[-1]
    inv_freq = theta ** (-torch.arange(0, K, 2, dtype=torch.float32, device=x_BHTK.device) / K)
    angle_TK2 = positions_T.float()[:, None] * inv_freq
    cos, sin = angle_TK2.cos(), angle_TK2.sin()
    x = x_BHTK.float()
    if pairing == "rotate_half":
        x1, x2 = x[..., :K // 2], x[..., K // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    elif pairing == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    else:
        raise ValueError(f"unknown RoPE pairing {pairing!r}")
    return out.to(x_BHTK.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        inner = cfg.n_heads * cfg.head_dim
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.k_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.v_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.dim, bias=False)

    def qkv(self, x_BTD):
        """Rotated queries and keys, values ``[B, H, T, K]``, and the positions 0..T-1."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        split = lambda y: y.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        q, k, v = split(self.q_proj(x_BTD)), split(self.k_proj(x_BTD)), split(self.v_proj(x_BTD))
        positions = torch.arange(T, device=x_BTD.device)
        q = rope(q, positions, cfg.rope_theta, cfg.rope_pairing)
        k = rope(k, positions, cfg.rope_theta, cfg.rope_pairing)
        return q, k, v, positions

    def forward(self, x_BTD, window: int | None):
        B, T, _ = x_BTD.shape
        q, k, v, positions = self.qkv(x_BTD)
        t, s = positions[:, None], positions[None, :]
        visible = s <= t
        if window is not None:
            visible = visible & (t - s < window)  # W keys including the query itself
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=1.0 / math.sqrt(self.cfg.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.window = cfg.layer_window(layer)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x), self.window)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class ToyLM(nn.Module):
    """``model(ids)`` -> ``(logits, loss)``: soft-capped logits ``[B, T, V]``; loss when targets are given."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.engram_enabled:
            raise ValueError("engram_enabled=True: the Engram memory is not part of the ToyLM spec")
        self.cfg = cfg
        self.model = Backbone(cfg)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, ids_BT, targets_BT=None):
        cfg = self.cfg
        x = self.model.embed_tokens(ids_BT)
        if cfg.embed_scale:
            x = x * math.sqrt(cfg.dim)
        for block in self.model.layers:
            x = block(x)
        x = self.model.norm(x)
        logits = x @ self.model.embed_tokens.weight.t()  # tied head
        if cfg.lm_head_logit_cap:
            logits = cfg.lm_head_logit_cap * torch.tanh(logits / cfg.lm_head_logit_cap)
        if targets_BT is None:
            return logits, None
        logits32 = logits.float()
        ce = F.cross_entropy(logits32.flatten(0, 1), targets_BT.flatten(), ignore_index=-100)
        valid = targets_BT.flatten() >= 0
        lse = torch.logsumexp(logits32.flatten(0, 1), -1)[valid]
        z = lse.pow(2).mean() if cfg.z_loss_form == "mean_sq" else lse.mean().pow(2)
        return logits, ce + cfg.z_loss_weight * z

    @torch.no_grad()
    def generate(self, ids_BT, max_new_tokens: int, temperature: float = 0.8, top_p: float = 0.9,
                 rep_penalty: float = 1.0):
        """Sampling as on the card: CTRL repetition penalty, temperature, nucleus (top-p)."""
        for _ in range(max_new_tokens):
            logits = self(ids_BT[:, -self.cfg.max_seq_len:])[0][:, -1].float()
            if rep_penalty != 1.0:
                seen = torch.gather(logits, 1, ids_BT)
                logits.scatter_(1, ids_BT, torch.where(seen > 0, seen / rep_penalty, seen * rep_penalty))
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, -1)
                sorted_p, order = probs.sort(-1, descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > top_p
                sorted_p[drop] = 0
                nxt = order.gather(1, torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1))
            ids_BT = torch.cat([ids_BT, nxt], 1)
        return ids_BT

    @classmethod
    def from_checkpoint(cls, path, key_map=None) -> "ToyLM":
        """Any checkpoint jaxlm reads (.pt of any naming, .safetensors, jaxlm export or run directory)."""
        from jaxlm.formats import read_checkpoint
        from jaxlm.formats.converted import to_torch_object
        converted = read_checkpoint(path, key_map=key_map, with_optimizer=False)
        ck = to_torch_object(converted, naming="hf", dtype="float32")
        model = cls(config_from_checkpoint(ck))
        model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in ck["model"].items()})
        return model.eval()


def config_from_checkpoint(ck: dict) -> Config:
    """The Config of a checkpoint dict in the card's layout (cfg dict + optional jaxlm conventions)."""
    known = {f.name for f in dataclasses.fields(Config)}
    fields = {**ck["cfg"], **ck.get("conventions", {})}
    return Config(**{k: v for k, v in fields.items() if k in known})
