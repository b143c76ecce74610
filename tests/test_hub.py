"""Hub ids (``Org/Repo`` + filename, ``hf://Org/Repo/FILE``) resolved offline against a local directory
laid out as huggingface_hub's cache: ``models--Org--Repo/{blobs,snapshots/<rev>,refs/main}``."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxlm
from conftest import REPO
from jaxlm import formats
from jaxlm.errors import CheckpointError
from jaxlm.formats import hub

from test_formats_hf import reference_logits, toylm_conv

hf = pytest.importorskip("huggingface_hub", reason="Hub ids resolve through huggingface_hub")

REVISION = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache, repo_id, files: dict, revision=REVISION):
    """Put ``{name_in_repo: local_file}`` into the cache as huggingface_hub does: blobs named by their
    hash, the snapshot's files symlinks to them, refs/main naming the revision."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return root / "snapshots" / revision


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A Hub cache with Org/Crow (a .pt in a sub-folder) and Org/Whale (HF layout, sharded)."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    conv = toylm_conv(seed=4)
    made = tmp_path / "made"
    formats.write_checkpoint(conv, made / "ckpt" / "step_000012.pt")
    add_to_cache(cache, "Org/Crow", {"ckpts/step_000012.pt": made / "ckpt" / "step_000012.pt"})
    hf_dir = formats.write_checkpoint(conv, made / "whale", layout="hf", max_shard_size="3KB")
    add_to_cache(cache, "Org/Whale", {p.name: p for p in hf_dir.iterdir()})
    return cache, conv


def test_hub_ids_load_offline_from_the_cache(offline_cache):
    cache, conv = offline_cache
    ids = np.random.default_rng(1).integers(0, 96, (2, 10))
    want = reference_logits(conv, ids)
    lm = jaxlm.load("Org/Crow", filename="ckpts/step_000012.pt")
    np.testing.assert_array_equal(np.asarray(lm(ids)), want)
    assert lm.step == 12 and str(cache) in lm.source
    np.testing.assert_array_equal(np.asarray(jaxlm.load("hf://Org/Crow/ckpts/step_000012.pt")(ids)), want)
    np.testing.assert_array_equal(np.asarray(jaxlm.load(f"hf://Org/Crow@{REVISION}/ckpts/step_000012.pt")(ids)), want)
    # A whole repository in the Hugging Face layout: the snapshot directory, shards and all.
    snapshot = hub.resolve("hf://Org/Whale")
    assert snapshot.name == REVISION and (snapshot / "model.safetensors.index.json").is_file()
    np.testing.assert_array_equal(np.asarray(jaxlm.load("Org/Whale")(ids)), want)
    conv_back = formats.read_checkpoint("Org/Whale", filename=None)
    assert conv_back.family == "toylm" and conv_back.layout["format"] == "hf"


def test_local_paths_stay_local(tmp_path, offline_cache):
    (tmp_path / "Org").mkdir()
    (tmp_path / "Org" / "Crow").write_text("x")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert not hub.is_hub_id("Org/Crow")  # an existing relative path wins over a Hub id
        assert hub.resolve("Org/Crow") == hub.pathlib.Path("Org/Crow")
    finally:
        os.chdir(cwd)
    assert hub.resolve(tmp_path / "a.pt") == tmp_path / "a.pt"
    assert hub.parse("hf://Org/Repo@v1/sub/f.pt") == ("Org/Repo", "sub/f.pt", "v1")


def test_hub_failures_are_one_line(offline_cache, monkeypatch):
    cases = [(lambda: jaxlm.load("Org/Crow", filename="nope.pt"), "Org/Crow/nope.pt .*not in the local Hub cache"),
             (lambda: jaxlm.load("Org/Missing"), "Org/Missing .*not in the local Hub cache"),
             (lambda: hub.parse("hf://Org"), "a Hub id is Org/Repo"),
             (lambda: hub.parse("hf://Org/Repo/a.pt", "b.pt"), "names the file a.pt and filename= names b.pt")]
    for call, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern) as error:
            call()
        assert "\n" not in str(error.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        jaxlm.load("hf://Org/Crow/ckpts/step_000012.pt")


def test_cli_takes_hub_ids_through_the_environment(offline_cache, tmp_path):
    """The real route: HF_HUB_CACHE and HF_HUB_OFFLINE=1 in a fresh process, as a user sets them."""
    cache, _ = offline_cache
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "tools.torch_port", "inspect", "hf://Org/Crow/ckpts/step_000012.pt"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "family      toylm" in out.stdout and "converts cleanly" in out.stdout
    out = subprocess.run([sys.executable, "-m", "tools.torch_port", "to-orbax", "Org/Whale", str(tmp_path / "exp")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    exported = formats.read_checkpoint(tmp_path / "exp")
    direct = formats.read_checkpoint("Org/Whale")
    for name, array in direct.params.items():
        np.testing.assert_array_equal(exported.params[name], array)
    shutil.rmtree(tmp_path / "exp")


def test_init_from_takes_a_hub_id(offline_cache, tmp_path):
    import jax

    from jaxlm import config as C
    from jaxlm import sharding
    from jaxlm.state import plan_state
    from test_formats_hf import TINY
    _, conv = offline_cache
    cfg = C.validate(C.Config(model=TINY, train=C.TrainConfig(steps=2, batch_size=8, seq_len=16,
                                                              compute_dtype="float32"),
                              optim=C.OptimConfig(lr=0.01, warmup_steps=1, planned_steps=2), out_dir=str(tmp_path)))
    mesh = sharding.make_mesh(cfg.mesh)
    plan = plan_state(cfg, mesh)
    with jax.set_mesh(mesh):
        state = formats.init_train_state("hf://Org/Crow/ckpts/step_000012.pt", cfg, plan.init(cfg),
                                         log=lambda *a: None)
    embedding = np.asarray(state["params"]["embed"]["embedding"])
    np.testing.assert_array_equal(embedding, conv.params["embed/embedding"])
