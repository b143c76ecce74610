"""The mixture of experts: bias-routed top-k, sqrt-softplus scores, a shared expert (SPEC 3.7).

Routing, per token: ``s = sqrt(softplus(W_g x))`` in float32; the k experts with the largest
``s + bias`` are chosen (the bias only chooses); their weights are the *unbiased* scores
renormalised to sum to one, times ``routed_scaling_factor``. The output is the weighted sum of
the chosen experts plus the unweighted shared expert.

The routed experts' weights are stacked on a leading ``experts`` axis, and only the chosen
experts run on a token, by one of two dispatches that compute the same function:

- ``ragged``: the (token, expert) assignments sorted by expert, each projection one grouped
  matmul (``jax.lax.ragged_dot``) over the sorted rows, then unsorted. Static shapes (N x k
  rows), no host sync, no loop over experts.
- ``dense_capacity``: each expert gets a fixed buffer of ``capacity`` rows, filled in token
  order by a scatter, one batched matmul over ``[experts, capacity]``, gathered back. With the
  default capacity (every token) nothing is dropped.

The router bias is a :class:`~jaxlm.models.family.Buffer`: upstream gives it no gradient (it
is a parameter nothing updates), so it is checkpointed but not trained, and read through
``stop_gradient``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models import family, layers


def scores_of(logits_NE, scoring_func: str):
    """Routing scores from float32 gate logits."""
    if scoring_func == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits_NE))
    if scoring_func == "softmax":
        return jax.nn.softmax(logits_NE, axis=-1)
    if scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits_NE)
    raise ValueError(f"unknown scoring_func {scoring_func!r}")


def swiglu(gate, up, limit: float):
    """``silu(gate) * up``; with ``limit`` > 0 the up-projection is clamped to [-limit, limit]
    and the gate from above at limit (routed experts only)."""
    if limit > 0:
        up = jnp.clip(up, -limit, limit)
        gate = jnp.minimum(gate, limit)
    return jax.nn.silu(gate) * up


class Router(nnx.Module):
    def __init__(self, dim: int, n_experts: int, *, with_bias: bool, rngs: nnx.Rngs):
        self.kernel = nnx.Param(layers.INIT_STD * jax.random.normal(rngs.params(), (dim, n_experts), jnp.float32),
                                out_sharding=("embed", "norm"))
        self.bias = family.Buffer(jnp.zeros((n_experts,), jnp.float32), out_sharding=("norm",)) if with_bias else None

    def __call__(self, x_ND, *, k: int, scoring_func: str, scale: float):
        """``(experts_NK, weights_NK, scores_NE)``: the chosen experts in descending biased score."""
        logits_NE = jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        scores_NE = scores_of(logits_NE, scoring_func)
        biased_NE = scores_NE if self.bias is None else scores_NE + jax.lax.stop_gradient(self.bias[...])
        _, experts_NK = jax.lax.top_k(biased_NE, k)
        chosen_NK = jnp.take_along_axis(scores_NE, experts_NK, axis=-1)
        if scoring_func != "softmax":
            chosen_NK = chosen_NK / (jnp.sum(chosen_NK, axis=-1, keepdims=True) + 1e-20)
        return experts_NK, chosen_NK * scale, scores_NE


class Experts(nnx.Module):
    """The routed experts' SwiGLU weights, stacked: ``w1``/``w3`` ``[E, D, F]``, ``w2`` ``[E, F, D]``."""

    def __init__(self, n_experts: int, dim: int, hidden: int, *, rngs: nnx.Rngs):
        init = lambda shape, axes: nnx.Param(layers.INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32),
                                             out_sharding=axes)
        self.w1 = init((n_experts, dim, hidden), ("experts", "embed", "mlp"))   # gate projection
        self.w3 = init((n_experts, dim, hidden), ("experts", "embed", "mlp"))   # up projection
        self.w2 = init((n_experts, hidden, dim), ("experts", "mlp", "embed"))   # down projection


WEIGHT_GRAD_TILE = 256   # rows per tile of the grouped weight gradient


@jax.custom_vjp
def grouped_matmul(x_AK, w_EKN, sizes_E):
    """``jax.lax.ragged_dot``: rows ``x_AK`` sorted by group, group ``e`` (``sizes_E[e]`` rows) times
    ``w_EKN[e]``; float32 out. Its weight gradient is computed tile by tile (below), not by the
    autodiff of ragged_dot, which XLA:GPU lowers to a dense product over every group with the
    rows of the others masked out: E times the arithmetic, and an ``[E, A, N]`` float32 copy."""
    return jax.lax.ragged_dot(x_AK, w_EKN, sizes_E, preferred_element_type=jnp.float32)


def _grouped_matmul_fwd(x_AK, w_EKN, sizes_E):
    return grouped_matmul(x_AK, w_EKN, sizes_E), (x_AK, w_EKN, sizes_E)


