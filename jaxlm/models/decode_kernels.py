"""Fused Pallas (Triton) kernels for the decode step of a pre-norm transformer layer, on GPU.

Why: decoding a small batch is a chain of dependent kernels (about 12 a layer with XLA), each
bound by its latency rather than by what it reads: at 2 rows a projection takes ~3 us where its
weights take under 1 us to read (docs/PERFORMANCE.md, "Generation"). Fewer kernels is what makes
a step faster, so here a layer is three kinds of kernel plus the cached attention
(``kv_cache.attend_one_token``):

    norm_qkv_rope   RMSNorm, the Q, K and V projections, RoPE on Q and K     (one kernel)
    project_add     a projection added into the float32 residual stream      (O; the MLP's down)
    norm_swiglu     RMSNorm, the gate and up projections, SiLU(gate) * up    (one kernel)

Each program computes a tile of output columns for a tile of rows from whole input rows (a
model dimension of a few hundred to a few thousand), so no program needs another's result; the
norm is recomputed by every program, which is cheaper than a kernel of its own.

Numerics follow the XLA path (``layers.py``): norms, RoPE and sums in float32, and rounding to
the compute dtype wherever XLA's ops produce it (a projection's output, RoPE's, SiLU's). The
kernels take rows in multiples of ``ROW_TILE`` (a Triton dot needs 16) and power-of-two sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
ROW_TILE = 16       # rows per program: the fewest a Triton dot takes, and the most programs
COLUMN_TILE = 64    # output columns per program of project_add and norm_swiglu
INNER_TILE = 256    # input columns per step of project_add's loop (bounds its registers)
SPLIT_INNER = 512   # input columns per program of project_add; longer inputs are split
ROPE_SPLIT = 1      # programs per head in norm_qkv_rope (each takes head_dim / 2 / ROPE_SPLIT pairs)
WARPS, STAGES = 4, 2


# "xla", "fused" or "fused_interpret" (the kernels run by the Pallas interpreter, on any
# backend: the CPU tests) forces a decode path; None chooses (``implementation``).
IMPLEMENTATION_OVERRIDE: str | None = None


def implementation(dtype, rows: int, dim: int, heads_dim: int, head_dim: int, hidden: int) -> str:
    """"fused" on GPU for half precision where the kernels tile the shapes, else "xla".

    Triton blocks are powers of two: rows are a multiple of ``ROW_TILE`` or a power of two below
    it (``padded_rows``), and so are the model's sizes.
    """
    pow2 = lambda n: n > 0 and n & (n - 1) == 0
    tiles = ((rows % ROW_TILE == 0 or pow2(rows)) and all(pow2(n) for n in (dim, heads_dim, head_dim, hidden))
             and head_dim >= 32 and min(dim, heads_dim, hidden) >= COLUMN_TILE)
    if IMPLEMENTATION_OVERRIDE:
        return IMPLEMENTATION_OVERRIDE if tiles or IMPLEMENTATION_OVERRIDE == "xla" else "xla"
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and tiles:
        return "fused"
    return "xla"


def padded_rows(rows: int) -> int:
    """Rows to decode ``rows`` sequences with (copies of a real row fill the rest; they are
    dropped). On GPU at least 2: XLA turns a one-row matmul into an elementwise product and a
    reduction (two kernels, the product written out), slower than two rows. Wherever the fused
    kernels may run, a power of two below ``ROW_TILE``, else a multiple of it."""
    fused = jax.default_backend() == "gpu" or (IMPLEMENTATION_OVERRIDE or "").startswith("fused")
    if not fused:
        return rows
    if rows < ROW_TILE:
        return max(2, 1 << (rows - 1).bit_length())
    return -(-rows // ROW_TILE) * ROW_TILE


def _round(x, dtype):
    """``x`` rounded to ``dtype`` and back to float32: where XLA's op would hand on ``dtype``."""
    return x.astype(dtype).astype(F32)


def _row_tile(rows: int) -> int:
    """Rows per program: ``ROW_TILE``, or all of them when fewer (a power of two, see ``_matmul``)."""
    return ROW_TILE if rows % ROW_TILE == 0 else rows


