"""Next-token cross-entropy plus z-loss on the model's (soft-capped) logits, in float32.

The model exposes ``hidden(ids)`` and ``logits(hidden)``; splitting the two lets the
loss compute logits a chunk of positions at a time, so that the float32 ``[B, T, V]``
tensor never exists at once (its backward recomputes each chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100  # targets below zero (padding) do not count


def token_losses(logits_BTV, targets_BT):
    """Per-token cross-entropy and log-partition (lse), float32; ignored targets give 0."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    safe_targets = jnp.maximum(targets_BT, 0)
    target_logit_BT = jnp.take_along_axis(logits_BTV, safe_targets[..., None], axis=-1)[..., 0]
    valid_BT = targets_BT >= 0
    return jnp.where(valid_BT, lse_BT - target_logit_BT, 0.0), jnp.where(valid_BT, lse_BT, 0.0)


def lm_loss(model, tokens_BT1, *, chunk: int = 0):
    """Mean cross-entropy + ``z_loss_weight`` x z-loss of a ``[B, T+1]`` token window.

    Returns ``(loss, metrics)`` with the cross-entropy and z-loss separately in metrics.
    ``chunk`` > 0 computes the logits ``chunk`` positions at a time.
    """
    cfg = model.cfg
    # Padding (IGNORE_INDEX) may appear as an input too; any valid id stands in for it there.
    inputs_BT, targets_BT = jnp.maximum(tokens_BT1[:, :-1], 0), tokens_BT1[:, 1:]
    hidden_BTD = model.hidden(inputs_BT)
    B, T, _ = hidden_BTD.shape

    if chunk and chunk < T:
        if T % chunk:
            raise ValueError(f"train.loss_chunk = {chunk} must divide the sequence length {T}")
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

    count = jnp.maximum(jnp.sum(targets_BT >= 0), 1)
    ce = jnp.sum(ce_BT) / count
    if getattr(cfg, "z_loss_form", "mean_sq") == "mean_sq":
        z = jnp.sum(lse_BT * lse_BT) / count          # PaLM: mean(lse^2)
    else:
        z = jnp.square(jnp.sum(lse_BT) / count)       # (mean lse)^2
    loss = ce + getattr(cfg, "z_loss_weight", 0.0) * z
    return loss, {"ce": ce, "z_loss": z}
