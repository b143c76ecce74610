"""The family contract is enough (issue 21, item 8): ``tests/tinygpt_family.py`` defines a second family
(learned positions, untied head, an EMA-recurrent block beside attention blocks, an auxiliary loss
and a Buffer) entirely inside ``tests/``, registered through ``jaxlm.models.register``, and this
file trains, resumes, decodes, exports and converts it with nothing in ``jaxlm/`` or ``tools/``
knowing its name.

Subprocesses find the family the way a user's would: the training config file imports it (a config
file is user code); the other command lines run their own ``main`` after ``import tinygpt_family``.
"""

import json
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, read_until, subprocess_env, xla_flags
import tinygpt_family as tg
from jaxlm import generate as G
from jaxlm import models
from jaxlm.models import family, kv_cache
from jaxlm.sampling import SamplingConfig

TESTS = pathlib.Path(__file__).resolve().parent
TINY = tg.TinyGPTConfig(vocab_size=96, dim=32, n_layers=3, n_heads=2, mlp_hidden=48, max_seq_len=64,
                        recurrent_layer=1)
STEPS, BATCH, SEQ = 20, 8, 32

@pytest.fixture(autouse=True, scope="module")
def registered():
    """Registered for this module only, so that other files' claim listings do not see it."""
    tg.register()
    yield
    models.FAMILIES.pop(tg.FAMILY, None)


