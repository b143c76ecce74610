"""The CUDA decode step (jaxlm.models.toylm.decode_kernel).

Everywhere: the weights it reads reproduce the model's projections, it is not used where it
cannot run, and a failed build is one clear line. With nvcc: both builds compile. On an NVIDIA
GPU only (skipped elsewhere, with the reason): the CUDA-core build's logits and caches equal
ToyLM.decode_step's in float32 past the sliding window, generate gives the same tokens through
it, the tensor-core build (bf16, one row to many) gives each row what the CUDA-core build gives
it, and greedy steps in one launch give what a launch a step gives.
"""

import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import generate as G
from jaxlm.errors import JaxlmError
from jaxlm.models import family, kv_cache, layers
from jaxlm.models.toylm import decode_kernel as toylm_decode
from jaxlm.models.toylm import ToyLM, ToyLMConfig

TINY = dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, head_dim=16, mlp_hidden=128, max_seq_len=64,
            sliding_window=8)
def cache_arrays(cache):
    """Every layer's keys and values, in one list."""
    return [array for layer in cache.layers for array in layer]


ON_GPU = jax.default_backend() == "gpu" and toylm_decode.find_nvcc() is not None
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU and nvcc (the kernel runs nowhere else)")


def tiny_model(dtype=jnp.float32, **overrides) -> ToyLM:
    """Random weights, norm scales away from 1 so that a misplaced scale shows."""
    model = ToyLM(ToyLMConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(0), dtype=dtype)
    rng = np.random.default_rng(0)
    for norm in [*(b.attn_norm for b in model.blocks), *(b.mlp_norm for b in model.blocks), model.final_norm]:
        norm.w[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(norm.w.shape), jnp.float32)
    return model


