"""ToyLM's decode step as one persistent CUDA kernel, called through XLA's FFI.

Why: on a GPU, XLA runs ``ToyLM.decode_step`` as a chain of ~150 small dependent kernels. The
chain, not reading the weights, bounds decoding at small batches (docs/PERFORMANCE.md,
"Generation"). This kernel computes the same step in one launch. It uses
the same cache layout and gives the same logits up to rounding, so ``generate`` can use it for
one chunk and XLA for the next. ``decode_step`` runs one step and returns the logits;
``greedy_steps`` runs many greedy steps in one launch, the kernel taking each step's arg-max
itself. It comes in two builds:
- ``decode_mma.cu``, products on the tensor cores (``mma.sync`` on tiles of 16 rows), for
  bfloat16 and float16 models whose shapes fit its tiles, up to ``MAX_MMA_ROWS`` rows;
- ``decode.cu``, products on the CUDA cores (a warp per output), for the others (float32)
  up to ``MAX_ROWS`` rows.

It runs where all of this holds:
- a CUDA GPU;
- ``nvcc`` to build it. It is built once per model shape and batch into ``~/.cache/jaxlm/kernels``
  (``JAXLM_CACHE_DIR`` moves it; ``jaxlm/models/cuda_build.py``);
- at most ``MAX_MMA_ROWS`` rows through the tensor cores, ``MAX_ROWS`` through the CUDA cores;
- weights and cache in one dtype: bfloat16, float16 or float32.
Everywhere else ``generate`` uses ``ToyLM.decode_step``; ``unsupported`` says why.
``ToyLM.fast_decoder`` offers it to generation through the family contract (``fast_decoder`` here).
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models import family, kv_cache, layers
from jaxlm.models.cuda_build import compile_library, ffi_target, find_nvcc
from jaxlm.switches import Switch

_HERE = pathlib.Path(__file__).parent
CUDA_CORE_SOURCE, TENSOR_CORE_SOURCE = _HERE / "decode.cu", _HERE / "decode_mma.cu"
_HEADERS = (_HERE / "decode_common.cuh", _HERE / "decode_ffi.cuh")
# Rows per build, from the measured crossovers (docs/PERFORMANCE.md, "Generation"): the tensor-core
# build from one row up to 128, XLA above; the CUDA-core build (float32) only up to 2 rows.
MAX_ROWS = 2
MAX_MMA_ROWS = 128
DOWN_SPLIT_MAX = 8    # the CUDA-core build splits a down-projection row over up to 8 warps
_DTYPE_CODES = {jnp.dtype(jnp.float32): 0, jnp.dtype(jnp.bfloat16): 1, jnp.dtype(jnp.float16): 2}
# ``with IMPLEMENTATION.scope("xla"):`` forces an implementation (benchmarks and tests compare them).
IMPLEMENTATION = Switch("ToyLM decode step", ("xla", "cuda"))
# ``with BUILD.scope("cuda_cores"):`` forces a build of the kernel (likewise).
BUILD = Switch("ToyLM decode kernel build", ("cuda_cores", "tensor_cores"))


class DecodeWeights(NamedTuple):
    """The weights as the kernel reads them: matrices ``[out, in]`` (a dot product per output
    over a contiguous row), stacked over layers, in the compute dtype; norm scales float32."""

    rope_frequencies: jax.Array   # [K/2]
    embed: jax.Array              # [V, D], also the tied head
    attn_norm: jax.Array          # [L, D]
    wqkv: jax.Array               # [L, 3D, D]
    wo: jax.Array                 # [L, D, D]
    mlp_norm: jax.Array           # [L, D]
    wgate_up: jax.Array           # [L, 2F, D]
    wdown: jax.Array              # [L, D, F]
    final_norm: jax.Array         # [D]


def unsupported(model, rows: int, cache_dtype=None) -> str | None:
    """Why the kernel cannot run this decode step, or None when it can."""
    device = jax.devices()[0]
    if jax.default_backend() != "gpu" or device.platform != "gpu" or "NVIDIA" not in device.device_kind.upper():
        return "not on an NVIDIA GPU"
    if getattr(model.cfg, "family", None) != "toylm":   # the model calls this module, not the reverse
        return f"{type(model).__name__} is not a ToyLM"
    dtype = jnp.dtype(model.dtype)
    if dtype not in _DTYPE_CODES:
        return f"compute dtype {dtype.name}"
    if cache_dtype is not None and jnp.dtype(cache_dtype) != dtype:
        return f"the cache is {jnp.dtype(cache_dtype).name}, the weights {dtype.name}"
    if rows > MAX_MMA_ROWS:
        return f"{rows} rows (the kernel takes at most {MAX_MMA_ROWS})"
    cfg, misfit = model.cfg, _tensor_core_misfit(model)
    if _uses_tensor_cores(model):
        if misfit:
            return misfit
    else:
        if rows > MAX_ROWS:
            return f"{rows} rows through the CUDA cores (at most {MAX_ROWS})" + (f": {misfit}" if misfit else "")
        vec = 16 // dtype.itemsize   # elements in one 16-byte load
        if cfg.dim % vec or cfg.mlp_hidden % (vec * DOWN_SPLIT_MAX):
            return f"dim {cfg.dim} / mlp_hidden {cfg.mlp_hidden} not multiples of {vec} / {vec * DOWN_SPLIT_MAX}"
    if find_nvcc() is None:
        return "nvcc not found (set JAXLM_NVCC or CUDA_HOME)"
    return None


def _tensor_core_misfit(model) -> str | None:
    """Why the tensor-core build cannot take this model, or None when it can. Its tiles: inputs
    in 32s, outputs in 8s, a head at most 8 n-tiles of 8."""
    cfg, dtype = model.cfg, jnp.dtype(model.dtype)
    if dtype.itemsize != 2:
        return f"{dtype.name} (the tensor-core build takes 16-bit dtypes)"
    if cfg.dim % 32 or cfg.mlp_hidden % 64 or cfg.vocab_size % 128 or cfg.head_dim % 8 or cfg.head_dim > 64:
        return (f"dim {cfg.dim} / mlp_hidden {cfg.mlp_hidden} / vocab {cfg.vocab_size} not multiples of "
                f"32 / 64 / 128, or head_dim {cfg.head_dim} not a multiple of 8 up to 64")
    return None


def _uses_tensor_cores(model) -> bool:
    """Which build runs the step: the tensor-core one wherever it fits (a ``BUILD`` scope wins)."""
    if BUILD.get():
        return BUILD.get() == "tensor_cores"
    return _tensor_core_misfit(model) is None


def implementation(model, rows: int, cache_dtype=None) -> str:
    """``"cuda"`` where the kernel runs, else ``"xla"`` (an ``IMPLEMENTATION`` scope wins)."""
    if IMPLEMENTATION.get():
        return IMPLEMENTATION.get()
    return "xla" if unsupported(model, rows, cache_dtype) else "cuda"


def fast_decoder(model, rows: int, cache_dtype=None) -> family.FastDecoder | str:
    """The kernel as the family contract offers it to generation, or why it does not run."""
    if implementation(model, rows, cache_dtype) != "cuda":
        return unsupported(model, rows, cache_dtype) or "the XLA step was chosen"
    return family.FastDecoder(name="ToyLM CUDA decode kernel", prepare=prepare, step=decode_step,
                              greedy_steps=greedy_steps, min_rows=1)


def prepare(model) -> DecodeWeights:
    """The kernel's weights from the model's (traceable; ``generate`` makes them once per generation)."""
    dtype, f32 = model.dtype, jnp.float32
    cfg, blocks = model.cfg, list(model.blocks)
    out_in = lambda linear: linear.kernel[...].astype(dtype).T
    stack = lambda per_block: jnp.stack([per_block(b) for b in blocks])
    return DecodeWeights(
        rope_frequencies=layers.rope_frequencies(cfg.head_dim, cfg.rope_theta),
        embed=model.embed.embedding[...].astype(dtype),
        attn_norm=stack(lambda b: b.attn_norm.w[...].astype(f32)),
        wqkv=stack(lambda b: jnp.concatenate([out_in(b.attn.q), out_in(b.attn.k), out_in(b.attn.v)])),
        wo=stack(lambda b: out_in(b.attn.o)),
        mlp_norm=stack(lambda b: b.mlp_norm.w[...].astype(f32)),
        wgate_up=stack(lambda b: jnp.concatenate([out_in(b.mlp.gate), out_in(b.mlp.up)])),
        wdown=stack(lambda b: out_in(b.mlp.down)),
        final_norm=model.final_norm.w[...].astype(f32))


def decode_step(model, weights: DecodeWeights, ids_B, cache: family.Cache):
    """``ToyLM.decode_step`` through the kernel: logits ``[B, V]`` and the cache, updated in place."""
    logits = jax.ShapeDtypeStruct((ids_B.shape[0], model.cfg.vocab_size), jnp.float32)
    return _launch(model, weights, ids_B, cache, logits, eos_id=-1)


def greedy_steps(model, weights: DecodeWeights, ids_B, cache: family.Cache, *, steps: int, eos_id: int):
    """``steps`` greedy decode steps in one launch, each fed the previous one's arg-max (the
    first fed ``ids_B``): what ``steps`` calls of ``decode_step`` and ``jnp.argmax`` give, without
    a launch, an arg-max and the loop's bookkeeping between steps. A row fed ``eos_id`` (-1:
    none) produces it again, as generate's rows that are done do.

    Returns the tokens ``[B, steps]`` and the cache, ``steps`` longer.
    """
    rows = ids_B.shape[0]
    return _launch(model, weights, ids_B, cache, jax.ShapeDtypeStruct((rows, steps), jnp.int32), eos_id=eos_id)


def _launch(model, weights: DecodeWeights, ids_B, cache: family.Cache, out: jax.ShapeDtypeStruct, eos_id: int):
    """One launch of the kernel; ``out`` says what it returns: float32 ``[B, V]`` logits (one
    step) or int32 ``[B, steps]`` greedy tokens."""
    cfg = model.cfg
    target, workspace_floats = _build(_defines(model, ids_B.shape[0]))
    caches = (*(layer.keys for layer in cache.layers), *(layer.values for layer in cache.layers))
    first_cache = 3 + len(weights)   # operands: ids, time, starts, the weights, then the caches
    call = jax.ffi.ffi_call(
        target,
        (out, jax.ShapeDtypeStruct((workspace_floats,), jnp.float32),
         *(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches)),
        input_output_aliases={first_cache + i: 2 + i for i in range(len(caches))})
    result, _, *caches = call(
        ids_B.astype(jnp.int32), cache.length, cache.starts_B, *weights, *caches,
        windows=np.array([block.attn.window or 0 for block in model.blocks], np.int64),
        eps=np.float32(cfg.norm_eps), embed_scale=np.float32(math.sqrt(cfg.dim) if cfg.embed_scale else 1.0),
        attn_scale=np.float32(1.0 / math.sqrt(cfg.head_dim)), logit_cap=np.float32(cfg.lm_head_logit_cap or 0.0),
        eos=np.int32(eos_id))
    n, steps = cfg.n_layers, 1 if out.dtype == jnp.float32 else out.shape[1]
    layer_caches = tuple(kv_cache.KVLayer(k, v) for k, v in zip(caches[:n], caches[n:]))
    return result, family.Cache(layer_caches, cache.length + steps, cache.starts_B)


def _defines(model, rows: int) -> tuple:
    cfg, device = model.cfg, jax.devices()[0]
    return (("DTYPE", _DTYPE_CODES[jnp.dtype(model.dtype)]), ("B", rows), ("D", cfg.dim), ("H", cfg.n_heads),
            ("K", cfg.head_dim), ("F", cfg.mlp_hidden), ("V", cfg.vocab_size), ("L", cfg.n_layers),
            ("BLOCKS", device.core_count), ("INTERLEAVED", int(cfg.rope_pairing == "interleaved")),
            ("TENSOR_CORES", int(_uses_tensor_cores(model))), ("ARCH", str(device.compute_capability).replace(".", "")))


def _compile(defines: tuple) -> pathlib.Path:
    """The kernel's library for one shape (built with nvcc unless the cache already holds it)."""
    settings = dict(defines)
    arch = settings.pop("ARCH")
    source = TENSOR_CORE_SOURCE if settings.pop("TENSOR_CORES") else CUDA_CORE_SOURCE
    return compile_library("toylm_decode", source, _HEADERS, arch, settings, "the ToyLM CUDA decode kernel")


@functools.cache
def _build(defines: tuple) -> tuple[str, int]:
    """The kernel for one shape, built and registered with XLA: ``(FFI target, workspace floats)``."""
    target, lib = ffi_target(_compile(defines), "JaxlmDecodeStep")
    return target, int(lib.jaxlm_workspace_floats())
