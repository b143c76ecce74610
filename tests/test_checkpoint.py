"""Runs that die and come back: resume must continue bit-for-bit, damaged checkpoints are skipped.

Each test trains a tiny ToyLM through the real command line in a subprocess, so that
kills and signals hit the real process.
"""

import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, read_until, xla_flags
from jaxlm.checkpoint import export_inference, restore_run

pytestmark = pytest.mark.slow

CONFIG = """
from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig
from jaxlm.models.toylm import ToyLMConfig

def get_config():
    return Config(
        model=ToyLMConfig(vocab_size=512, dim=32, n_layers=2, n_heads=2, head_dim=16, mlp_hidden=64,
                          max_seq_len=64, sliding_window=16),
        train=TrainConfig(steps={steps}, batch_size=8, seq_len=32, log_every=5, eval_batches=2),
        optim=OptimConfig(lr=0.02, warmup_steps=2),
        data=DataConfig(source="pydoc", vocab_size=512, cache_dir={cache!r}),
        checkpoint=CheckpointConfig(every_steps={every}, keep=3),
        out_dir={out!r},
    )
"""


def write_config(tmp_path, name, *, steps=30, every=5):
    out = tmp_path / name
    path = tmp_path / f"{name}.py"
    path.write_text(CONFIG.format(steps=steps, every=every, out=str(out), cache=str(tmp_path / "cache")))
    return path, out


def command(config, *extra):
    return [sys.executable, "-m", "jaxlm.train", "--config", str(config), *extra]


def env(devices=8):
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu"}


