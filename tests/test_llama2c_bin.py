"""llama2.c model.bin v3 (jaxlm.formats.llama2c_bin) against the upstream exporter's own file.

The golden truth is ``fixtures/llama_think/model_v3.bin`` (written by the original ``export.py --version 3``
from ``ckpt.pt``), its manifest (header fields, tensor order with byte offsets, dropped keys) and, for the
real 95M shape, ``full_keys.json`` and the byte count SPEC §13 states.
"""

import json
import os
import struct

import numpy as np
import pytest

from conftest import fixture_dir
from jaxlm.errors import CheckpointError
from jaxlm.formats import llama2c_bin as lb
from jaxlm.formats import torch_pt

REAL_BIN_BYTES = 376_226_624  # SPEC §13: the real 95M model's model.bin


@pytest.fixture(scope="module")
def fixture():
    root = fixture_dir("llama_think")
    top = torch_pt.load(root / "ckpt.pt")
    manifest = json.loads((root / "manifest.json").read_text())
    return root, top, manifest


def _one_line(error):
    message = str(error.value)
    assert "\n" not in message and message
    return message


def _tiny_args(**changes):
    """A small config unlike the fixture's: explicit head_dim, GQA 3/1, odd sizes, FFN width from multiple_of."""
    args = {"dim": 24, "n_layers": 5, "n_heads": 3, "n_kv_heads": 1, "head_dim": 6, "vocab_size": 37,
            "multiple_of": 16, "max_seq_len": 19, "rope_base": 12345.5, "partial_rotary_factor": 0.25,
            "layer_types": ("csa", "linear", "full", "window", "linear"), "linear_num_key_heads": 1,
            "linear_num_value_heads": 2, "linear_key_head_dim": 5, "linear_value_head_dim": 7,
            "linear_conv_kernel_dim": 3, "attnres_block_size": 0, "hyper_connections": True}
    args.update(changes)
    return args


def _random_state_dict(args, seed=0, prefix="_orig_mod."):
    """Random tensors for every tensor the format holds, plus upstream tensors it has no place for."""
    rng = np.random.default_rng(seed)
    header = lb.header_from(args, {})
    sd = {prefix + name: rng.standard_normal(shape).astype(np.float32) for name, shape in lb.layout(header)}
    sd[prefix + "output.weight"] = sd[prefix + "tok_embeddings.weight"]
    for i, kind in enumerate(lb.layer_types(args)):
        for scale in ("hc_attn.residual_scale", "hc_ffn.sublayer_scale"):
            sd[f"{prefix}layers.{i}.{scale}"] = rng.standard_normal(header.dim).astype(np.float32)
        if kind == "csa":
            sd[f"{prefix}layers.{i}.attention.compress_k.weight"] = np.ones((6, 6), np.float32)
            sd[f"{prefix}layers.{i}.attention.comp_mask"] = np.zeros((1, 1, 19, 5), np.float32)
    return sd


# ----------------------------------------------------------------------------- the fixture, byte for byte


def test_fixture_ckpt_writes_the_exporters_file_byte_for_byte(fixture, tmp_path):
    root, top, _ = fixture
    path = lb.write_bin(top["model"], top["model_args"], tmp_path / "out" / "model.bin")
    assert path.read_bytes() == (root / "model_v3.bin").read_bytes()
    assert sorted(os.listdir(path.parent)) == ["model.bin"]  # no temporary file left behind


def test_fixture_header_and_offsets_match_the_manifest(fixture):
    root, _, manifest = fixture
    v3 = manifest["model_v3"]
    h = lb.read_header(root / "model_v3.bin")
    for name, value in v3["header"].items():
        if name in ("magic", "version"):
            continue
        ours = list(h.layer_bits) if name == "layer_type_bytes" else getattr(h, name)
        assert ours == value, name
    offsets, at = [], lb.HEADER_BYTES
    for name, shape in lb.layout(h):
        offsets.append([name, list(shape), at])
        at += 4 * int(np.prod(shape))
    assert offsets == v3["tensor_order_with_byte_offsets"]
    assert at == v3["total_bytes"] == (root / "model_v3.bin").stat().st_size


