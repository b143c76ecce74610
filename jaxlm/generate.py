"""Text generation with a KV cache: ``python -m jaxlm.generate``.

    python -m jaxlm.generate --checkpoint step_017500.pt --prompt "The capital of France is" \\
        --max_new_tokens 80 --temperature 0.8 --top_p 0.9 --repetition_penalty 1.3

    from jaxlm.generate import generate_text
    texts = generate_text(lm.model, lm.tokenizer, ["The capital of France is"], max_new_tokens=80,
                          sampling=SamplingConfig(temperature=0.8, top_p=0.9, repetition_penalty=1.3))

How it runs. Prompts are left-padded to a common length (rounded up to a bucket, so that new
lengths rarely recompile) and run through the model once (``prefill``), filling the cache. Then
decoding runs in jitted chunks of ``chunk_size`` steps: one ``fori_loop`` per call, with the cache,
the last token, the context mask and the random key in its carry, donated so the cache is updated
in place. Every chunk has the same shapes, so one compile serves them all; the host only sees the
chunk's tokens, prints them, and decides whether to go on (EOS or a stop string in every row),
while the next chunk is already queued on the device. Where a family offers a faster decode step
(``model.fast_decoder``, the family contract: ToyLM's one-kernel CUDA step on NVIDIA GPUs), it
replaces ``decode_step``, and plain greedy decoding may run a whole chunk as one call of it.

Randomness: the token at time t of every row is drawn with ``fold_in(key(seed), t)``, so a seed
gives the same text whatever the chunk size.
"""

from __future__ import annotations

import argparse
import codecs
import functools
import math
import sys
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import (ArgumentParser, ConfigError, JaxlmError, non_negative_float, non_negative_int,
                          positive_float, positive_int)
from jaxlm.models import family, kv_cache
from jaxlm.sampling import SamplingConfig, next_token

# jaxlm.data.tokenizer.DEFAULT_EOS: the end of text of a tokenizer trained here, and the fallback of
# generate_text when no EOS id is given (jaxlm.load finds a checkpoint's own: LoadedModel.eos_id).
EOS_TOKEN = "<|endoftext|>"
CARD_SAMPLING = SamplingConfig(temperature=0.8, top_p=0.9, repetition_penalty=1.3)  # the model cards' settings
DEFAULT_CHUNK = 16
# fori_loop unroll factor of the decode loop: unrolling was no faster (docs/PERFORMANCE.md,
# "Generation"), and a rolled loop compiles faster.
DECODE_UNROLL = 1
# How decode steps run: "auto" (the family's fast step where it runs, greedy chunks in one call
# of it), "fast_steps" (the fast step, but a call a step and the arg-max here: tests compare),
# "xla" (always the model's own decode_step).
DECODE_MODES = ("auto", "fast_steps", "xla")


class DecodeState(NamedTuple):
    """The carry of the decode loop; everything a chunk needs to continue."""

    cache: family.Cache
    token_B: jax.Array     # int32 [B]: the last sampled token, not yet in the cache
    seen_BV: jax.Array     # bool [B, V]: ids in each row's context (repetition penalty); [B, 1] when unused
    done_B: jax.Array      # bool [B]: the row has produced EOS
    rng: jax.Array

    def cache_dtype(self):
        """The dtype of the cache's largest floating-point array (what a fast step reads)."""
        arrays = [a for a in jax.tree.leaves(self.cache.layers) if jnp.issubdtype(a.dtype, jnp.floating)]
        return max(arrays, key=lambda a: a.size).dtype if arrays else None


