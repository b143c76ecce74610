"""nanowhale (DeepSeek-V4) end to end through the plain command lines: the Hugging Face directory into
Orbax and back (single file and shards, bit for bit, loadable by name into a PyTorch module), jaxlm.load
against the upstream logits, generation with a DeepSeek-form tokenizer, and bad input in one line."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlm
from conftest import REPO, fixture_dir, subprocess_env, xla_flags
from jaxlm.errors import CheckpointError, JaxlmError
from jaxlm.formats import safetensors_file
from tools.torch_port.__main__ import main as torch_port

DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"


def env():
    return subprocess_env(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, env=env(),
                          timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The fixture directory through ``to-orbax`` (the real CLI entry point, in this process)."""
    src = fixture_dir("nanowhale")
    dst = tmp_path_factory.mktemp("nanowhale") / "orbax"
    assert torch_port(["to-orbax", str(src), str(dst)]) == 0
    return src, dst


def read_dir(d):
    """Every tensor of a Hugging Face directory (single file or the shards its index names)."""
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        tensors, _ = safetensors_file.load(d / name)
        assert not set(tensors) & set(out), f"{name} repeats a key"
        out.update(tensors)
    return out


# ----------------------------------------------------------------------------- the HF layout, both ways


@pytest.mark.parametrize("shard", [None, "200KB"])
def test_hf_directory_to_orbax_and_back_is_bit_identical(exported, tmp_path, shard):
    src, orbax = exported
    out = tmp_path / "hf"
    assert torch_port(["to-torch", str(orbax), str(out), *(["--max-shard-size", shard] if shard else [])]) == 0
    # config.json: every original field, at its original value.
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    original, _ = safetensors_file.load(src / "model.safetensors")
    written = read_dir(out)
    assert set(written) == set(original)
    for name, array in original.items():
        got = written[name]
        assert (got.dtype, got.shape) == (array.dtype, array.shape), name
        assert np.asarray(got).tobytes() == np.asarray(array).tobytes(), name
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 3 and set(index["weight_map"]) == set(original)
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        assert not (out / "model.safetensors").exists()
        # And the shards read back through jaxlm.load as the upstream logits.
        check_against_upstream(jaxlm.load(out), src)


def check_against_upstream(lm, src):
    ids = jnp.asarray(np.load(src / "input_ids.npy"))
    logits, inter = jax.jit(lambda i: lm.model.inspect(i))(ids)
    want = np.load(src / "logits.npy")
    rel = np.abs(np.asarray(logits) - want).max() / np.abs(want).max()
    assert rel <= 1e-4, rel
    experts = np.stack([np.asarray(inter[f"layer{i}_experts"]) for i in range(lm.cfg.num_hidden_layers)])
    np.testing.assert_array_equal(experts, np.load(src / "topk_experts.npy"))
    return rel


def test_jaxlm_load_of_the_directory_and_its_export_match_upstream(exported):
    src, orbax = exported
    check_against_upstream(jaxlm.load(src), src)
    check_against_upstream(jaxlm.load(orbax), src)


def test_written_state_dict_loads_strictly_into_a_module_of_the_original_names(exported, tmp_path):
    """The original modeling code is not available here: the module is assembled from the names,
    shapes and dtypes of upstream's own ``state_dict`` (the fixture file it wrote)."""
    torch = pytest.importorskip("torch")
    src, orbax = exported
    assert torch_port(["to-torch", str(orbax), str(tmp_path / "hf")]) == 0
    original, _ = safetensors_file.load(src / "model.safetensors")

    root = torch.nn.Module()
    for name, array in original.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.empty(array.shape, dtype=torch.float32)))
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    result = root.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, p in root.named_parameters():
        assert p.detach().numpy().tobytes() == np.asarray(original[name]).tobytes(), name


# ----------------------------------------------------------------------------- generation


