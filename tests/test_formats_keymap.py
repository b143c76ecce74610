"""The generic key mapping (``jaxlm/formats/keymap.py``) and reading by claim, with a tiny MoE family
defined here: stacked experts, an untied head, its own naming module (this file)."""

import dataclasses
import json
from typing import ClassVar

import numpy as np
import pytest
from flax import nnx

from jaxlm import formats, models
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.formats import keymap, safetensors_file
from jaxlm.models.family import Family

# ----------------------------------------------------------------------------- the tiny family


@dataclasses.dataclass(frozen=True)
class TinyMoEConfig:
    family: ClassVar[str] = "tiny_moe"
    SHAPE_FIELDS: ClassVar[tuple] = ("vocab_size", "dim", "hidden", "n_experts")
    vocab_size: int = 11
    dim: int = 4
    hidden: int = 6
    n_experts: int = 3
    router_scale: float = 1.0

    def validate(self):
        if self.n_experts < 1:
            raise ConfigError("n_experts must be >= 1")


class TinyMoE(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype=None):
        self.cfg = cfg
        init = nnx.initializers.normal(1.0)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs)
        self.w1 = nnx.Param(init(rngs.params(), (cfg.n_experts, cfg.dim, cfg.hidden)))
        self.w2 = nnx.Param(init(rngs.params(), (cfg.n_experts, cfg.hidden, cfg.dim)))
        self.head = nnx.Linear(cfg.dim, cfg.vocab_size, use_bias=False, rngs=rngs)


# The naming-module protocol, implemented by this test module itself.
FAMILY = "tiny_moe"
KEY_RE = [r"tok\.weight", r"experts\.\d+\.(?:w1|w2)\.weight", r"out\.weight"]


def claim(shapes, fields):
    share = keymap.match_fraction(shapes, KEY_RE)
    return share, f"{share:.0%} of keys named like tiny_moe"


def entries(cfg):
    out = [keymap.param("tok.weight", "embed/embedding", role="embed")]
    experts = range(cfg.n_experts)
    for i in experts:  # interleaved, as a PyTorch ModuleList of experts registers them
        out += [e for e in keymap.stack([f"experts.{j}.w1.weight" for j in experts], "w1") if e.index == i]
        out += [e for e in keymap.stack([f"experts.{j}.w2.weight" for j in experts], "w2") if e.index == i]
    return out + [keymap.param("out.weight", "head/kernel")]


def config_from_fields(fields, shapes, source="checkpoint", overrides=()):
    report = keymap.ConfigReport()
    values = {k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(TinyMoEConfig)}}
    report.ignored = {k: v for k, v in fields.items() if k not in values}
    if "tok.weight" in shapes:
        values.setdefault("vocab_size", shapes["tok.weight"][0])
        values.setdefault("dim", shapes["tok.weight"][1])
    return keymap.build_config(TinyMoEConfig, values, source, overrides), report


def fields_for_torch(cfg, original, report=None):
    return {**(original or {}), **dataclasses.asdict(cfg)}


@pytest.fixture
def tiny_family():
    models.register(Family(name=FAMILY, config=TinyMoEConfig, model=TinyMoE, naming=__name__))
    yield
    models.FAMILIES.pop(FAMILY, None)


def tiny_state_dict(cfg, seed=0):
    """What a PyTorch TinyMoE saves: per-expert (out, in) matrices and an untied head."""
    rng = np.random.default_rng(seed)
    sd = {"tok.weight": rng.normal(size=(cfg.vocab_size, cfg.dim)).astype(np.float32)}
    for e in range(cfg.n_experts):
        sd[f"experts.{e}.w1.weight"] = rng.normal(size=(cfg.hidden, cfg.dim)).astype(np.float32)
        sd[f"experts.{e}.w2.weight"] = rng.normal(size=(cfg.dim, cfg.hidden)).astype(np.float32)
    sd["out.weight"] = rng.normal(size=(cfg.vocab_size, cfg.dim)).astype(np.float32)
    return sd


# ----------------------------------------------------------------------------- the machinery alone


