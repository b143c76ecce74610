"""``probe``: which of the unpublished conventions a checkpoint was trained with, by its loss on text.

A wrong guess of RoPE pairing or theta, of which layer parity slides, or of the window edge
gives fluent-looking but degraded output, so each plausible setting is scored by the
checkpoint's cross-entropy on the given text; the lowest wins. The search is staged, since
the conventions act independently: RoPE pairing x theta first (all that matters below the
window), then embedding scaling, then sliding parity x window edge on sequences longer than
the window (only where the attention pattern slides).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.api import model_from_params
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import DataError
from jaxlm.formats import read_checkpoint
from jaxlm.loss import token_losses

THETAS = (10_000.0, 100_000.0, 500_000.0, 1_000_000.0)
PAIRINGS = ("rotate_half", "interleaved")


def _sequences(ids: list[int], seq_len: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping ``[N, seq_len + 1]`` windows of the token stream (at least one)."""
    n = max(1, min(len(ids) // (seq_len + 1), max(1, max_tokens // seq_len)))
    if len(ids) < seq_len + 1:
        return np.asarray(ids, np.int32)[None]
    return np.asarray(ids[: n * (seq_len + 1)], np.int32).reshape(n, seq_len + 1)


def mean_loss(model_cfg, params, tokens_NT1: np.ndarray) -> float:
    """Token-mean cross-entropy of the model ``model_cfg`` with ``params`` on the windows."""
    model = model_from_params(model_cfg, params)
    graphdef, state = nnx.split(model)

    @jax.jit
    def losses(state, tokens_BT1):
        logits = nnx.merge(graphdef, state)(tokens_BT1[:, :-1])
        return token_losses(logits, tokens_BT1[:, 1:])[0].mean()

    return float(np.mean([float(losses(state, jnp.asarray(row[None]))) for row in tokens_NT1]))


def _flag(name, value) -> str:
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"


def probe(src, tokenizer_path, text_path, *, key_map=None, seq_len: int | None = None, max_tokens: int = 8192,
          log=print) -> dict:
    """Score the settings; prints a table and returns ``{"rows": [...], "best": {...}, "loss": x}``."""
    conv = read_checkpoint(src, key_map=key_map, with_optimizer=False)
    base = conv.model_cfg
    # Read with jaxlm's checks: not a tokenizer, or more ids than the model has rows, is one line.
    tokenizer = load_tokenizer(tokenizer_path, vocab_size=base.vocab_size, eos_token=None)
    try:
        ids = tokenizer.encode(pathlib.Path(text_path).read_text(encoding="utf-8")).ids
    except OSError as error:
        raise DataError(f"--text {text_path}: {error.strerror}; give a UTF-8 text file to score") from None
    except UnicodeDecodeError as error:
        raise DataError(f"--text {text_path}: not UTF-8 text (byte {error.start}); give a UTF-8 text file") from None
    if len(ids) < 2:
        raise DataError(f"--text {text_path}: {len(ids)} token(s), nothing to score; give a longer text")
    seq_len = seq_len or min(base.max_seq_len, 2 * base.sliding_window)
    tokens = _sequences(ids, seq_len, max_tokens)
    length = tokens.shape[1] - 1
    log(f"probe: {tokens.size - len(tokens):,} tokens in {len(tokens)} sequences of {length} "
        f"(window {base.sliding_window})")
    params = {k: np.asarray(v, np.float32) for k, v in conv.params.items()}
    rows: list[tuple[dict, float]] = []

    def score(**changes) -> float:
        cfg = dataclasses.replace(base, **changes)
        for setting, loss in rows:
            if setting == changes_of(cfg):
                return loss
        loss = mean_loss(cfg, params, tokens)
        rows.append((changes_of(cfg), loss))
        log(f"  {'  '.join(_flag(k, v) for k, v in changes_of(cfg).items()):<110} loss {loss:.4f}")
        return loss

    def changes_of(cfg) -> dict:
        return {k: getattr(cfg, k) for k in ("rope_pairing", "rope_theta", "embed_scale", "sliding_parity",
                                             "window_includes_query")}

    thetas = sorted(set(THETAS) | {base.rope_theta})
    best = min(((p, t) for p in PAIRINGS for t in thetas), key=lambda pt: score(rope_pairing=pt[0], rope_theta=pt[1]))
    chosen = {"rope_pairing": best[0], "rope_theta": best[1]}
    chosen["embed_scale"] = min((False, True), key=lambda s: score(**chosen, embed_scale=s))
    slides = base.attention_pattern == "gemma4" and base.n_layers > 1
    if slides and length > base.sliding_window:
        parity_edge = min(((p, w) for p in ("even", "odd") for w in (True, False)),
                          key=lambda pw: score(**chosen, sliding_parity=pw[0], window_includes_query=pw[1]))
        chosen["sliding_parity"], chosen["window_includes_query"] = parity_edge
    elif slides:
        log(f"  (the text gives sequences of {length} tokens, not longer than the window of {base.sliding_window}: "
            "sliding parity and window edge cannot be told apart; give more text)")
    final = dataclasses.replace(base, **chosen)
    loss = score(**chosen)
    default_loss = dict((tuple(s.items()), l) for s, l in rows).get(tuple(changes_of(base).items()))
    changed = {k: v for k, v in changes_of(final).items() if v != getattr(base, k)}
    select = " ".join(f"--config.model.{_flag(k, v)}" for k, v in changed.items()) or "the defaults"
    margin = "" if default_loss is None else f", the checkpoint's current setting {default_loss:.4f}"
    line = (f"best: {' '.join(_flag(k, v) for k, v in changes_of(final).items())} (loss {loss:.4f}{margin}; "
            f"select with {select}, or to-orbax --set {' --set '.join(_flag(k, v) for k, v in changed.items())})"
            if changed else
            f"best: {' '.join(_flag(k, v) for k, v in changes_of(final).items())} (loss {loss:.4f}; "
            "the spec's defaults: nothing to select)")
    log(line)
    return {"rows": rows, "best": changes_of(final), "loss": loss, "perplexity": math.exp(loss)}
