"""Llama Think end to end through the user-facing commands: model.bin out and in, ckpt.pt both ways
with its optimizer, --init_from, generation, bad input, training with a kill and a resume.

The truth is the upstream code's own files in ``fixtures/llama_think/``: ``ckpt.pt`` (written by its
train.py, with Muon/AdamW state at iter_num 2), ``model_v3.bin`` (its export.py --version 3 of that
checkpoint), ``logits.npy`` and the manifest.
"""

import json
import pathlib
import struct

import numpy as np
import pytest

from conftest import fixture_dir, read_until, xla_flags

torch = pytest.importorskip("torch")

from jaxlm.formats import llama2c_bin as lb  # noqa: E402
from tools.torch_port.__main__ import main as torch_port  # noqa: E402


@pytest.fixture(scope="module")
def root():
    return fixture_dir("llama_think")


@pytest.fixture(scope="module")
def alone(root, tmp_path_factory):
    """``ckpt.pt`` and ``model_v3.bin`` linked into a folder of their own: jaxlm.load looks for a
    tokenizer beside a checkpoint, and the fixture folder's Llama 2 tokenizer.model (32000 ids) does not
    fit the fixture model's 256."""
    folder = tmp_path_factory.mktemp("alone")
    for name in ("ckpt.pt", "model_v3.bin"):
        (folder / name).symlink_to(root / name)
    return folder


@pytest.fixture(scope="module")
def export(root, tmp_path_factory):
    """``to-orbax ckpt.pt`` once for the module (parameters and optimizer state)."""
    dst = tmp_path_factory.mktemp("export") / "llama_think_jax"
    assert torch_port(["to-orbax", str(root / "ckpt.pt"), str(dst)]) == 0
    return dst