def test_stack_entries_split_and_join_exactly():
    rng = np.random.default_rng(1)
    shapes = {"blocks/0/moe/w13": (4, 3, 10)}  # 4 experts, each a fused gate|up of 5 + 5 rows, transposed
    entries = keymap.stack([f"e.{i}.w13" for i in range(4)], ["blocks/0/moe/w13"])
    torch_tensors = {e.name: rng.normal(size=(10, 3)) for e in entries}
    assert all(keymap.expected_torch_shape(e, shapes) == (10, 3) for e in entries)
    assembler = keymap.Assembler(shapes)
    for e in reversed(entries):  # any order
        assembler.add(e, torch_tensors[e.name])
    flat = assembler.result()
    assert flat["blocks/0/moe/w13"].shape == (4, 3, 10)
    np.testing.assert_array_equal(flat["blocks/0/moe/w13"][2], torch_tensors["e.2.w13"].T)
    for e in entries:  # and back, bit for bit
        np.testing.assert_array_equal(keymap.to_torch(e, flat), torch_tensors[e.name])
    partial = keymap.Assembler(shapes)
    partial.add(entries[0], torch_tensors[entries[0].name])
    with pytest.raises(CheckpointError, match="1 of its 4 stacked keys"):
        partial.result()
    assert partial.result(strict=False) == {}


def test_fused_stack_splits_rows_per_target():
    shapes = {"g": (2, 3, 5), "u": (2, 3, 4)}
    entries = keymap.stack(["x.0", "x.1"], ["g", "u"])
    tensors = {e.name: np.arange(27, dtype=np.float32).reshape(9, 3) + 100 * e.index for e in entries}
    assembler = keymap.Assembler(shapes)
    for e in entries:
        assembler.add(e, tensors[e.name])
    flat = assembler.result()
    np.testing.assert_array_equal(flat["g"][1], tensors["x.1"][:5].T)
    np.testing.assert_array_equal(flat["u"][1], tensors["x.1"][5:].T)
    np.testing.assert_array_equal(keymap.to_torch(entries[1], flat), tensors["x.1"])


def test_check_plan_names_family_gaps_and_clashes():
    shapes = {"w": (3, 2, 2)}
    entries = keymap.stack(["a.0", "a.1", "a.2"], "w")
    file_shapes = {e.name: (2, 2) for e in entries}
    keymap.check_plan(keymap.Plan(entries, [], "x", []), file_shapes, shapes, "f.pt", "Fam")
    with pytest.raises(CheckpointError, match=r"no key holds w\[1\]"):
        keymap.check_plan(keymap.Plan([entries[0], entries[2]], [], "x", []), file_shapes, shapes, "f.pt", "Fam")
    twice = [entries[0], dataclasses.replace(entries[0], name="b.0")]
    with pytest.raises(CheckpointError, match=r"both a\.0 and b\.0 map to w \[0\]"):
        keymap.check_plan(keymap.Plan(twice, [], "x", []), {**file_shapes, "b.0": (2, 2)}, shapes, "f.pt", "Fam")
    with pytest.raises(CheckpointError, match=r"3 keys like a\.0 stack into w, but Fam with this cfg has 4"):
        keymap.check_plan(keymap.Plan(entries, [], "x", []), file_shapes, {"w": (4, 2, 2)}, "f.pt", "Fam")
    with pytest.raises(CheckpointError, match=r"1 keys match no Fam parameter: junk \(5,\)") as error:
        keymap.check_plan(keymap.Plan(entries, [("junk", (5,))], "x", []), file_shapes, shapes, "f.pt", "Fam")
    assert "ToyLM" not in str(error.value) and "\n" not in str(error.value)


def test_plan_from_entries_key_map_prefixes_and_buffers():
    entries = [keymap.param("a.weight", "a/kernel"), keymap.param("b.weight", "b/w", role="norm")]
    shapes = {"_orig_mod.a.weight": (2, 3), "mine.b": (3,), "rope.inv_freq": (4,), "what": (1,)}
    plan = keymap.plan_from_entries(entries, shapes, {r"mine\.(\w)": r"\1/w"})
    kinds = {e.name: (e.kind, e.targets, e.transpose) for e in plan.entries}
    assert kinds["_orig_mod.a.weight"] == ("param", ["a/kernel"], True)
    assert kinds["mine.b"] == ("param", ["b/w"], False)
    assert kinds["rope.inv_freq"][0] == "buffer"
    assert plan.unmatched == [("what", (1,))]
    assert any("_orig_mod." in n for n in plan.notes)


def test_build_config_coerces_and_refuses_in_one_line():
    cfg = keymap.build_config(TinyMoEConfig, {"dim": 8.0, "router_scale": 2}, "c.json", ["hidden=7"])
    assert (cfg.dim, cfg.router_scale, cfg.hidden) == (8, 2.0, 7) and type(cfg.dim) is int
    for values, overrides, pattern in [({"dim": "x"}, (), r"cfg\.dim = 'x': expected int"),
                                       ({"n_experts": 0}, (), "valid TinyMoEConfig: n_experts"),
                                       ({}, ["nope=1"], "--set nope: not a TinyMoEConfig field")]:
        with pytest.raises(CheckpointError, match=pattern) as error:
            keymap.build_config(TinyMoEConfig, values, "c.json", overrides)
        assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- through the converter


