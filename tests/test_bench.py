"""``python -m jaxlm.bench`` on a tiny config, and every fast path against the plain path.

The fast paths (fused loss, scan over layers, remat) must compute the same loss and the same
gradients as the plain computation, to float32 rounding; the PyTorch side of the bench must
compute what the shipped ``toylm_torch`` computes.
"""

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, xla_flags
from jaxlm import config as C
from jaxlm.loss import auto_chunk, lm_loss
from jaxlm.models import layers
from jaxlm.models.toylm import ToyLM, ToyLMConfig
from jaxlm.state import plan_state
from jaxlm.train import make_train_step

TINY = ToyLMConfig(vocab_size=64, dim=32, n_layers=5, n_heads=2, head_dim=16, mlp_hidden=64, max_seq_len=64,
                   sliding_window=8, lm_head_logit_cap=5.0, z_loss_weight=0.1)


def tokens(seed=0, shape=(2, 33)):
    t = np.random.default_rng(seed).integers(0, TINY.vocab_size, shape)
    t[0, 7] = t[1, -1] = -100  # padding: ignored as a target
    return jnp.asarray(t)


def loss_and_grads(cfg, **options):
    model = ToyLM(cfg, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    f = lambda p: lm_loss(nnx.merge(graphdef, p), tokens(), **options)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return loss, metrics, grads


def assert_same(a, b, rtol=2e-5):
    (loss_a, m_a, g_a), (loss_b, m_b, g_b) = a, b
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    for key in ("ce", "log_z_sq"):
        np.testing.assert_allclose(float(m_a[key]), float(m_b[key]), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b), strict=True):
        scale = float(jnp.max(jnp.abs(y)))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def plain():
    return loss_and_grads(TINY)