def bucket(n: int, minimum: int = 16) -> int:
    """``n`` rounded up to a size with at most 1/8 of padding, so that few sizes (compiles) exist."""
    if n <= minimum:
        return minimum
    step = 2 ** max(0, n.bit_length() - 4)
    return -(-n // step) * step


def inference_params(model):
    """``(graphdef, params)`` with every matrix cast once to the compute dtype.

    In bf16 this halves what each decode step reads and keeps the casts out of the loop (XLA
    does not hoist them). Norm vectors stay float32, and the cached path upcasts embeddings,
    so the residual stream stays float32; a bf16 checkpoint's weights are cast back exactly.
    """
    graphdef, params = nnx.split(model)
    dtype = getattr(model, "dtype", jnp.float32)
    cast = lambda leaf: leaf.astype(dtype) if leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
    return graphdef, jax.tree.map(cast, params)


def _plain_greedy(sampling: SamplingConfig) -> bool:
    """Whether each token is the arg-max of the logits alone (no repetition penalty)."""
    return sampling.is_greedy and sampling.repetition_penalty == 1.0


def fast_decoder(model, rows: int, cache_dtype, mode: str = "auto") -> family.FastDecoder | None:
    """The family's fast decode step for ``rows`` rows, where it offers one that runs here."""
    if mode not in DECODE_MODES:
        raise ConfigError(f"decode mode {mode!r}: choose one of {', '.join(DECODE_MODES)}")
    if mode == "xla" or not hasattr(model, "fast_decoder"):
        return None
    found = model.fast_decoder(rows, cache_dtype)
    return None if isinstance(found, str) else found


def min_decode_rows(model, mode: str = "auto") -> int:
    """Rows a decode step runs with at least. On GPU, XLA turns a one-row matmul into an
    elementwise product plus a reduction (two kernels, the product written out), which made
    batch-1 decoding slower than batch 2; a copy of the row avoids that. A family's fast step
    says itself what it is fastest with."""
    decoder = fast_decoder(model, 1, model.dtype, mode)
    if decoder is not None:
        return decoder.min_rows
    return 2 if jax.default_backend() == "gpu" else 1


def _accept(state: DecodeState, token_B, eos_id: int) -> DecodeState:
    """Record a sampled token: rows already done keep repeating EOS, the context mask grows."""
    token_B = jnp.where(state.done_B, eos_id, token_B)
    seen_BV = state.seen_BV
    if seen_BV.shape[1] > 1:
        seen_BV = seen_BV.at[jnp.arange(token_B.shape[0]), token_B].set(True)
    return state._replace(token_B=token_B, seen_BV=seen_BV, done_B=state.done_B | (token_B == eos_id))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "sampling", "eos_id"))
def _prefill(graphdef, params, ids_BP, starts_B, rng, *, cache_len, sampling, eos_id) -> DecodeState:
    """Prompts through the model in one pass; the state holds the first new token."""
    model = nnx.merge(graphdef, params)
    B, P = ids_BP.shape
    logits_BV, cache = model.prefill(ids_BP, model.init_cache(B, cache_len), starts_B)
    if sampling.repetition_penalty != 1.0:
        real_BP = (jnp.arange(P)[None, :] >= starts_B[:, None]).astype(jnp.int32)
        counts_BV = jnp.zeros((B, logits_BV.shape[-1]), jnp.int32).at[jnp.arange(B)[:, None], ids_BP].add(real_BP)
        seen_BV = counts_BV > 0
    else:
        seen_BV = jnp.zeros((B, 1), bool)
    token_B = next_token(logits_BV, seen_BV, jax.random.fold_in(rng, P), sampling)
    empty = DecodeState(cache, token_B, seen_BV, jnp.zeros((B,), bool), rng)
    return _accept(empty, token_B, eos_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "decoder"))
def _fast_weights(graphdef, params, decoder: family.FastDecoder):
    return decoder.prepare(nnx.merge(graphdef, params))


def decode_weights(model, graphdef, params, state: DecodeState, mode: str = "auto"):
    """``(decoder, weights)``: the family's fast step and its weights where it runs, else
    ``(None, None)``. Made once per generation and passed to every chunk, so that a weight layout
    of its own (ToyLM's kernel transposes every matrix) is not re-made inside each chunk."""
    decoder = fast_decoder(model, state.token_B.shape[0], state.cache_dtype(), mode)
    if decoder is None:
        return None, None
    return decoder, _fast_weights(graphdef, params, decoder)


@functools.partial(jax.jit, static_argnames=("graphdef", "decoder", "steps", "sampling", "eos_id", "unroll",
                                             "greedy_in_one_call"),
                   donate_argnames=("state",))