def test_a_second_family_round_trips_through_the_converter(tmp_path, tiny_family):
    cfg = TinyMoEConfig()
    sd = tiny_state_dict(cfg)
    safetensors_file.save(sd, tmp_path / "moe.safetensors", {"cfg": json.dumps({"hidden": 6, "n_experts": 3})})
    conv = formats.read_checkpoint(tmp_path / "moe.safetensors")
    assert conv.family == "tiny_moe" and conv.model_cfg == cfg
    np.testing.assert_array_equal(conv.params["w1"], np.stack([sd[f"experts.{e}.w1.weight"].T for e in range(3)]))
    np.testing.assert_array_equal(conv.params["head/kernel"], sd["out.weight"].T)  # untied: its own parameter
    assert set(conv.params) == {"embed/embedding", "w1", "w2", "head/kernel"}
    formats.write_checkpoint(conv, tmp_path / "back.safetensors")
    back, _ = safetensors_file.load(tmp_path / "back.safetensors")
    assert list(back) == list(sd)
    for name in sd:
        np.testing.assert_array_equal(back[name], sd[name])
    # An export and back: the stored layout still knows the stack entries.
    formats.save_export(conv, tmp_path / "exp")
    again = formats.read_checkpoint(tmp_path / "exp")
    formats.write_checkpoint(again, tmp_path / "again.safetensors")
    assert all(np.array_equal(safetensors_file.load(tmp_path / "again.safetensors")[0][n], sd[n]) for n in sd)


def test_a_missing_expert_is_named(tmp_path, tiny_family):
    sd = tiny_state_dict(TinyMoEConfig())
    del sd["experts.1.w2.weight"]
    safetensors_file.save(sd, tmp_path / "moe.safetensors", {"cfg": json.dumps({"hidden": 6, "n_experts": 3})})
    with pytest.raises(CheckpointError, match=r"no key holds w2\[1\]"):
        formats.read_checkpoint(tmp_path / "moe.safetensors")


def test_the_best_claim_reads_and_no_claim_is_one_line(tmp_path, tiny_family):
    sd = tiny_state_dict(TinyMoEConfig())
    safetensors_file.save(sd, tmp_path / "moe.safetensors")
    an = formats.converted.analyze({"model": safetensors_file.load(tmp_path / "moe.safetensors")[0]}, "moe")
    assert an.family == "tiny_moe" and an.claims[0][:2] == (1.0, "tiny_moe")
    assert {name for _, name, _ in an.claims} >= {"tiny_moe", "toylm"}
    strange = {f"alien.{i}.tensor": np.zeros((2, 2), np.float32) for i in range(4)}
    strange_shapes = {k: v.shape for k, v in strange.items()}
    safetensors_file.save(strange, tmp_path / "alien.safetensors")
    with pytest.raises(CheckpointError, match="no model family claims this checkpoint.*best candidates: ") as error:
        formats.read_checkpoint(tmp_path / "alien.safetensors")
    message = str(error.value)
    claims = sorted(((m.claim(strange_shapes, {})[0], m.FAMILY) for m in keymap.naming_modules()),
                    key=lambda c: -c[0])  # ties keep the registry's order, as keymap.choose does
    assert "\n" not in message and all(f"{name} {score:.2f} (" in message for score, name in claims[:3])
    # Naming the family skips the claims; its own check then says what does not fit.
    with pytest.raises(CheckpointError, match="4 keys match no tiny_moe parameter: alien.0.tensor"):
        formats.read_checkpoint(tmp_path / "alien.safetensors", family="tiny_moe")


def test_generic_modules_import_no_family():
    import ast
    import pathlib
    root = pathlib.Path(formats.__file__).parent
    generic = ["__init__.py", "converted.py", "keymap.py", "hf_layout.py", "hub.py", "train_state.py",
               "orbax_export.py", "run_dir.py", "safetensors_file.py", "torch_pt.py", "optimizer_state.py",
               "skeleton.py", "../api.py"]
    families = {f for f in models.names()} | {"toylm", "hybrid", "deepseek_v4"}
    for name in generic:
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                       if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                parts = set(module.split("."))
                assert not parts & families, f"{name} imports {module}"
    assert not hasattr(formats.converted, "FAMILY_NAMES")