def test_fixture_bin_reads_back_the_ckpt_tensors_bit_exactly(fixture):
    root, top, manifest = fixture
    sd, args = lb.read_bin(root / "model_v3.bin")
    original = lb.strip_prefix(top["model"])
    assert len(sd) == manifest["model_v3"]["n_tensors"]
    for name, array in sd.items():
        assert array.dtype == np.float32 and array.shape == original[name].shape, name
        assert array.tobytes() == np.ascontiguousarray(original[name]).tobytes(), name
    assert "output.weight" not in sd  # shared classifier: stored once


def test_fixture_read_is_the_c_runner_model(fixture):
    root, top, manifest = fixture
    _, args = lb.read_bin(root / "model_v3.bin")
    upstream = top["model_args"]
    assert args["llama2c_lossy"] is True and args["hyper_connections"] is False
    assert args["layer_types"] == tuple("linear" if k == "linear" else "full" for k in upstream["layer_types"])
    derived = manifest["derived"]
    assert (args["hidden_dim"], args["head_dim"], args["norm_eps"]) == (
        derived["ffn_hidden_dim"], derived["head_dim"], derived["norm_eps"])
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "rope_base",
                "partial_rotary_factor", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                "linear_value_head_dim", "linear_conv_kernel_dim", "attnres_block_size"):
        assert args[key] == upstream[key], key


def test_fixture_dropped_keys_are_the_manifests(fixture):
    _, top, manifest = fixture
    assert sorted(lb.dropped_keys(top["model"], top["model_args"])) == \
        sorted(manifest["model_v3"]["dropped_state_dict_keys"])


def test_fixture_bin_rewrites_to_itself(fixture, tmp_path):
    root, _, _ = fixture
    sd, args = lb.read_bin(root / "model_v3.bin")
    path = lb.write_bin(sd, args, tmp_path / "again.bin")
    assert path.read_bytes() == (root / "model_v3.bin").read_bytes()


def test_write_from_torch_object(fixture, tmp_path):
    root, top, _ = fixture
    path = lb.write_from_torch_object(top, tmp_path / "m.bin")
    assert path.read_bytes() == (root / "model_v3.bin").read_bytes()
    assert lb.is_llama2c_bin(path) and not lb.is_llama2c_bin(root / "ckpt.pt")
    with pytest.raises(CheckpointError) as error:
        lb.write_from_torch_object({"model": top["model"]}, tmp_path / "n.bin")
    assert "model_args" in _one_line(error)


# ----------------------------------------------------------------------------- the real 95M shape


def test_real_config_layout_matches_full_keys_and_spec_size():
    root = fixture_dir("llama_think")
    full = json.loads((root / "full_keys.json").read_text())
    shapes = {e["key"].removeprefix(lb.PREFIX): tuple(e["shape"]) for e in full["keys"]}
    h = lb.header_from(full["model_args"], {})
    assert (h.hidden_dim, h.head_dim, h.norm_eps, h.layer_bits) == (1536, 64, 1e-6, (0, 0, 1, 1) * 4)
    entries = lb.layout(h)
    assert all(shapes[name] == shape for name, shape in entries)
    assert lb.HEADER_BYTES + 4 * sum(int(np.prod(s)) for _, s in entries) == REAL_BIN_BYTES
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # no memory: shapes only
    dropped = lb.dropped_keys(zeros, full["model_args"])
    assert dropped and all((".hc_" in k) or k.rsplit(".", 2)[-2] in ("compress_k", "compress_v", "blend_gate")
                           for k in dropped)
    assert len(dropped) + len(entries) + 1 + full["n_mask_buffers"] == full["n_state_dict_entries"]