def _matmul(x, w):
    """``x @ w`` in float32. Triton's dot takes 16 rows at least; fewer (a GEMV, decoding one or a
    few sequences) are a broadcast product summed over the input, so that nothing is padded."""
    if x.shape[0] >= ROW_TILE:
        return jnp.dot(x, w, preferred_element_type=F32)
    return jnp.sum(x.astype(F32)[:, :, None] * w.astype(F32)[None, :, :], axis=1)


def _project(x, w):
    """``x @ w`` accumulated in float32 and rounded to the weights' dtype, as a bf16 Linear."""
    return _round(_matmul(x, w), w.dtype)


def _normed_projections(x_ref, norm_ref, eps: float, *weights):
    """``RMSNorm(x) @ w`` for each ``w``: whole rows normalised in float32, cast, projected."""
    x = x_ref[...].astype(F32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=1, keepdims=True) + eps)
    x = (x * norm_ref[...][None, :]).astype(weights[0].dtype)
    return [_project(x, w) for w in weights]


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, name, *args):
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton
        params["compiler_params"] = pl_triton.CompilerParams(num_warps=WARPS, num_stages=STAGES)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=interpret, name=name, **params)(*args)


# --------------------------------------------------------------------------- RMSNorm + Q/K/V + RoPE


def _norm_qkv_rope_kernel(x_ref, norm_ref, w_ref, cos_ref, sin_ref, q_ref, k_ref, v_ref, *, eps, n_heads, split):
    """Program (row tile, j, part): column block j of [Q | K | V] (head ``j mod H`` of Q, K or V),
    its RoPE pairs (d, d + head_dim/2) for d in part ``part`` of ``split`` (rotate_half pairing)."""
    which = pl.program_id(1) // n_heads
    part = pl.program_id(2)
    half = q_ref.shape[1] // 2
    width = half // split
    first_cols, second_cols = pl.ds(part * width, width), pl.ds(half + part * width, width)
    w_first, w_second = w_ref[:, first_cols], w_ref[:, second_cols]   # loads issued before the norm's
    first, second = _normed_projections(x_ref, norm_ref, eps, w_first, w_second)
    rotate = which < 2                                                 # V is not rotated
    cos = jnp.where(rotate, cos_ref[:, first_cols], 1.0)
    sin = jnp.where(rotate, sin_ref[:, first_cols], 0.0)
    first, second = first * cos - second * sin, second * cos + first * sin
    for index, out_ref in enumerate((q_ref, k_ref, v_ref)):
        @pl.when(which == index)
        def _(out_ref=out_ref):
            out_ref[:, first_cols] = first.astype(out_ref.dtype)
            out_ref[:, second_cols] = second.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "head_dim", "interpret"))
