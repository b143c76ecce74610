"""Gated DeltaNet (SPEC §7): the delta rule in chunked form for training, recurrent for decoding.

Per head, with state ``M`` (dk x dv), decay ``lam_t = exp(g_t)`` and write strength ``beta_t``::

    M~ = lam_t M_{t-1};  e_t = beta_t (v_t - M~^T k_t);  M_t = M~ + k_t e_t^T;  o_t = M_t^T q_t

The chunked form (chunk ``c``) is the WY/UT representation of that recurrence. Within a chunk, with
``gam`` the cumulative log-decay and ``S`` the state at the chunk's start, the corrections ``E``
solve ``(I + A) E = beta V - (beta exp(gam) K) S`` with ``A[i, j] = beta_i exp(gam_i - gam_j) k_i.k_j``
for ``j < i``. With ``T = (I + A)^-1``, ``U = T beta V`` and ``W = T (beta exp(gam) K)``::

    O   = P U + (exp(gam) Q - P W) S          P[i, j] = exp(gam_i - gam_j) q_i.k_j, j <= i
    S'  = exp(gam_c) S + Kd^T (U - W S)       Kd = exp(gam_c - gam) K

Everything but the state carry is a batched matmul over all chunks at once; a ``lax.scan`` over
chunks carries only ``S`` (float32), one ``dk x dk`` by ``dk x dv`` product a step. ``T`` is
computed by matmuls only (``unit_lower_inverse``), never by a triangular solve.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models import layers


class GDNLayer(NamedTuple):
    """A GDN layer's decode cache: the delta-rule state and the conv's last ``K - 1`` inputs."""

    state: jax.Array     # [B, Hv, dk, dv] float32
    conv: jax.Array      # [B, K - 1, C] the projections q|k|v of the last K - 1 times


# --------------------------------------------------------------------------- the delta rule


def unit_lower_inverse(a_NCC, base: int = 16):
    """``(I + a)^-1`` for strictly lower-triangular ``a`` ``[..., c, c]`` (c a power of two), by matmuls.

    Diagonal blocks of ``base`` rows: the Neumann series ``sum_n (-a)^n``, which ends at
    ``n = base - 1`` (a nilpotent block), as the product ``(I - a)(I + a^2)(I + a^4)...``. Then
    blocks are doubled: ``[[X1, 0], [A21, X2]]^-1 = [[X1^-1, 0], [-X2^-1 A21 X1^-1, X2^-1]]``. Doubling
    keeps rounding near forward substitution's; one long Neumann product over all ``c`` rows would
    sum powers whose entries grow like binomials.
    """
    c = a_NCC.shape[-1]
    b = min(base, c)
    # Blocks are static slices (c / base of them): few, and plain for XLA to fuse.
    block = lambda x, i, j, size: x[..., i * size:(i + 1) * size, j * size:(j + 1) * size]
    minus = jnp.stack([-block(a_NCC, i, i, b) for i in range(c // b)], axis=-3)   # [..., c/b, b, b]
    inv, power = jnp.eye(b, dtype=a_NCC.dtype) + minus, minus
    for _ in range(int(math.log2(b)) - 1):
        power = power @ power
        inv = inv + inv @ power
    size = b
    while size < c:
        pairs = c // (2 * size)
        a21 = jnp.stack([block(a_NCC, 2 * p + 1, 2 * p, size) for p in range(pairs)], axis=-3)
        x11, x22 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        x21 = -(x22 @ a21 @ x11)
        top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
        bottom = jnp.concatenate([x21, x22], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        size *= 2
    return inv[..., 0, :, :]


def chunked_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, *, chunk: int, state_BHKV=None):
    """The gated delta rule over a whole sequence: ``(o_BTHV float32, final state_BHKV float32)``.

    ``q`` is already scaled; ``g`` is the log-decay (<= 0). A time with ``g = 0`` and ``beta = 0``
    leaves the state as it is, which is how padding (at either end) is made invisible.

    Precision: the within-chunk products take their operands in ``q``'s dtype (bf16 under mixed
    precision) and accumulate in float32; the decays, the inverse and everything that touches
    the carried state are float32.
    """
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    n = -(-T // chunk)
    pad = n * chunk - T
    low = q_BTHK.dtype

    def chunks(x, dtype):   # [B, T, H, ...] -> [B, H, n, c, ...]
        x = jnp.pad(x.astype(dtype), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, n, chunk, H, *x.shape[3:])
        return jnp.moveaxis(x, 3, 1)

    def mm(a, b):   # a @ b with operands in the compute dtype, float32 out
        return jnp.matmul(a.astype(low), b.astype(low), preferred_element_type=jnp.float32)

    q, k, v = chunks(q_BTHK, low), chunks(k_BTHK, low), chunks(v_BTHV, low)
    g, beta = chunks(g_BTH, jnp.float32), chunks(beta_BTH, jnp.float32)
    gam = jnp.cumsum(g, axis=-1)                                        # [B, H, n, c]
    diff = gam[..., :, None] - gam[..., None, :]
    row, col = jnp.arange(chunk)[:, None], jnp.arange(chunk)[None, :]
    # exp only where i >= j, where the difference is <= 0 (elsewhere it could overflow).
    decay_incl = jnp.where(row >= col, jnp.exp(jnp.where(row >= col, diff, 0.0)), 0.0)
    decay_strict = jnp.where(row > col, decay_incl, 0.0)
    k_T = jnp.swapaxes(k, -1, -2)
    a = beta[..., :, None] * mm(k, k_T) * decay_strict
    t_inv = unit_lower_inverse(a)
    u = mm(t_inv, beta[..., None] * v)                                  # [B, H, n, c, V]
    w = mm(t_inv, (beta * jnp.exp(gam))[..., None] * k)                 # [B, H, n, c, K]
    p = mm(q, k_T) * decay_incl
    o_intra = mm(p, u)
    q_state = jnp.exp(gam)[..., None] * q - mm(p, w)                    # what reads the chunk's start state
    k_decayed_T = jnp.swapaxes(jnp.exp(gam[..., -1:] - gam)[..., None] * k, -1, -2)
    kw = jnp.matmul(k_decayed_T, w)                                     # [B, H, n, K, K] float32
    ku = jnp.matmul(k_decayed_T, u)                                     # [B, H, n, K, V]
    decay_chunk = jnp.exp(gam[..., -1])                                 # [B, H, n]

    def step(s_BHKV, inputs):
        kw_BHKK, ku_BHKV, d_BH = inputs
        return d_BH[..., None, None] * s_BHKV - kw_BHKK @ s_BHKV + ku_BHKV, s_BHKV

    s0 = jnp.zeros((B, H, K, V), jnp.float32) if state_BHKV is None else state_BHKV.astype(jnp.float32)
    final, starts = jax.lax.scan(step, s0, (jnp.moveaxis(kw, 2, 0), jnp.moveaxis(ku, 2, 0),
                                            jnp.moveaxis(decay_chunk, 2, 0)))
    starts = jnp.moveaxis(starts, 0, 2)                                 # [B, H, n, K, V]
    o = o_intra + q_state @ starts                                      # [B, H, n, c, V]
    o = jnp.moveaxis(o, 1, 3).reshape(B, n * chunk, H, V)[:, :T]
    return o, final


def recurrent_step(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, state_BHKV):
    """One time step of the delta rule: ``(o_BHV, state_BHKV)``, all float32."""
    q, k, v = (x.astype(jnp.float32) for x in (q_BHK, k_BHK, v_BHV))
    s = jnp.exp(g_BH.astype(jnp.float32))[..., None, None] * state_BHKV
    e = beta_BH.astype(jnp.float32)[..., None] * (v - jnp.einsum("bhkv,bhk->bhv", s, k))
    s = s + k[..., :, None] * e[..., None, :]
    return jnp.einsum("bhkv,bhk->bhv", s, q), s


def recurrent_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV=None):
    """The same function as ``chunked_delta_rule``, one time step after another."""
    B, _, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    s0 = jnp.zeros((B, H, K, V), jnp.float32) if state_BHKV is None else state_BHKV

    def step(s, xs):
        o, s = recurrent_step(*xs, s)
        return s, o

    final, o_TBHV = jax.lax.scan(step, s0, tuple(jnp.moveaxis(x, 1, 0)
                                                 for x in (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH)))
    return jnp.moveaxis(o_TBHV, 0, 1), final


# --------------------------------------------------------------------------- the layer


def causal_conv(u_BTC, w_KC, tail_BKC=None):
    """Depthwise causal conv ``y_t = sum_j w[j] u_{t-K+1+j}`` (a cross-correlation; ``w[K-1]`` weighs
    the current time), with ``tail`` the ``K - 1`` inputs before ``u`` (zeros if None). float32 out.

    The inputs stay in their dtype and are widened inside the sum, so that under mixed precision
    the gradient to ``u`` is made in ``u``'s dtype (bf16), not a float32 ``[B, T, C]`` copy."""
    K = w_KC.shape[0]
    B, T, C = u_BTC.shape
    tail = jnp.zeros((B, K - 1, C), u_BTC.dtype) if tail_BKC is None else tail_BKC.astype(u_BTC.dtype)
    full = jnp.concatenate([tail, u_BTC], axis=1)
    w = w_KC.astype(jnp.float32)
    return sum(w[j] * full[:, j:j + T].astype(jnp.float32) for j in range(K))


