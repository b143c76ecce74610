"""Splash attention (``layers.causal_attention(..., implementation="splash")``, the TPU choice) against
XLA's ``jax.nn.dot_product_attention`` (the "xla" implementation): forward and gradients for each
attention kind of each family, below, at and above each window; lengths no block divides; under a
mesh; and every registered family's logits. On CPU the Pallas kernel runs in interpret mode, which
compiles slowly: shapes are small and each kernel is compiled once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO
from jaxlm import config as C
from jaxlm import models, sharding, switches
from jaxlm.models import layers, splash

# (query heads, key/value heads, head dim, window) of each family's attention, as its real config has
# them (ToyLM's window shrunk from Crowfeather's 1024 so that interpret mode stays quick).
KINDS = {
    "toylm_global": (8, 8, 64, None),
    "toylm_sliding": (8, 8, 64, 64),
    "llama_think_full": (9, 3, 64, None),        # GQA, head_dim = dim 576 / 9 heads
    "llama_think_csa_local": (9, 3, 64, 64),     # csa_local_window
    "nanowhale_mla": (8, 1, 96, None),           # one shared K=V head (MQA)
}
# Windowed kinds below, at and above the window; 320 is padded to 384, three blocks of 128 of which
# the local mask skips some.
CASES = [("llama_think_full", 128), ("nanowhale_mla", 128)] + [
    (kind, T) for kind, lengths in (("toylm_sliding", (40, 64, 320)), ("llama_think_csa_local", (40, 64, 128)))
    for T in lengths]
BATCH = 2
# Interpret mode makes large programs; the least optimisation compiles them faster, to the same numbers.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def inputs(kind: str, T: int, batch: int = BATCH):
    H, G, K, _ = KINDS[kind]
    rng = np.random.default_rng(T * 100 + H + G)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    # Queries of a few units so that the softmax is far from uniform (a wrong mask shows).
    return 3 * draw(batch, T, H, K), draw(batch, T, G, K), draw(batch, T, G, K), draw(batch, T, H, K)


def loss_and_grads(implementation: str, window):
    """``(out, dq, dk, dv)`` of ``sum(attention * w)``, jitted."""
    def f(q, k, v, w):
        out = layers.causal_attention(q, k, v, window=window, implementation=implementation)
        return jnp.sum(out * w), out
    grad = jax.grad(f, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda q, k, v, w: (lambda g, out: (out, *g))(*grad(q, k, v, w)), compiler_options=FAST_COMPILE)


@functools.cache
def splash_result(kind: str, T: int):
    """Splash's output and gradients without a mesh (shared by the parity and the mesh tests)."""
    return jax.device_get(loss_and_grads("splash", KINDS[kind][3])(*inputs(kind, T)))


def assert_close(got, want, what):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, (what, name)
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        assert err <= 2e-5 * max(1.0, float(np.max(np.abs(b)))), f"{what}: {name} differs by {err}"


@pytest.mark.parametrize("kind,T", CASES, ids=[f"{k}-T{t}" for k, t in CASES])
def test_splash_matches_xla_forward_and_gradients(kind, T):
    want = loss_and_grads("xla", KINDS[kind][3])(*inputs(kind, T))
    assert_close(splash_result(kind, T), want, f"{kind} T={T}")


def test_a_length_no_block_divides_is_padded_and_gives_the_same_result():
    """ToyLM's global layers at 200 (padded to 256); the windowed cases above pad 40, 64 and 320 too."""
    assert splash.block_size(200) == (256, 256) and splash.block_size(320) == (384, 128)
    assert splash.block_size(1024) == (1024, 512) and splash.block_size(40) == (128, 128)
    q, k, v, w = inputs("toylm_global", 200)
    assert_close(splash_result("toylm_global", 200), loss_and_grads("xla", None)(q, k, v, w), "T=200")