def _decode_chunk(graphdef, params, state: DecodeState, fast_weights, *, decoder, steps, sampling, eos_id,
                  unroll=DECODE_UNROLL, greedy_in_one_call=True):
    """``steps`` decode steps in one executable: feed the pending token, sample the next, through
    the family's fast step when ``decoder`` is given (its weights ``fast_weights``), else
    ``model.decode_step``. Plain greedy decoding through a fast step that offers ``greedy_steps``
    runs the whole chunk as one call of it.

    Returns the new state and the ``[B, steps]`` tokens sampled.
    """
    model = nnx.merge(graphdef, params)
    if decoder is not None and decoder.greedy_steps and greedy_in_one_call and _plain_greedy(sampling):
        # A done row's pending token is EOS (_accept), so the fast step repeats it as _accept would.
        tokens_BN, cache = decoder.greedy_steps(model, fast_weights, state.token_B, state.cache, steps=steps,
                                                eos_id=eos_id)
        done_B = state.done_B | jnp.any(tokens_BN == eos_id, axis=1)
        return state._replace(cache=cache, token_B=tokens_BN[:, -1], done_B=done_B), tokens_BN
    decode_step = model.decode_step
    if decoder is not None:
        decode_step = functools.partial(decoder.step, model, fast_weights)

    def step(i, carry):
        state, tokens_BN = carry
        logits_BV, cache = decode_step(state.token_B, state.cache)
        # cache.length is now the time of the token being sampled.
        token_B = next_token(logits_BV, state.seen_BV, jax.random.fold_in(state.rng, cache.length), sampling)
        state = _accept(state._replace(cache=cache), token_B, eos_id)
        return state, jax.lax.dynamic_update_index_in_dim(tokens_BN, state.token_B, i, axis=1)

    tokens_BN = jnp.zeros((state.token_B.shape[0], steps), jnp.int32)
    return jax.lax.fori_loop(0, steps, step, (state, tokens_BN), unroll=unroll)


# --------------------------------------------------------------------------- token level


def generate_tokens(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    sampling: SamplingConfig = CARD_SAMPLING, seed: int = 0, eos_id: int | None = None,
                    chunk_size: int = DEFAULT_CHUNK,
                    on_tokens: Callable[[list[list[int]]], bool] | None = None,
                    decode: str = "auto") -> list[list[int]]:
    """New token ids for each prompt, cut before the first EOS.

    Rows decode in lockstep; a row that hits EOS idles until all have or ``max_new_tokens`` is
    reached. ``on_tokens(new_ids_per_row)`` is called as each chunk arrives (the first call holds
    the one token of the prefill) and may return True to stop early. ``decode``: one of
    ``DECODE_MODES`` (the same tokens, computed another way).
    """
    sampling.validate()
    prompts = [list(map(int, p)) for p in prompts]
    check_prompts(model.cfg, prompts, max_new_tokens)
    chunk_size = max(1, min(chunk_size, max_new_tokens - 1)) if max_new_tokens > 1 else 1
    n_chunks = math.ceil((max_new_tokens - 1) / chunk_size)
    prompt_len = bucket(max(map(len, prompts)))
    cache_len = bucket(prompt_len + n_chunks * chunk_size)   # every time step the chunks will write
    rows = prompts + prompts[-1:] * (min_decode_rows(model, decode) - len(prompts))   # extra rows are dropped
    ids_BP = np.zeros((len(rows), prompt_len), np.int32)
    starts_B = np.array([prompt_len - len(p) for p in rows], np.int32)
    for row, prompt in enumerate(rows):
        ids_BP[row, starts_B[row]:] = prompt
    eos = -1 if eos_id is None else int(eos_id)

    graphdef, params = inference_params(model)
    state = _prefill(graphdef, params, jnp.asarray(ids_BP), jnp.asarray(starts_B), jax.random.key(seed),
                     cache_len=cache_len, sampling=sampling, eos_id=eos)
    decoder, fast_weights = decode_weights(model, graphdef, params, state, decode)
    pending = state.token_B[:, None]
    outputs: list[list[int]] = [[] for _ in prompts]
    for c in range(n_chunks + 1):
        if c < n_chunks:  # queue the next chunk before reading the last one, so the device never waits
            state, next_pending = _decode_chunk(graphdef, params, state, fast_weights, decoder=decoder,
                                                steps=chunk_size, sampling=sampling, eos_id=eos,
                                                greedy_in_one_call=decode == "auto")
        new = np.asarray(pending)[:len(prompts)].tolist()
        room = max_new_tokens - len(outputs[0])
        new = [row[:room] for row in new]
        for out, row in zip(outputs, new):
            out.extend(row)
        finished = all(eos in out for out in outputs)
        stop = on_tokens(new) if on_tokens else False
        if finished or stop or c == n_chunks:
            break
        pending = next_pending
    return [out[:out.index(eos)] if eos in out else out for out in outputs]


