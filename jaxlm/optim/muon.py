"""Muon: SGD momentum, Newton–Schulz orthogonalisation, a shape-dependent update scale.

One step, for every matrix W with gradient G (ToyLM spec and Llama Think's ``muon.py`` agree):

    M <- beta * M + G                          (plain sum, no dampening)
    U  = G + beta * M   (Nesterov)   or   M
    X  = U / (||U||_F + 1e-7);  5 times:  A = X X^T;  X <- a X + (b A + c A^2) X
    update = scale(rows, cols) * X

Learning rate and decoupled weight decay are chained after this transform (see
``partition.build_optimizer``), as in optax's own Muon.

Why not ``optax.contrib.muon`` underneath: its momentum is a bias-corrected EMA
(``(1-beta) G``), so its Nesterov mix weights the fresh gradient differently from
``G + beta*M`` during the first steps and the 1e-7 of the normalisation meets another
scale — the Llama Think golden steps would not reproduce; its AdamW branch is Nesterov-Adam
whenever Muon uses Nesterov and shares Muon's ``eps``; by default it sends every 2-D leaf,
embeddings included, to Muon; and it orthogonalises leaf by leaf. Its reusable part, the
``MuonDimensionNumbers`` type that says which axes form the matrix, is used here.

Every parameter is read as a batch of matrices ``(batch, fan_in, fan_out)`` (leading axes of
stacked layers or experts are batch axes, so each matrix is orthogonalised on its own), turned
to the wide orientation (rows <= cols) so that the Gram matrix ``X X^T`` is the small one —
the polynomial satisfies f(X^T) = f(X)^T, so the result does not depend on it. Matrices of
equal shape from all leaves are then stacked and go through one batched Newton–Schulz, so
a model with dozens of layers costs a handful of batched matmul chains, not one per leaf.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

# One (a, b, c) row per iteration; a single row is reused for every iteration.
NS_COEFFICIENTS = {
    # Keller Jordan's quintic: maximal slope at 0, singular values end in ~[0.7, 1.2].
    "quintic": ((3.4445, -4.7750, 2.0315),),
    # Polar Express (Amsel et al. 2025, arXiv:2505.16932), the 5-step table of modded-nanogpt.
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
    # Classic cubic Newton–Schulz X <- 1.5 X - 0.5 X X^T X: converges to the polar factor, slowly.
    "cubic": ((1.5, -0.5, 0.0),),
}
# The Polar Express table was fitted for inputs normalised with a 2% margin below 1.
NS_NORM_SAFETY = {"polar_express": 1.02}
NS_NORM_EPS = 1e-7

UPDATE_SCALES = ("toylm", "llama_think", "moonlight", "none")

KERNEL_AXES = MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)  # Flax (..., in, out)

# (leaf's key path, leaf's shape) -> which axes form the matrix; the rest are batch axes.
MatrixAxesFn = Callable[[tuple, tuple[int, ...]], MuonDimensionNumbers]


def update_scale(kind: str, fan_in: int, fan_out: int) -> float:
    """The factor the orthogonalised update of one (fan_in, fan_out) matrix is multiplied by."""
    if kind == "toylm":        # Keller Jordan's Muon: only matrices that widen get more
        return max(1.0, fan_out / fan_in) ** 0.5
    if kind == "llama_think":  # Llama Think's muon.py: aspect ratio of the 2-D view
        return math.sqrt(max(fan_in, fan_out) / min(fan_in, fan_out))
    if kind == "moonlight":    # Moonlight: match AdamW's update RMS (~0.2)
        return 0.2 * math.sqrt(max(fan_in, fan_out))
    if kind == "none":
        return 1.0
    raise ValueError(f"unknown Muon update scale {kind!r}; allowed: {', '.join(UPDATE_SCALES)}")


def ns_coefficient_rows(name: str, ns_steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each of the ``ns_steps`` iterations."""
    rows = NS_COEFFICIENTS[name]
    if len(rows) == 1:
        return rows * ns_steps
    if ns_steps > len(rows):
        raise ValueError(f"coefficient set {name!r} has {len(rows)} iterations, asked for {ns_steps}")
    return rows[:ns_steps]


def newton_schulz(x_BRC: jax.Array, coefficients, norm_safety: float = 1.0,
                  eps: float = NS_NORM_EPS) -> jax.Array:
    """Approximately orthogonalise each matrix of a (batch, rows, cols) stack, rows <= cols."""
    norm_B11 = jnp.sqrt(jnp.sum(jnp.square(x_BRC), axis=(-2, -1), keepdims=True))
    x_BRC = x_BRC / (norm_B11 * norm_safety + eps)
    for a, b, c in coefficients:
        gram_BRR = x_BRC @ x_BRC.mT
        x_BRC = a * x_BRC + (b * gram_BRR + c * gram_BRR @ gram_BRR) @ x_BRC
    return x_BRC


