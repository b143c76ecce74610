"""nanowhale_tiny trained through ``python -m jaxlm.train``: router metrics in the log, SIGKILL and
resume bit for bit (router biases included), and the same losses on one device, on an experts x data
mesh and on fsdp=8 of fake CPU devices."""

import importlib.util
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, read_until, subprocess_env, xla_flags

# Five training processes (each compiles the train step): an end-to-end run, not a fast test.
pytestmark = pytest.mark.slow

STEPS, BATCH, SEQ = 8, 8, 32
MESHES = {"experts4_data2": ("--config.mesh.experts=4", "--config.mesh.data=2"),
          "fsdp8": ("--config.mesh.fsdp=8", "--config.mesh.data=1")}


def env(devices, cache):
    # One persistent compilation cache for the module: the resumed run reuses the killed run's compiles.
    return subprocess_env(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def command(out, root, *extra):
    return [sys.executable, "-m", "jaxlm.train", "--config", "nanowhale_tiny.py",
            f"--config.train.steps={STEPS}", f"--config.train.batch_size={BATCH}", f"--config.train.seq_len={SEQ}",
            "--config.train.log_every=1", "--config.train.eval_batches=1", "--config.train.sample_prompt=",
            "--config.optim.warmup_steps=2", f"--config.optim.planned_steps={STEPS}",
            "--config.data.tokenizer_train_docs=2000", f"--config.data.cache_dir={root / 'data'}",
            "--config.checkpoint.every_steps=2", f"--config.out_dir={out}", *extra]


def step_lines(log: str) -> dict[int, str]:
    return {int(line.split()[2].rstrip(":")): line for line in log.splitlines() if line.startswith("train step ")}


def metric(line: str, name: str) -> float:
    words = line.split()
    return float(words[words.index(name) + 1])


def final_state(out_dir):
    from jaxlm.checkpoint import restore_run
    from jaxlm.formats.converted import flatten
    _, state = restore_run(out_dir)
    flat = lambda tree: {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(tree)).items()}
    return flat(state["params"]), flat(state.get("buffers", {})), int(state["step"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference, killed-then-resumed and the two meshes' runs, all started from this one fixture so
    that they overlap; returns their logs and output directories."""
    root = tmp_path_factory.mktemp("nanowhale_runs")
    cache = root / "xla"
    popen = lambda out, devices, *extra: subprocess.Popen(command(out, root, *extra), cwd=REPO, env=env(devices, cache),
                                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reference = popen(root / "reference", 1)
    logs = {"reference": read_until(reference, lambda line: line.startswith("train step 1:"), timeout=600)}
    # The tokenizer is cached now: the others may start.
    others = {"killed": popen(root / "killed", 1)}
    for name, extra in MESHES.items():
        others[name] = popen(root / name, 8, *extra)
    logs["reference"].append(reference.communicate(timeout=600)[0])
    assert reference.returncode == 0, "".join(logs["reference"])[-3000:]
    killed = others.pop("killed")
    # Killed past the save of step 4, perhaps while a save is written.
    killed_log = read_until(killed, lambda line: line.startswith("train step 5:"), timeout=600)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, "".join(killed_log)[-3000:]
    resumed = subprocess.run(command(root / "killed", root), cwd=REPO, env=env(1, cache), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    logs["resumed"] = resumed.stdout
    for name, proc in others.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        logs[name] = out
    logs["reference"] = "".join(logs["reference"])
    return root, logs


def test_router_metrics_are_logged_per_expert(runs):
    root, logs = runs
    lines = step_lines(logs["reference"])
    assert sorted(lines) == list(range(1, STEPS + 1))
    for line in lines.values():
        load = [metric(line, f"expert_load/{e}") for e in range(4)]
        assert abs(sum(load) - 1.0) < 2e-3 and min(load) > 0     # fractions of the routed slots
        assert 0 < metric(line, "router_entropy") <= np.log(4) + 1e-3
        assert "balance" not in line   # upstream has no balance loss (SPEC 3.9)
    # The same vectors in metrics.jsonl and TensorBoard, one scalar series per expert.
    from jaxlm.monitor import read_metrics
    series = read_metrics(root / "reference")
    for name in (*(f"expert_load/{e}" for e in range(4)), "router_entropy"):
        assert [step for step, _ in series[f"train/{name}"]] == list(range(1, STEPS + 1)), name
    if importlib.util.find_spec("tensorboardX") is None:   # the monitor writes TensorBoard only with it
        return
    events = b"".join(f.read_bytes() for f in (root / "reference" / "tensorboard").rglob("events.out.tfevents*"))
    assert all(f"expert_load/{e}".encode() in events for e in range(4)) and b"router_entropy" in events


def test_sigkill_and_resume_is_bit_identical_buffers_included(runs):
    root, logs = runs
    params, buffers, step = final_state(root / "reference")
    assert step == STEPS
    assert {k for k in buffers if k.endswith("gate/bias")} == {f"layers/{i}/ffn/gate/bias" for i in range(2)}
    assert "resumed from" in logs["resumed"]
    again_params, again_buffers, again_step = final_state(root / "killed")
    assert again_step == STEPS and again_params.keys() == params.keys() and again_buffers.keys() == buffers.keys()
    for name in params:
        assert again_params[name].tobytes() == params[name].tobytes(), f"{name} differs"
    for name in buffers:
        assert again_buffers[name].tobytes() == buffers[name].tobytes(), f"buffer {name} differs"
    again, lines = step_lines(logs["resumed"]), step_lines(logs["reference"])
    assert min(again) <= 5 and max(again) == STEPS
    assert all(again[n].split("tokens_per_s")[0] == lines[n].split("tokens_per_s")[0] for n in again)


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_same_losses_on_one_device_and_on_a_mesh(runs, mesh):
    root, logs = runs
    one, many = step_lines(logs["reference"]), step_lines(logs[mesh])
    assert sorted(many) == sorted(one)
    for n in one:   # printed to 4 digits; the meshes sum in another order
        for name in ("loss", "grad_norm", "router_entropy", *(f"expert_load/{e}" for e in range(4))):
            a, b = metric(one[n], name), metric(many[n], name)
            assert abs(a - b) <= 2e-3 * max(abs(a), 1e-2), (mesh, n, name, a, b)
    params, _, _ = final_state(root / "reference")
    other, _, _ = final_state(root / mesh)
    # AdamW divides by sqrt(v): a gradient near zero whose sign the other summation order flips moves
    # its parameter by ~lr, so a handful of elements may differ; the rest must agree closely.
    diff = np.concatenate([np.abs(other[name] - params[name]).ravel() for name in params])
    assert diff.max() < 1e-3 and np.mean(diff > 2e-5) < 0.02 and np.median(diff) < 1e-7, \
        (mesh, diff.max(), np.mean(diff > 2e-5), np.median(diff))


def test_experts_are_split_over_the_experts_axis():
    from jaxlm import config as C
    from jaxlm import sharding
    from jaxlm.state import plan_state
    spec = importlib.util.spec_from_file_location("nanowhale_tiny", REPO / "configs" / "nanowhale_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.mesh = C.MeshConfig(data=2, experts=4)
    plan = plan_state(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:8]))
    from jaxlm.formats.converted import flatten
    flat = flatten(nnx.to_pure_dict(plan.abstract["params"]))
    for w in ("w1", "w2", "w3"):   # the leading axis of the stacked experts
        assert flat[f"layers/0/ffn/experts/{w}"].sharding.spec[0] == "experts", w
    assert "experts" not in flat["layers/0/attn/wq_a/kernel"].sharding.spec
