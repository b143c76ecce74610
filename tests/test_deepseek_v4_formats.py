"""DeepSeek-V4's Hugging Face naming: keys <-> params, config.json <-> config, claims, errors."""

import json

import numpy as np
import pytest

from conftest import fixture_dir
from jaxlm.errors import CheckpointError
from jaxlm.formats import deepseek_v4 as naming
from jaxlm.formats import safetensors_file
from jaxlm.models.deepseek_v4 import DeepSeekV4Config


@pytest.fixture(scope="module")
def fixture_files():
    d = fixture_dir("nanowhale")
    tensors, metadata = safetensors_file.load(d / "model.safetensors")
    return d, tensors, json.loads((d / "config.json").read_text())


def shapes_of(tensors):
    return {k: tuple(v.shape) for k, v in tensors.items()}


def test_config_from_fixture_fields(fixture_files):
    _, tensors, fields = fixture_files
    cfg, _ = naming.config_from_fields(fields, shapes_of(tensors), "fixture")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                 "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters", "rope_theta",
                 "routed_scaling_factor", "scoring_func", "max_position_embeddings"):
        assert getattr(cfg, name) == fields[name], name
    assert cfg.param_count() == sum(t.size for t in tensors.values())


def test_state_dict_round_trip_is_bit_identical(fixture_files):
    _, tensors, fields = fixture_files
    cfg, _ = naming.config_from_fields(fields, shapes_of(tensors), "fixture")
    flat = naming.params_from_state_dict(tensors, cfg)
    assert flat["layers/1/ffn/experts/w2"].shape == (cfg.n_routed_experts, cfg.moe_intermediate_size,
                                                     cfg.hidden_size)
    np.testing.assert_array_equal(flat["layers/1/ffn/experts/w2"][2], tensors["model.layers.1.ffn.experts.2.w2.weight"].T)
    back = naming.state_dict_from_params(flat, cfg)
    assert set(back) == set(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        assert back[name].tobytes() == np.asarray(array).tobytes(), name


def test_safetensors_file_round_trip(fixture_files, tmp_path):
    _, tensors, fields = fixture_files
    cfg, _ = naming.config_from_fields(fields, shapes_of(tensors), "fixture")
    out = tmp_path / "model.safetensors"
    safetensors_file.save(naming.state_dict_from_params(naming.params_from_state_dict(tensors, cfg), cfg), out,
                          {"format": "pt"})
    again, metadata = safetensors_file.load(out)
    assert metadata == {"format": "pt"} and set(again) == set(tensors)
    assert all(again[k].tobytes() == np.asarray(v).tobytes() for k, v in tensors.items())


def test_orig_mod_prefix_is_stripped(fixture_files):
    _, tensors, fields = fixture_files
    prefixed = {f"_orig_mod.{k}": v for k, v in tensors.items()}
    cfg, _ = naming.config_from_fields(fields, shapes_of(prefixed), "fixture")
    flat = naming.params_from_state_dict(prefixed, cfg)
    np.testing.assert_array_equal(flat["lm_head"], tensors["lm_head.weight"])


def test_fields_for_torch_keeps_every_original_field(fixture_files):
    _, tensors, fields = fixture_files
    cfg, _ = naming.config_from_fields(fields, shapes_of(tensors), "fixture")
    assert naming.fields_for_torch(cfg, fields) == fields
    full = json.loads((fixture_dir("nanowhale") / "full_config.json").read_text())
    written = naming.fields_for_torch(DeepSeekV4Config(), None)
    ignore = {"transformers_version"}   # bookkeeping of the library that wrote it
    assert {k: v for k, v in written.items() if k not in ignore} == {k: v for k, v in full.items() if k not in ignore}


def test_field_contradicting_shapes_is_one_line(fixture_files):
    _, tensors, fields = fixture_files
    with pytest.raises(CheckpointError, match=r"config.json hidden_size = 96 but the tensors say 64") as e:
        naming.config_from_fields({**fields, "hidden_size": 96}, shapes_of(tensors), "fixture")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"n_routed_experts = 3 but the tensors say 4"):
        naming.config_from_fields({**fields, "n_routed_experts": 3}, shapes_of(tensors), "fixture")
    with pytest.raises(CheckpointError, match=r"num_experts_per_tok = 5: must be <= .*n_routed_experts"):
        naming.config_from_fields({**fields, "num_experts_per_tok": 5}, shapes_of(tensors), "fixture")


def test_missing_and_extra_keys_are_one_line(fixture_files):
    _, tensors, fields = fixture_files
    cfg, _ = naming.config_from_fields(fields, shapes_of(tensors), "fixture")
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.ffn.experts.3.w3.weight"}
    with pytest.raises(CheckpointError, match=r"key model.layers.1.ffn.experts.3.w3.weight is missing"):
        naming.params_from_state_dict(missing, cfg)
    extra = {**tensors, "model.layers.0.attn.bogus": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected key model.layers.0.attn.bogus"):
        naming.params_from_state_dict(extra, cfg)


def test_claim(fixture_files):
    _, tensors, fields = fixture_files
    score, why = naming.claim(shapes_of(tensors), fields)
    assert score >= 0.9 and "hc_head_fn" in why
    toy = {"model.embed_tokens.weight": (8, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4)}
    assert naming.claim(toy, {})[0] == 0.0


def test_hash_layers_lose_their_bias():
    cfg = DeepSeekV4Config(num_hidden_layers=3, num_hash_layers=1, vocab_size=50, hidden_size=16, head_dim=8,
                           qk_rope_head_dim=4, num_attention_heads=2, q_lora_rank=8, o_lora_rank=4,
                           moe_intermediate_size=8)
    shapes = naming.expected_shapes(cfg)
    assert "model.layers.0.ffn.gate.bias" not in shapes and "model.layers.1.ffn.gate.bias" in shapes
    assert sum(int(np.prod(s)) for s in shapes.values()) == cfg.param_count()
    fields = {"num_hash_layers": 1, "qk_rope_head_dim": 4}
    assert naming.config_from_fields(fields, shapes, "test")[0] == cfg


def test_overrides_and_report(fixture_files):
    _, tensors, fields = fixture_files
    bare = {k: v for k, v in fields.items() if k not in ("hidden_size", "num_hidden_layers")}
    cfg, report = naming.config_from_fields(bare, shapes_of(tensors), "fixture",
                                            overrides=["moe_dispatch=dense_capacity"])
    assert cfg.moe_dispatch == "dense_capacity" and (cfg.hidden_size, cfg.num_hidden_layers) == (64, 2)
    assert report.inferred["hidden_size"] == 64 and "sliding_window" in report.ignored
    entries = naming.entries(cfg)
    stacked = [e for e in entries if e.kind == "stack" and e.targets == ["layers/0/ffn/experts/w2"]]
    assert [e.index for e in stacked] == [0, 1, 2, 3] and {e.count for e in stacked} == {4}