def train(config, *extra, devices=8):
    out = subprocess.run(command(config, *extra), capture_output=True, text=True, cwd=REPO, env=env(devices),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def final_params(out_dir):
    _, state = restore_run(out_dir)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state["params"]))}, int(state["step"])


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    reference_cfg, reference_out = write_config(tmp_path, "reference")
    train(reference_cfg)
    reference, step = final_params(reference_out)
    assert step == 30

    killed_cfg, killed_out = write_config(tmp_path, "killed")
    rng = random.Random(0)
    kill_steps, last_seen = [], 0
    for attempt in range(10):
        # Log every step; kill a random fraction of a second after a randomly chosen step
        # is reached, which lands both between saves and inside them (every 5 steps).
        process = subprocess.Popen(command(killed_cfg, "--config.train.log_every=1"), cwd=REPO, env=env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        target = rng.randint(last_seen + 1, 32)  # past 29: let this attempt finish
        step_of = lambda line: int(line.split()[2].rstrip(":")) if line.startswith("train step ") else 0
        seen = read_until(process, lambda line: target < 30 and step_of(line) >= target, or_end=True)
        last_seen = max([last_seen] + [step_of(line) for line in seen])
        if target < 30 and last_seen >= target:
            time.sleep(rng.uniform(0.0, 0.3))
            process.send_signal(signal.SIGKILL)
            kill_steps.append(target)
        process.communicate(timeout=300)
        if process.returncode == 0:
            break
    else:
        pytest.fail("the run never finished in 10 attempts")
    assert len(kill_steps) >= 2, f"the run should have been killed at least twice (killed at {kill_steps})"
    resumed, step = final_params(killed_out)
    assert step == 30
    assert_bit_identical(resumed, reference)


def test_sigterm_saves_the_current_step_and_exits(tmp_path):
    config, out = write_config(tmp_path, "term", steps=100_000, every=0)
    process = subprocess.Popen(command(config), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    read_until(process, lambda line: "train step 10:" in line)   # training is under way
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    rest = process.communicate(timeout=60)[0]
    assert process.returncode == 0, rest
    assert time.monotonic() - sent < 30
    assert "stopped by signal" in rest
    steps = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 10 <= steps[0] < 100_000  # every_steps=0: only the signal saved


def test_damaged_newest_checkpoint_falls_back_and_still_matches(tmp_path):
    config, out = write_config(tmp_path, "damaged", steps=20)
    train(config)
    reference, _ = final_params(out)
    newest = out / "checkpoints" / "20"
    for path in (newest / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"garbage" + path.read_bytes()[: path.stat().st_size // 3])
    result = train(config)
    assert "checkpoints/20 is damaged" in result.stdout and "resumed from" in result.stdout
    resumed, step = final_params(out)
    assert step == 20
    assert_bit_identical(resumed, reference)  # retrained from step 15 to the same bits


def test_a_different_config_on_the_same_directory_is_refused(tmp_path):
    config, out = write_config(tmp_path, "guard", steps=5)
    train(config)
    refused = subprocess.run(command(config, "--config.optim.lr=0.5"), capture_output=True, text=True,
                             cwd=REPO, env=env(), timeout=120)
    assert refused.returncode == 2
    assert "holds a run of another config (differs in optim.lr)" in refused.stderr
    assert "Traceback" not in refused.stderr
    fresh = train(config, "--config.optim.lr=0.5", "--config.resume=false")
    assert "previous checkpoints moved to" in fresh.stdout
    assert list(out.glob("checkpoints.before-*/5"))  # the old run is kept, not deleted


def test_restore_on_another_device_count_and_mesh(tmp_path):
    config, out = write_config(tmp_path, "mesh", steps=10)
    train(config, "--config.mesh.data=1", "--config.mesh.fsdp=8")  # FSDP over 8 devices
    reference, _ = final_params(out)
    # Re-run on a single device: the step-10 state restores there, and the run is finished.
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    one = subprocess.run(command(config, "--config.mesh.data=1"), capture_output=True, text=True, cwd=REPO,
                         env=env(1), timeout=300)
    assert one.returncode == 0 and "already trained to step 10 of 10" in one.stdout, one.stderr[-2000:]
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before   # nothing written
    # The converter reads the run saved on 8 devices in a process that has one.
    inspected = subprocess.run([sys.executable, "-m", "tools.torch_port", "inspect", str(out)], capture_output=True,
                               text=True, cwd=REPO, env=env(1), timeout=300)
    assert inspected.returncode == 0 and "step        10" in inspected.stdout, inspected.stderr[-2000:]
    # A copy without its step-10 checkpoint resumes from step 5 on 4 x 2 and retrains the same steps.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "10")
    four_by_two = subprocess.run(command(config, "--config.mesh.data=4", "--config.mesh.fsdp=2",
                                         f"--config.out_dir={copy}"),
                                 capture_output=True, text=True, cwd=REPO, env=env(8), timeout=300)
    assert four_by_two.returncode == 0, four_by_two.stderr[-2000:]
    assert f"resumed from {copy / 'checkpoints' / '5'}" in four_by_two.stdout
    retrained, step = final_params(copy)
    assert step == 10 and retrained.keys() == reference.keys()
    # Another mesh sums in another order, and five Muon steps amplify float32 rounding, so the
    # bits differ; a wrong resume (state, schedule or data position) would miss by about as much
    # as the five steps moved the weights. The continuation must land far closer than that.
    _, at_5 = restore_run(out, step=5)
    at_5 = {"/".join(map(str, k)): np.asarray(v) for k, v in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(at_5["params"]))}
    for name in reference:
        moved = np.linalg.norm(reference[name] - at_5[name])
        assert np.linalg.norm(retrained[name] - reference[name]) < 0.05 * moved, name


def test_inference_export_is_params_only(tmp_path):
    config, out = write_config(tmp_path, "export", steps=5)
    train(config)
    params, _ = final_params(out)
    dst = export_inference(out, tmp_path / "exported", dtype="bfloat16")
    assert (dst / "config.json").is_file() and (dst / "tokenizer.json").is_file()
    size = sum(p.stat().st_size for p in (dst / "params").rglob("*") if p.is_file())
    n_params = sum(a.size for a in params.values())
    assert size < 2 * n_params + 64 * 1024  # bf16 weights and no optimizer state
    from jaxlm import formats
    assert formats.read_checkpoint(dst, with_optimizer=False).step == 5   # kept for a .pt written from it


def test_two_processes_train_checkpoint_die_and_resume_on_one(tmp_path):
    """Two CPU processes (2 devices each) on localhost; killed; resumed by one process."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config, out = write_config(tmp_path, "multi", steps=20)
    processes = [
        subprocess.Popen(command(config), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**env(2), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                              "JAX_PROCESS_ID": str(i)})
        for i in range(2)]
    checkpoints = out / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (checkpoints / "10" / "data").is_dir():
        if any(p.poll() is not None for p in processes):   # the other would wait for it for ever
            for p in processes:
                p.kill()
            pytest.fail("a process ended before the save of step 10:\n"
                        + "\n".join(p.communicate(timeout=60)[0][-3000:] for p in processes))
        time.sleep(0.2)
    time.sleep(1.0)
    for p in processes:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 10
    assert sorted(q.name for q in (checkpoints / str(saved[-1]) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]  # each process saved its own data position

    resumed = train(config, devices=1)
    assert f"resumed from {checkpoints / str(saved[-1])}" in resumed.stdout
    assert "saved for another process count" in resumed.stdout
    _, step = final_params(out)
    assert step == 20


def test_a_save_that_runs_out_of_space_leaves_the_previous_checkpoint_intact(tmp_path):
    """Writes beyond a file-size limit fail (EFBIG) as they do on a full disk: the limit lets the
    run start (config and tokenizer files are small) but no checkpoint file fits."""
    config, out = write_config(tmp_path, "full_disk", steps=10, every=5)
    train(config)
    reference, _ = final_params(out)                      # step 10 of an undisturbed run
    shutil.move(out / "checkpoints" / "10", tmp_path / "step10")  # so that step 10 must be redone
    before, step = final_params(out)
    assert step == 5

    # The limit is set by a small process that then becomes the run (exec), not by ``preexec_fn``:
    # Python code between fork and exec in this process, whose JAX threads may hold locks, can
    # deadlock the child, and with it ``Popen`` itself. SIGXFSZ ignored: a failing write returns
    # an error instead of killing the run.
    small_files_only = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                        "resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024)); "
                        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
    failed = subprocess.run([sys.executable, "-c", small_files_only, *command(config)[1:]], capture_output=True,
                            text=True, cwd=REPO, env=env(), timeout=300)
    assert "resumed from" in failed.stdout and "train step 10:" in failed.stdout, failed.stderr[-2000:]
    assert failed.returncode == 2  # the save of step 10 could not be written, and the user is told so
    assert "error: could not write the checkpoint of step 10" in failed.stderr
    assert not (out / "checkpoints" / "10").exists()
    after, step = final_params(out)
    assert step == 5
    assert_bit_identical(after, before)
    train(config)  # with space again, the run resumes from step 5 and reaches the same step 10
    resumed, step = final_params(out)
    assert step == 10
    assert_bit_identical(resumed, reference)