def random_model(cfg=TINY, seed=0):
    """Weights larger than the init's (varied logits of a few units, no arg-max near-ties), so that a
    mistake in a cache shows; the Buffer starts at zero. Built from shapes and numpy draws: no eager
    JAX op, so nothing compiles op by op."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: tg.TinyGPT(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    rng = np.random.default_rng(seed)
    draw = lambda p: (1.0 + 0.3 * rng.standard_normal(p.shape) if p.ndim == 1 else 0.2 * rng.standard_normal(p.shape))
    params = jax.tree.map(lambda p: jnp.asarray(draw(p), jnp.float32), params)
    return nnx.merge(graphdef, params, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest))


def param_dict(model) -> dict[str, np.ndarray]:
    from jaxlm.formats.converted import flatten
    return {k.removesuffix("/value"): v for k, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


# ----------------------------------------------------------------------------- the contract in-process


def test_the_family_is_registered_through_the_public_api_and_counts_itself():
    assert models.get("tinygpt").model is tg.TinyGPT and "tinygpt" in models.names()
    model = nnx.eval_shape(lambda: models.build_model(TINY, rngs=nnx.Rngs(0), dtype=jnp.float32))
    assert isinstance(TINY, family.FamilyConfig) and isinstance(model, family.FamilyModel)
    params = {k: v for k, v in param_dict(model).items()}
    assert TINY.param_count() == sum(a.size for a in params.values())
    # N_matmul from the built model: every projection kernel (the head included), no lookup table.
    kernels = sum(a.size for name, a in params.items() if name.endswith("/kernel"))
    attention = TINY.layer_kinds().count("attention")
    assert TINY.layer_kinds() == ["attention", "ema", "attention"]
    assert TINY.flops_per_token(SEQ) == 6 * kernels + attention * 12 * TINY.dim * (SEQ + 1) / 2
    buffers = nnx.to_pure_dict(nnx.state(model, family.Buffer))   # tokens_seen: kept, not trained
    assert list(buffers) == ["tokens_seen"] and buffers["tokens_seen"].dtype == jnp.int32
    from jaxlm.errors import ConfigError
    with pytest.raises(ConfigError, match="recurrent_layer = 3"):
        tg.TinyGPTConfig(n_layers=3, recurrent_layer=3).validate()


def test_hidden_returns_the_aux_loss_and_the_loss_adds_it():
    from jaxlm.loss import lm_loss
    model = random_model()
    tokens = jax.random.randint(jax.random.key(3), (2, 17), 0, TINY.vocab_size)
    x_BTD, aux = nnx.jit(lambda m, ids: m.hidden(ids))(model, tokens[:, :-1])
    assert x_BTD.shape == (2, 16, TINY.dim) and set(aux.losses) == {"aux_l2"} and "ema_decay" in aux.metrics
    loss, metrics = nnx.jit(lm_loss)(model, tokens)
    assert float(metrics["aux_l2"]) > 0
    np.testing.assert_allclose(float(loss), float(metrics["ce"]) + float(metrics["aux_l2"]), rtol=1e-6)
    assert int(model.tokens_seen[...]) == 2 * 2 * 16   # the forward pass counted both calls' tokens


def cached_logits(model, ids_BT, prompt_len, max_len, starts_B=None):
    """Logits for positions prompt_len-1 .. T-1 through prefill + decode_step, ``[B, n, V]``."""
    prefill = jax.jit(lambda ids, cache, starts: model.prefill(ids, cache, starts))
    step = jax.jit(lambda ids, cache: model.decode_step(ids, cache))
    logits, cache = prefill(ids_BT[:, :prompt_len], model.init_cache(ids_BT.shape[0], max_len), starts_B)
    out = [logits]
    for t in range(prompt_len, ids_BT.shape[1]):
        logits, cache = step(ids_BT[:, t], cache)
        out.append(logits)
    return np.stack(out, axis=1), cache


def test_cached_logits_equal_the_uncached_forward_also_with_left_padding():
    model = random_model()
    forward = nnx.jit(lambda m, x: m(x))
    ids = jax.random.randint(jax.random.key(2), (2, 30), 0, TINY.vocab_size)
    full = np.asarray(forward(model, ids))
    cached, cache = cached_logits(model, ids, prompt_len=7, max_len=32)
    assert np.abs(full).max() > 1.0
    np.testing.assert_allclose(cached, full[:, 6:], atol=1e-5, rtol=0)
    # One cache entry per block, of the block's own kind.
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [kv_cache.KVLayer, tg.RecurrentState, kv_cache.KVLayer]
    assert int(cache.length) == 30

    # Row 1 left-padded by 5: its logits are those of its unpadded tokens alone.
    pad = 5
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), ids[1:, :25]], axis=1)
    rows = jnp.concatenate([ids[:1, :30], padded], axis=0)
    got, _ = cached_logits(model, rows, prompt_len=12, max_len=32, starts_B=jnp.array([0, pad], jnp.int32))
    np.testing.assert_allclose(got[0], full[0, 11:], atol=1e-5, rtol=0)
    alone = np.asarray(forward(model, ids[1:, :25]))[0]
    np.testing.assert_allclose(got[1], alone[11 - pad:], atol=1e-5, rtol=0)


def test_generate_tokens_with_the_per_layer_cache_equals_greedy_on_the_full_forward():
    model = random_model()
    forward = nnx.jit(lambda m, x: m(x))
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 11]]    # different lengths: the second is left-padded
    new = G.generate_tokens(model, prompts, max_new_tokens=12, sampling=SamplingConfig(greedy=True), chunk_size=5)
    for prompt, tokens in zip(prompts, new):
        ids = list(prompt)
        for _ in range(12):   # right-padded to one shape (one compile): causal, so the padding is unseen
            row = jnp.asarray([ids + [0] * (24 - len(ids))])
            ids.append(int(np.argmax(np.asarray(forward(model, row))[0, len(ids) - 1])))
        assert tokens == ids[len(prompt):]
    assert len(set(new[0])) > 2   # not a degenerate repetition that any cache would reproduce


def test_the_train_step_updates_the_buffer_and_reports_the_aux_loss():
    from jaxlm import config as C
    from jaxlm import sharding
    from jaxlm.state import plan_state
    from jaxlm.train import jit_train_step
    cfg = C.validate(C.Config(model=TINY, train=C.TrainConfig(steps=2, batch_size=4, seq_len=16, grad_accum=2,
                                                              compute_dtype="float32"),
                              optim=C.OptimConfig(warmup_steps=1)))
    mesh = sharding.make_mesh(C.MeshConfig(data=1), devices=jax.devices()[:1])
    plan = plan_state(cfg, mesh)
    with sharding.use_mesh(mesh):
        state = plan.init(cfg)
        step = jit_train_step(plan, cfg)
        tokens = jax.random.randint(jax.random.key(0), (2, 4, 17), 0, TINY.vocab_size)
        for _ in range(2):
            state, metrics = step(state, tokens)
    assert int(state["buffers"]["tokens_seen"][...]) == 2 * 2 * 4 * 16
    assert float(metrics["aux_l2"]) > 0 and "ema_decay" in metrics


# ----------------------------------------------------------------------------- through the command lines

CONFIG = """
import sys
sys.path.insert(0, {tests!r})
import tinygpt_family  # registers the family: a config file is user code
from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig

def get_config():
    return Config(
        model=tinygpt_family.TinyGPTConfig(vocab_size=512, dim=32, n_layers=3, n_heads=2, mlp_hidden=64,
                                           max_seq_len=64, recurrent_layer=1),
        train=TrainConfig(steps={steps}, batch_size={batch}, seq_len={seq}, log_every=1, eval_batches=1,
                          compute_dtype="float32"),
        optim=OptimConfig(lr=0.02, warmup_steps=2),
        data=DataConfig(source="pydoc", vocab_size=512, tokenizer_train_docs=2000, cache_dir={cache!r}),
        checkpoint=CheckpointConfig(every_steps=5, keep=2),
        out_dir={out!r},
    )
"""


def env(**extra):
    """A fresh process's environment: the family's module on the path and named in JAXLM_FAMILIES,
    which is how a jaxlm command line finds a family that lives outside jaxlm."""
    return subprocess_env(TESTS, **{"XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu",
                                    "JAXLM_FAMILIES": "tinygpt_family", **extra})


def with_family(module: str, *args) -> list[str]:
    """The plain jaxlm command line a user types (the family comes in through JAXLM_FAMILIES)."""
    return [sys.executable, "-m", module, *args]


def run(cmd, timeout=300):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env(), timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Config files for the runs of this module (one tokenizer cache for all of them)."""
    root = tmp_path_factory.mktemp("tinygpt_runs")

    def config(name):
        path = root / f"{name}.py"
        path.write_text(CONFIG.format(tests=str(TESTS), steps=STEPS, batch=BATCH, seq=SEQ,
                                      cache=str(root / "cache"), out=str(root / name)))
        return path, root / name

    def trained(name):
        """A finished run of ``name`` (trained here unless an earlier test already did)."""
        path, out = config(name)
        if not (out / "checkpoints" / str(STEPS)).is_dir():
            run(train_command(path))
        return out

    config.trained = trained
    return config


def train_command(config):
    return [sys.executable, "-m", "jaxlm.train", "--config", str(config)]


def final_state(out_dir):
    from jaxlm.checkpoint import restore_run
    _, state = restore_run(out_dir)
    from jaxlm.formats.converted import flatten
    flat = lambda tree: {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(tree)).items()}
    return flat(state["params"]), flat(state.get("buffers", {})), int(state["step"])


def step_losses(log: str) -> dict[int, str]:
    """``train step N: loss X ...`` lines -> {N: the whole line}."""
    return {int(line.split()[2].rstrip(":")): line for line in log.splitlines() if line.startswith("train step ")}


def test_trains_through_the_cli_is_sigkilled_and_resumes_bit_identically(runs):
    reference_cfg, reference_out = runs("reference")
    killed_cfg, killed_out = runs("killed")
    # The uninterrupted run and the one to be killed side by side (they share only the tokenizer cache,
    # which the reference fills first: the killed run starts once the reference logs its first step).
    reference = subprocess.Popen(train_command(reference_cfg), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    reference_log = read_until(reference, lambda line: line.startswith("train step 1:"))
    killed = subprocess.Popen(train_command(killed_cfg), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    reference_log.append(reference.communicate(timeout=300)[0])
    assert reference.returncode == 0, "".join(reference_log)[-3000:]
    # Killed past the save of step 10 (every 5), perhaps while it is written.
    killed_log = read_until(killed, lambda line: line.startswith("train step 12:"))
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, "".join(killed_log)[-3000:]

    lines = step_losses("".join(reference_log))
    assert sorted(lines) == list(range(1, STEPS + 1))
    assert all("aux_l2" in line and "ema_decay" in line for line in lines.values())   # the aux channel, logged
    params, buffers, step = final_state(reference_out)
    assert step == STEPS
    assert buffers == {"tokens_seen": STEPS * BATCH * SEQ}   # the Buffer, updated in the forward pass and saved

    resumed_log = run(train_command(killed_cfg)).stdout
    assert "resumed from" in resumed_log
    resumed_params, resumed_buffers, step = final_state(killed_out)
    assert step == STEPS and resumed_params.keys() == params.keys()
    for name in params:
        assert resumed_params[name].tobytes() == params[name].tobytes(), f"{name} differs"
    assert resumed_buffers == buffers   # a Buffer lost on resume would have restarted the count
    # The steps re-done after the kill log the reference's losses, digit for digit.
    again = step_losses(resumed_log)
    assert min(again) <= 11 and max(again) == STEPS
    assert all(again[n].split("tokens_per_s")[0] == lines[n].split("tokens_per_s")[0] for n in again)


def test_exported_through_the_cli_and_loaded_with_jaxlm_load(runs, tmp_path):
    import jaxlm
    from jaxlm.checkpoint import restore_run
    from jaxlm.state import merge_model, plan_state
    out = runs.trained("reference")   # the run the resume test made, if it ran first
    dst = tmp_path / "exported"
    run(with_family("jaxlm.checkpoint", "export", str(out), str(dst)))
    lm = jaxlm.load(dst)
    assert lm.cfg.family == "tinygpt" and lm.tokenizer is not None
    cfg, state = restore_run(out)
    from jaxlm import sharding
    plan = plan_state(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    trained = merge_model(plan.graphdef, state["params"], state.get("buffers"))
    assert param_dict(lm.model).keys() == param_dict(trained).keys()
    for name, array in param_dict(trained).items():
        assert np.asarray(param_dict(lm.model)[name]).tobytes() == np.asarray(array).tobytes(), name
    ids = jnp.asarray([lm.encode("def main():\n    return 0")], jnp.int32)
    forward = nnx.jit(lambda m, x: m(x))   # one executable for both: equal weights give equal bits
    np.testing.assert_array_equal(np.asarray(lm(ids)), np.asarray(forward(trained, ids)))
    assert int(lm.model.tokens_seen[...]) >= STEPS * BATCH * SEQ   # the Buffer came with the weights


def test_plain_command_lines_find_an_out_of_tree_family(tmp_path):
    """A fresh process finds the family through JAXLM_FAMILIES; without it, one clear line, exit 2."""
    from jaxlm import config as C
    fake_run = tmp_path / "run"
    fake_run.mkdir()
    (fake_run / "config.json").write_text(C.to_json(C.Config(model=TINY, train=C.TrainConfig(seq_len=SEQ))))
    command = [sys.executable, "-m", "jaxlm.checkpoint", "export", str(fake_run), str(tmp_path / "d")]
    found = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env(), timeout=120)
    assert "unknown model family" not in found.stderr, found.stderr[-400:]
    assert "has no checkpoints/ folder" in found.stderr   # it got as far as the (empty) run's checkpoints
    lost = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env(JAXLM_FAMILIES=""), timeout=120)
    assert lost.returncode == 2 and "Traceback" not in lost.stderr
    assert "unknown model family 'tinygpt'" in lost.stderr


# ----------------------------------------------------------------------------- a .pt in its own naming


def torch_state_dict(cfg, seed=0) -> dict[str, np.ndarray]:
    """What a PyTorch TinyGPT saves (``nn.Linear`` weights ``(out, in)``, q|k|v fused), in its
    registration order; random values, larger than an init's, so that a misplaced tensor shows."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
    ones = lambda n: (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)
    D, F = cfg.dim, cfg.mlp_hidden
    sd = {"tokens_seen": np.asarray(777, np.int32),
          "wte.weight": normal(cfg.vocab_size, D), "wpe.weight": normal(cfg.max_seq_len, D)}
    for i, kind in enumerate(cfg.layer_kinds()):
        sd[f"h.{i}.ln_1.weight"] = ones(D)
        if kind == "attention":
            sd[f"h.{i}.attn.qkv.weight"], sd[f"h.{i}.attn.proj.weight"] = normal(3 * D, D), normal(D, D)
        else:
            sd[f"h.{i}.ema.in_proj.weight"] = normal(D, D)
            sd[f"h.{i}.ema.decay"] = rng.uniform(-1, 3, D).astype(np.float32)
            sd[f"h.{i}.ema.out_proj.weight"] = normal(D, D)
        sd[f"h.{i}.ln_2.weight"], sd[f"h.{i}.mlp.fc.weight"], sd[f"h.{i}.mlp.proj.weight"] = ones(D), normal(F, D), normal(D, F)
    sd["ln_f.weight"], sd["lm_head.weight"] = ones(D), normal(cfg.vocab_size, D)
    return sd


def reference_logits(sd, cfg, ids) -> np.ndarray:
    """The architecture as its module docstring states it, in float64 numpy on the PyTorch tensors:
    the independent truth for the naming (transposes, the q|k|v order, the untied head)."""
    sd = {k: v.astype(np.float64) for k, v in sd.items() if k != "tokens_seen"}
    T, D, H = len(ids), cfg.dim, cfg.n_heads
    norm = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w
    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))  # jax.nn.gelu's default
    x = sd["wte.weight"][ids] + sd["wpe.weight"][:T]
    for i, kind in enumerate(cfg.layer_kinds()):
        y = norm(x, sd[f"h.{i}.ln_1.weight"])
        if kind == "attention":
            q, k, v = np.split(y @ sd[f"h.{i}.attn.qkv.weight"].T, 3, axis=-1)
            heads = lambda z: z.reshape(T, H, D // H).transpose(1, 0, 2)
            scores = heads(q) @ heads(k).transpose(0, 2, 1) / np.sqrt(D // H)
            scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            y = (probs @ heads(v)).transpose(1, 0, 2).reshape(T, D) @ sd[f"h.{i}.attn.proj.weight"].T
        else:
            u, a, h, states = y @ sd[f"h.{i}.ema.in_proj.weight"].T, 1 / (1 + np.exp(-sd[f"h.{i}.ema.decay"])), 0.0, []
            for t in range(T):
                h = a * h + (1 - a) * u[t]
                states.append(h)
            y = np.stack(states) @ sd[f"h.{i}.ema.out_proj.weight"].T
        x = x + y
        x = x + gelu(norm(x, sd[f"h.{i}.ln_2.weight"]) @ sd[f"h.{i}.mlp.fc.weight"].T) @ sd[f"h.{i}.mlp.proj.weight"].T
    return norm(x, sd["ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.fixture
def pt_file(tmp_path):
    torch = pytest.importorskip("torch")
    sd = torch_state_dict(TINY)
    fields = {"vocab_size": TINY.vocab_size, "dim": TINY.dim, "n_layers": TINY.n_layers, "n_heads": TINY.n_heads,
              "mlp_hidden": TINY.mlp_hidden, "max_seq_len": TINY.max_seq_len, "dropout": 0.0}
    path = tmp_path / "tinygpt.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "cfg": fields, "step": 1234}, path)
    return path, sd


def test_a_pt_in_its_own_naming_round_trips_through_the_converter(pt_file, tmp_path):
    import torch
    from jaxlm import formats
    path, sd = pt_file
    dst, back = tmp_path / "orbax", tmp_path / "back.pt"
    run(with_family("tools.torch_port.__main__", "to-orbax", str(path), str(dst)))
    conv = formats.read_checkpoint(dst)
    assert conv.family == "tinygpt" and conv.model_cfg == TINY and conv.step == 1234
    # Flax layout: kernels transposed, q|k|v split in row order, the untied head its own parameter.
    np.testing.assert_array_equal(conv.params["blocks/0/mixer/k/kernel"], sd["h.0.attn.qkv.weight"][TINY.dim:2 * TINY.dim].T)
    np.testing.assert_array_equal(conv.params["head/kernel"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(conv.params["blocks/1/mixer/decay"], sd["h.1.ema.decay"])
    assert conv.params["tokens_seen"] == 777 and conv.params["tokens_seen"].dtype == np.int32   # the Buffer
    # The converted parameters in the model compute what the architecture says (float64 reference).
    model = random_model()
    as_key = lambda path: tuple(int(k) if k.isdigit() else k for k in path.split("/"))
    nnx.update(model, nnx.State.from_flat_path({as_key(p): jnp.asarray(a) for p, a in conv.params.items()}))
    ids = np.random.default_rng(5).integers(0, TINY.vocab_size, 20)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids[None])))[0], reference_logits(sd, TINY, ids),
                               atol=2e-5, rtol=0)

    run(with_family("tools.torch_port.__main__", "to-torch", str(dst), str(back)))
    original, written = torch.load(path, weights_only=True), torch.load(back, weights_only=True)
    assert list(written["model"]) == list(original["model"])     # the same keys, in the same order
    for name, tensor in original["model"].items():
        other = written["model"][name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape
        assert other.numpy().tobytes() == tensor.numpy().tobytes(), f"{name} differs"
    assert written["cfg"] == original["cfg"] and written["step"] == 1234


def test_jaxlm_load_reads_the_pt_and_its_export(pt_file, tmp_path):
    import jaxlm
    from jaxlm import formats
    path, sd = pt_file
    ids = np.random.default_rng(6).integers(0, TINY.vocab_size, 20)
    want = reference_logits(sd, TINY, ids)
    lm = jaxlm.load(path)
    np.testing.assert_allclose(np.asarray(lm(ids))[0], want, atol=2e-5, rtol=0)
    formats.save_export(formats.read_checkpoint(path), tmp_path / "exp")
    np.testing.assert_array_equal(np.asarray(jaxlm.load(tmp_path / "exp")(ids)), np.asarray(lm(ids)))


# ----------------------------------------------------------------------------- nothing in jaxlm/ knows it


def test_no_file_in_jaxlm_or_tools_names_the_test_family():
    hits = [str(p.relative_to(REPO)) for folder in ("jaxlm", "tools") for p in (REPO / folder).rglob("*")
            if p.is_file() and p.suffix in (".py", ".cu", ".cuh", ".md", ".json", ".txt")
            and "tinygpt" in p.read_text(errors="replace").lower()]
    assert not hits, f"generic code names the test family: {hits}"