def check_prompts(cfg, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Refuse what cannot be generated (before anything is printed or compiled)."""
    if not prompts:
        raise ConfigError("no prompts given")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens = {max_new_tokens}: must be >= 1")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ConfigError(f"prompt {i} is empty: give at least one token")
        if len(prompt) + max_new_tokens > cfg.max_seq_len:
            raise ConfigError(f"prompt {i} has {len(prompt)} tokens + max_new_tokens {max_new_tokens} > the "
                              f"model's max_seq_len {cfg.max_seq_len}: shorten the prompt or ask for fewer tokens")
        if max(prompt) >= cfg.vocab_size or min(prompt) < 0:
            raise ConfigError(f"prompt {i} has token ids outside the model's vocabulary 0..{cfg.vocab_size - 1}: "
                              "the tokenizer does not belong to this model")


def generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int, sampling: SamplingConfig = CARD_SAMPLING,
             seed: int = 0, eos_id: int | None = None, chunk_size: int = DEFAULT_CHUNK) -> list[int]:
    """New token ids continuing one prompt (cut before the first EOS)."""
    return generate_tokens(model, [prompt_ids], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                           eos_id=eos_id, chunk_size=chunk_size)[0]


# --------------------------------------------------------------------------- text level


class _TextRow:
    """Decodes one row's tokens as they come, cuts at stop strings, and releases only text that
    can no longer change: not the start of a stop string, not half of a multi-byte character."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text, self.released, self.stopped = "", 0, False

    def add(self, ids: list[int], eos_id: int | None) -> str:
        """Take new ids; return the newly released text."""
        if self.stopped:
            return ""
        if eos_id is not None and eos_id in ids:
            ids, self.stopped = ids[:ids.index(eos_id)], True
        self.ids.extend(ids)
        self.text = self.tokenizer.decode(self.ids)
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        return self._release(final=self.stopped)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= max((len(s) - 1 for s in self.stop), default=0)
            while end > self.released and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.released:
            return ""
        piece, self.released = self.text[self.released:end], end
        return piece


def generate_text(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  sampling: SamplingConfig = CARD_SAMPLING, seed: int = 0, stop: Sequence[str] = (),
                  chunk_size: int = DEFAULT_CHUNK, on_text: Callable[[int, str], None] | None = None,
                  eos_id: int | None | str = "auto", new_token_counts: list[int] | None = None) -> list[str]:
    """Continuations of ``prompts``, stopped at EOS or at the first of ``stop`` (excluded).

    ``on_text(row, piece)`` receives each row's text as it becomes final, for streaming.
    ``eos_id``: the id that ends a text (``lm.eos_id`` of ``jaxlm.load``); ``"auto"``: the
    tokenizer's ``<|endoftext|>`` if it has one; None: none (stop strings and the length only).
    ``new_token_counts``, if given, receives the number of new ids of each row (up to its stop).
    """
    if eos_id == "auto":
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
    rows = [_TextRow(tokenizer, stop) for _ in prompts]

    def on_tokens(new_ids):
        for i, (row, ids) in enumerate(zip(rows, new_ids)):
            piece = row.add(ids, eos_id)
            if piece and on_text:
                on_text(i, piece)
        return all(row.stopped for row in rows)

    generate_tokens(model, [tokenizer.encode(p).ids for p in prompts], max_new_tokens=max_new_tokens,
                    sampling=sampling, seed=seed, eos_id=eos_id, chunk_size=chunk_size, on_tokens=on_tokens)
    for i, row in enumerate(rows):
        piece = row.finish()
        if piece and on_text:
            on_text(i, piece)
    if new_token_counts is not None:
        new_token_counts[:] = [len(row.ids) for row in rows]
    return [row.text for row in rows]


# --------------------------------------------------------------------------- benchmark


def benchmark_decode(cfg_or_model, batch: int, prompt_len: int = 16, new_tokens: int = 256, dtype=jnp.bfloat16,
                     chunk_size: int | None = None, repeats: int = 5, unroll: int = DECODE_UNROLL,
                     attention: str | None = None, step: str | None = None, seed: int = 0) -> dict:
    """Greedy decoding speed of random weights: ``new_tokens`` cached decode steps after a prefill.

    ``chunk_size`` steps run per call (default: all of them in one call); ``attention`` forces
    "xla" or "pallas" for the cached attention (``kv_cache.IMPLEMENTATION``), ``step`` a decode
    mode (``DECODE_MODES``: "xla" for the model's own step). Returns tokens_per_s and ms_per_step
    (median over ``repeats``; a batch of 1 runs as ``min_decode_rows(model)`` rows and counts one),
    prefill_ms, compile_s, and memory: params_bytes, cache_bytes, peak_bytes (parameters + a fast
    step's weights, if used + decode state + the executable's temporaries, from XLA's memory
    analysis) and allocator_peak_bytes (the device allocator's process-wide peak, where the
    backend reports one).
    """
    from jaxlm.models import build_model
    if isinstance(cfg_or_model, nnx.Module):
        model = cfg_or_model
    else:
        model = build_model(cfg_or_model, rngs=nnx.Rngs(seed), dtype=dtype)
    with kv_cache.IMPLEMENTATION.scope(attention):
        jax.clear_caches()   # traces made with another implementation must not be reused
        return _benchmark_decode(model, batch, prompt_len, new_tokens, chunk_size, repeats, unroll,
                                 step or "auto", seed)


def _benchmark_decode(model, batch, prompt_len, new_tokens, chunk_size, repeats, unroll, mode, seed) -> dict:
    cfg = model.cfg
    rows = max(batch, min_decode_rows(model, mode))
    chunk_size = chunk_size or new_tokens
    n_chunks = math.ceil(new_tokens / chunk_size)
    cache_len = bucket(prompt_len + n_chunks * chunk_size)
    sampling = SamplingConfig(greedy=True)
    graphdef, params = inference_params(model)
    ids_BP = jax.random.randint(jax.random.key(seed + 1), (rows, prompt_len), 0, cfg.vocab_size, jnp.int32)
    starts_B = jnp.zeros((rows,), jnp.int32)
    kwargs = dict(steps=chunk_size, sampling=sampling, eos_id=-1, unroll=unroll, greedy_in_one_call=mode == "auto")

    def fresh_state():
        state = _prefill(graphdef, params, ids_BP, starts_B, jax.random.key(seed), cache_len=cache_len,
                         sampling=sampling, eos_id=-1)
        return jax.block_until_ready(state)

    state = fresh_state()
    decoder, fast_weights = decode_weights(model, graphdef, params, state, mode)   # once, as generate does
    fast_weights = jax.block_until_ready(fast_weights)
    t0 = time.perf_counter()
    compiled = _decode_chunk.lower(graphdef, params, state, fast_weights, decoder=decoder, **kwargs).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, fresh_state(), fast_weights))   # warm-up (first-run allocations)

    prefill_times, decode_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = fresh_state()
        prefill_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n_chunks):
            state, tokens = compiled(params, state, fast_weights)
        jax.block_until_ready(tokens)
        decode_times.append(time.perf_counter() - t0)
    step_s = float(np.median(decode_times)) / (n_chunks * chunk_size)

    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", 0) if analysis is not None else 0
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        batch=batch, rows=rows, prompt_len=prompt_len, new_tokens=n_chunks * chunk_size, chunk_size=chunk_size,
        dtype=jnp.dtype(model.dtype).name, attention=_cached_attention(state.cache),
        step="xla" if decoder is None else decoder.name,
        backend=jax.default_backend(), device=jax.devices()[0].device_kind,
        tokens_per_s=batch / step_s, ms_per_step=step_s * 1e3, prefill_ms=float(np.median(prefill_times)) * 1e3,
        compile_s=compile_s, params_bytes=nbytes(params), cache_bytes=nbytes(state.cache),
        peak_bytes=nbytes(params) + nbytes(fast_weights) + nbytes(state) + temp, allocator_peak_bytes=stats.get("peak_bytes_in_use"))


