"""The PyTorch converter: safe loading, naming families, config, round trips, parity with a PyTorch ToyLM.

Checkpoints in other layouts are made here with ``tools/torch_port``'s PyTorch ToyLM (random
weights, tiny config) and renamed by small test-local functions, independent of the converter's
own tables.
"""

import collections
import dataclasses
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import REPO, fixture_dir
from jaxlm.errors import CheckpointError

torch = pytest.importorskip("torch", reason="the converter's tests build checkpoints with torch")

import jaxlm  # noqa: E402
from jaxlm import formats  # noqa: E402
from jaxlm.formats import torch_pt  # noqa: E402
from tools.torch_port import toylm_torch  # noqa: E402
from tools.torch_port.__main__ import main as cli  # noqa: E402

TINY = dict(vocab_size=96, dim=32, n_layers=3, n_heads=2, head_dim=16, mlp_hidden=48, max_seq_len=64,
            sliding_window=8)


# ----------------------------------------------------------------------------- making checkpoints


def torch_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = toylm_torch.ToyLM(toylm_torch.Config(**{**TINY, **overrides}))
    with torch.no_grad():  # larger weights and uneven norms, so that every convention shows in the logits
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.ndim == 1 else 0.25 * torch.randn_like(p))
    return model.eval()


def card_cfg(model) -> dict:
    """The cfg dict as the card's checkpoints have it (upstream field names only)."""
    known = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "mlp_hidden", "max_seq_len", "attention_pattern",
             "sliding_window", "engram_enabled", "engram_slots", "engram_inject_layer", "optimizer",
             "lm_head_logit_cap", "z_loss_weight", "lr_schedule")
    return {k: getattr(model.cfg, k) for k in known}