def deepseek_tokenizer(folder, vocab_size=300):
    """A byte-level BPE of DeepSeek-V4's form: its special tokens at ids 0, 1, 2, no post-processor
    additions, upstream's tokenizer_config.json beside it; small enough for the fixture's 320 ids."""
    from jaxlm.data.tokenizer import save_tokenizer, train_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    texts = [f"Paragraph {i}: the whale swims {i * 7 % 13} leagues through the sea." for i in range(60)]
    save_tokenizer(train_tokenizer(texts, vocab_size, (DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_PAD)),
                   folder / "tokenizer.json")
    shutil.copy(fixture_dir("nanowhale") / "tokenizer" / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


def test_generate_cli_on_the_hf_directory(tmp_path):
    src = fixture_dir("nanowhale")
    tok = deepseek_tokenizer(tmp_path / "tok")
    out = cli("jaxlm.generate", "--checkpoint", str(src), "--tokenizer", str(tok / "tokenizer.json"),
              "--prompt", "the whale swims", "--max_new_tokens", "8", "--greedy", "--chunk_size", "3")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "the whale swims" in out.stdout and "Traceback" not in out.stderr
    # The text printed is the greedy continuation of the full forward, token by token.
    from jaxlm.data.tokenizer import load_tokenizer
    lm, tokenizer = jaxlm.load(src), load_tokenizer(tok, eos_token=DEEPSEEK_EOS)
    prompt = tokenizer.encode("the whale swims").ids
    forward = nnx.jit(lambda m, x: m(x))
    ids = list(prompt)
    for _ in range(8):
        row = jnp.asarray([ids + [0] * (24 - len(ids))])
        ids.append(int(np.argmax(np.asarray(forward(lm.model, row))[0, len(ids) - 1])))
    continuation = tokenizer.decode(ids[len(prompt):]).strip()
    assert continuation and continuation in out.stdout, (continuation, out.stdout)


def test_generated_tokens_over_several_chunks_equal_greedy_on_the_full_forward():
    from test_deepseek_v4_model import TINY, randomised
    from jaxlm import generate as G
    from jaxlm.generate import SamplingConfig
    model = randomised(TINY, seed=11)
    forward = nnx.jit(lambda m, x: m(x))
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 40, 11]]    # the second left-padded
    new = G.generate_tokens(model, prompts, max_new_tokens=11, sampling=SamplingConfig(greedy=True), chunk_size=3)
    for prompt, tokens in zip(prompts, new):
        ids = list(prompt)
        for _ in range(11):
            row = jnp.asarray([ids + [0] * (24 - len(ids))])
            ids.append(int(np.argmax(np.asarray(forward(model, row))[0, len(ids) - 1])))
        assert tokens == ids[len(prompt):]
    assert len(set(new[0])) > 2


# ----------------------------------------------------------------------------- bad input, one line each


def copy_fixture(root, name):
    src, d = fixture_dir("nanowhale"), root / name
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, d / f)
    return d


def one_line(call, pattern):
    with pytest.raises(CheckpointError, match=pattern) as error:
        call()
    assert "\n" not in str(error.value), str(error.value)


def cli_one_line(d, pattern, capsys):
    """``to-orbax`` on it: exit 2, one ``error:`` line on stderr, no traceback."""
    capsys.readouterr()
    assert torch_port(["to-orbax", str(d), str(d.parent / (d.name + "_orbax"))]) == 2
    err = capsys.readouterr().err.strip()
    import re
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err and re.search(pattern, err), err


def test_bad_directories_are_one_line_through_load_and_cli(tmp_path, capsys):
    src = fixture_dir("nanowhale")
    fields = json.loads((src / "config.json").read_text())
    tensors, meta = safetensors_file.load(src / "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    cases = []

    d = copy_fixture(tmp_path, "contradicts")
    (d / "config.json").write_text(json.dumps({**fields, "hidden_size": 96}))
    cases.append((d, r"config\.json hidden_size = 96 but the tensors say 64; fix hidden_size in config\.json"))

    d = copy_fixture(tmp_path, "topk")
    (d / "config.json").write_text(json.dumps({**fields, "num_experts_per_tok": 5}))
    cases.append((d, r"num_experts_per_tok = 5: must be <= model\.n_routed_experts \(4\)"))

    d = copy_fixture(tmp_path, "missing")
    gone = "model.layers.1.ffn.experts.3.w3.weight"
    safetensors_file.save({k: v for k, v in tensors.items() if k != gone}, d / "model.safetensors", meta)
    cases.append((d, rf"key {gone} is missing"))

    d = copy_fixture(tmp_path, "extra")
    safetensors_file.save({**tensors, "model.layers.0.attn.bogus": np.zeros(3, np.float32)}, d / "model.safetensors",
                          meta)
    cases.append((d, r"unexpected key model\.layers\.0\.attn\.bogus \(3,\)"))

    d = copy_fixture(tmp_path, "truncated")
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:100])
    cases.append((d, r"truncated safetensors header"))

    d = tmp_path / "shards"
    assert torch_port(["to-orbax", str(src), str(tmp_path / "orbax")]) == 0
    assert torch_port(["to-torch", str(tmp_path / "orbax"), str(d), "--max-shard-size", "200KB"]) == 0
    shard = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (d / shard).unlink()
    cases.append((d, rf"names the shard {shard}, which is not in"))

    for d, pattern in cases:
        one_line(lambda: jaxlm.load(d), pattern)
        cli_one_line(d, pattern, capsys)

    # And once as a user meets it: a fresh process, exit status 2, one line, no traceback.
    out = cli("jaxlm.generate", "--checkpoint", str(tmp_path / "topk"), "--prompt", "x", "--max_new_tokens", "2")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().count("\n") == 0 and "num_experts_per_tok = 5" in out.stderr