def grouped_weight_grad(x_AK, dy_AN, sizes_E, tile: int = WEIGHT_GRAD_TILE):
    """``[E, K, N]`` float32: ``x_e^T dy_e`` per group of sorted rows. Each group is cut into tiles of
    ``tile`` rows (its last one zero-padded); one batched matmul over the tiles, then a sum of each
    group's tiles. The tiles are a static upper bound, ``A / tile + E``: the arithmetic is the
    groups' own plus at most one tile each."""
    A, E = x_AK.shape[0], sizes_E.shape[0]
    n_tiles = -(-A // tile) + E
    tiles_E = -(-sizes_E // tile)
    first_tile_E = jnp.cumsum(tiles_E) - tiles_E
    first_row_E = jnp.cumsum(sizes_E) - sizes_E
    t = jnp.arange(n_tiles)
    group_T = jnp.clip(jnp.searchsorted(jnp.cumsum(tiles_E), t, side="right"), 0, E - 1)
    within_TI = (t - first_tile_E[group_T])[:, None] * tile + jnp.arange(tile)[None, :]
    valid_TI = (within_TI < sizes_E[group_T][:, None]) & (t < jnp.sum(tiles_E))[:, None]
    rows_TI = jnp.where(valid_TI, first_row_E[group_T][:, None] + within_TI, 0)
    take = lambda y: jnp.where(valid_TI[..., None], y[rows_TI], 0).astype(y.dtype)
    dw_TKN = jnp.einsum("tik,tin->tkn", take(x_AK), take(dy_AN), preferred_element_type=jnp.float32)
    return jax.ops.segment_sum(dw_TKN, group_T, num_segments=E, indices_are_sorted=True)


def _grouped_matmul_bwd(residuals, dy_AN):
    x_AK, w_EKN, sizes_E = residuals
    dy = dy_AN.astype(x_AK.dtype)
    dx_AK = jax.lax.ragged_dot(dy, jnp.swapaxes(w_EKN, 1, 2), sizes_E, preferred_element_type=jnp.float32)
    dw_EKN = grouped_weight_grad(x_AK, dy, sizes_E)
    return dx_AK.astype(x_AK.dtype), dw_EKN.astype(w_EKN.dtype), None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def ragged_dispatch(x_ND, experts_NK, experts: Experts, *, dtype, limit: float):
    """Every assignment's expert output ``[N, K, D]`` (float32), by sorting and grouped matmuls."""
    N, K = experts_NK.shape
    E = experts.w1.shape[0]
    flat_A = experts_NK.reshape(-1)                          # assignment a = token a // K
    order_A = jnp.argsort(flat_A, stable=True)
    sizes_E = jnp.bincount(flat_A, length=E).astype(jnp.int32)
    x_AD = x_ND.astype(dtype)[order_A // K]
    mm = lambda lhs, w: grouped_matmul(lhs, w[...].astype(dtype), sizes_E)
    act_AF = swiglu(mm(x_AD, experts.w1), mm(x_AD, experts.w3), limit).astype(dtype)
    y_AD = mm(act_AF, experts.w2)
    inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(N * K, dtype=order_A.dtype))
    return y_AD[inverse_A].reshape(N, K, -1)


def capacity(n_tokens: int, k: int, n_experts: int, factor: float) -> int:
    """Rows of each expert's buffer: every token (factor 0), else factor x the mean load."""
    if factor <= 0:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(factor * n_tokens * k / n_experts)))


def dense_capacity_dispatch(x_ND, experts_NK, experts: Experts, *, dtype, limit: float, factor: float):
    """Every assignment's expert output ``[N, K, D]`` (float32; zero where dropped) through
    fixed ``[E, capacity]`` buffers and batched matmuls."""
    N, K = experts_NK.shape
    E, D, _ = experts.w1.shape
    C = capacity(N, K, E, factor)
    flat_A = experts_NK.reshape(-1)
    onehot_AE = jax.nn.one_hot(flat_A, E, dtype=jnp.int32)
    rank_A = jnp.take_along_axis(jnp.cumsum(onehot_AE, axis=0), flat_A[:, None], axis=1)[:, 0] - 1
    slot_A = jnp.where(rank_A < C, flat_A * C + rank_A, E * C)   # E * C: out of range, dropped
    x_AD = x_ND.astype(dtype)[jnp.arange(N * K) // K]
    x_ECD = jnp.zeros((E * C, D), dtype).at[slot_A].set(x_AD, mode="drop").reshape(E, C, D)
    mm = lambda lhs, w: jnp.einsum("ecd,edf->ecf", lhs, w[...].astype(dtype), preferred_element_type=jnp.float32)
    act_ECF = swiglu(mm(x_ECD, experts.w1), mm(x_ECD, experts.w3), limit).astype(dtype)
    y_ECD = mm(act_ECF, experts.w2).reshape(E * C, D)
    return y_ECD.at[slot_A].get(mode="fill", fill_value=0.0).reshape(N, K, D)


class MoE(nnx.Module):
    def __init__(self, cfg, *, with_bias: bool, dtype, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
        self.gate = Router(D, E, with_bias=with_bias, rngs=rngs)
        self.experts = Experts(E, D, F, rngs=rngs)
        self.shared_expert = layers.SwiGLU(D, F, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD):
        """``(y_BTD, experts_BTK, weights_BTK, entropy_BT)``; ``entropy``: of each token's
        normalised routing scores, for the logs."""
        cfg = self.cfg
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        experts_NK, weights_NK, scores_NE = self.gate(
            x_ND, k=cfg.num_experts_per_tok, scoring_func=cfg.scoring_func, scale=cfg.routed_scaling_factor)
        if cfg.moe_dispatch == "ragged":
            y_NKD = ragged_dispatch(x_ND, experts_NK, self.experts, dtype=self.dtype, limit=cfg.swiglu_limit)
        else:
            y_NKD = dense_capacity_dispatch(x_ND, experts_NK, self.experts, dtype=self.dtype,
                                            limit=cfg.swiglu_limit, factor=cfg.moe_capacity_factor)
        y_ND = jnp.einsum("nk,nkd->nd", weights_NK, y_NKD)
        y_ND = y_ND + self.shared_expert(x_ND.astype(self.dtype)).astype(jnp.float32)
        p_NE = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
        entropy_N = -jnp.sum(p_NE * jnp.log(jnp.maximum(p_NE, 1e-30)), axis=-1)
        return (y_ND.reshape(B, T, D).astype(x_BTD.dtype), experts_NK.reshape(B, T, -1),
                weights_NK.reshape(B, T, -1), entropy_N.reshape(B, T))
