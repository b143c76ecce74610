"""The PyTorch ToyLM trained at its best, timed as ``jaxlm.bench`` times jaxlm (it runs these rows).

    python -m tools.torch_port.bench_torch --spec '{"config_dict": ..., "batch": 16, "seq": 4096, ...}'

What "at its best" means here, each a choice a PyTorch user would make for speed:

* ``torch.compile`` of the model and its loss (the shipped ``ToyLM.forward``: soft-capped logits,
  cross-entropy, z-loss), bf16 autocast over float32 master weights, TF32 for float32 matmuls;
* attention through a fused kernel that honours the sliding window (the shipped module builds an
  explicit boolean mask): ``flex`` FlexAttention with a causal / sliding-window block mask in every
  layer; ``sdpa_flex`` SDPA's flash kernel (``is_causal=True``) for global layers and FlexAttention
  for sliding ones; ``sdpa`` SDPA everywhere (sliding layers then need an explicit mask);
* fused AdamW (``fused=True``) for the embedding and norms, and Muon with jaxlm's semantics
  (``jaxlm/optim/muon.py``) where matrices of one shape are stacked for one batched, compiled
  Newton–Schulz — faster than a per-parameter loop such as ``torch.optim.Muon``'s;
* ``clip_grad_norm_`` with ``foreach``, gradients set to ``None`` between steps.

The model wraps ``toylm_torch.ToyLM`` without changing it: each block's attention module is
replaced by ``FastAttention``, a subclass with the same parameters and the same function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from tools.torch_port.toylm_torch import Attention, Config, ToyLM

ATTENTION_KERNELS = ("flex", "sdpa_flex", "sdpa")
RESULT_TAG = "BENCH_RESULT "


# --------------------------------------------------------------------------- the model


def window_mask_mod(window: int | None):
    """FlexAttention's mask: causal, and within ``window`` keys (the query included) when given."""
    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx
        if window is not None:
            visible = visible & (q_idx - kv_idx < window)
        return visible
    return mask_mod


class FastAttention(Attention):
    """The shipped attention with a fused kernel; ``prepare(T, device)`` before the first call."""

    def __init__(self, cfg: Config, kernel: str, window: int | None):
        super().__init__(cfg)
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r}; allowed: {', '.join(ATTENTION_KERNELS)}")
        self.kernel, self.window, self.block_mask = kernel, window, None

    def prepare(self, seq_len: int, device) -> None:
        """Build the block mask once, outside the compiled step (it depends on T and the window only)."""
        from torch.nn.attention.flex_attention import create_block_mask
        if self.uses_flex(seq_len):
            self.block_mask = create_block_mask(window_mask_mod(self.window), None, None, seq_len, seq_len,
                                                device=device)

    def uses_flex(self, seq_len: int) -> bool:
        sliding = self.window is not None and self.window < seq_len
        return self.kernel == "flex" or (self.kernel == "sdpa_flex" and sliding)

    def forward(self, x_BTD, window: int | None):
        B, T, _ = x_BTD.shape
        q, k, v, positions = self.qkv(x_BTD)
        scale = 1.0 / math.sqrt(self.cfg.head_dim)
        if self.uses_flex(T):
            from torch.nn.attention.flex_attention import flex_attention
            out = flex_attention(q, k, v, block_mask=self.block_mask, scale=scale)
        elif window is not None and window < T:  # SDPA has no window: an explicit mask (no flash kernel)
            t = positions[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=(positions[None, :] <= t) &
                                                 (t - positions[None, :] < window), scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def fast_toylm(cfg: Config, kernel: str) -> ToyLM:
    """A ``ToyLM`` whose attention modules are ``FastAttention`` (state_dict names unchanged)."""
    model = ToyLM(cfg)
    for i, block in enumerate(model.model.layers):
        fast = FastAttention(cfg, kernel, cfg.layer_window(i))
        fast.load_state_dict(block.self_attn.state_dict())
        block.self_attn = fast
    return model


def prepare(model: ToyLM, seq_len: int, device) -> None:
    for block in model.model.layers:
        block.self_attn.prepare(seq_len, device)


# --------------------------------------------------------------------------- Muon


QUINTIC = ((3.4445, -4.7750, 2.0315),)


def newton_schulz(x_BRC, coefficients, eps: float = 1e-7):
    """jaxlm.optim.muon.newton_schulz for a (batch, rows, cols) stack, rows <= cols."""
    x_BRC = x_BRC / (torch.linalg.matrix_norm(x_BRC, keepdim=True) + eps)
    for a, b, c in coefficients:
        gram_BRR = x_BRC @ x_BRC.mT
        x_BRC = a * x_BRC + (b * gram_BRR + c * gram_BRR @ gram_BRR) @ x_BRC
    return x_BRC


class BatchedMuon(torch.optim.Optimizer):
    """Muon as ``jaxlm.optim.scale_by_muon`` computes it (``M = beta M + G``; Nesterov ``G + beta M``;
    quintic Newton–Schulz; update scale ``max(1, fan_out / fan_in) ** 0.5``; decoupled weight decay),
    for torch ``(out, in)`` weights, with the matrices of each shape stacked into one batch."""

    def __init__(self, params, lr: float, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype=torch.float32, weight_decay: float = 0.0, compile: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))
        self.coefficients = QUINTIC * ns_steps
        self.ns_dtype = ns_dtype
        self.newton_schulz = torch.compile(newton_schulz) if compile else newton_schulz
        self.stacks = []   # (group, [params of one shape], momentum [n, out, in])
        for group in self.param_groups:
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes matrices; got a parameter of shape {tuple(p.shape)}")
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, members in by_shape.items():
                momentum_buffer = torch.zeros((len(members), *shape), dtype=torch.float32, device=members[0].device)
                self.stacks.append((group, members, momentum_buffer))

    @torch.no_grad()
    def step(self, closure=None):
        for group, members, momentum_buffer in self.stacks:
            beta, lr = group["momentum"], group["lr"]
            grads = torch.stack([p.grad for p in members]).float()
            momentum_buffer.mul_(beta).add_(grads)
            direction = grads.add(momentum_buffer, alpha=beta) if group["nesterov"] else momentum_buffer
            fan_out, fan_in = members[0].shape
            wide = fan_out <= fan_in  # orthogonalise the wide orientation: the Gram matrix is the small one
            x = direction if wide else direction.mT
            x = self.newton_schulz(x.to(self.ns_dtype), self.coefficients).float()
            update = x if wide else x.mT
            if group["weight_decay"]:
                torch._foreach_mul_(members, 1.0 - lr * group["weight_decay"])
            scale = max(1.0, fan_out / fan_in) ** 0.5
            torch._foreach_add_(members, list(update.unbind(0)), alpha=-lr * scale)