@pytest.mark.parametrize("options", [
    dict(fused=True, chunk=8),          # four chunks
    dict(fused=True),                   # chunk size picked by auto_chunk (the whole sequence here)
    dict(scan_layers=True),
    dict(remat="full"),
    dict(remat="dots"),
    dict(fused=True, chunk=16, scan_layers=True, remat="full"),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fast_path_gives_the_plain_loss_and_gradients(plain, options):
    assert_same(loss_and_grads(TINY, **options), plain)


def test_fused_loss_without_softcap_and_sq_mean_form_falls_back():
    no_cap = dataclasses.replace(TINY, lm_head_logit_cap=0.0)
    assert_same(loss_and_grads(no_cap, fused=True, chunk=8), loss_and_grads(no_cap))
    sq_mean = dataclasses.replace(TINY, z_loss_form="sq_mean")   # not fusable: the chunked path runs
    assert_same(loss_and_grads(sq_mean, fused=True, chunk=8), loss_and_grads(sq_mean))


def test_scan_covers_the_repeating_layers_and_unrolls_the_rest():
    def period(**fields):
        model = ToyLM(dataclasses.replace(TINY, **fields), rngs=nnx.Rngs(0))
        return layers.repeat_period([nnx.split(block)[0] for block in model.blocks])

    assert period(n_layers=6) == (2, 3)                          # S G S G S G: all scanned
    assert period(n_layers=5) == (2, 2)                          # S G S G | G (the last layer is global)
    assert period(n_layers=6, sliding_parity="odd") == (2, 2)    # G S G S | G G
    assert period(n_layers=4, attention_pattern="all_global") == (1, 4)
    assert period(n_layers=1) == (1, 0)                          # nothing repeats


def test_auto_chunk_bounds_the_logits_and_divides_the_sequence():
    assert auto_chunk(16, 4096) == 1024
    assert auto_chunk(32, 4096) == 512
    assert auto_chunk(7, 96) == 96
    assert 4095 % auto_chunk(16, 4095) == 0


def test_train_step_with_every_fast_path_matches_the_plain_step():
    """The whole optimizer step (Muon + AdamW, clipping, accumulation) from the same state."""
    def step(**train):
        cfg = C.validate(C.Config(model=TINY, optim=C.OptimConfig(lr=0.02, warmup_steps=1),
                                  train=C.TrainConfig(batch_size=2, seq_len=32, grad_accum=2,
                                                      compute_dtype="float32", **train)))
        plan = plan_state(cfg, _one_device_mesh())
        state = plan.init(cfg)
        batch = jnp.stack([tokens(1), tokens(2)])
        new_state, metrics = jax.jit(make_train_step(plan.graphdef, plan.tx, cfg))(state, batch)
        return new_state["params"], metrics

    fast_params, fast = step(fused_loss=True, loss_chunk=8, scan_layers=True, remat="full")
    plain_params, plain = step(fused_loss=False)
    np.testing.assert_allclose(float(fast["loss"]), float(plain["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(fast["grad_norm"]), float(plain["grad_norm"]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(fast_params), jax.tree.leaves(plain_params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _one_device_mesh():
    from jaxlm import sharding
    return sharding.make_mesh(C.MeshConfig(), devices=jax.devices()[:1])


# --------------------------------------------------------------------------- the command


TINY_CONFIG = textwrap.dedent("""
    from jaxlm.config import Config, OptimConfig, TrainConfig
    from jaxlm.models.toylm import ToyLMConfig

    def get_config():
        return Config(model=ToyLMConfig(vocab_size=128, dim=32, n_layers=2, n_heads=2, head_dim=16, mlp_hidden=64,
                                        max_seq_len=64, sliding_window=16),
                      train=TrainConfig(batch_size=2, seq_len=32, grad_accum=2), optim=OptimConfig(warmup_steps=1))
""")


def test_bench_command_times_jaxlm_and_pytorch_on_cpu(tmp_path):
    pytest.importorskip("torch")
    config = tmp_path / "tiny_bench.py"
    config.write_text(TINY_CONFIG)
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "-m", "jaxlm.bench", "--config", str(config), "--steps", "1", "--repeats", "1",
         "--warmup", "1", "--peak_tflops", "1", "--torch", "--torch_attention", "sdpa", "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(None)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["variant"]) for r in rows] == [("jaxlm", "config"), ("torch", "sdpa")]
    for row in rows:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1, row
        assert row["batch"] == 2 and row["seq"] == 32 and row["grad_accum"] == 2
    assert "| jaxlm | config | 2 x 32 x 2 |" in done.stdout
    assert "jaxlm (config) / PyTorch (sdpa) =" in done.stdout


def test_bench_decode_mode_prints_a_table(tmp_path):
    config = tmp_path / "tiny_bench.py"
    config.write_text(TINY_CONFIG)
    done = subprocess.run([sys.executable, "-m", "jaxlm.bench", "--config", str(config), "--mode", "decode",
                           "--batch", "2"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| batch | decode step | tokens/s | ms per step | prefill ms | compile s | peak mem MiB |" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 2 | "))
    cells = row.strip("|").split("|")
    assert len(cells) == 7 and float(cells[2].replace(",", "")) > 0, row
    assert cells[1].strip() == "XLA, xla attention", row   # no CUDA kernel off GPU


# --------------------------------------------------------------------------- the PyTorch side


def test_torch_fast_attention_computes_the_shipped_model():
    torch = pytest.importorskip("torch")
    from tools.torch_port.bench_torch import fast_toylm, prepare
    from tools.torch_port.toylm_torch import Config, ToyLM as TorchToyLM

    cfg = Config(vocab_size=64, dim=32, n_layers=3, n_heads=2, head_dim=16, mlp_hidden=64, max_seq_len=64,
                 sliding_window=8)
    torch.manual_seed(0)
    shipped = TorchToyLM(cfg)
    ids = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        want, _ = shipped(ids)
        for kernel in ("sdpa", "flex", "sdpa_flex"):
            fast = fast_toylm(cfg, kernel)
            fast.load_state_dict(shipped.state_dict())
            prepare(fast, 32, "cpu")
            got, _ = fast(ids)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=kernel)


def test_torch_batched_muon_is_jaxlm_muon():
    torch = pytest.importorskip("torch")
    from jaxlm.optim import scale_by_muon
    from tools.torch_port.bench_torch import BatchedMuon

    rng = np.random.default_rng(0)
    shapes = [(48, 16), (48, 16), (16, 48), (16, 16)]           # torch (out, in): wide, tall and square
    weights = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(2)]
    params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
    muon = BatchedMuon(params, lr=0.1, compile=False)
    tx = scale_by_muon()
    jax_params = [jnp.asarray(w.T) for w in weights]            # Flax (in, out)
    state = tx.init(jax_params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        muon.step()
        updates, state = tx.update([jnp.asarray(g.T) for g in step_grads], state)
        jax_params = [p - 0.1 * u for p, u in zip(jax_params, updates)]
    for p, q in zip(params, jax_params):
        np.testing.assert_allclose(p.detach().numpy(), np.asarray(q).T, rtol=1e-4, atol=1e-5)