# ----------------------------------------------------------------------------- other shapes


def test_round_trip_other_shapes_bit_exact(tmp_path):
    args = _tiny_args()
    sd = _random_state_dict(args)
    path = lb.write_bin(sd, args, tmp_path / "t.bin")
    back, read_args = lb.read_bin(path)
    stripped = lb.strip_prefix(sd)
    assert set(back) == {name for name, _ in lb.layout(lb.header_from(args, stripped))}
    for name, array in back.items():
        assert array.tobytes() == stripped[name].tobytes(), name
    # FFN width: int(2 * 4 * 24 / 3) = 64, already a multiple of 16; head_dim explicit (not 24 // 3)
    assert (read_args["hidden_dim"], read_args["head_dim"], read_args["n_kv_heads"]) == (64, 6, 1)
    assert read_args["layer_types"] == ("full", "linear", "full", "full", "linear")
    assert read_args["rope_base"] == 12345.5 and read_args["partial_rotary_factor"] == 0.25
    assert lb.write_bin(back, read_args, tmp_path / "u.bin").read_bytes() == path.read_bytes()


def test_header_bytes_by_hand(tmp_path):
    """The header fields at the SPEC's offsets, with ModelArgs' defaults for what model_args leaves out."""
    args = _tiny_args(n_kv_heads=None, head_dim=None, layer_types=None, n_layers=6, multiple_of=48)
    for name in ("rope_base", "partial_rotary_factor"):
        del args[name]
    sd = _random_state_dict(args, seed=1, prefix="")
    raw = lb.write_bin(sd, args, tmp_path / "d.bin").read_bytes()
    magic, version, *base = struct.unpack_from("<Ii7i", raw, 0)
    assert (magic, version) == (0x616B3432, 3) and raw[:4] == b"24ka"
    # hidden: int(2 * 96 / 3) = 64, rounded up to 96; kv heads default to n_heads; head_dim = 24 // 3
    assert base == [24, 96, 6, 3, 3, 37, 19]
    assert struct.unpack_from("<i3f6i", raw, 36) == (8, np.float32(1e7), 0.25, np.float32(1e-6), 1, 2, 5, 7, 3, 0)
    assert raw[76] == 1 and list(raw[77:83]) == [0, 0, 0, 1, 0, 0]  # upstream's default pattern
    assert raw[83:512] == bytes(429)


def test_attnres_tensors_round_trip(tmp_path):
    args = _tiny_args(attnres_block_size=2, hyper_connections=False)
    sd = _random_state_dict(args, seed=2)
    back, read_args = lb.read_bin(lb.write_bin(sd, args, tmp_path / "a.bin"))
    assert read_args["attnres_block_size"] == 2
    assert back["layers.4.mlp_res.proj.weight"].shape == (1, 24)
    assert back["layers.4.mlp_res.proj.weight"].tobytes() == sd["_orig_mod.layers.4.mlp_res.proj.weight"].tobytes()


def test_bfloat16_tensors_are_written_as_their_float32_values(tmp_path):
    import ml_dtypes
    args = _tiny_args()
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in _random_state_dict(args, seed=3).items()}
    back, _ = lb.read_bin(lb.write_bin(sd, args, tmp_path / "b.bin"))
    emb = sd["_orig_mod.tok_embeddings.weight"]
    assert back["tok_embeddings.weight"].tobytes() == emb.astype(np.float32).tobytes()


def test_nan_embedding_stores_the_classifier_like_torch_equal(tmp_path):
    """export.py decides 'shared' with torch.equal(emb, out) on a tied model: False when a NaN is in it."""
    torch = pytest.importorskip("torch")
    t = torch.tensor([1.0, float("nan")])
    assert not torch.equal(t, t)  # the behaviour this writer mirrors
    args = _tiny_args()
    sd = _random_state_dict(args, seed=4)
    sd["_orig_mod.tok_embeddings.weight"][3, 5] = np.nan
    clean = _random_state_dict(args, seed=4)
    path = lb.write_bin(sd, args, tmp_path / "nan.bin")
    raw = path.read_bytes()
    assert raw[76] == 0
    assert len(raw) == len(lb.write_bin(clean, args, tmp_path / "c.bin").read_bytes()) + 37 * 24 * 4
    back, _ = lb.read_bin(path)
    assert back["output.weight"].tobytes() == back["tok_embeddings.weight"].tobytes()


