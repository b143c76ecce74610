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

from jaxlm.config import REMAT_POLICIES
from jaxlm.switches import Switch, target_platform

# Parameters carry logical axis names as metadata; they are placed on the mesh by
# jaxlm/sharding.py after creation, not eagerly by Flax (which would need a mesh at
# construction time and would put device logic into model code).
nnx.use_eager_sharding(False)

INIT_STD = 0.02

# Logical axis name -> mesh axes for activations, chosen by jaxlm.sharding.use_mesh while a
# mesh is in use; unset, activation layouts are left to XLA.
ACTIVATION_RULES = Switch("activation rules")


def constrain(x, *logical_axes: str | None):
    """Pin an activation's layout by logical axis names (e.g. "batch", "length", "act_embed"; None: whole).

    A name the rules do not know is an error, not silently unsharded."""
    rules = ACTIVATION_RULES.get()
    if rules is None:
        return x
    unknown = [name for name in logical_axes if name and name not in rules]
    if unknown:
        raise ValueError(f"activation axis {unknown[0]!r} has no sharding rule; known: {', '.join(rules)}")
    spec = jax.sharding.PartitionSpec(*(rules[name] if name else None for name in logical_axes))
    return jax.lax.with_sharding_constraint(x, spec)


def dense(in_features: int, out_features: int, axes: tuple[str, str], *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free projection with float32 master weights and ``dtype`` compute."""
    return nnx.Linear(
        in_features, out_features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(INIT_STD), axes), rngs=rngs)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32. The scale is the weight ``w`` itself (initialised to ones), or
    with ``offset=1.0`` the Gemma form ``1 + w`` (``w`` initialised to zeros), as checkpoints store it."""

    def __init__(self, dim: int, eps: float, *, offset: float = 0.0):
        self.eps, self.offset = eps, offset
        self.w = nnx.Param(jnp.full((dim,), 1.0 - offset, jnp.float32), out_sharding=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.w[...] + self.offset if self.offset else self.w[...]
        return (x32 * scale).astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.gate = dense(dim, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up = dense(dim, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down = dense(hidden, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD):
        return self.down(jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD))


def rope_frequencies(head_dim: int, theta: float):
    """``[head_dim / 2]`` float32 angular frequencies of RoPE's pairs: ``theta ** (-2i / head_dim)``."""
    return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def rope(x_BTHK, positions_BT, *, theta: float, pairing: str):
    """Rotary position embedding on the last axis, computed in float32.

    ``rotate_half`` pairs dimension i with i + K/2 (Llama/HF); ``interleaved`` pairs
    2i with 2i + 1 (the original RoFormer / Meta-Llama complex form).
    """
    angle_BTK2 = positions_BT.astype(jnp.float32)[..., None] * rope_frequencies(x_BTHK.shape[-1], theta)
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


def _remat_policy(remat: str):
    if remat == "full":   # keep only each block's input; recompute the whole block in the backward pass
        return jax.checkpoint_policies.nothing_saveable
    if remat == "dots":   # keep the projections' outputs; recompute norms, RoPE, activations, attention
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {remat!r}; allowed: {', '.join(REMAT_POLICIES)}")


def repeat_period(graphdefs) -> tuple[int, int]:
    """``(period, groups)``: the leading ``groups`` x ``period`` blocks repeat with that period.

    Blocks whose graphdefs are equal have the same structure and static settings (a sliding
    and a global block differ in their window), so alternating sliding/global layers repeat
    with period 2. Chosen to cover the most layers; ``groups`` < 2 means nothing repeats.
    """
    n, best = len(graphdefs), (1, 0)
    for period in range(1, n // 2 + 1):
        groups = 1
        while (groups + 1) * period <= n and all(
                graphdefs[groups * period + j] == graphdefs[j] for j in range(period)):
            groups += 1
        if groups >= 2 and groups * period > best[0] * best[1]:
            best = (period, groups)
    return best


def run_blocks(blocks, x, *args, remat: str = "none", scan: bool = False):
    """``x = block(x, *args)`` for each block in order: the same function, computed faster or leaner.

    ``remat`` recomputes each block's activations in the backward pass instead of keeping them
    (``REMAT_POLICIES``), trading compute for memory so that larger batches fit. ``scan`` runs
    the repeating part of the stack as one ``jax.lax.scan`` over groups of layers, so XLA
    compiles one group instead of every layer: the parameters are stacked per step, not stored
    stacked, so checkpoints and the parameter tree do not change.
    """
    split = [nnx.split(block) for block in blocks]

    def apply(graphdef, state, x):
        # Block boundaries are where the activation layout is pinned (a no-op without a mesh).
        return nnx.merge(graphdef, state)(constrain(x, "batch", "length", "act_embed"), *args)

    if remat != "none":
        apply = jax.checkpoint(apply, policy=_remat_policy(remat), static_argnums=(0,))
    period, groups = repeat_period([graphdef for graphdef, _ in split]) if scan else (1, 0)
    if groups >= 2:
        graphdefs = [graphdef for graphdef, _ in split[:period]]
        stacked = [jax.tree.map(lambda *layers: jnp.stack(layers),
                                *(split[g * period + j][1] for g in range(groups)))
                   for j in range(period)]

        def group(x, states):
            for graphdef, state in zip(graphdefs, states):
                x = apply(graphdef, state, x)
            return x, None

        x, _ = jax.lax.scan(group, x, stacked)
        split = split[groups * period:]
    for graphdef, state in split:
        x = apply(graphdef, state, x)
    return constrain(x, "batch", "length", "act_embed")


# ``with ATTENTION.scope("xla"):`` forces an implementation (benchmarks time XLA's against cuDNN's).
ATTENTION = Switch("attention implementation", ("xla", "cudnn", "splash"))


def attention_implementation(dtype) -> str:
    """Splash attention on TPU, cuDNN flash attention on GPU for half precision, XLA elsewhere."""
    if ATTENTION.get():
        return ATTENTION.get()
    if target_platform() == "tpu":
        return "splash"
    if target_platform() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def causal_attention(q_BTHK, k_BSHK, v_BSHK, *, window: int | None, implementation: str | None = None):
    """Causal softmax attention, optionally restricted to a sliding window of ``window`` keys.

    A query at position t sees keys t-window+1 ... t (``window`` keys including itself),
    which is ``local_window_size=(window - 1, 0)``. ``is_causal=True`` is always passed:
    cuDNN given a window without it would let queries see the future. Keys and values may
    have fewer heads than queries (grouped-query attention), dividing them.
    """
    implementation = implementation or attention_implementation(q_BTHK.dtype)
    # Sequences and heads split, as the projections made them. cuDNN's partitioner refuses
    # query/key/value of different layouts, which Shardy's propagation produced under FSDP
    # when no activation was pinned (tests/test_sharding.py watches that check).
    q_BTHK, k_BSHK, v_BSHK = (constrain(x, "batch", "length", "act_heads", None) for x in (q_BTHK, k_BSHK, v_BSHK))
    if implementation == "splash":
        from jaxlm.models import splash   # Pallas' TPU kernels load only where they are used
        # The real Mosaic kernel where the program is for a TPU, Pallas' interpreter elsewhere.
        return splash.attention(q_BTHK, k_BSHK, v_BSHK, window=window, rules=ACTIVATION_RULES.get(),
                                interpret=target_platform() != "tpu")
    return jax.nn.dot_product_attention(
        q_BTHK, k_BSHK, v_BSHK,
        scale=1.0 / math.sqrt(q_BTHK.shape[-1]),
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )
