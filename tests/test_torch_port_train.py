"""``--init_from``: a PyTorch checkpoint with optimizer state continues training in jaxlm, and goes back.

The checkpoint is made by ``test_torch_port.crowfeather_like``: a tiny ToyLM trained two steps in
PyTorch with Muon-style momentum on the matrices and AdamW on embedding and norms, saved with a
pickled Config, a ``_orig_mod.`` prefix, bf16 weights and moments.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO

torch = pytest.importorskip("torch", reason="the converter's tests build checkpoints with torch")

from test_torch_port import TINY, assert_same_tensors, crowfeather_like, ids, load_as_upstream  # noqa: E402

import jaxlm  # noqa: E402
from jaxlm import checkpoint, sharding  # noqa: E402
from jaxlm import config as C  # noqa: E402
from jaxlm.errors import CheckpointError  # noqa: E402
from jaxlm.formats import init_train_state  # noqa: E402
from jaxlm.formats.optimizer_state import slots_from_optax  # noqa: E402
from jaxlm.models.toylm import ToyLMConfig  # noqa: E402
from jaxlm.state import plan_state  # noqa: E402
from jaxlm.train import make_train_step  # noqa: E402
from tools.torch_port.__main__ import main as cli  # noqa: E402


def run_config(out_dir, steps=10):
    cfg = C.Config(model=ToyLMConfig(**TINY),
                   train=C.TrainConfig(steps=steps, batch_size=8, seq_len=16, compute_dtype="float32"),
                   optim=C.OptimConfig(lr=0.01, warmup_steps=1, planned_steps=steps),
                   out_dir=str(out_dir))
    return C.validate(cfg)


def torch_param(model, name):
    return dict(model.named_parameters())[name]


def as_f32(t):
    return t.detach().to(torch.bfloat16).float().numpy()


def test_init_from_pt_restores_moments_and_step_then_trains(tmp_path):
    src, model, muon, adamw = crowfeather_like(tmp_path)
    cfg = run_config(tmp_path / "run")
    mesh = sharding.make_mesh(cfg.mesh)
    plan = plan_state(cfg, mesh)
    with jax.set_mesh(mesh):
        state = init_train_state(src, cfg, plan.init(cfg), out_dir=tmp_path / "run", log=lambda *a: None)
        assert int(state["step"]) == 2
        slots, count = slots_from_optax(state["opt_state"])
        assert count == 2 and set(slots) == {"momentum", "mu", "nu"}
        q = torch_param(model, "model.layers.1.self_attn.q_proj.weight")
        np.testing.assert_array_equal(slots["momentum"]["blocks/1/attn/q/kernel"], as_f32(muon.state[q]["momentum_buffer"]).T)
        embed = torch_param(model, "model.embed_tokens.weight")
        np.testing.assert_array_equal(slots["mu"]["embed/embedding"], as_f32(adamw.state[embed]["exp_avg"]))
        np.testing.assert_array_equal(slots["nu"]["embed/embedding"], as_f32(adamw.state[embed]["exp_avg_sq"]))
        assert "blocks/1/attn/q/kernel" not in slots.get("mu", {})  # Muon's matrices have no Adam moments
        params = state["params"]
        np.testing.assert_array_equal(np.asarray(params["blocks"][2]["mlp"]["down"]["kernel"][...]),
                                      as_f32(torch_param(model, "model.layers.2.mlp.down_proj.weight")).T)
        assert params["embed"]["embedding"][...].dtype == jnp.float32  # master weights upcast

        step_fn = jax.jit(make_train_step(plan.graphdef, plan.tx, cfg), donate_argnums=0)
        tokens = jnp.asarray(ids(17, batch=8)[None], jnp.int32)
        state, metrics = step_fn(state, tokens)
        assert int(state["step"]) == 3 and np.isfinite(float(metrics["loss"]))
        assert slots_from_optax(state["opt_state"])[1] == 3  # the schedule moved on from the saved step
    assert (tmp_path / "run" / "torch_layout.json").is_file()


def test_run_directory_back_to_torch_is_bit_exact_before_training(tmp_path):
    """pt -> --init_from -> a jaxlm run checkpoint -> to-torch: the source's names, bf16 and moments, unchanged."""
    src, *_ = crowfeather_like(tmp_path)
    cfg = run_config(tmp_path / "run")
    mesh = sharding.make_mesh(cfg.mesh)
    plan = plan_state(cfg, mesh)
    ckpt = checkpoint.Checkpointer(cfg)
    ckpt.check_config()
    with jax.set_mesh(mesh):
        state = init_train_state(src, cfg, plan.init(cfg), out_dir=ckpt.out_dir, log=lambda *a: None)
        ckpt.save(2, state)
        ckpt.wait()
    ckpt.close()
    # jaxlm.load reads the run, one of its steps and an inference export of it alike
    want = np.asarray(jaxlm.load(src)(ids(20)))
    np.testing.assert_array_equal(np.asarray(jaxlm.load(tmp_path / "run")(ids(20))), want)
    np.testing.assert_array_equal(np.asarray(jaxlm.load(tmp_path / "run" / "checkpoints" / "2")(ids(20))), want)
    checkpoint.export_inference(tmp_path / "run", tmp_path / "inference", dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(jaxlm.load(tmp_path / "inference")(ids(20))), want)
    assert cli(["to-torch", str(tmp_path / "run"), str(tmp_path / "back.pt")]) == 0
    original = load_as_upstream(src, tmp_path)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    original["cfg"] = {k: v for k, v in vars(original["cfg"]).items()}
    for group in back["optim"][0]["param_groups"] + back["optim"][1]["param_groups"]:
        group["lr"] = 1e-3  # to-torch writes the run's current learning rate into each group
    assert_same_tensors(original, back)
    # and as the jaxlm-native layout, readable by the PyTorch ToyLM
    assert cli(["to-torch", str(tmp_path / "run"), str(tmp_path / "card.pt"), "--naming", "hf"]) == 0
    card = torch.load(tmp_path / "card.pt", weights_only=True)
    assert card["step"] == 2 and card["optimizer"]["param_groups"][0]["use_muon"] is True
    assert card["optimizer"]["param_groups"][0]["param_names"][0] == "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.slow
def test_train_cli_continues_from_a_pt_at_its_step(tmp_path):
    src, *_ = crowfeather_like(tmp_path, vocab_size=512)  # a vocabulary jaxlm's tokenizer trainer can reach
    (tmp_path / "cfg.py").write_text(f"""
from jaxlm.config import Config, DataConfig, OptimConfig, TrainConfig, CheckpointConfig
from jaxlm.models.toylm import ToyLMConfig
def get_config():
    return Config(model=ToyLMConfig(**{dict(TINY, vocab_size=512)!r}),
                  train=TrainConfig(steps=6, batch_size=8, seq_len=16, log_every=1, eval_batches=1),
                  optim=OptimConfig(lr=0.01, warmup_steps=1, planned_steps=100),
                  data=DataConfig(source="pydoc", vocab_size=512, cache_dir={str(tmp_path / 'cache')!r}),
                  checkpoint=CheckpointConfig(every_steps=0), out_dir={str(tmp_path / 'run')!r})
""")
    out = subprocess.run([sys.executable, "-m", "jaxlm.train", "--config", str(tmp_path / "cfg.py"),
                          "--init_from", str(src)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 2" in out.stdout + out.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["6"]


def test_init_from_the_converted_directory_is_the_same_and_mismatches_are_refused(tmp_path):
    src, *_ = crowfeather_like(tmp_path)
    assert cli(["to-orbax", str(src), str(tmp_path / "exp")]) == 0
    cfg = run_config(tmp_path / "run")
    mesh = sharding.make_mesh(cfg.mesh)
    plan = plan_state(cfg, mesh)
    quiet = lambda *a: None
    other_vocab, other_theta = run_config(tmp_path / "run2"), run_config(tmp_path / "run3")
    other_vocab.model.vocab_size = 128
    other_theta.model.rope_theta = 500_000.0
    plans = [plan_state(c, mesh) for c in (other_vocab, other_theta)]  # (outside the mesh, as train does)
    with jax.set_mesh(mesh):
        from_pt = init_train_state(src, cfg, plan.init(cfg), log=quiet)
        from_dir = init_train_state(tmp_path / "exp", cfg, plan.init(cfg), log=quiet)
        for a, b in zip(jax.tree.leaves(from_pt), jax.tree.leaves(from_dir)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        with pytest.raises(CheckpointError, match="vocabulary mismatch: .* has 96 tokens, the config model.vocab_size = 128"):
            init_train_state(src, other_vocab, plans[0].init(other_vocab), log=quiet)
        notes = []
        init_train_state(src, other_theta, plans[1].init(other_theta), log=notes.append)
        assert any("rope_theta = 10000.0, the run config 500000.0" in n for n in notes)