def test_prepared_weights_reproduce_the_projections():
    model = tiny_model()
    w = toylm_decode.prepare(model)
    cfg, F = model.cfg, model.cfg.mlp_hidden
    x = jax.random.normal(jax.random.key(1), (3, cfg.dim))
    h = jax.random.normal(jax.random.key(2), (3, F))
    for l, block in enumerate(model.blocks):
        qkv = jnp.concatenate([block.attn.q(x), block.attn.k(x), block.attn.v(x)], axis=-1)
        np.testing.assert_allclose(x @ w.wqkv[l].T, qkv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x @ w.wo[l].T, block.attn.o(x), rtol=1e-5, atol=1e-6)
        gate_up = x @ w.wgate_up[l].T
        np.testing.assert_allclose(gate_up[:, :F], block.mlp.gate(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gate_up[:, F:], block.mlp.up(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h @ w.wdown[l].T, block.mlp.down(h), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(w.attn_norm[l], block.attn_norm.w[...])
        np.testing.assert_array_equal(w.mlp_norm[l], block.mlp_norm.w[...])
    np.testing.assert_array_equal(w.final_norm, model.final_norm.w[...])
    np.testing.assert_array_equal(w.embed, model.embed.embedding[...])
    # Two RoPE pairs rotated by hand with these frequencies match layers.rope.
    x_BTHK = jax.random.normal(jax.random.key(3), (1, 1, 1, cfg.head_dim))
    angle = 5.0 * w.rope_frequencies
    x1, x2 = x_BTHK[..., : cfg.head_dim // 2], x_BTHK[..., cfg.head_dim // 2:]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    by_hand = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    rotated = layers.rope(x_BTHK, jnp.full((1, 1), 5), theta=cfg.rope_theta, pairing="rotate_half")
    np.testing.assert_allclose(by_hand, rotated, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the fallback off GPU")
def test_off_gpu_the_xla_step_is_used():
    model = tiny_model()
    assert toylm_decode.unsupported(model, 1) == "not on an NVIDIA GPU"
    assert toylm_decode.implementation(model, 1) == "xla"
    assert G.min_decode_rows(model) == 1


def test_too_many_rows_or_mixed_dtypes_are_refused(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [type("Gpu", (), {"platform": "gpu", "device_kind": "NVIDIA H200"})()])
    assert "16-bit" in toylm_decode.unsupported(model, toylm_decode.MAX_ROWS + 1)   # float32: CUDA cores only
    assert toylm_decode.unsupported(model, toylm_decode.MAX_ROWS) is None
    assert "cache is bfloat16" in toylm_decode.unsupported(model, 1, jnp.bfloat16)
    half = tiny_model(dtype=jnp.bfloat16)
    assert "at most" in toylm_decode.unsupported(half, toylm_decode.MAX_MMA_ROWS + 1)
    odd_head = tiny_model(dtype=jnp.bfloat16, dim=48, n_heads=4, head_dim=12)   # no tensor-core tiles
    assert "head_dim 12" in toylm_decode.unsupported(odd_head, toylm_decode.MAX_ROWS + 1)
    assert toylm_decode.unsupported(odd_head, toylm_decode.MAX_ROWS) is None      # the CUDA cores take it
    with toylm_decode.BUILD.scope("tensor_cores"):
        assert "16-bit" in toylm_decode.unsupported(model, 1)


def _fake_nvcc(tmp_path, script: str) -> str:
    path = tmp_path / "nvcc"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_failed_build_is_one_clear_line_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXLM_NVCC", _fake_nvcc(tmp_path, 'echo "decode.cu(12): error: something broke" >&2\nexit 2\n'))
    defines = (("DTYPE", 0), ("B", 1), ("D", 64), ("H", 4), ("K", 16), ("F", 128), ("V", 256), ("L", 4),
               ("BLOCKS", 132), ("INTERLEAVED", 0), ("TENSOR_CORES", 0), ("ARCH", "90"))
    with pytest.raises(JaxlmError) as error:
        toylm_decode._compile(defines)
    message = str(error.value)
    assert "\n" not in message and "something broke" in message and "CUDA decode kernel" in message
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))


@pytest.mark.skipif(toylm_decode.find_nvcc() is None, reason="needs nvcc to build the kernel")
def test_both_builds_compile_for_half_and_single_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
    # CUDA cores: float32 and bf16; tensor cores: bf16 and float16, one row to many
    for dtype_code, rows, interleaved, tensor_cores in ((0, 2, 1, 0), (1, 1, 0, 0), (1, 1, 0, 1), (1, 20, 0, 1),
                                                        (2, 64, 1, 1)):
        defines = (("DTYPE", dtype_code), ("B", rows), ("D", 64), ("H", 4), ("K", 16), ("F", 128), ("V", 256),
                   ("L", 4), ("BLOCKS", 132), ("INTERLEAVED", interleaved), ("TENSOR_CORES", tensor_cores),
                   ("ARCH", "90"))
        library = toylm_decode._compile(defines)
        assert library.exists() and library.stat().st_size > 0
        assert toylm_decode._compile(defines) == library   # cached: not rebuilt


# ------------------------------------------------------------------------------- on a GPU


@needs_gpu
@pytest.mark.parametrize("overrides, rows", [
    ({}, 2),
    (dict(rope_pairing="interleaved", embed_scale=True, window_includes_query=False, lm_head_logit_cap=0.0), 1),
])
def test_cuda_step_equals_the_xla_step_past_the_window(overrides, rows):
    model = tiny_model(**overrides)
    prompt, steps = 6, 26   # the sliding rings (8 slots) wrap three times
    ids = jax.random.randint(jax.random.key(1), (rows, prompt + steps), 0, model.cfg.vocab_size)
    starts = jnp.array([2, 0][:rows], jnp.int32)
    with jax.default_matmul_precision("highest"):   # XLA's default float32 matmuls on GPU are TF32
        _, cache = jax.jit(model.prefill)(ids[:, :prompt], model.init_cache(rows, 32), starts)
        weights = toylm_decode.prepare(model)
        xla_step = jax.jit(model.decode_step)
        cuda_step = jax.jit(lambda w, i, c: toylm_decode.decode_step(model, w, i, c))
        xla_cache = cuda_cache = cache
        for t in range(steps):
            xla_logits, xla_cache = xla_step(ids[:, prompt + t], xla_cache)
            cuda_logits, cuda_cache = cuda_step(weights, ids[:, prompt + t], cuda_cache)
            np.testing.assert_allclose(cuda_logits, xla_logits, atol=1e-5, rtol=0)
    for xla_c, cuda_c in zip(cache_arrays(xla_cache), cache_arrays(cuda_cache)):
        np.testing.assert_allclose(cuda_c, xla_c, atol=1e-5, rtol=0)


@needs_gpu
def test_generate_gives_the_same_tokens_through_the_kernel(monkeypatch):
    """Greedy, float32, in chunks of 7: XLA's step, the kernel a launch a step, and the kernel a
    launch a chunk (its own arg-max) give the same tokens, also cut at an EOS met mid-way."""
    model = tiny_model()
    prompts = [[5, 17, 99, 3], [42, 7]]
    greedy = G.SamplingConfig(greedy=True)

    def tokens(implementation, chunk_in_kernel=True, eos_id=None):
        mode = "xla" if implementation == "xla" else "auto" if chunk_in_kernel else "fast_steps"
        jax.clear_caches()
        return G.generate_tokens(model, prompts, max_new_tokens=30, sampling=greedy, eos_id=eos_id, chunk_size=7,
                                 decode=mode)

    with jax.default_matmul_precision("highest"):
        through_xla = tokens("xla")
        eos = through_xla[0][9]
        through_xla_eos = tokens("xla", eos_id=eos)
        assert tokens("cuda") == tokens("cuda", chunk_in_kernel=False) == through_xla
        assert tokens("cuda", eos_id=eos) == tokens("cuda", chunk_in_kernel=False, eos_id=eos) == through_xla_eos
    jax.clear_caches()
    assert toylm_decode.unsupported(model, 2) is None
    assert len(through_xla_eos[0]) <= 9


@needs_gpu
@pytest.mark.parametrize("overrides, rows", [
    ({}, 20),
    (dict(rope_pairing="interleaved", embed_scale=True, window_includes_query=False, lm_head_logit_cap=0.0), 35),
    ({}, 1),
    ({}, toylm_decode.MAX_MMA_ROWS),
])
def test_tensor_core_build_gives_each_row_what_the_cuda_core_build_gives(overrides, rows, monkeypatch):
    """bf16 (the tensor cores take no float32): the tensor-core build on all rows against the
    CUDA-core build on 2-row slices, of the first m-tile and of the padded last one (one row: an
    m-tile of 15 padding rows). Both keep the residual in float32 and round where XLA's step
    does, so they differ only by summation order (a bf16 rounding flip here and there); on an
    H200 at most 2.4e-3 of the largest logit, caches 2e-3."""
    model = tiny_model(jnp.bfloat16, **overrides)
    prompt, steps = 6, 26   # the sliding rings (8 slots) wrap three times
    ids = jax.random.randint(jax.random.key(1), (rows, prompt + steps), 0, model.cfg.vocab_size)
    starts = jnp.asarray(np.random.default_rng(1).integers(0, 6, rows), jnp.int32)
    _, cache = jax.jit(model.prefill)(ids[:, :prompt], model.init_cache(rows, 32), starts)
    assert toylm_decode.unsupported(model, rows) is None and toylm_decode._uses_tensor_cores(model)
    weights = toylm_decode.prepare(model)
    # The build is chosen when a step is traced: each jitted step keeps the one it was traced with.
    step = jax.jit(lambda w, i, c: toylm_decode.decode_step(model, w, i, c))
    cuda_core_step = jax.jit(lambda w, i, c: toylm_decode.decode_step(model, w, i, c))
    xla_step = jax.jit(model.decode_step)
    slices = [np.arange(min(2, rows)), np.arange(max(rows - 2, 0), rows)]
    take = lambda c, r: family.Cache(tuple(kv_cache.KVLayer(layer.keys[r], layer.values[r]) for layer in c.layers),
                                     c.length, c.starts_B[r])
    many_cache, xla_cache, few_caches = cache, cache, [take(cache, r) for r in slices]
    for t in range(steps):
        token = ids[:, prompt + t]
        many_logits, many_cache = step(weights, token, many_cache)
        with toylm_decode.BUILD.scope("cuda_cores"):
            few = [cuda_core_step(weights, token[r], few_caches[k]) for k, r in enumerate(slices)]
        xla_logits, xla_cache = xla_step(token, xla_cache)
        scale = float(jnp.max(jnp.abs(xla_logits)))
        # against XLA's bf16 step, which rounds the residual per op: within bf16 rounding
        assert float(jnp.linalg.norm(many_logits - xla_logits) / jnp.linalg.norm(xla_logits)) < 1e-2
        for k, r in enumerate(slices):
            few_logits, few_caches[k] = few[k]
            np.testing.assert_allclose(many_logits[r], few_logits, atol=1e-2 * scale, rtol=0)
    for k, r in enumerate(slices):
        for many, few in zip(cache_arrays(many_cache), cache_arrays(few_caches[k])):
            many, few = np.asarray(many[r], np.float32), np.asarray(few, np.float32)
            np.testing.assert_allclose(many, few, atol=1e-2 * np.abs(few).max(), rtol=0)


@needs_gpu
@pytest.mark.parametrize("dtype, rows", [(jnp.float32, 2), (jnp.bfloat16, 20), (jnp.bfloat16, 1),
                                         (jnp.bfloat16, toylm_decode.MAX_MMA_ROWS)])
def test_greedy_steps_in_one_launch_equal_a_launch_a_step(dtype, rows):
    """greedy_steps feeds each step's arg-max to the next inside the kernel. Against the same
    build a launch a step with jnp.argmax of its logits: the same tokens and bit-identical caches
    (the arithmetic is the same), over two launches; rows that produce EOS repeat it."""
    model = tiny_model(dtype)
    prompt, steps = 6, 26   # the sliding rings (8 slots) wrap three times
    ids = jax.random.randint(jax.random.key(2), (rows, prompt), 0, model.cfg.vocab_size)
    starts = jnp.asarray(np.random.default_rng(2).integers(0, 4, rows), jnp.int32)
    _, cache = jax.jit(model.prefill)(ids, model.init_cache(rows, 32), starts)
    weights = toylm_decode.prepare(model)
    step = jax.jit(lambda w, i, c: toylm_decode.decode_step(model, w, i, c))
    many = jax.jit(lambda w, i, c, n, eos: toylm_decode.greedy_steps(model, w, i, c, steps=n, eos_id=eos),
                   static_argnums=(3, 4))

    def a_launch_a_step(eos):   # generate's rule: a row fed EOS is done
        tokens, done, c, token = [], np.asarray(ids[:, -1] == eos), cache, ids[:, -1]
        for _ in range(steps):
            logits, c = step(weights, token, c)
            token = jnp.where(done, eos, jnp.argmax(logits, axis=-1).astype(jnp.int32))
            done = done | np.asarray(token == eos)
            tokens.append(np.asarray(token))
        return np.stack(tokens, axis=1), c

    eos = int(a_launch_a_step(-1)[0][0, 5])   # a token row 0 produces: it and maybe others stop
    expected, expected_cache = a_launch_a_step(eos)
    first, c = many(weights, ids[:, -1], cache, 10, eos)
    rest, c = many(weights, first[:, -1], c, steps - 10, eos)
    np.testing.assert_array_equal(np.concatenate([first, rest], axis=1), expected)
    assert (expected[0, 5:] == eos).all()
    assert int(c.length) == int(cache.length) + steps
    for got, want in zip(cache_arrays(c), cache_arrays(expected_cache)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
