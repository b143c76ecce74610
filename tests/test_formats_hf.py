"""The Hugging Face layout for every family: config.json + model.safetensors, or shards + index;
written and read back, loaded with jaxlm.load, and its damage reported in one line."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm import formats, models
from jaxlm.errors import CheckpointError
from jaxlm.formats import hf_layout, safetensors_file
from jaxlm.formats.converted import Converted, flatten
from jaxlm.models.family import Family
from jaxlm.models.toylm import ToyLMConfig

import test_formats_keymap as tiny

TINY = ToyLMConfig(vocab_size=96, dim=32, n_layers=2, n_heads=2, head_dim=16, mlp_hidden=48, max_seq_len=64,
                   sliding_window=8)


def toylm_conv(seed=0) -> Converted:
    """A ToyLM trained in jaxlm (random weights), as the converter holds it."""
    model = models.build_model(TINY, rngs=nnx.Rngs(seed), dtype=jnp.float32)
    params = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
    return Converted(family="toylm", model_cfg=TINY, params=params, step=12)


def reference_logits(conv, ids):
    """The logits of ``conv``'s own parameters, computed as jaxlm.load's model computes them (jitted)."""
    from jaxlm.api import LoadedModel, model_from_params
    return np.asarray(LoadedModel(model=model_from_params(conv.model_cfg, conv.params), cfg=conv.model_cfg)(ids))


@pytest.fixture
def tiny_family():
    models.register(Family(name=tiny.FAMILY, config=tiny.TinyMoEConfig, model=tiny.TinyMoE, naming=tiny.__name__))
    yield
    models.FAMILIES.pop(tiny.FAMILY, None)


@pytest.mark.parametrize("shard", [None, "3KB"])
def test_toylm_hf_directory_round_trip_and_load(tmp_path, shard):
    conv = toylm_conv()
    out = formats.write_checkpoint(conv, tmp_path / "hf", layout="hf", max_shard_size=shard)
    config = json.loads((out / "config.json").read_text())
    assert (config["dim"], config["n_layers"], config["vocab_size"]) == (32, 2, 96)
    if shard is None:
        assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        limit = hf_layout.parse_size(shard)
        sizes = {}
        for name in shards:
            tensors, _ = safetensors_file.load(out / name)
            sizes[name] = sum(a.nbytes for a in tensors.values())
            assert sizes[name] <= limit or len(tensors) == 1, (name, sizes[name])
            assert {k for k, s in index["weight_map"].items() if s == name} == set(tensors)
        assert index["metadata"]["total_size"] == sum(sizes.values())
        assert not (out / "model.safetensors").exists()
    back = formats.read_checkpoint(out)
    assert back.family == "toylm" and back.model_cfg == TINY and back.layout["format"] == "hf"
    assert set(back.params) == set(conv.params)
    for name, array in conv.params.items():
        np.testing.assert_array_equal(back.params[name], array)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12))
    np.testing.assert_array_equal(np.asarray(jaxlm.load(out)(ids)), reference_logits(conv, ids))


def test_rewriting_with_fewer_shards_leaves_no_stale_files(tmp_path):
    conv = toylm_conv()
    formats.write_checkpoint(conv, tmp_path / "hf", layout="hf", max_shard_size="3KB")
    formats.write_checkpoint(conv, tmp_path / "hf", layout="hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    formats.read_checkpoint(tmp_path / "hf")


def test_another_family_keeps_its_names_in_shards(tmp_path, tiny_family):
    cfg = tiny.TinyMoEConfig()
    sd = tiny.tiny_state_dict(cfg, seed=3)
    folder = tmp_path / "src"
    folder.mkdir()
    safetensors_file.save(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"hidden": 6, "n_experts": 3, "architectures": ["TinyMoE"]}))
    conv = formats.read_checkpoint(folder)
    assert conv.family == "tiny_moe" and conv.params["w2"].shape == (3, 6, 4)
    out = formats.write_checkpoint(conv, tmp_path / "sharded", max_shard_size=200)  # no suffix: HF layout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == list(sd)  # the source's names, in its order
    assert json.loads((out / "config.json").read_text())["architectures"] == ["TinyMoE"]  # unknown fields kept
    again = formats.read_checkpoint(out)
    for name, array in conv.params.items():
        np.testing.assert_array_equal(again.params[name], array)
    written = {}
    for shard in set(index["weight_map"].values()):
        written.update(safetensors_file.load(out / shard)[0])
    for name in sd:
        assert written[name].dtype == sd[name].dtype
        np.testing.assert_array_equal(written[name], sd[name])


def test_the_safetensors_library_reads_what_is_written(tmp_path):
    numpy_st = pytest.importorskip("safetensors.numpy")
    conv = toylm_conv()
    out = formats.write_checkpoint(conv, tmp_path / "hf", layout="hf", max_shard_size="3KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        ours, _ = safetensors_file.load(out / shard)
        theirs = numpy_st.load_file(out / shard)
        assert set(ours) == set(theirs)
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])


def _one_line(call, pattern):
    with pytest.raises(CheckpointError, match=pattern) as error:
        call()
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


def test_damage_is_reported_in_one_line(tmp_path):
    conv = toylm_conv()
    out = formats.write_checkpoint(conv, tmp_path / "hf", layout="hf", max_shard_size="3KB")
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))

    # An index naming a shard that is not there.
    (out / shards[1]).rename(tmp_path / "aside.safetensors")
    _one_line(lambda: jaxlm.load(out), f"names the shard {shards[1]}, which is not in")
    (tmp_path / "aside.safetensors").rename(out / shards[1])

    # A truncated header.
    raw = (out / shards[0]).read_bytes()
    (out / shards[0]).write_bytes(raw[:40])
    _one_line(lambda: formats.read_checkpoint(out), "truncated safetensors header")
    (out / shards[0]).write_bytes(raw)

    # A shard that lacks a key its index promises, and one with a key the index does not list.
    tensors, meta = safetensors_file.load(out / shards[0])
    tensors = {k: np.array(v) for k, v in tensors.items()}
    first = next(iter(tensors))
    safetensors_file.save({k: v for k, v in tensors.items() if k != first}, out / shards[0], meta)
    _one_line(lambda: formats.read_checkpoint(out), f"puts {first} in {shards[0]}, which does not hold it")
    safetensors_file.save({**tensors, "stray.weight": np.zeros(3, np.float32)}, out / shards[0], meta)
    _one_line(lambda: formats.read_checkpoint(out), f"holds stray.weight, which {index_file.name} does not list")

    # A checkpoint with a missing key, and one with an extra key (index and shard agree).
    safetensors_file.save({k: v for k, v in tensors.items() if k != first}, out / shards[0], meta)
    index_file.write_text(json.dumps({**index, "weight_map": {k: s for k, s in index["weight_map"].items()
                                                              if k != first}}))
    _one_line(lambda: formats.read_checkpoint(out), "no key holds")
    safetensors_file.save({**tensors, "stray.weight": np.zeros(3, np.float32)}, out / shards[0], meta)
    index_file.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], "stray.weight": shards[0]}}))
    _one_line(lambda: formats.read_checkpoint(out), r"1 keys match no ToyLM parameter: stray\.weight \(3,\)")

    # config.json contradicting the tensors.
    index_file.write_text(json.dumps(index))
    safetensors_file.save(tensors, out / shards[0], meta)
    formats.read_checkpoint(out)  # repaired
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "dim": 64}))
    _one_line(lambda: formats.read_checkpoint(out), "dim")
    (out / "config.json").write_text("{broken")
    _one_line(lambda: formats.read_checkpoint(out), r"config\.json: not JSON")