# ----------------------------------------------------------------------------- errors on writing


def test_write_errors_are_one_line(tmp_path):
    args = _tiny_args()
    sd = _random_state_dict(args)
    cases = [
        (sd, _tiny_args(layer_types=("linear", "mamba", "full", "full", "linear")), "mamba"),
        (sd, _tiny_args(layer_types=("linear", "full")), "n_layers"),
        (sd, _tiny_args(dim=32), "tok_embeddings.weight"),
        ({k: v for k, v in sd.items() if "layers.3.attention.wk" not in k}, args, "layers.3.attention.wk.weight"),
        ({**sd, "_orig_mod.output.weight": sd["_orig_mod.tok_embeddings.weight"] + 1}, args, "output.weight"),
        (sd, _tiny_args(attnres_block_size=2), "hyper_connections"),
        (sd, _tiny_args(dim=24.0), "dim"),
    ]
    for state_dict, model_args, needle in cases:
        with pytest.raises(CheckpointError) as error:
            lb.write_bin(state_dict, model_args, tmp_path / "x.bin")
        assert needle in _one_line(error)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary left


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    args = _tiny_args()
    dst = tmp_path / "keep.bin"
    dst.write_bytes(b"old")

    def broken_replace(src, dst_):
        raise OSError("disk full")
    monkeypatch.setattr(lb.os, "replace", broken_replace)
    with pytest.raises(OSError):
        lb.write_bin(_random_state_dict(args), args, dst)
    assert dst.read_bytes() == b"old" and os.listdir(tmp_path) == ["keep.bin"]


# ----------------------------------------------------------------------------- errors on reading


@pytest.fixture
def good_bin(tmp_path):
    args = _tiny_args()
    return lb.write_bin(_random_state_dict(args), args, tmp_path / "good.bin").read_bytes()


@pytest.mark.parametrize("damage, needle", [
    (lambda raw: b"\x7fELF" + raw[4:], "magic"),
    (lambda raw: raw[:4] + struct.pack("<i", 4) + raw[8:], "version 4"),
    (lambda raw: raw[:4] + struct.pack("<i", 1) + raw[8:], "version 1"),
    (lambda raw: raw[:6], "truncated"),
    (lambda raw: raw[:300], "truncated"),
    (lambda raw: raw[:-4], "truncated"),
    (lambda raw: raw + bytes(8), "does not fit"),
    (lambda raw: raw[:16] + struct.pack("<i", 0) + raw[20:], "n_layers"),        # n_layers = 0
    (lambda raw: raw[:16] + struct.pack("<i", 9999) + raw[20:], "n_layers"),     # more than the header holds
    (lambda raw: raw[:24] + struct.pack("<i", 0) + raw[28:], "n_kv_heads = 0"),
    (lambda raw: raw[:8] + struct.pack("<i", 25) + raw[12:], "truncated"),       # dim 25: tensors do not fit
    (lambda raw: raw[:77] + b"\x02" + raw[78:], "damaged"),                       # layer type byte 2
])
def test_read_errors_are_one_line(tmp_path, good_bin, damage, needle):
    path = tmp_path / "bad.bin"
    path.write_bytes(damage(good_bin))
    with pytest.raises(CheckpointError) as error:
        lb.read_bin(path)
    message = _one_line(error)
    assert needle in message and "bad.bin" in message


def test_read_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as error:
        lb.read_bin(tmp_path / "nope.bin")
    assert "not found" in _one_line(error)