def build_optimizers(model: ToyLM, optim: dict, device_type: str):
    """Muon for the blocks' matrices, AdamW for the embedding and norms (jaxlm's split and lrs)."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        (muon if p.ndim == 2 and "embed" not in name else adamw).append(p)
    adamw_lr = optim["adamw_lr"] if optim.get("adamw_lr") is not None else optim["lr"] * optim["adamw_lr_ratio"]
    fused = device_type == "cuda"
    opt_adamw = torch.optim.AdamW(adamw, lr=adamw_lr, betas=(optim["b1"], optim["b2"]), eps=optim["eps"],
                                  weight_decay=optim["weight_decay"], fused=fused)
    if optim["name"] == "adamw":
        return [torch.optim.AdamW(muon, lr=optim["lr"], betas=(optim["b1"], optim["b2"]), eps=optim["eps"],
                                  weight_decay=optim["weight_decay"], fused=fused), opt_adamw]
    if optim["ns_coefficients"] != "quintic":
        raise ValueError(f"the PyTorch side implements the quintic Newton–Schulz only, not {optim['ns_coefficients']!r}")
    opt_muon = BatchedMuon(muon, lr=optim["lr"], momentum=optim["momentum"], nesterov=optim["nesterov"],
                           ns_steps=optim["ns_steps"], ns_dtype=getattr(torch, optim["ns_dtype"]),
                           weight_decay=optim["muon_weight_decay"], compile=device_type == "cuda")
    return [opt_muon, opt_adamw]


# --------------------------------------------------------------------------- timing


def model_config(model_dict: dict) -> Config:
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in model_dict.items() if k in known})


def time_train_step(spec: dict) -> dict:
    """Compile and time the PyTorch step the spec describes (``jaxlm.bench`` builds the spec)."""
    cfg_dict, kernel = spec["config_dict"], spec["variant"]
    B, T, G = spec["batch"], spec["seq"], spec["grad_accum"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True   # as XLA's default float32 matmul on GPU
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg_dict.get("seed", 0))

    cfg = model_config(cfg_dict["model"])
    model = fast_toylm(cfg, kernel).to(device)
    prepare(model, T, device)
    # On a CPU (smoke tests) compiling costs more than it saves.
    compiled = torch.compile(model) if spec.get("compile", device.type == "cuda") else model
    optimizers = build_optimizers(model, cfg_dict["optim"], device.type)
    params = list(model.parameters())
    clip = cfg_dict["optim"]["grad_clip"]

    generator = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (G, B, T + 1), generator=generator).to(device) for _ in range(2)]

    def step(tokens_GBT1):
        for tokens_BT1 in tokens_GBT1:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                _, loss = compiled(tokens_BT1[:, :-1], tokens_BT1[:, 1:])
            (loss / G).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [float(step(batches[0]))]          # compiles the forward, backward and Newton–Schulz
    compile_s = time.perf_counter() - start
    for i in range(spec["warmup"]):
        losses.append(float(step(batches[(i + 1) % 2])))
    block_times = []
    for _ in range(spec["repeats"]):
        sync()
        start = time.perf_counter()
        for i in range(spec["steps"]):
            loss = step(batches[i % 2])
        sync()
        block_times.append((time.perf_counter() - start) / spec["steps"])
    losses.append(float(loss))
    return {
        "step_s": sorted(block_times)[len(block_times) // 2], "step_s_all": block_times, "compile_s": compile_s,
        "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "first_loss": losses[0], "last_loss": losses[-1],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "devices": 1,
        "versions": f"torch {torch.__version__}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.torch_port.bench_torch", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="a row as jaxlm.bench writes it (JSON)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    result = time_train_step(json.loads(args.spec))
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
