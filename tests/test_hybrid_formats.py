"""formats/hybrid.py: which files are Llama Think's, model_args <-> HybridConfig, key errors."""

import json

import pytest

from conftest import fixture_dir
from jaxlm.errors import CheckpointError
from jaxlm.formats import hybrid as fh
from jaxlm.formats import torch_pt
from jaxlm.models.hybrid import HybridConfig


@pytest.fixture(scope="module")
def ckpt():
    return torch_pt.load(fixture_dir("llama_think") / "ckpt.pt")


def _shapes(ck):
    return {k: tuple(v.shape) for k, v in ck["model"].items()}


def test_claims_its_own_files_and_not_a_plain_llama(ckpt):
    score, why = fh.claim(_shapes(ckpt), ckpt["model_args"])
    assert score > 0.9, why
    real = json.loads((fixture_dir("llama_think") / "full_keys.json").read_text())
    assert fh.claim({e["key"]: tuple(e["shape"]) for e in real["keys"]}, {})[0] > 0.9
    llama = {"tok_embeddings.weight": (256, 40), "layers.0.attention.wq.weight": (40, 40),
             "layers.0.attention.wk.weight": (40, 40), "layers.0.feed_forward.w1.weight": (128, 40),
             "layers.0.attention_norm.weight": (40,), "norm.weight": (40,), "output.weight": (256, 40)}
    assert fh.claim(llama, {"dim": 40})[0] == 0.0


def test_config_from_the_state_dict_alone(ckpt):
    """Without model_args every size comes off the tensors (the rest are the ModelArgs defaults)."""
    cfg, report = fh.config_from_fields({}, _shapes(ckpt), "ckpt.pt")
    want, _ = fh.config_from_fields(ckpt["model_args"], _shapes(ckpt), "ckpt.pt")
    assert cfg == want and cfg.param_count() == 207_016
    assert {"layer_types", "dim", "vocab_size", "n_heads", "n_kv_heads", "linear_key_head_dim",
            "max_seq_len"} <= set(report.inferred)
    with pytest.raises(CheckpointError, match="shape") as e:
        fh.config_from_fields({**ckpt["model_args"], "dim": 48}, _shapes(ckpt), "ckpt.pt")
    assert "\n" not in str(e.value)


def test_shape_mismatch_and_foreign_keys_are_one_line(ckpt):
    shapes = _shapes(ckpt)
    args = {**ckpt["model_args"], "linear_key_head_dim": 16}
    with pytest.raises(CheckpointError, match="in_proj_qkv"):
        fh.config_from_fields(args, shapes, "ckpt.pt")
    with pytest.raises(CheckpointError, match="extra_thing"):
        fh.config_from_fields(ckpt["model_args"], {**shapes, "layers.0.extra_thing.weight": (2, 2)}, "ckpt.pt")
    missing = {k: v for k, v in shapes.items() if "compress_k" not in k}
    with pytest.raises(CheckpointError, match="missing"):
        fh.config_from_fields(ckpt["model_args"], missing, "ckpt.pt")


def test_untied_head_is_refused(ckpt):
    cfg, _ = fh.config_from_fields(ckpt["model_args"], _shapes(ckpt), "ckpt.pt")
    sd = dict(ckpt["model"])
    sd["_orig_mod.output.weight"] = sd["_orig_mod.output.weight"] + 1.0
    with pytest.raises(CheckpointError, match="tied"):
        fh.params_from_state_dict(sd, cfg)


def test_model_args_written_back(ckpt):
    cfg, _ = fh.config_from_fields(ckpt["model_args"], _shapes(ckpt), "ckpt.pt")
    assert list(fh.fields_for_torch(cfg, ckpt["model_args"])) == list(ckpt["model_args"])
    fresh = fh.fields_for_torch(HybridConfig(), None)
    assert list(fresh) == list(fh.MODEL_ARGS) and len(fresh) == 31
    real = json.loads((fixture_dir("llama_think") / "full_keys.json").read_text())["model_args"]
    assert fresh == {**real, "layer_types": tuple(real["layer_types"])}
    changed = fh.fields_for_torch(HybridConfig(norm_eps=1e-5), None)
    assert changed["norm_eps"] == 1e-5 and "hidden_dim" not in changed