def _cli_error(capsys, argv) -> str:
    """Run the converter CLI expecting a user error: exit status 2 and one line on stderr."""
    capsys.readouterr()
    assert torch_port(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _logits(loaded, ids):
    import jax.numpy as jnp
    return np.asarray(loaded.model(jnp.asarray(ids)))


# ----------------------------------------------------------------------------- model.bin


def test_to_bin_of_the_ckpt_is_the_exporters_file_byte_for_byte(root, tmp_path, capsys):
    dst = tmp_path / "model.bin"
    assert torch_port(["to-bin", str(root / "ckpt.pt"), str(dst)]) == 0
    assert dst.read_bytes() == (root / "model_v3.bin").read_bytes()
    out = capsys.readouterr().out
    assert "lossy" in out and "CSA layers run as full attention" in out


def test_to_bin_of_an_orbax_export_of_the_ckpt_is_the_same_file(root, export, tmp_path):
    dst = tmp_path / "from_export.bin"
    assert torch_port(["to-bin", str(export), str(dst)]) == 0
    assert dst.read_bytes() == (root / "model_v3.bin").read_bytes()


def test_to_bin_of_the_bin_rewrites_it(root, tmp_path):
    dst = tmp_path / "again.bin"
    assert torch_port(["to-bin", str(root / "model_v3.bin"), str(dst)]) == 0
    assert dst.read_bytes() == (root / "model_v3.bin").read_bytes()


def test_jaxlm_load_of_the_bin_is_the_c_runner_model_and_the_switch_selects_it(root, alone):
    """The .bin reads as the C runner's model (full attention for CSA, plain residuals), which is what
    ``llama2c_lossy=true`` computes from the full checkpoint; the full checkpoint itself gives the
    upstream PyTorch logits, which the lossy model does not."""
    import jaxlm
    ids = np.load(root / "input_ids.npy")
    golden = np.load(root / "logits.npy")
    from_bin = jaxlm.load(alone / "model_v3.bin")
    assert from_bin.cfg.llama2c_lossy and not from_bin.cfg.hyper_connections
    assert set(from_bin.cfg.layer_types) == {"linear", "full"}
    assert any("lossy" in note for note in from_bin.notes)
    lossy = jaxlm.load(alone / "ckpt.pt", overrides=["llama2c_lossy=true"])
    assert "csa" in lossy.cfg.layer_types and lossy.cfg.hyper_connections
    full = jaxlm.load(alone / "ckpt.pt")
    a, b, c = _logits(from_bin, ids), _logits(lossy, ids), _logits(full, ids)
    scale = np.abs(golden).max()
    assert np.abs(a - b).max() <= 1e-5 * scale
    assert np.abs(c - golden).max() <= 1e-4 * scale
    assert np.abs(a - golden).max() > 1e-2 * scale   # the format really loses something


@pytest.fixture(scope="module")
def good_bin(root):
    return (root / "model_v3.bin").read_bytes()


@pytest.mark.parametrize("damage, needle", [
    (lambda raw: b"\x7fELF" + raw[4:], "magic"),
    (lambda raw: raw[:4] + struct.pack("<i", 2) + raw[8:], "version 2"),
    (lambda raw: raw[:4] + struct.pack("<i", 4) + raw[8:], "version 4"),
    (lambda raw: raw[:100], "truncated"),
    (lambda raw: raw[:-8], "truncated"),
])
def test_a_bad_bin_is_one_line_through_the_cli(tmp_path, capsys, good_bin, damage, needle):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(damage(good_bin))
    for argv in (["to-orbax", str(bad), str(tmp_path / "out")], ["to-bin", str(bad), str(tmp_path / "out.bin")],
                 ["inspect", str(bad)]):
        err = _cli_error(capsys, argv)
        assert needle in err and "bad.bin" in err


def test_inspect_shows_the_bin_as_the_lossy_model(root, capsys):
    assert torch_port(["inspect", str(root / "model_v3.bin")]) == 0
    out = capsys.readouterr().out
    assert "lossy" in out and "family      hybrid" in out and "llama2c_lossy=True" in out


def test_a_file_of_no_known_format_is_one_line(tmp_path, capsys):
    junk = tmp_path / "weights.dat"
    junk.write_bytes(b"\x00" * 64)
    err = _cli_error(capsys, ["to-orbax", str(junk), str(tmp_path / "out")])
    assert "weights.dat" in err and ".bin (hybrid)" in err


def test_to_bin_to_a_suffix_the_family_has_no_format_for(root, tmp_path, capsys):
    err = _cli_error(capsys, ["to-bin", str(root / "model_v3.bin"), str(tmp_path / "model.gguf")])
    assert ".gguf" in err and ".bin" in err


# ----------------------------------------------------------------------------- ckpt.pt both ways


def _same(a, b, where="ckpt"):
    """Equal structure, key order, types and values; tensors of the same dtype, shape and bits."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.flatten().view(torch.uint8).equal(b.flatten().view(torch.uint8)) if a.numel() else True, where
        return
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_ckpt_to_orbax_and_back_is_bit_exact_with_its_optimizer(root, export, tmp_path):
    back = tmp_path / "back.pt"
    assert torch_port(["to-torch", str(export), str(back)]) == 0
    original = torch.load(root / "ckpt.pt", map_location="cpu", weights_only=False)
    again = torch.load(back, map_location="cpu", weights_only=False)
    _same(original, again)   # _orig_mod. keys, masks, model_args, iter_num, best_val_loss, config, optimizer
    manifest = json.loads((root / "manifest.json").read_text())["checkpoint"]
    assert list(again) == manifest["top_level_keys"] and again["iter_num"] == 2
    assert set(manifest["mask_buffers"]) <= set(again["model"])
    sd = again["model"]   # the tied head shares the embedding's storage, as upstream saved it
    assert sd["_orig_mod.output.weight"].data_ptr() == sd["_orig_mod.tok_embeddings.weight"].data_ptr()


def test_the_optimizer_state_lands_on_the_parameters_the_manifest_names(root, export):
    """Each torch optimizer index is the parameter the manifest names: its Muon momentum or AdamW
    moments become that parameter's slots (in Flax layout), at the checkpoint's step."""
    from jaxlm import formats
    from jaxlm.formats import hybrid as fh
    conv = formats.read_checkpoint(export)
    assert conv.step == 2
    by_name = {e.name: e for e in fh.entries(conv.model_cfg) if e.kind == "param"}
    optimizer = torch.load(root / "ckpt.pt", map_location="cpu", weights_only=False)["optimizer"]
    manifest = json.loads((root / "manifest.json").read_text())["checkpoint"]["optimizer_index_to_param"]
    groups = {0: ("momentum_buffer",), 1: ("exp_avg", "exp_avg_sq")}
    slots = {"momentum_buffer": "momentum", "exp_avg": "mu", "exp_avg_sq": "nu"}
    for item in manifest:
        entry = by_name[item["param"]]
        state = optimizer["state"][item["index"]]
        for name in groups[item["group"]]:
            want = state[name].float().numpy()
            got = conv.slots[slots[name]][entry.targets[0]]
            got = got.transpose(tuple(reversed(range(got.ndim)))) if entry.transpose else got
            np.testing.assert_array_equal(np.asarray(got, np.float32), want, err_msg=item["param"])
    assert len(manifest) == sum(len(g["params"]) for g in optimizer["param_groups"])


def test_init_from_the_ckpt_continues_at_its_iteration_with_its_optimizer_state(root):
    """--init_from's state: the checkpoint's step, its weights and every optimizer moment it saved."""
    import jax
    from jaxlm import config as C
    from jaxlm import formats
    from jaxlm import sharding
    from jaxlm.state import plan_state
    cfg = C.load_config("llama_think_tiny.py")
    mesh = sharding.make_mesh(cfg.mesh)
    plan = plan_state(cfg, mesh)
    with jax.set_mesh(mesh):
        state = formats.init_train_state(root / "ckpt.pt", cfg, plan.init(cfg), log=lambda *_: None)
    assert int(state["step"]) == 2
    top = torch.load(root / "ckpt.pt", map_location="cpu", weights_only=False)
    emb = np.asarray(state["params"]["embed"]["embedding"])
    np.testing.assert_array_equal(emb, top["model"]["_orig_mod.tok_embeddings.weight"].numpy())
    leaves = [np.asarray(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) >= 1]
    by_shape = {}
    for leaf in leaves:
        by_shape.setdefault(leaf.shape, []).append(leaf)
    from jaxlm.formats import hybrid as fh
    transposed = {e.name: e.transpose for e in fh.entries(cfg.model)}
    manifest = json.loads((root / "manifest.json").read_text())["checkpoint"]["optimizer_index_to_param"]
    for item in manifest:
        for name, value in top["optimizer"]["state"][item["index"]].items():
            if name == "step":
                continue
            want = value.float().numpy()
            flax = want.transpose(tuple(reversed(range(want.ndim)))) if transposed[item["param"]] else want
            assert any(np.array_equal(leaf, flax) for leaf in by_shape.get(flax.shape, [])), (item, name)


# ----------------------------------------------------------------------------- bad input


def test_a_ckpt_whose_layer_types_name_an_unknown_kind_is_one_line(root, tmp_path, capsys):
    top = torch.load(root / "ckpt.pt", map_location="cpu", weights_only=False)
    top["model_args"]["layer_types"] = ("linear", "linear", "mamba", "full") * 2
    bad = tmp_path / "ckpt.pt"
    torch.save(top, bad)
    for verb, dst in (("to-orbax", "out"), ("to-bin", "out.bin"), ("to-torch", "out.pt")):
        err = _cli_error(capsys, [verb, str(bad), str(tmp_path / dst)])
        assert "'mamba'" in err and "layer" in err and str(bad) in err


def _byte_tokenizer(path):
    """A byte-level tokenizer of exactly 256 ids (no merges, no special tokens): what fits the fixture."""
    from jaxlm.data.tokenizer import train_tokenizer
    tokenizer = train_tokenizer(["the fixture model has 256 ids"], 256, special_tokens=())
    assert tokenizer.get_vocab_size() == 256
    tokenizer.save(str(path))
    return tokenizer


def test_generate_refuses_a_tokenizer_larger_than_the_model_in_one_line(root, capsys):
    """The fixture model has 256 ids, Llama 2's tokenizer.model 32000: refused before any compile."""
    from jaxlm.generate import main as generate
    capsys.readouterr()
    status = generate(["--checkpoint", str(root / "ckpt.pt"), "--tokenizer", str(root / "tokenizer.model"),
                       "--prompt", "Hello", "--max_new_tokens", "20"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and "32000" in err and "256" in err


@pytest.mark.slow
def test_generate_from_the_ckpt_with_a_tokenizer_that_fits_is_greedy_decoding(alone, tmp_path, capsys):
    """``python -m jaxlm.generate --checkpoint ckpt.pt`` (recurrent GDN state, CSA ring + blocks, full
    KV cache) continues the prompt with the arg-max of the uncached forward at every step."""
    import jax.numpy as jnp

    import jaxlm
    from jaxlm.generate import main as generate
    tokenizer = _byte_tokenizer(tmp_path / "tokenizer.json")
    prompt, steps = "The for statement", 12
    capsys.readouterr()
    assert generate(["--checkpoint", str(alone / "ckpt.pt"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                     "--prompt", prompt, "--max_new_tokens", str(steps), "--greedy"]) == 0
    printed = capsys.readouterr().out
    model = jaxlm.load(alone / "ckpt.pt").model
    ids = tokenizer.encode(prompt).ids
    T = len(ids) + steps
    for _ in range(steps):   # one compile: the causal forward of a fixed, right-padded length
        logits = np.asarray(model(jnp.asarray([ids + [0] * (T - len(ids))])))
        ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    assert printed.startswith(prompt)
    assert tokenizer.decode(ids) in printed


# ----------------------------------------------------------------------------- training through the CLI

STEPS, EVERY = 8, 3
OVERRIDES = ["--config.train.batch_size=2", "--config.train.seq_len=96", "--config.train.log_every=1",
             "--config.train.eval_batches=1", "--config.train.sample_tokens=1",
             "--config.data.tokenizer_train_docs=300", f"--config.checkpoint.every_steps={EVERY}"]


def _env():
    import os
    return {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}


def _train(out_dir, cache, *extra, steps=STEPS):
    import sys
    return [sys.executable, "-m", "jaxlm.train", "--config", "llama_think_tiny.py", *OVERRIDES,
            f"--config.train.steps={steps}", f"--config.out_dir={out_dir}", f"--config.data.cache_dir={cache}", *extra]


def _steps(log: str) -> dict[int, str]:
    return {int(line.split()[2].rstrip(":")): line for line in log.splitlines() if line.startswith("train step ")}


def _final(out_dir):
    from flax import nnx

    from jaxlm.checkpoint import restore_run
    from jaxlm.formats.converted import flatten
    _, state = restore_run(out_dir)
    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(state["params"])).items()}, int(state["step"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer_cache")


@pytest.mark.slow
def test_train_init_from_the_ckpt_continues_at_its_iteration(root, tmp_path, cache):
    import subprocess
    REPO = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(_train(tmp_path / "run", cache, "--init_from", str(root / "ckpt.pt"), steps=4),
                         capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "parameters and optimizer state at step 2" in out.stdout
    assert sorted(_steps(out.stdout)) == [3, 4]          # iter_num 2 done: the next step is the third
    assert _final(tmp_path / "run")[1] == 4


@pytest.mark.slow
def test_train_is_sigkilled_and_resumes_bit_identically(tmp_path, cache):
    """The tiny config from scratch: one run straight through, one killed past a save and resumed."""
    import signal
    import subprocess
    REPO = pathlib.Path(__file__).resolve().parents[1]
    reference = subprocess.run(_train(tmp_path / "reference", cache), capture_output=True, text=True, cwd=REPO,
                               env=_env(), timeout=600)
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-3000:]
    killed = subprocess.Popen(_train(tmp_path / "killed", cache), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    read_until(killed, lambda line: line.startswith("train step 7:"), timeout=600)   # past the save of step 6 (every 3)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run(_train(tmp_path / "killed", cache), capture_output=True, text=True, cwd=REPO,
                             env=_env(), timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, (resumed.stdout + resumed.stderr)[-3000:]
    want, step = _final(tmp_path / "reference")
    got, again = _final(tmp_path / "killed")
    assert step == again == STEPS and got.keys() == want.keys()
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    lines, redone = _steps(reference.stdout), _steps(resumed.stdout)
    # Resumed after the last save that was complete when the kill came (step 6's may still have been written).
    assert min(redone) in (EVERY + 1, 2 * EVERY + 1) and max(redone) == STEPS
    assert all(redone[n].split("tokens_per_s")[0] == lines[n].split("tokens_per_s")[0] for n in redone)
