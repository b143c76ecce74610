"""Next-token cross-entropy, the family's head terms (z-loss) and its auxiliary losses, in float32.

The model exposes ``hidden(ids) -> (hidden, aux)`` and ``logits(hidden)`` (the family contract,
``jaxlm/models/family.py``); splitting the two lets the loss compute logits a chunk of positions
at a time, so that the float32 ``[B, T, V]`` tensor never exists at once (its backward
recomputes each chunk). The auxiliary losses a model returns (MoE balance, router z-loss) are
added to the objective as they are, and each is reported under its name; its auxiliary metrics
are reported too.

The fused path (``fused=True``, models with ``output_projection``) goes further: one pass
over the chunks computes the loss and, at once, its gradients with respect to the hidden
states and the output table, so the backward pass neither recomputes the logits nor
multiplies a float32 ``[B, T, V]`` cotangent (it multiplies one in the compute dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models.family import HeadLoss

IGNORE_INDEX = -100  # targets below zero (padding) do not count


def token_losses(logits_BTV, targets_BT):
    """Per-token cross-entropy and log-partition (lse), float32; ignored targets give 0."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    safe_targets = jnp.maximum(targets_BT, 0)
    target_logit_BT = jnp.take_along_axis(logits_BTV, safe_targets[..., None], axis=-1)[..., 0]
    valid_BT = targets_BT >= 0
    return jnp.where(valid_BT, lse_BT - target_logit_BT, 0.0), jnp.where(valid_BT, lse_BT, 0.0)


def lm_loss(model, tokens_BT1, *, chunk: int = 0, fused: bool = False, head_loss: HeadLoss | None = None,
            **layer_options):
    """Mean cross-entropy + ``z_weight`` x z-loss + the model's auxiliary losses of a ``[B, T+1]``
    token window.

    Returns ``(loss, metrics)`` with the cross-entropy (``ce``), the unweighted z term
    (``log_z_sq``: the raw mean log²Z, or (mean log Z)², before ``z_weight``), each auxiliary loss
    and metric separately in metrics. ``head_loss`` defaults to the family's recipe
    (``model.cfg.loss_terms()``). ``chunk`` > 0 computes the logits ``chunk`` positions at a time.
    ``fused`` computes the head's gradients in that same pass (the same loss and gradients; PaLM
    z-loss form only, the other form is computed unfused) and, with ``chunk`` 0, picks its own
    chunk size. ``layer_options`` (``remat``, ``scan_layers``) go to ``model.hidden``.
    """
    head_loss = model.cfg.loss_terms() if head_loss is None else head_loss
    # Padding (IGNORE_INDEX) may appear as an input too; any valid id stands in for it there.
    inputs_BT, targets_BT = jnp.maximum(tokens_BT1[:, :-1], 0), tokens_BT1[:, 1:]
    hidden_BTD, aux = model.hidden(inputs_BT, **layer_options)
    loss, metrics = _head_loss(model, hidden_BTD, targets_BT, chunk, fused, head_loss)
    for name, value in aux.losses.items():
        loss = loss + value
        metrics[name] = value
    return loss, {**metrics, **aux.metrics}


def _head_loss(model, hidden_BTD, targets_BT, chunk, fused, head_loss: HeadLoss):
    B, T, _ = hidden_BTD.shape
    count = jnp.maximum(jnp.sum(targets_BT >= 0), 1)
    z_form, z_weight = head_loss.z_form, head_loss.z_weight

    if fused and z_form == "mean_sq" and hasattr(model, "output_projection"):
        table_VD, cap, dtype = model.output_projection()
        chunk = chunk or auto_chunk(B, T)
        _check_chunk(chunk, T)
        objective, ce_sum, lse_sq_sum = fused_head_loss(
            hidden_BTD, table_VD, targets_BT, cap, z_weight, chunk, jnp.dtype(dtype))
        # Only the objective is differentiated; ce and z are reported.
        ce, z = jax.lax.stop_gradient(ce_sum) / count, jax.lax.stop_gradient(lse_sq_sum) / count
        return objective / count, {"ce": ce, "log_z_sq": z}

    if chunk and chunk < T:
        _check_chunk(chunk, T)
        n = T // chunk
        hidden_NBCD = hidden_BTD.reshape(B, n, chunk, -1).swapaxes(0, 1)
        targets_NBC = targets_BT.reshape(B, n, chunk).swapaxes(0, 1)

        @jax.checkpoint
        def one_chunk(args):
            h_BCD, t_BC = args
            return token_losses(model.logits(h_BCD), t_BC)

        ce_NBC, lse_NBC = jax.lax.map(one_chunk, (hidden_NBCD, targets_NBC))
        ce_BT, lse_BT = ce_NBC.swapaxes(0, 1).reshape(B, T), lse_NBC.swapaxes(0, 1).reshape(B, T)
    else:
        ce_BT, lse_BT = token_losses(model.logits(hidden_BTD), targets_BT)

    ce = jnp.sum(ce_BT) / count
    if z_form == "mean_sq":
        z = jnp.sum(lse_BT * lse_BT) / count          # PaLM: mean(lse^2)
    else:
        z = jnp.square(jnp.sum(lse_BT) / count)       # (mean lse)^2
    loss = ce + z_weight * z
    return loss, {"ce": ce, "log_z_sq": z}