def l2_normalize(x):
    """``x / sqrt(sum(x^2) + 1e-6)`` over the last axis, in float32 (SPEC §3)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


class GatedRMSNorm(nnx.Module):
    """``w * x / rms(x) * silu(z)`` per value head (weight ones-initialised and used as ``w``)."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.w = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",))

    def __call__(self, x, z):
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.w[...] * jax.nn.silu(z.astype(jnp.float32))


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        D, C, K = cfg.dim, cfg.gdn_conv_channels, cfg.linear_conv_kernel_dim
        Hv, Vd = cfg.linear_num_value_heads, cfg.gdn_value_dim
        self.in_proj_qkv = layers.dense(D, C, ("embed", "heads"), dtype=dtype, rngs=rngs)
        bound = 1.0 / math.sqrt(K)   # PyTorch's default Conv1d init for one input channel per group
        self.conv1d = nnx.Param(jax.random.uniform(rngs.params(), (K, 1, C), jnp.float32, -bound, bound),
                                out_sharding=(None, None, "heads"))
        self.in_proj_z = layers.dense(D, Vd, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.in_proj_b = layers.dense(D, Hv, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.in_proj_a = layers.dense(D, Hv, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.dt_bias = nnx.Param(jnp.ones((Hv,), jnp.float32), out_sharding=("heads",))
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (Hv,), jnp.float32, 1.0, 16.0)),
                               out_sharding=("heads",))
        self.norm = GatedRMSNorm(cfg.linear_value_head_dim, cfg.norm_eps)
        self.out_proj = layers.dense(Vd, D, ("heads", "embed"), dtype=dtype, rngs=rngs)
        # The upstream init redraws the output projections with std 0.02 / sqrt(2 L).
        self.out_proj.kernel[...] = self.out_proj.kernel[...] / math.sqrt(2 * cfg.n_layers)

    def _gates(self, x):
        """``(z, beta, g)``: the output gate, the write strength and the log-decay (float32)."""
        cfg = self.cfg
        split = lambda y: y.reshape(*y.shape[:-1], cfg.linear_num_value_heads, -1)
        z = split(self.in_proj_z(x))
        beta = jax.nn.sigmoid(self.in_proj_b(x).astype(jnp.float32))
        a = self.in_proj_a(x).astype(jnp.float32)
        g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(a + self.dt_bias[...])
        return z, beta, g

    def _qkv(self, y_C):
        """Split the conv output into heads: q (scaled), k L2-normalised, v; q/k repeated to Hv heads."""
        cfg = self.cfg
        kd = cfg.gdn_key_dim
        heads = lambda t, h: t.reshape(*t.shape[:-1], h, -1)
        q = heads(y_C[..., :kd], cfg.linear_num_key_heads)
        k = heads(y_C[..., kd:2 * kd], cfg.linear_num_key_heads)
        v = heads(y_C[..., 2 * kd:], cfg.linear_num_value_heads)
        repeat = cfg.linear_num_value_heads // cfg.linear_num_key_heads
        if repeat > 1:
            q, k = jnp.repeat(q, repeat, axis=-2), jnp.repeat(k, repeat, axis=-2)
        q = l2_normalize(q) * (1.0 / math.sqrt(cfg.linear_key_head_dim))
        return q, l2_normalize(k), v

    def _out(self, o, z):
        y = self.norm(o, z).astype(self.dtype)
        return self.out_proj(y.reshape(*y.shape[:-2], -1))

    def _sequence(self, x_BTD, valid_BT=None, state=None):
        """``(out_BTD, final state, u_BTC)``; ``valid_BT`` False marks padding that must leave no trace."""
        u = self.in_proj_qkv(x_BTD)
        z, beta, g = self._gates(x_BTD)
        if valid_BT is not None:
            u = jnp.where(valid_BT[..., None], u, 0)
            beta, g = jnp.where(valid_BT[..., None], beta, 0.0), jnp.where(valid_BT[..., None], g, 0.0)
        y = jax.nn.silu(causal_conv(u, self.conv1d[...][:, 0])).astype(self.dtype)
        q, k, v = self._qkv(y)
        o, state = chunked_delta_rule(q, k, v, g, beta, chunk=self.cfg.gdn_chunk, state_BHKV=state)
        return self._out(o, z), state, u

    def __call__(self, x_BTD, positions_BT=None):
        return self._sequence(x_BTD)[0]

    # ---- decoding

    def init_cache(self, batch: int, max_len: int, dtype) -> GDNLayer:
        cfg = self.cfg
        return GDNLayer(
            jnp.zeros((batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim),
                      jnp.float32),
            jnp.zeros((batch, cfg.linear_conv_kernel_dim - 1, cfg.gdn_conv_channels), dtype))

    def prefill(self, x_BTD, valid_BT, cache: GDNLayer):
        out, state, u = self._sequence(x_BTD, valid_BT)
        keep = cache.conv.shape[1]
        tail = jnp.concatenate([cache.conv, u.astype(cache.conv.dtype)], axis=1)[:, -keep:] if keep else cache.conv
        return out, GDNLayer(state, tail)

    def decode(self, x_B1D, cache: GDNLayer):
        u = self.in_proj_qkv(x_B1D)                                      # [B, 1, C]
        z, beta, g = self._gates(x_B1D)
        y = jax.nn.silu(causal_conv(u, self.conv1d[...][:, 0], cache.conv)).astype(self.dtype)
        q, k, v = self._qkv(y[:, 0])
        o, state = recurrent_step(q, k, v, g[:, 0], beta[:, 0], cache.state)
        tail = jnp.concatenate([cache.conv, u.astype(cache.conv.dtype)], axis=1)[:, 1:]
        return self._out(o[:, None], z), GDNLayer(state, tail)