HF_TO_META = [("model.embed_tokens", "tok_embeddings"), ("model.layers.", "layers."), ("model.norm", "norm"),
              ("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
              ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
              ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
              ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
              ("post_attention_layernorm", "ffn_norm")]


def meta_names(sd, head=False):
    out = collections.OrderedDict()
    for name, t in sd.items():
        for a, b in HF_TO_META:
            name = name.replace(a, b)
        out[name] = t
    if head:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def nanogpt_names(sd, n_layers):
    out = collections.OrderedDict(**{"transformer.wte.weight": sd["model.embed_tokens.weight"]})
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out[f"transformer.h.{i}.ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
            [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[f"transformer.h.{i}.attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"transformer.h.{i}.ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[f"transformer.h.{i}.mlp.c_fc.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"],
                                                               sd[p + "mlp.up_proj.weight"]])
        out[f"transformer.h.{i}.mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)  # mask buffer
    out["transformer.ln_f.weight"] = sd["model.norm.weight"]
    out["lm_head.weight"] = out["transformer.wte.weight"]  # nanoGPT ties by sharing the tensor
    return out


def prefixed(sd, prefix):
    return collections.OrderedDict((prefix + k, v) for k, v in sd.items())


def bf16(sd):
    return collections.OrderedDict((k, v.to(torch.bfloat16)) for k, v in sd.items())


def with_pickled_config(tmp_path, fields, module="config"):
    """A Config object whose class lives in a module that is gone by the time the file is read."""
    folder = tmp_path / f"code_{module}"
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(
        "import dataclasses\n@dataclasses.dataclass\nclass Config:\n"
        + "".join(f"    {k}: object = None\n" for k in fields))
    sys.path.insert(0, str(folder))
    try:
        cls = __import__(module).Config
        return cls(**fields)
    finally:
        sys.path.remove(str(folder))


def forget_module(name="config"):
    sys.modules.pop(name, None)


def load_as_upstream(src, tmp_path):
    """``torch.load`` the way upstream does it: unrestricted, with its ``config`` module importable."""
    sys.path.insert(0, str(tmp_path / "code_config"))
    try:
        return torch.load(src, weights_only=False)
    finally:
        sys.path.remove(str(tmp_path / "code_config"))
        forget_module()


def ids(seq_len, batch=2, seed=0, vocab=TINY["vocab_size"]):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq_len))


def torch_logits(model, token_ids):
    with torch.no_grad():
        return model(torch.as_tensor(token_ids))[0].float().numpy()


def assert_close(a, b, tol=1e-4):
    rel = np.abs(a - b).max() / max(np.abs(b).max(), 1e-6)
    assert rel <= tol, f"max relative error {rel:.2e}"


# ----------------------------------------------------------------------------- the golden fixture


def test_fixture_converts_and_matches_its_logits(tmp_path):
    folder = fixture_dir("toylm")
    want = np.load(folder / "logits.npy")
    token_ids = np.load(folder / "input_ids.npy")
    lm = jaxlm.load(folder / "toylm_tiny.pt")
    got = np.asarray(lm(token_ids))
    assert got.dtype == np.float32 and got.shape == want.shape
    assert_close(got, want)
    assert lm.step == 1000 and lm.cfg.sliding_window == 12
    # through the CLI into an Orbax export, loaded again
    assert cli(["to-orbax", str(folder / "toylm_tiny.pt"), str(tmp_path / "exp")]) == 0
    assert_close(np.asarray(jaxlm.load(tmp_path / "exp")(token_ids)), want)
    # and the PyTorch ToyLM reads the fixture directly (its names are Hugging Face style too)
    assert_close(torch_logits(toylm_torch.ToyLM.from_checkpoint(folder / "toylm_tiny.pt"), token_ids), want)


def test_reader_needs_no_torch():
    """jaxlm.load from a plain install: the .pt is read with torch made unimportable."""
    folder = fixture_dir("toylm")
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, jaxlm\n"
            f"lm = jaxlm.load({str(folder / 'toylm_tiny.pt')!r})\n"
            f"x = np.asarray(lm(np.load({str(folder / 'input_ids.npy')!r})))\n"
            "print(x.shape, x.dtype)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(2, 33, 256) float32" in out.stdout


def test_reader_matches_torch_load_bit_for_bit(tmp_path):
    tensors = {"bf16": torch.randn(5, 7).to(torch.bfloat16), "f32": torch.randn(3), "i64": torch.arange(6),
               "f16_t": torch.randn(4, 6).half().t(), "strided": torch.randn(10)[::3], "scalar": torch.tensor(2.5),
               "bool": torch.tensor([True, False])}
    obj = {"t": tensors, "shared": [tensors["bf16"], tensors["bf16"]], "n": 3, "s": "x", "tuple": (1, 2.0, None)}
    torch.save(obj, tmp_path / "a.pt")
    ours = torch_pt.load(tmp_path / "a.pt")
    for name, t in tensors.items():
        got = ours["t"][name]
        assert got.shape == tuple(t.shape) and str(got.dtype) == str(t.dtype).removeprefix("torch."), name
        want = t.contiguous().view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.contiguous().numpy()
        assert np.array_equal(got.view(want.dtype) if t.dtype == torch.bfloat16 else got, want), name
    assert ours["shared"][0] is ours["shared"][1]
    assert ours["tuple"] == (1, 2.0, None) and ours["n"] == 3


def test_writer_is_read_by_torch_with_weights_only(tmp_path):
    import ml_dtypes
    embed = np.random.default_rng(0).normal(size=(6, 4)).astype(ml_dtypes.bfloat16)
    obj = {"cfg": {"dim": 4, "name": "x", "cap": 30.0, "flag": True, "none": None},
           "model": collections.OrderedDict([("embed", embed), ("head", embed), ("n", np.arange(3))]),
           "step": 17_500, "big": 2**40, "neg": -3, "opt": {"state": {0: {"step": np.asarray(5.0, np.float32)}},
                                                           "param_groups": [{"params": [0], "betas": (0.9, 0.95)}]}}
    torch_pt.save(obj, tmp_path / "w.pt")
    back = torch.load(tmp_path / "w.pt", weights_only=True)
    assert back["cfg"] == obj["cfg"] and back["step"] == 17_500 and back["big"] == 2**40 and back["neg"] == -3
    assert back["model"]["embed"].dtype == torch.bfloat16
    assert back["model"]["embed"].data_ptr() == back["model"]["head"].data_ptr()  # tied: one storage
    assert np.array_equal(back["model"]["embed"].view(torch.int16).numpy(), embed.view(np.int16))
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.95)
    with zipfile.ZipFile(tmp_path / "w.pt") as z:  # records 64-byte aligned, as torch writes them
        for info in z.infolist():
            if "/data/" in info.filename:
                raw = (tmp_path / "w.pt").read_bytes()[info.header_offset:info.header_offset + 30]
                start = info.header_offset + 30 + int.from_bytes(raw[26:28], "little") + int.from_bytes(raw[28:30], "little")
                assert start % 64 == 0


# ----------------------------------------------------------------------------- safe loading


class Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func, name", [(os.system, "posix.system"), (eval, "builtins.eval"),
                                        (subprocess.getoutput, "subprocess.getoutput")])
def test_malicious_pickle_is_refused_without_running(tmp_path, func, name):
    marker = tmp_path / "pwned"
    payload = f"touch {marker}" if func is not eval else f"open({str(marker)!r}, 'w')"
    model = torch_model()
    torch.save({"cfg": card_cfg(model), "model": bf16(model.state_dict()), "extra": Exploit(func, payload)},
               tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as error:
        jaxlm.load(tmp_path / "evil.pt")
    assert "\n" not in str(error.value)
    assert not marker.exists()
    assert cli(["inspect", str(tmp_path / "evil.pt")]) == 2
    assert not marker.exists()


def test_crafted_tensor_record_outside_its_storage_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(4)}}, tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as z:
        records = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(n for n in records if n.endswith("data.pkl"))
    records[pkl] = records[pkl].replace(b"K\x04\x85", b"M\x00\x10\x85")  # size (4,) -> (4096,)
    with zipfile.ZipFile(tmp_path / "bad.pt", "w") as z:
        for name, data in records.items():
            z.writestr(name, data)
    with pytest.raises(CheckpointError, match="past the end of its storage"):
        torch_pt.load(tmp_path / "bad.pt")


def test_pickled_config_object_loads_without_its_module(tmp_path):
    model = torch_model()
    for module in ("config", "__main__"):
        if module == "config":
            cfg = with_pickled_config(tmp_path, card_cfg(model))
        else:  # a Config defined in the training script itself
            import __main__
            cls = dataclasses.make_dataclass("Config", [(k, object) for k in card_cfg(model)])
            cls.__module__ = "__main__"
            __main__.Config = cls
            cfg = cls(**card_cfg(model))
        torch.save({"cfg": cfg, "model": bf16(model.state_dict()), "step": 7}, tmp_path / f"{module}.pt")
        if module == "config":
            forget_module()
        else:
            del __main__.Config
        with pytest.raises(Exception):  # what upstream's weights_only load would say
            torch.load(tmp_path / f"{module}.pt", weights_only=True)
        lm = jaxlm.load(tmp_path / f"{module}.pt")
        assert lm.cfg.dim == TINY["dim"] and lm.step == 7
        assert any(f"pickled {module}.Config" in n for n in lm.notes)
    assert "config" not in sys.modules


# ----------------------------------------------------------------------------- namings and parity


def make_variant(tmp_path, variant, model):
    """A checkpoint of ``model`` in another layout: (path, key map or None)."""
    sd, n = model.state_dict(), model.cfg.n_layers
    cfg, key_map = card_cfg(model), None
    if variant == "hf":
        state = sd
    elif variant == "meta_compiled":
        state = prefixed(meta_names(sd, head=True), "_orig_mod.")
    elif variant == "nanogpt_ddp":
        state = prefixed(nanogpt_names(sd, n), "module.")
    elif variant == "meta_pickled_cfg_no_head":
        state = meta_names(sd)
        cfg = with_pickled_config(tmp_path, cfg)
    elif variant == "bare_state_dict":
        state, cfg = sd, None
    elif variant == "swiglu_w1_w2_c_proj_namespace_cfg":  # a nanoGPT SwiGLU: c_proj(silu(w1 x) * w2 x)
        import argparse
        state = collections.OrderedDict()
        for name, t in sd.items():
            name = name.replace("model.embed_tokens", "transformer.wte").replace("model.layers.", "transformer.h.")
            name = name.replace("model.norm", "transformer.ln_f")
            for a, b in (("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"), ("self_attn.v_proj", "attn.v"),
                         ("self_attn.o_proj", "attn.c_proj"), ("mlp.gate_proj", "mlp.w1"), ("mlp.up_proj", "mlp.w2"),
                         ("mlp.down_proj", "mlp.c_proj")):
                name = name.replace(a, b)
            state[name.replace("input_layernorm", "ln_1").replace("post_attention_layernorm", "ln_2")] = t
        cfg = argparse.Namespace(**cfg)
    elif variant == "head_only":  # a tied model that saved its output head and not the embedding
        state = collections.OrderedDict((k.replace("model.embed_tokens", "lm_head"), v) for k, v in sd.items())
    elif variant == "custom_with_key_map":
        renames = {"model.embed_tokens.weight": "emb.table", "model.norm.weight": "out_norm.scale"}
        state = collections.OrderedDict()
        for name, t in sd.items():
            new = renames.get(name)
            if new is None:
                new = name.replace("model.layers.", "trunk.cell").replace(".self_attn.", ".mix_").replace(
                    ".mlp.", ".ff_").replace("_proj.weight", "").replace("input_layernorm.weight", "n1").replace(
                    "post_attention_layernorm.weight", "n2")
            state[new] = t
        key_map = {"emb.table": "embed/embedding", "out_norm.scale": "final_norm/w",
                   r"trunk\.cell(\d+)\.mix_(q|k|v|o)": r"blocks/\1/attn/\2/kernel",
                   r"trunk\.cell(\d+)\.ff_(gate|up|down)": "blocks/{1}/mlp/{2}/kernel",
                   r"trunk\.cell(\d+)\.n1": r"blocks/\1/attn_norm/w", r"trunk\.cell(\d+)\.n2": r"blocks/\1/mlp_norm/w"}
    else:
        raise ValueError(variant)
    obj = dict(state) if cfg is None else {"cfg": cfg, "model": bf16(state), "step": 100}
    if cfg is None:
        obj = bf16(state)
    torch.save(obj, tmp_path / f"{variant}.pt")
    forget_module()
    if key_map is not None:
        (tmp_path / "map.json").write_text(json.dumps(key_map))
        key_map = tmp_path / "map.json"
    return tmp_path / f"{variant}.pt", key_map