def _check_chunk(chunk: int, T: int) -> None:
    if T % chunk:
        raise ValueError(f"train.loss_chunk = {chunk} must divide the sequence length {T}")


FUSED_CHUNK_TOKENS = 16384  # B x chunk positions per fused step: 512 MiB of float32 logits at V = 8192


def auto_chunk(B: int, T: int) -> int:
    """The largest divisor of T whose chunk holds at most ``FUSED_CHUNK_TOKENS`` tokens of the batch."""
    for chunk in range(max(1, min(T, FUSED_CHUNK_TOKENS // B)), 0, -1):
        if T % chunk == 0:
            return chunk
    return 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def fused_head_loss(hidden_BTD, table_VD, targets_BT, cap, z_weight, chunk, dtype):
    """``(ce_sum + z_weight * lse_sq_sum, ce_sum, lse_sq_sum)`` over valid targets, with
    ``logits = softcap(hidden @ table.T, cap)`` computed in ``dtype`` (float32 out), a chunk
    of ``chunk`` positions at a time. Gradients: of the first output only."""
    return _fused_pass(hidden_BTD, table_VD, targets_BT, cap, z_weight, chunk, dtype, with_grads=False)[0]


def _fused_forward(hidden_BTD, table_VD, targets_BT, cap, z_weight, chunk, dtype):
    return _fused_pass(hidden_BTD, table_VD, targets_BT, cap, z_weight, chunk, dtype, with_grads=True)


def _fused_backward(cap, z_weight, chunk, dtype, grads, cotangents):
    d_hidden_BTD, d_table_VD, targets_BT = grads
    g = cotangents[0]  # ce_sum and lse_sq_sum are by-products, not differentiated
    zero_targets = np.zeros(targets_BT.shape, jax.dtypes.float0)
    return g * d_hidden_BTD, g * d_table_VD, zero_targets


fused_head_loss.defvjp(_fused_forward, _fused_backward)


def _fused_pass(hidden_BTD, table_VD, targets_BT, cap, z_weight, chunk, dtype, *, with_grads):
    B, T, D = hidden_BTD.shape
    n = T // chunk
    hidden_NBCD = hidden_BTD.reshape(B, n, chunk, D).swapaxes(0, 1)
    targets_NBC = targets_BT.reshape(B, n, chunk).swapaxes(0, 1)
    table_c_VD = table_VD.astype(dtype)

    def one_chunk(d_table_VD, args):
        h_BCD, t_BC = args
        h_c_BCD = h_BCD.astype(dtype)
        raw_BCV = jnp.einsum("bcd,vd->bcv", h_c_BCD, table_c_VD, preferred_element_type=jnp.float32)
        tanh_BCV = jnp.tanh(raw_BCV / cap) if cap else None
        logits_BCV = cap * tanh_BCV if cap else raw_BCV
        lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        valid_BC = t_BC >= 0
        safe_t_BC = jnp.maximum(t_BC, 0)
        target_logit_BC = jnp.take_along_axis(logits_BCV, safe_t_BC[..., None], axis=-1)[..., 0]
        ce = jnp.sum(jnp.where(valid_BC, lse_BC - target_logit_BC, 0.0))
        lse_sq = jnp.sum(jnp.where(valid_BC, lse_BC * lse_BC, 0.0))
        if not with_grads:
            return d_table_VD, (ce, lse_sq, None)
        # d(ce + w lse^2)/dlogits = softmax * (1 + 2 w lse) - onehot(target), on valid tokens.
        probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
        one_hot_BCV = safe_t_BC[..., None] == jnp.arange(logits_BCV.shape[-1])
        d_logits_BCV = probs_BCV * (1.0 + 2.0 * z_weight * lse_BC)[..., None] - one_hot_BCV
        if cap:  # through cap * tanh(raw / cap)
            d_logits_BCV = d_logits_BCV * (1.0 - tanh_BCV * tanh_BCV)
        d_raw_BCV = jnp.where(valid_BC[..., None], d_logits_BCV, 0.0).astype(dtype)
        d_h_BCD = jnp.einsum("bcv,vd->bcd", d_raw_BCV, table_c_VD, preferred_element_type=jnp.float32)
        d_table_VD = d_table_VD + jnp.einsum("bcv,bcd->vd", d_raw_BCV, h_c_BCD, preferred_element_type=jnp.float32)
        return d_table_VD, (ce, lse_sq, d_h_BCD.astype(hidden_BTD.dtype))

    d_table_VD = jnp.zeros(table_VD.shape, jnp.float32) if with_grads else None
    d_table_VD, (ce_N, lse_sq_N, d_h_NBCD) = jax.lax.scan(one_chunk, d_table_VD, (hidden_NBCD, targets_NBC))
    ce_sum, lse_sq_sum = jnp.sum(ce_N), jnp.sum(lse_sq_N)
    sums = (ce_sum + z_weight * lse_sq_sum, ce_sum, lse_sq_sum)
    if not with_grads:
        return sums, None
    d_hidden_BTD = d_h_NBCD.swapaxes(0, 1).reshape(B, T, D)
    return sums, (d_hidden_BTD, d_table_VD.astype(table_VD.dtype), targets_BT)