def norm_qkv_rope(x_BD, norm_D, wqkv_D3N, cos_BR, sin_BR, *, eps: float, head_dim: int, interpret: bool = False):
    """``(q, k, v)``, each ``[B, heads * head_dim]`` in the weights' dtype: RMSNorm(x) projected by
    ``[Wq | Wk | Wv]`` (``decode_weights``), q and k rotated (rotate_half pairing; ``cos``/``sin``
    are ``[B, head_dim / 2]``)."""
    B, D = x_BD.shape
    N = wqkv_D3N.shape[1] // 3
    n_heads = N // head_dim
    split = min(ROPE_SPLIT, head_dim // 32)   # a part keeps at least 16 pairs: a Triton dot's minimum
    rt = _row_tile(B)
    rows = lambda cols: pl.BlockSpec((rt, cols), lambda i, j, p: (i, 0))
    out = pl.BlockSpec((rt, head_dim), lambda i, j, p: (i, j % n_heads))
    kernel = functools.partial(_norm_qkv_rope_kernel, eps=eps, n_heads=n_heads, split=split)
    return _call(kernel, (B // rt, 3 * n_heads, split),
                 [rows(D), pl.BlockSpec((D,), lambda i, j, p: (0,)),
                  pl.BlockSpec((D, head_dim), lambda i, j, p: (0, j)), rows(head_dim // 2), rows(head_dim // 2)],
                 [out, out, out], [jax.ShapeDtypeStruct((B, N), wqkv_D3N.dtype)] * 3, interpret, "norm_qkv_rope",
                 x_BD, norm_D, wqkv_D3N, cos_BR, sin_BR)


# --------------------------------------------------------------------------- projection + residual


def _project_kernel(h_ref, w_ref, *refs, inner_tile):
    """``h @ w`` over this program's input columns; added to the residual when it has all of them."""
    *residual_ref, out_ref = refs

    def step(s, acc):
        cols = pl.ds(pl.multiple_of(s * inner_tile, inner_tile), inner_tile)
        return acc + _matmul(h_ref[:, cols], w_ref[cols, :])

    acc = jax.lax.fori_loop(0, h_ref.shape[1] // inner_tile, step, jnp.zeros(out_ref.shape, F32))
    out_ref[...] = residual_ref[0][...] + _round(acc, w_ref.dtype) if residual_ref else acc


@functools.partial(jax.jit, static_argnames=("interpret",))
def project_add(h_BN, w_ND, residual_BD, *, interpret: bool = False):
    """``residual + h @ w``: the projection rounded to the weights' dtype, the sum float32.

    A long input (the MLP's down projection) is split over programs, ``SPLIT_INNER`` columns
    each, so that more of the GPU reads the weights; their float32 partial sums are added in a
    fixed order by the XLA fusion that adds the residual (no atomics: the result is deterministic).
    """
    B, N = h_BN.shape
    D = w_ND.shape[1]
    splits = max(1, N // SPLIT_INNER)
    part = N // splits
    kernel = functools.partial(_project_kernel, inner_tile=min(INNER_TILE, part))
    rt = _row_tile(B)
    grid = (B // rt, D // COLUMN_TILE, splits)
    inputs = [pl.BlockSpec((rt, part), lambda i, j, s: (i, s)),
              pl.BlockSpec((part, COLUMN_TILE), lambda i, j, s: (s, j))]
    h_BN, residual_BD = h_BN.astype(w_ND.dtype), residual_BD.astype(F32)
    if splits == 1:
        tile = pl.BlockSpec((rt, COLUMN_TILE), lambda i, j, s: (i, j))
        return _call(kernel, grid, inputs + [tile], tile, jax.ShapeDtypeStruct((B, D), F32), interpret, "project_add",
                     h_BN, w_ND, residual_BD)
    partials_SBD = _call(kernel, grid, inputs, pl.BlockSpec((None, rt, COLUMN_TILE), lambda i, j, s: (s, i, j)),
                         jax.ShapeDtypeStruct((splits, B, D), F32), interpret, "project_split", h_BN, w_ND)
    return residual_BD + _round(partials_SBD.sum(0), w_ND.dtype)


# --------------------------------------------------------------------------- RMSNorm + SwiGLU


def _norm_swiglu_kernel(x_ref, norm_ref, wg_ref, wu_ref, out_ref, *, eps):
    dtype = wg_ref.dtype
    w_gate, w_up = wg_ref[...], wu_ref[...]   # loads issued before the norm's
    gate, up = _normed_projections(x_ref, norm_ref, eps, w_gate, w_up)
    silu = _round(gate * _round(1.0 / (1.0 + jnp.exp(-gate)), dtype), dtype)
    out_ref[...] = (silu * up).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def norm_swiglu(x_BD, norm_D, wg_DF, wu_DF, *, eps: float, interpret: bool = False):
    """``silu(gate(n)) * up(n)`` for ``n = RMSNorm(x)``, ``[B, F]`` in the weights' dtype."""
    B, D = x_BD.shape
    F = wg_DF.shape[1]
    column = pl.BlockSpec((D, COLUMN_TILE), lambda i, j: (0, j))
    rt = _row_tile(B)
    return _call(functools.partial(_norm_swiglu_kernel, eps=eps), (B // rt, F // COLUMN_TILE),
                 [pl.BlockSpec((rt, D), lambda i, j: (i, 0)), pl.BlockSpec((D,), lambda i, j: (0,)),
                  column, column],
                 pl.BlockSpec((rt, COLUMN_TILE), lambda i, j: (i, j)), jax.ShapeDtypeStruct((B, F), wg_DF.dtype),
                 interpret, "norm_swiglu", x_BD, norm_D, wg_DF, wu_DF)