VARIANTS = ["hf", "meta_compiled", "nanogpt_ddp", "meta_pickled_cfg_no_head", "bare_state_dict", "custom_with_key_map",
            "swiglu_w1_w2_c_proj_namespace_cfg", "head_only"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_namings_convert_and_match_pytorch_logits(tmp_path, variant):
    model = torch_model()
    path, key_map = make_variant(tmp_path, variant, model)
    reference = toylm_torch.ToyLM(model.cfg)
    reference.load_state_dict(bf16(model.state_dict()))  # the stored bf16 weights, computed in float32
    reference = reference.float().eval()
    token_ids = ids(20)  # longer than the window of 8
    if variant == "custom_with_key_map":
        with pytest.raises(CheckpointError, match=r"trunk\.cell0\.mix_q \(32, 32\)"):
            jaxlm.load(path)  # unmatched keys are named with their shapes
    # A bare state_dict has no cfg: the shape comes from the tensors, the rest is the user's to say.
    overrides = ["n_heads=2", "sliding_window=8", "max_seq_len=64"] if variant == "bare_state_dict" else ()
    lm = jaxlm.load(path, key_map=key_map, overrides=overrides)
    assert_close(np.asarray(lm(token_ids)), torch_logits(reference, token_ids))
    if variant == "bare_state_dict":
        assert any("inferred: vocab_size=96, dim=32, n_layers=3, mlp_hidden=48" in n for n in lm.notes), lm.notes


@pytest.mark.parametrize("conventions", [
    {},
    {"rope_pairing": "interleaved", "rope_theta": 500.0, "sliding_parity": "odd", "window_includes_query": False,
     "embed_scale": True},
    {"attention_pattern": "all_global", "lm_head_logit_cap": 0.0},
])
@pytest.mark.parametrize("seq_len", [6, 23])  # below and above the window of 8
def test_jax_and_pytorch_toylm_agree(tmp_path, conventions, seq_len):
    model = torch_model(seed=1, **conventions)
    path = tmp_path / "m.pt"
    torch.save({"cfg": card_cfg(model), "model": model.state_dict(),
                "conventions": {k: v for k, v in conventions.items() if k not in card_cfg(model)}}, path)
    lm = jaxlm.load(path)
    assert lm.model.cfg.rope_pairing == conventions.get("rope_pairing", "rotate_half")
    token_ids = ids(seq_len, seed=seq_len)
    assert_close(np.asarray(lm(token_ids)), torch_logits(model, token_ids))


def test_rope_theta_is_read_off_a_saved_inv_freq_buffer(tmp_path):
    model = torch_model(rope_theta=500_000.0)
    sd = bf16(model.state_dict())
    head_dim = model.cfg.head_dim
    sd["model.rotary_emb.inv_freq"] = 500_000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    torch.save({"cfg": card_cfg(model), "model": sd}, tmp_path / "a.pt")  # the cfg does not say theta
    lm = jaxlm.load(tmp_path / "a.pt")
    assert lm.cfg.rope_theta == 500_000.0 and any("inv_freq buffer" in n for n in lm.notes)
    reference = toylm_torch.ToyLM(model.cfg)
    reference.load_state_dict(bf16(model.state_dict()))
    assert_close(np.asarray(lm(ids(20))), torch_logits(reference.float(), ids(20)))
    formats.write_checkpoint(formats.read_checkpoint(tmp_path / "a.pt"), tmp_path / "b.pt")
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert list(back) == ["cfg", "model"]  # the buffer goes back, and no conventions key is added
    assert torch.equal(back["model"]["model.rotary_emb.inv_freq"], sd["model.rotary_emb.inv_freq"])


def test_tied_head_that_differs_is_refused(tmp_path):
    model = torch_model()
    sd = meta_names(model.state_dict())
    sd["output.weight"] = torch.randn_like(sd["tok_embeddings.weight"])
    torch.save({"cfg": card_cfg(model), "model": sd}, tmp_path / "untied.pt")
    with pytest.raises(CheckpointError, match="output.weight differs from the embedding.*ties"):
        jaxlm.load(tmp_path / "untied.pt")


# ----------------------------------------------------------------------------- config


def test_unknown_cfg_fields_are_reported_and_written_back(tmp_path, capsys):
    model = torch_model()
    cfg = {**card_cfg(model), "engram_slots": 64, "wandb_project": "crow", "rope_theta": 10000}
    torch.save({"cfg": cfg, "model": bf16(model.state_dict()), "step": 3}, tmp_path / "a.pt")
    assert cli(["inspect", str(tmp_path / "a.pt")]) == 0
    out = capsys.readouterr().out
    assert "ignored     engram_slots=64, wandb_project='crow'" in out   # a value the upstream default is not
    assert "at default  engram_enabled=False" in out
    assert "hf naming" in out and "converts cleanly" in out
    assert cli(["to-orbax", str(tmp_path / "a.pt"), str(tmp_path / "exp")]) == 0
    assert "ignored cfg fields" in capsys.readouterr().out
    assert cli(["to-torch", str(tmp_path / "exp"), str(tmp_path / "b.pt")]) == 0
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert back["cfg"] == cfg and type(back["cfg"]["rope_theta"]) is int
    assert list(back) == ["cfg", "model", "step"]


def test_synonym_fields_and_config_errors(tmp_path):
    model = torch_model()
    nano = {"n_layer": 3, "n_head": 2, "n_embd": 32, "block_size": 64, "vocab_size": 96, "bias": False}
    torch.save({"model_args": nano, "model": nanogpt_names(model.state_dict(), 3), "iter_num": 5},
               tmp_path / "nano.pt")
    conv = formats.read_checkpoint(tmp_path / "nano.pt")
    assert (conv.model_cfg.n_layers, conv.model_cfg.n_heads, conv.model_cfg.head_dim) == (3, 2, 16)
    assert conv.step == 5
    assert conv.model_cfg.sliding_window == 64  # not in the cfg: as long as the context, so it never binds
    back = formats.to_torch_object(conv)
    assert back["model_args"] == nano  # their names, their values
    bad = {**card_cfg(model), "vocab_size": 100}
    torch.save({"cfg": bad, "model": model.state_dict()}, tmp_path / "vocab.pt")
    with pytest.raises(CheckpointError, match="vocabulary mismatch: cfg.vocab_size = 100 but the embedding has 96"):
        jaxlm.load(tmp_path / "vocab.pt")
    torch.save({"cfg": {**card_cfg(model), "engram_enabled": True}, "model": model.state_dict()},
               tmp_path / "engram.pt")
    with pytest.raises(CheckpointError, match="Engram"):
        jaxlm.load(tmp_path / "engram.pt")


def test_user_errors_are_one_line(tmp_path, capsys):
    model = torch_model()
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all")
    torch.save({"cfg": card_cfg(model), "model": model.state_dict()}, tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    sd = model.state_dict()
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32)
    torch.save({"cfg": card_cfg(model), "model": sd}, tmp_path / "shape.pt")
    (tmp_path / "map.json").write_text("{not json")
    cases = [
        (["inspect", str(tmp_path / "missing.pt")], "file not found"),
        (["to-orbax", str(tmp_path / "junk.pt"), str(tmp_path / "o1")], "not a torch checkpoint|neither"),
        (["to-orbax", str(tmp_path / "cut.pt"), str(tmp_path / "o2")], "not a torch checkpoint|truncated|damaged"),
        (["to-orbax", str(tmp_path / "shape.pt"), str(tmp_path / "o3")], r"up_proj.weight has shape \(40, 32\)"),
        (["to-orbax", str(tmp_path / "good.pt"), str(tmp_path / "o4"), "--key-map", str(tmp_path / "map.json")],
         "key map .*not JSON"),
        (["to-orbax", str(tmp_path / "good.pt"), str(tmp_path / "o5"), "--set", "rope_pairing=sideways"],
         "rope_pairing"),
        (["to-torch", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")], "no such file or directory"),
    ]
    import re
    for argv, pattern in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and re.search(pattern, err), (argv, err)


# ----------------------------------------------------------------------------- round trips


def torch_optimizers(model, steps=2):
    """SGD-Nesterov momentum on the matrices (Muon's buffer) and AdamW on embedding + norms, a few steps."""
    matrices = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    muon = torch.optim.SGD(matrices, lr=1e-3, momentum=0.95, nesterov=True)
    adamw = torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95))
    for step in range(steps):
        token_ids = torch.as_tensor(ids(12, seed=step))
        _, loss = model(token_ids[:, :-1], token_ids[:, 1:])
        loss.backward()
        muon.step(), adamw.step()
        muon.zero_grad(), adamw.zero_grad()
    return muon, adamw


def bf16_state(opt_sd):
    """An optimizer state_dict with its moments stored in bf16, as the card's files store them."""
    return {"state": {i: {k: (v.to(torch.bfloat16) if v.ndim else v) for k, v in s.items()}
                      for i, s in opt_sd["state"].items()},
            "param_groups": opt_sd["param_groups"]}


def crowfeather_like(tmp_path, pickled=True, prefix="_orig_mod.", **overrides):
    """A step_XXXXXX.pt as the card describes: cfg (object), bf16 state_dict, step, optimizer state."""
    model = torch_model(**overrides)
    muon, adamw = torch_optimizers(model)
    cfg = with_pickled_config(tmp_path, card_cfg(model)) if pickled else card_cfg(model)
    ck = {"cfg": cfg, "model": prefixed(bf16(model.state_dict()), prefix), "step": 2,
          "optim": [bf16_state(muon.state_dict()), bf16_state(adamw.state_dict())],
          "rng": torch.get_rng_state(), "tokens_seen": 2 * 2 * 11}
    torch.save(ck, tmp_path / "step_000002.pt")
    forget_module()
    return tmp_path / "step_000002.pt", model, muon, adamw


def assert_same_tensors(a, b, where="top"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def test_round_trip_pt_orbax_pt_is_bit_exact(tmp_path):
    src, *_ = crowfeather_like(tmp_path)
    assert cli(["to-orbax", str(src), str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "optimizer").is_dir()
    assert cli(["to-torch", str(tmp_path / "exp"), str(tmp_path / "back.pt")]) == 0
    original = load_as_upstream(src, tmp_path)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    original["cfg"] = dataclasses.asdict(original["cfg"])  # the object comes back as its fields
    assert back["cfg"] == original["cfg"]
    assert_same_tensors(original, back)
    # names, prefix, bf16 and the optimizer layout are all the source's
    assert next(iter(back["model"])).startswith("_orig_mod.model.")
    assert back["optim"][1]["state"][0]["exp_avg"].dtype == torch.bfloat16


def test_round_trip_of_fused_and_tied_layouts(tmp_path):
    model = torch_model()
    sd = bf16(prefixed(nanogpt_names(model.state_dict(), 3), "module."))
    sd["module.lm_head.weight"] = sd["module.transformer.wte.weight"]
    torch.save({"config": card_cfg(model), "model": sd, "iter_num": 9}, tmp_path / "nano.pt")
    conv = formats.read_checkpoint(tmp_path / "nano.pt")
    formats.save_export(conv, tmp_path / "exp")
    formats.write_checkpoint(formats.read_checkpoint(tmp_path / "exp"), tmp_path / "back.pt")
    original, back = torch.load(tmp_path / "nano.pt"), torch.load(tmp_path / "back.pt", weights_only=True)
    assert_same_tensors(original, back)
    assert back["model"]["module.lm_head.weight"].data_ptr() == back["model"]["module.transformer.wte.weight"].data_ptr()


def test_other_namings_and_safetensors_out_and_back(tmp_path):
    model = torch_model()
    torch.save({"cfg": card_cfg(model), "model": bf16(model.state_dict()), "step": 4}, tmp_path / "a.pt")
    want = np.asarray(jaxlm.load(tmp_path / "a.pt")(ids(20)))
    for naming in ("meta", "nanogpt", "hf"):
        assert cli(["to-torch", str(tmp_path / "a.pt"), str(tmp_path / f"{naming}.pt"), "--naming", naming]) == 0
        np.testing.assert_array_equal(np.asarray(jaxlm.load(tmp_path / f"{naming}.pt")(ids(20))), want)
    assert cli(["to-torch", str(tmp_path / "a.pt"), str(tmp_path / "st" / "model.safetensors")]) == 0
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "st" / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    np.testing.assert_array_equal(np.asarray(jaxlm.load(tmp_path / "st")(ids(20))), want)
    # The card's own loading recipe on what to-torch wrote (cfg dict + conventions)
    ck = torch.load(tmp_path / "hf.pt", weights_only=True)
    reference = toylm_torch.ToyLM(toylm_torch.config_from_checkpoint(ck))
    reference.load_state_dict(ck["model"])
    assert_close(torch_logits(reference.float(), ids(20)), want)


def test_conventions_travel_through_safetensors_and_set(tmp_path):
    model = torch_model(rope_pairing="interleaved")
    torch.save({"cfg": card_cfg(model), "model": model.state_dict()}, tmp_path / "a.pt")
    assert cli(["to-orbax", str(tmp_path / "a.pt"), str(tmp_path / "exp"), "--set", "rope_pairing=interleaved"]) == 0
    assert cli(["to-torch", str(tmp_path / "exp"), str(tmp_path / "st" / "model.safetensors")]) == 0
    assert formats.read_checkpoint(tmp_path / "st" / "model.safetensors").model_cfg.rope_pairing == "interleaved"
    assert cli(["to-torch", str(tmp_path / "exp"), str(tmp_path / "b.pt")]) == 0
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert back["conventions"] == {"rope_pairing": "interleaved"}  # changed since conversion: written
    assert toylm_torch.config_from_checkpoint(back).rope_pairing == "interleaved"


def test_one_optimizer_with_muon_and_adamw_groups_in_any_order(tmp_path):
    """Keller Jordan's MuonWithAuxAdam layout: one state_dict, two groups, integer steps, no names;
    the AdamW group lists the norms before the embedding."""
    model = torch_model()
    named = list(bf16(model.state_dict()).items())
    is_matrix = lambda n, t: t.ndim >= 2 and "embed" not in n
    muon_ids = [i for i, (n, t) in enumerate(named) if is_matrix(n, t)]
    norm_ids = [i for i, (n, t) in enumerate(named) if t.ndim == 1]
    embed_id = next(i for i, (n, _) in enumerate(named) if "embed" in n)
    state = {i: {"momentum_buffer": torch.randn_like(named[i][1])} for i in muon_ids}
    state.update({i: {"exp_avg": torch.randn_like(named[i][1]), "exp_avg_sq": torch.rand_like(named[i][1]),
                      "step": 40} for i in norm_ids + [embed_id]})
    opt = {"state": state, "param_groups": [{"params": muon_ids, "use_muon": True, "lr": 0.02, "momentum": 0.95},
                                            {"params": norm_ids + [embed_id], "use_muon": False, "lr": 5e-3,
                                             "betas": (0.9, 0.95), "eps": 1e-10}]}
    torch.save({"cfg": card_cfg(model), "model": collections.OrderedDict(named), "optimizer": opt}, tmp_path / "k.pt")
    conv = formats.read_checkpoint(tmp_path / "k.pt")
    assert conv.step == 40  # no top-level step: AdamW's own count
    q = dict(named)["model.layers.2.self_attn.q_proj.weight"]
    q_id = next(i for i, (n, _) in enumerate(named) if n == "model.layers.2.self_attn.q_proj.weight")
    np.testing.assert_array_equal(conv.slots["momentum"]["blocks/2/attn/q/kernel"].view(np.int16),
                                  state[q_id]["momentum_buffer"].view(torch.int16).numpy().T)
    assert q.shape == state[q_id]["momentum_buffer"].shape
    np.testing.assert_array_equal(conv.slots["nu"]["embed/embedding"].view(np.int16),
                                  state[embed_id]["exp_avg_sq"].view(torch.int16).numpy())
    formats.save_export(conv, tmp_path / "exp")
    formats.write_checkpoint(formats.read_checkpoint(tmp_path / "exp"), tmp_path / "back.pt")
    assert_same_tensors(torch.load(tmp_path / "k.pt"), torch.load(tmp_path / "back.pt", weights_only=True))


# ----------------------------------------------------------------------------- what travels with a conversion


def word_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_the_step_is_the_checkpoints_own_in_every_file_and_report(tmp_path, capsys):
    """.pt, .safetensors and ``inspect`` of each say the source's step; a source without one (a bare
    state_dict) gets none, not a made-up 0."""
    from safetensors import safe_open
    model = torch_model()
    torch.save({"cfg": card_cfg(model), "model": model.state_dict(), "step": 7}, tmp_path / "a.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    for src, step in (("a.pt", 7), ("bare.pt", None)):
        assert cli(["to-orbax", str(tmp_path / src), str(tmp_path / f"{src}.exp")]) == 0
        for dst in (f"{src}.exp", f"{src}.back.pt", f"{src}.card.pt", f"{src}.st/model.safetensors", f"{src}.hf"):
            naming = ["--naming", "hf"] if "card" in dst else []
            if not dst.endswith(".exp"):
                assert cli(["to-torch", str(tmp_path / f"{src}.exp"), str(tmp_path / dst), *naming]) == 0
            assert formats.read_checkpoint(tmp_path / dst).step == step, dst
            capsys.readouterr()
            assert cli(["inspect", str(tmp_path / dst)]) == 0
            steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
            assert steps == ([f"step        {step}"] if step is not None else []), (dst, steps)
        with safe_open(tmp_path / f"{src}.st" / "model.safetensors", "np") as f:
            assert f.metadata().get("step") == (None if step is None else str(step))
        assert torch.load(tmp_path / f"{src}.card.pt", weights_only=True).get("step") == step


def test_to_torch_writes_the_tokenizer_beside_the_pt(tmp_path, capsys):
    """What to-torch writes and its tokenizer travel together: jaxlm.load finds it without being told;
    a folder that holds another tokenizer is refused before anything is written."""
    model = torch_model()
    (tmp_path / "src").mkdir()
    torch.save({"cfg": card_cfg(model), "model": model.state_dict(), "step": 3}, tmp_path / "src" / "a.pt")
    word_tokenizer(tmp_path / "src" / "tokenizer.json", TINY["vocab_size"])
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t5"}))
    assert cli(["to-orbax", str(tmp_path / "src" / "a.pt"), str(tmp_path / "exp")]) == 0
    for dst in ("out/b.pt", "st/model.safetensors", "hf"):
        assert cli(["to-torch", str(tmp_path / "exp"), str(tmp_path / dst)]) == 0
        assert "tokenizer.json and tokenizer_config.json beside it" in capsys.readouterr().out
        lm = jaxlm.load(tmp_path / dst)
        assert lm.tokenizer.encode("t7 t9").ids == [7, 9] and lm.eos_id == 5, dst
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    # a second .pt of the same source into that folder is fine; a source with another tokenizer is not
    assert cli(["to-torch", str(tmp_path / "exp"), str(tmp_path / "out" / "c.pt"), "--naming", "meta"]) == 0
    word_tokenizer(tmp_path / "other.json", TINY["vocab_size"] - 1)
    capsys.readouterr()
    assert cli(["to-torch", str(tmp_path / "exp"), str(tmp_path / "out" / "d.pt"),
                "--tokenizer", str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "is not the tokenizer of d.pt's source" in err
    assert not (tmp_path / "out" / "d.pt").exists()
    # no tokenizer anywhere: said so, nothing invented
    torch.save({"cfg": card_cfg(model), "model": model.state_dict()}, tmp_path / "alone.pt")
    assert cli(["to-torch", str(tmp_path / "alone.pt"), str(tmp_path / "lone" / "x.pt")]) == 0
    assert "no tokenizer found with the source" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "lone").iterdir()) == ["x.pt"]


def test_fields_at_their_upstream_defaults_are_not_reported_as_ignored(tmp_path, capsys):
    """What jaxlm itself writes for PyTorch (the card's fields, features off) reads back without a note."""
    model = torch_model()
    torch.save({"cfg": card_cfg(model), "model": bf16(model.state_dict()), "step": 3}, tmp_path / "a.pt")
    assert cli(["to-orbax", str(tmp_path / "a.pt"), str(tmp_path / "exp")]) == 0
    assert "ignored cfg fields" not in capsys.readouterr().out
    assert cli(["inspect", str(tmp_path / "a.pt")]) == 0
    assert "ignored     (none)" in capsys.readouterr().out