def _cached_attention(cache: family.Cache) -> str:
    """The cached-attention implementation of the cache's last KV layer (what a step runs), if any."""
    kv_layers = [layer for layer in cache.layers if isinstance(layer, kv_cache.KVLayer)]
    return kv_cache.attention_implementation(kv_layers[-1].keys) if kv_layers else "none"


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m jaxlm.generate",
                     description="Sample continuations of prompts from a checkpoint (KV-cached, jitted decode). "
                                 "Defaults are the model cards' settings: T=0.8, top-p 0.9, repetition penalty "
                                 "1.3, 80 new tokens.")
    parser.add_argument("--checkpoint", required=True,
                        help="anything jaxlm.load reads: .pt, .safetensors, an Orbax export, a run directory")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the checkpoint)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    parser.add_argument("--prompts_file", help="a file with one prompt per line (added to --prompt)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=80)
    parser.add_argument("--temperature", type=non_negative_float, default=CARD_SAMPLING.temperature)
    parser.add_argument("--top_p", type=positive_float, default=CARD_SAMPLING.top_p)
    parser.add_argument("--top_k", type=non_negative_int, default=0, help="0: no top-k filter")
    parser.add_argument("--repetition_penalty", type=positive_float, default=None,
                        help=f"CTRL/HF rule; default {CARD_SAMPLING.repetition_penalty} when sampling, 1 with --greedy")
    parser.add_argument("--greedy", action="store_true", help="arg-max decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[],
                        help=r"stop when this string appears (repeatable; escapes like \n are understood)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--chunk_size", type=positive_int, default=DEFAULT_CHUNK,
                        help="decode steps per jitted call: the streaming granularity")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = _Stdout()
    try:
        return _run(args, out)
    except JaxlmError as error:
        out.end_line()  # an error after streamed text starts on a line of its own
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out.end_line()
        return 130


class _Stdout:
    """Standard output that remembers whether its last line is unfinished."""

    def __init__(self):
        self.open_line = False

    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.open_line = not text.endswith("\n")

    def end_line(self) -> None:
        if self.open_line:
            self.write("\n")


def _run(args, out: _Stdout) -> int:
    import jaxlm
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as error:
            raise ConfigError(f"--prompts_file {args.prompts_file}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"--prompts_file {args.prompts_file}: not UTF-8 text (byte {error.start}); "
                              "give a text file with one prompt per line") from None
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts_file FILE")
    penalty = args.repetition_penalty
    if penalty is None:
        penalty = 1.0 if args.greedy else CARD_SAMPLING.repetition_penalty
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=penalty, greedy=args.greedy)
    sampling.validate()
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
    lm = jaxlm.load(args.checkpoint, dtype=dtype, tokenizer=args.tokenizer)
    if lm.tokenizer is None:
        raise ConfigError(f"{args.checkpoint}: no tokenizer.json beside the checkpoint; pass --tokenizer PATH")
    try:
        stop = [codecs.decode(s, "unicode_escape") for s in args.stop]
    except UnicodeDecodeError as error:
        raise ConfigError(f"--stop: a bad escape sequence ({error.reason}); write e.g. '\\n\\n'") from None
    # Everything that can be refused is refused before the first character is printed.
    check_prompts(lm.cfg, [lm.tokenizer.encode(p).ids for p in prompts], args.max_new_tokens)

    streaming = len(prompts) == 1
    if streaming:
        out.write(prompts[0])
    counts: list[int] = []
    t0 = time.perf_counter()
    texts = generate_text(lm.model, lm.tokenizer, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                          seed=args.seed, stop=stop, chunk_size=args.chunk_size, eos_id=lm.eos_id,
                          on_text=(lambda row, piece: out.write(piece)) if streaming else None,
                          new_token_counts=counts)
    seconds = time.perf_counter() - t0
    if streaming:
        out.write("\n")
    else:
        for prompt, text in zip(prompts, texts):
            out.write(f"{prompt}{text}\n\n")
    print(f"[{len(prompts)} prompt(s), {sum(counts)} new tokens in {seconds:.2f} s including compilation]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