def test_under_a_mesh_the_batch_and_heads_split_and_the_result_is_the_unsharded_one():
    """FSDP x tensor on 8 fake devices: sequences split 2 ways, query heads 4 ways and nanowhale's one
    shared key/value head whole to each; no communication but the shared head's gradient sum."""
    kind, T = "nanowhale_mla", 128
    mesh = sharding.make_mesh(C.MeshConfig(fsdp=2, tensor=4), devices=jax.devices()[:8])
    _, G, _, window = KINDS[kind]
    q, k, v, w = inputs(kind, T)
    q, w = (jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES, None, "tensor"))) for x in (q, w))
    kv_heads = "tensor" if G > 1 else None
    k, v = (jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES, None, kv_heads))) for x in (k, v))
    with sharding.use_mesh(mesh):
        step = loss_and_grads("splash", window)
        hlo = step.lower(q, k, v, w).compile().as_text()
        got = step(q, k, v, w)
    # Nothing moves but, with one shared head, its gradient summed over the head shards.
    moved = [op for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce") if op in hlo]
    assert moved == ([] if G > 1 else ["all-reduce"])
    assert got[0].sharding.spec[0] == sharding.BATCH_AXES
    assert_close(jax.device_get(got), splash_result(kind, T), f"{kind} on a mesh")


def test_tpu_programs_choose_splash():
    for dtype in (jnp.bfloat16, jnp.float32):
        with switches.PLATFORM.scope("tpu"):
            assert layers.attention_implementation(dtype) == "splash"
        with switches.PLATFORM.scope("cpu"):
            assert layers.attention_implementation(dtype) == "xla"
    with pytest.raises(ValueError, match="G dividing H"):
        splash.attention(*inputs("llama_think_full", 128)[:2], jnp.zeros((BATCH, 128, 2, 64)), window=None,
                         rules=None, interpret=True)


def test_on_tpu_v2_and_v3_the_kernel_runs_in_float32_and_returns_bf16():
    """Their Mosaic matmuls take no bf16: the kernel gets float32 queries, keys and values there."""
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in inputs("llama_think_full", 128))

    def kernel_dtypes():
        """The floating dtypes the Pallas kernels are given, anywhere in the traced program."""
        found, calls = set(), 0
        def walk(jaxpr):
            nonlocal calls
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "pallas_call":
                    calls += 1
                    found.update(str(x.aval.dtype) for x in eqn.invars if jnp.issubdtype(x.aval.dtype, jnp.floating))
                for param in eqn.params.values():
                    for sub in param if isinstance(param, (tuple, list)) else (param,):
                        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                            walk(getattr(sub, "jaxpr", sub) if not hasattr(sub, "eqns") else sub)
        # A new function each time: a traced one keeps the switch it was traced with.
        attend = lambda q, k, v: splash.attention(q, k, v, window=None, rules=None, interpret=True)
        walk(jax.make_jaxpr(attend)(q, k, v).jaxpr)
        assert calls, "no Pallas kernel in the program"
        return found

    for kind, want in (("TPU v2", {"float32"}), ("TPU v3", {"float32"}), ("TPU v5 lite", {"bfloat16"})):
        with switches.DEVICE_KIND.scope(kind):
            assert kernel_dtypes() == want, kind
            out = jax.eval_shape(lambda q, k, v: splash.attention(q, k, v, window=None, rules=None, interpret=True),
                                 q, k, v)
            assert out.dtype == jnp.bfloat16, kind


# ----------------------------------------------------------------------------- every family's logits


def tiny_configs() -> dict[str, C.Config]:
    """The smallest config in configs/ of each family (by parameter count)."""
    best = {}
    for path in sorted((REPO / "configs").glob("*.py")):
        cfg = C.load_config(str(path))
        name = models.family_of(cfg.model)
        if name not in best or cfg.model.param_count() < best[name].model.param_count():
            best[name] = cfg
    return best


TINY = tiny_configs()


def random_model(model_cfg, seed=0):
    """``(graphdef, state)`` with weights drawn in numpy (no eager JAX op, so nothing compiles op by
    op): matrices N(0, 0.1²), vectors 1 + N(0, 0.1²), buffers zero."""
    abstract = nnx.eval_shape(lambda: models.build_model(model_cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    draw = lambda p: 0.1 * rng.standard_normal(p.shape) + (p.ndim == 1)
    params = jax.tree.map(lambda p: jnp.asarray(draw(p), p.dtype), params)
    rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)
    return nnx.split(nnx.merge(graphdef, params, rest))


@pytest.mark.parametrize("family", models.built_in_names())   # not a test's own (tinygpt)
def test_every_family_computes_the_same_logits_with_splash(family):
    assert family in TINY, f"family {family!r} has no config in configs/ to test splash attention with"
    cfg = TINY[family]
    T = min(128, cfg.model.max_seq_len)
    graphdef, state = random_model(cfg.model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, T)), jnp.int32)

    def logits(state, ids):
        model = nnx.merge(graphdef, state)
        return model.logits(model.hidden(ids)[0])

    results = {}
    for implementation in ("xla", "splash"):
        with layers.ATTENTION.scope(implementation):   # a jit each: the choice is read while tracing
            results[implementation] = np.asarray(jax.jit(logits, compiler_options=FAST_COMPILE)(state, ids))
    err = float(np.max(np.abs(results["splash"] - results["xla"])))
    assert err <= 1e-5 * max(1.0, float(np.max(np.abs(results["xla"])))), f"{family}: logits differ by {err}"
