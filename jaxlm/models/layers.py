"""Building blocks shared by the families: RMSNorm, RoPE, SwiGLU, the attention core.

Kernels are in Flax layout ``(in, out)`` and carry logical axis names (``embed``,
``heads``, ``mlp``, ``vocab``) that ``jaxlm/sharding.py`` maps onto the mesh. Nothing
here knows about devices or PyTorch names.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Parameters carry logical axis names as metadata; they are placed on the mesh by
# jaxlm/sharding.py after creation, not eagerly by Flax (which would need a mesh at
# construction time and would put device logic into model code).
nnx.use_eager_sharding(False)

INIT_STD = 0.02


def dense(in_features: int, out_features: int, axes: tuple[str, str], *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free projection with float32 master weights and ``dtype`` compute."""
    return nnx.Linear(
        in_features, out_features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(INIT_STD), axes), rngs=rngs)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32; the scale is the weight ``w`` itself (initialised to ones)."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.w = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.w[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.gate = dense(dim, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up = dense(dim, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down = dense(hidden, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD):
        return self.down(jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD))


def rope(x_BTHK, positions_BT, *, theta: float, pairing: str):
    """Rotary position embedding on the last axis, computed in float32.

    ``rotate_half`` pairs dimension i with i + K/2 (Llama/HF); ``interleaved`` pairs
    2i with 2i + 1 (the original RoFormer / Meta-Llama complex form).
    """
    head_dim = x_BTHK.shape[-1]
    inv_freq_K2 = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_BTK2 = positions_BT.astype(jnp.float32)[..., None] * inv_freq_K2
    cos_BT1K2 = jnp.cos(angle_BTK2)[:, :, None, :]
    sin_BT1K2 = jnp.sin(angle_BTK2)[:, :, None, :]
    x32 = x_BTHK.astype(jnp.float32)
    if pairing == "rotate_half":
        x1, x2 = jnp.split(x32, 2, axis=-1)
        out = jnp.concatenate([x1 * cos_BT1K2 - x2 * sin_BT1K2, x2 * cos_BT1K2 + x1 * sin_BT1K2], axis=-1)
    elif pairing == "interleaved":
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
        out = jnp.stack([x1 * cos_BT1K2 - x2 * sin_BT1K2, x2 * cos_BT1K2 + x1 * sin_BT1K2], axis=-1)
        out = out.reshape(x32.shape)
    else:
        raise ValueError(f"unknown RoPE pairing {pairing!r}")
    return out.astype(x_BTHK.dtype)


def attention_implementation(dtype) -> str:
    """cuDNN flash attention on GPU for half precision, XLA everywhere else."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def causal_attention(q_BTHK, k_BSHK, v_BSHK, *, window: int | None, implementation: str | None = None):
    """Causal softmax attention, optionally restricted to a sliding window of ``window`` keys.

    A query at position t sees keys t-window+1 ... t (``window`` keys including itself),
    which is ``local_window_size=(window - 1, 0)``. ``is_causal=True`` is always passed:
    cuDNN given a window without it would let queries see the future.
    """
    implementation = implementation or attention_implementation(q_BTHK.dtype)
    return jax.nn.dot_product_attention(
        q_BTHK, k_BSHK, v_BSHK,
        scale=1.0 / math.sqrt(q_BTHK.shape[-1]),
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )
