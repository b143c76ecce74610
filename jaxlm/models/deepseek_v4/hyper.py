"""Hyper-connections: ``H`` residual streams mixed around each sub-layer (SPEC 3.2-3.5, 3.8).

The state is ``h_BTHD``. Before a sub-layer, a mixer reads the whole state (flattened stream-major
and RMS-scaled) and makes three things per token: ``pre`` weights that sum the streams into the
sub-layer's input, ``post`` weights that spread its output over the streams, and ``M``, an
``H x H`` mix of the streams themselves, projected towards a doubly stochastic matrix by a few
Sinkhorn steps. After it: ``h'_i = post_i f + sum_j M_ij h_j`` (the first index of ``M`` is the
output stream; the official DeepSeek-V4 code's transpose is wrong for these weights).

Everything here is float32, whatever the compute dtype: the mixers and the Sinkhorn are where
half precision loses the most (``fixtures/nanowhale/SPEC.md`` section 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

HC_INIT_STD = 0.01   # upstream's init of the mixers' matrices


def _scaled_mix(h_BTHD, fn_XR, eps: float):
    """``rho * (fn @ flat(h))`` per token: ``[B, T, R]``; ``flat`` is stream-major."""
    B, T, H, D = h_BTHD.shape
    x_BTX = h_BTHD.reshape(B, T, H * D).astype(jnp.float32)
    rho_BT1 = jax.lax.rsqrt(jnp.mean(x_BTX * x_BTX, axis=-1, keepdims=True) + eps)
    return rho_BT1 * jnp.einsum("btx,xr->btr", x_BTX, fn_XR.astype(jnp.float32))


def sinkhorn(A_BTHH, iters: int, eps: float):
    """Row softmax (+eps), then alternately columns and rows normalised, ending on columns:
    ``iters`` column normalisations in all."""
    M = jax.nn.softmax(A_BTHH, axis=-1) + eps
    M = M / (jnp.sum(M, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        M = M / (jnp.sum(M, axis=-1, keepdims=True) + eps)
        M = M / (jnp.sum(M, axis=-2, keepdims=True) + eps)
    return M


class Mixer(nnx.Module):
    """One sub-layer's mixer: ``fn`` (Flax layout ``[H*D, (2+H)*H]``), ``base`` and three scales."""

    def __init__(self, hc_mult: int, dim: int, *, rms_eps: float, hc_eps: float, iters: int, rngs: nnx.Rngs):
        H, rows = hc_mult, (2 + hc_mult) * hc_mult
        self.hc_mult, self.rms_eps, self.hc_eps, self.iters = H, rms_eps, hc_eps, iters
        self.fn = nnx.Param(HC_INIT_STD * jax.random.normal(rngs.params(), (H * dim, rows), jnp.float32),
                            out_sharding=("embed", "norm"))
        self.base = nnx.Param(jnp.zeros((rows,), jnp.float32), out_sharding=("norm",))
        self.scale = nnx.Param(jnp.ones((3,), jnp.float32), out_sharding=("norm",))

    def pre(self, h_BTHD):
        """``(u_BTD, post_BTH, M_BTHH)``: the sub-layer's input (in the stream dtype) and the post-mix."""
        H = self.hc_mult
        mu_BTR = _scaled_mix(h_BTHD, self.fn[...], self.rms_eps)
        base, scale = self.base[...], self.scale[...]
        pre_BTH = jax.nn.sigmoid(scale[0] * mu_BTR[..., :H] + base[:H]) + self.hc_eps
        post_BTH = 2.0 * jax.nn.sigmoid(scale[1] * mu_BTR[..., H:2 * H] + base[H:2 * H])
        A_BTR = scale[2] * mu_BTR[..., 2 * H:] + base[2 * H:]
        M_BTHH = sinkhorn(A_BTR.reshape(*A_BTR.shape[:2], H, H), self.iters, self.hc_eps)
        u_BTD = jnp.einsum("bth,bthd->btd", pre_BTH, h_BTHD.astype(jnp.float32))
        return u_BTD.astype(h_BTHD.dtype), post_BTH, M_BTHH

    @staticmethod
    def post(h_BTHD, f_BTD, post_BTH, M_BTHH):
        """``h'_i = post_i f + sum_j M_ij h_j``, accumulated in float32, back in the stream dtype."""
        out = post_BTH[..., None] * f_BTD.astype(jnp.float32)[:, :, None, :]
        out = out + jnp.einsum("btij,btjd->btid", M_BTHH, h_BTHD.astype(jnp.float32))
        return out.astype(h_BTHD.dtype)


class Head(nnx.Module):
    """The final contraction of the streams into one: ``sum_j pre_j h_j`` (SPEC 3.8)."""

    def __init__(self, hc_mult: int, dim: int, *, rms_eps: float, hc_eps: float, rngs: nnx.Rngs):
        self.rms_eps, self.hc_eps = rms_eps, hc_eps
        self.fn = nnx.Param(HC_INIT_STD * jax.random.normal(rngs.params(), (hc_mult * dim, hc_mult), jnp.float32),
                            out_sharding=("embed", "norm"))
        self.base = nnx.Param(jnp.zeros((hc_mult,), jnp.float32), out_sharding=("norm",))
        self.scale = nnx.Param(jnp.ones((1,), jnp.float32), out_sharding=("norm",))

    def __call__(self, h_BTHD):
        mu_BTH = _scaled_mix(h_BTHD, self.fn[...], self.rms_eps)
        pre_BTH = jax.nn.sigmoid(self.scale[...][0] * mu_BTH + self.base[...]) + self.hc_eps
        return jnp.einsum("bth,bthd->btd", pre_BTH, h_BTHD.astype(jnp.float32))