class _MatrixView(NamedTuple):
    """A leaf read as a (batch, rows, cols) stack, wide, and how to undo that."""
    perm: tuple[int, ...]
    permuted_shape: tuple[int, ...]
    fan_in: int
    fan_out: int

    @property
    def transposed(self) -> bool:
        return self.fan_in > self.fan_out

    def to_matrices(self, x: jax.Array) -> jax.Array:
        x_BIO = jnp.transpose(x, self.perm).reshape(-1, self.fan_in, self.fan_out)
        return x_BIO.mT if self.transposed else x_BIO

    def from_matrices(self, x_BRC: jax.Array) -> jax.Array:
        x_BIO = x_BRC.mT if self.transposed else x_BRC
        inverse = sorted(range(len(self.perm)), key=self.perm.__getitem__)
        return jnp.transpose(x_BIO.reshape(self.permuted_shape), inverse)


def _matrix_view(shape: tuple[int, ...], axes: MuonDimensionNumbers) -> _MatrixView:
    as_tuple = lambda a: (a,) if isinstance(a, int) else tuple(a)
    fan_in_axes = tuple(a % len(shape) for a in as_tuple(axes.reduction_axis))
    fan_out_axes = tuple(a % len(shape) for a in as_tuple(axes.output_axis))
    if len(shape) < 2 or set(fan_in_axes) & set(fan_out_axes):
        raise ValueError(f"Muon needs disjoint fan-in/fan-out axes of a >= 2-D leaf; got {shape} with {axes}")
    batch_axes = tuple(a for a in range(len(shape)) if a not in fan_in_axes + fan_out_axes)
    perm = batch_axes + fan_in_axes + fan_out_axes
    return _MatrixView(perm, tuple(shape[a] for a in perm),
                       math.prod(shape[a] for a in fan_in_axes), math.prod(shape[a] for a in fan_out_axes))


def orthogonalize(tree, *, matrix_axes: MatrixAxesFn, coefficients, norm_safety: float = 1.0,
                  scale: str = "toylm", ns_dtype=jnp.float32):
    """Scaled Newton–Schulz of every leaf; same-shape matrices of all leaves share one batched call."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    views = [_matrix_view(x.shape, matrix_axes(path, x.shape)) for path, x in flat]
    matrices = [view.to_matrices(x) for view, (_, x) in zip(views, flat)]

    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(m.shape[1:], []).append(i)
    results = [None] * len(flat)
    for members in by_shape.values():
        stacked = jnp.concatenate([matrices[i] for i in members]) if len(members) > 1 else matrices[members[0]]
        ortho = newton_schulz(stacked.astype(ns_dtype), coefficients, norm_safety)
        offsets = list(itertools.accumulate(matrices[i].shape[0] for i in members))[:-1]
        for i, part in zip(members, jnp.split(ortho, offsets)):
            view, x = views[i], flat[i][1]
            results[i] = update_scale(scale, view.fan_in, view.fan_out) * view.from_matrices(part.astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, results)


class MuonState(NamedTuple):
    momentum: optax.Updates


def scale_by_muon(*, momentum: float = 0.95, nesterov: bool = True, ns_coefficients: str = "quintic",
                  ns_steps: int = 5, scale: str = "toylm", ns_dtype=jnp.float32,
                  matrix_axes: MatrixAxesFn = lambda path, shape: KERNEL_AXES) -> optax.GradientTransformation:
    """Muon's direction for every leaf of the tree it is given (chain lr and weight decay after it).

    ``matrix_axes(path, shape)`` says which axes of a leaf form the matrix; by default the last
    two, Flax ``(..., in, out)``, with any leading axes (stacked layers) as batch axes.
    """
    coefficients = ns_coefficient_rows(ns_coefficients, ns_steps)
    norm_safety = NS_NORM_SAFETY.get(ns_coefficients, 1.0)
    update_scale(scale, 1, 1)  # fail at construction, not inside jit

    def init_fn(params):
        return MuonState(momentum=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        new_momentum = jax.tree.map(lambda m, g: momentum * m + g, state.momentum, updates)
        direction = (jax.tree.map(lambda m, g: g + momentum * m, new_momentum, updates)
                     if nesterov else new_momentum)
        ortho = orthogonalize(direction, matrix_axes=matrix_axes, coefficients=coefficients,
                              norm_safety=norm_safety, scale=scale, ns_dtype=ns_dtype)
        return ortho, MuonState(momentum=new_momentum)

    return optax.GradientTransformation(init_fn, update_fn)
