"""Typed run configuration: dataclasses, Python config files, command-line overrides.

A config file is a Python file that defines ``get_config() -> Config``. It is found by
name (``crowfeather.py`` -> ``configs/crowfeather.py``) or by path. Any field can then
be overridden from the command line with ``--config.train.steps=200``.

Every field is type-checked against its annotation and every section validates its
own values, so that a typo or an impossible shape ends in one line naming the field,
not in a traceback from deep inside JAX.

This module sits at the bottom of the import graph: the family configs (in
``jaxlm/models/<family>.py``) are plain dataclasses that this module handles
generically, without importing them.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import sys
import types
import typing
from typing import Any

from jaxlm.errors import ConfigError, JaxlmError


# --------------------------------------------------------------------------- sections


# How block activations are recomputed in the backward pass (models.layers.run_blocks).
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000                 # optimizer steps of this run
    batch_size: int = 16              # sequences per micro-batch, over all devices
    seq_len: int = 1024               # tokens per sequence fed to the model
    grad_accum: int = 1               # micro-batches per optimizer step
    compute_dtype: str = "bfloat16"   # activations/matmuls; params stay float32
    log_every: int = 10
    eval_every: int = 0               # 0: evaluate only at the end
    eval_batches: int = 4
    sample_prompt: str = ""           # printed continuation at the end ("" skips it)
    sample_tokens: int = 40
    loss_chunk: int = 0               # positions per loss chunk (0: whole sequence; the fused loss picks one)
    # Fast paths: each computes the same loss and gradients (tests/test_bench.py); docs/PERFORMANCE.md
    # has what each one costs or saves.
    fused_loss: bool = True           # head + soft-cap + cross-entropy + z-loss gradients in one chunked pass
    remat: str = "none"               # recompute block activations in the backward pass: none | full | dots
    scan_layers: bool = False         # one lax.scan over repeating layer groups: faster compiles

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "seq_len", "grad_accum", "log_every", "sample_tokens")
        _non_negative(self, "eval_every", "eval_batches", "loss_chunk")
        _choice(self, "compute_dtype", ("bfloat16", "float32"))
        _choice(self, "remat", REMAT_POLICIES)


@dataclasses.dataclass
class OptimConfig:
    """Muon for 2-D hidden weights, AdamW for the rest (or AdamW for everything)."""

    name: str = "muon"                 # "muon" (Muon + AdamW split) or "adamw"
    lr: float = 2e-3                   # peak learning rate of the main group
    # Muon group
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: str = "quintic"   # named Newton-Schulz coefficient set
    # update scale: toylm max(1, fan_out/fan_in)**0.5 | llama_think sqrt(max/min side)
    # | moonlight 0.2*sqrt(max side) | none
    muon_scale: str = "toylm"
    muon_weight_decay: float = 0.0
    ns_dtype: str = "float32"          # Newton-Schulz matmul dtype (bfloat16: faster, noisier)
    # which leaves go where (regexes searched in the "/"-joined parameter path):
    adamw_patterns: tuple[str, ...] = ("embed", "head")  # >= 2-D leaves sent to AdamW anyway
    conv_patterns: tuple[str, ...] = ("conv",)           # conv kernels (..., K, C_in/g, C_out): one matrix
    # AdamW group: lr either absolute or as a ratio of the Muon lr
    adamw_lr: float | None = None
    adamw_lr_ratio: float = 0.25
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0             # global-norm clip; 0 disables
    # schedule
    schedule: str = "wsd"              # wsd | cosine | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2        # WSD: final fraction of the planned steps spent decaying
    decay_shape: str = "linear"        # WSD: linear | cosine | 1-sqrt
    final_lr_fraction: float = 0.0     # lr at the end, as a fraction of the peak
    planned_steps: int | None = None   # length of the schedule (None: train.steps)

    def validate(self) -> None:
        _choice(self, "name", ("muon", "adamw"))
        _choice(self, "ns_coefficients", ("quintic", "polar_express", "cubic"))
        _choice(self, "muon_scale", ("toylm", "llama_think", "moonlight", "none"))
        _choice(self, "ns_dtype", ("float32", "bfloat16"))
        _choice(self, "schedule", ("wsd", "cosine", "constant"))
        _choice(self, "decay_shape", ("linear", "cosine", "1-sqrt"))
        _positive(self, "lr", "ns_steps", "eps")
        _non_negative(self, "warmup_steps", "weight_decay", "muon_weight_decay", "grad_clip", "adamw_lr_ratio")
        _fraction(self, "momentum", "b1", "b2", "decay_fraction", "final_lr_fraction")
        if self.ns_coefficients == "polar_express" and self.ns_steps > 5:  # a 5-row table
            raise ConfigError(f"optim.ns_steps = {self.ns_steps}: ns_coefficients='polar_express' has 5 steps at most")
        if self.adamw_lr is not None and self.adamw_lr < 0:
            raise ConfigError(f"optim.adamw_lr = {self.adamw_lr}: must be >= 0 (or None to use adamw_lr_ratio)")
        if self.planned_steps is not None and self.planned_steps <= 0:
            raise ConfigError(f"optim.planned_steps = {self.planned_steps}: must be > 0 (or None for train.steps)")


class DataSource(typing.NamedTuple):
    """One corpus of a data mixture (see docs/DATA.md for the path forms).

    A NamedTuple rather than a dataclass so that a config holding a mixture
    stays plain JSON (it is written as a list) and comes back through
    ``DataConfig.__post_init__``.
    """

    path: str                          # "pydoc", file, directory, glob, "hf://...", "tfds:name[/config]"
    weight: float = 1.0                # share of the mixture's tokens (normalised over all sources)
    kind: str = "auto"                 # auto | pydoc | text | jsonl | parquet | hf | tokens | array_record | tfds
    text_column: str = ""              # field holding the text, or a "{a}\n{b}" template ("": data.text_column)
    split: str = "train"               # TFDS split to read
    token_dtype: str = ""              # pre-tokenized files: uint16 | uint32 ("": uint16 unless a header says)


DATA_SOURCE_KINDS = ("auto", "pydoc", "text", "jsonl", "parquet", "hf", "tokens", "array_record", "tfds")


@dataclasses.dataclass
class DataConfig:
    """Where the tokens come from; see ``jaxlm/data`` and docs/DATA.md for the sources."""

    # One source ("pydoc": CPython's docs, no download; or a path/glob/"hf://"/"tfds:" spec),
    # or a weighted mixture: (DataSource("a/*.parquet", 0.7), DataSource("b.jsonl", 0.3)).
    source: str | tuple[DataSource, ...] = "pydoc"
    tokenizer: str = ""                # tokenizer.json, SentencePiece .model, or their directory ("": train one, cached)
    vocab_size: int = 0                # size of a tokenizer trained here (0: model vocab)
    eos_token: str = "<|endoftext|>"   # appended to every document ("": none, BOS-only framing as Llama Think's)
    special_tokens: tuple[str, ...] = ()   # further special tokens of a tokenizer trained here
    tokenizer_train_docs: int = 100_000    # documents a tokenizer trained here sees (the cards: 100k)
    text_column: str = "text"
    heldout_fraction: float = 0.01     # documents kept out of training for evaluation
    num_workers: int = 0               # Grain worker processes (0: in-process)
    read_threads: int = 4              # threads per process reading/tokenizing documents
    shuffle_buffer: int = 10_000       # documents: window shuffle of streamed (parquet/hub) sources
    tfds_data_dir: str = ""            # where "tfds:" sources live ("": <cache_dir>/tfds)
    cache_dir: str = "~/.cache/jaxlm"

    def __post_init__(self) -> None:
        self.source = _data_sources(self.source)

    def validate(self) -> None:
        _non_negative(self, "vocab_size", "num_workers", "read_threads")
        _positive(self, "tokenizer_train_docs", "shuffle_buffer")
        _fraction(self, "heldout_fraction")
        if isinstance(self.source, str):
            if not self.source:
                _fail(self, "source", "must name a source, e.g. 'pydoc' or 'data/*.parquet'")
            return
        if not self.source:
            _fail(self, "source", "an empty mixture; give at least one DataSource")
        for i, entry in enumerate(self.source):
            where = f"{_section(self)}source[{i}]"
            if not entry.path:
                raise ConfigError(f"{where}.path is empty: name a file, directory, glob or 'pydoc'")
            if not (isinstance(entry.weight, (int, float)) and entry.weight > 0):
                raise ConfigError(f"{where}.weight = {entry.weight!r}: must be > 0")
            if entry.kind not in DATA_SOURCE_KINDS:
                raise ConfigError(f"{where}.kind = {entry.kind!r}: allowed: " + ", ".join(DATA_SOURCE_KINDS))
            if entry.token_dtype not in ("", "uint16", "uint32"):
                raise ConfigError(f"{where}.token_dtype = {entry.token_dtype!r}: allowed: '', 'uint16', 'uint32'")

    @property
    def sources(self) -> tuple[DataSource, ...]:
        """The mixture, a single source being a mixture of one."""
        return (DataSource(self.source),) if isinstance(self.source, str) else self.source


def _data_sources(value: Any) -> Any:
    """Bring mixture entries back to DataSource (JSON and CLI give lists/dicts)."""
    if isinstance(value, DataSource):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(entry if isinstance(entry, DataSource)
                     else DataSource(**entry) if isinstance(entry, dict)
                     else DataSource(*entry) if isinstance(entry, (tuple, list))
                     else entry for entry in value)
    return value


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 0               # save every N steps (0: only at the end / on signal)
    every_minutes: float = 0.0         # and/or every M minutes
    keep: int = 3                      # newest checkpoints kept
    keep_every: int = 0                # also keep every Nth step forever (0: none)
    async_save: bool = True

    def validate(self) -> None:
        _non_negative(self, "every_steps", "every_minutes", "keep_every")
        _positive(self, "keep")


@dataclasses.dataclass
class MeshConfig:
    """Device mesh axes; -1 means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    experts: int = 1     # a mixture of experts' experts split over this many devices (the batch too)
    tensor: int = 1

    def validate(self) -> None:
        names = ("data", "fsdp", "experts", "tensor")
        sizes = [getattr(self, name) for name in names]
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError("mesh: at most one of data/fsdp/experts/tensor may be -1 (\"the rest\")")
        for name, size in zip(names, sizes):
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name} = {size}: must be a positive size or -1")


@dataclasses.dataclass
class Config:
    model: Any                         # a family config, e.g. jaxlm.models.toylm.ToyLMConfig
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    seed: int = 0
    out_dir: str = "runs/default"
    resume: bool = True                # continue from the newest checkpoint in out_dir

    def validate(self) -> None:
        if not dataclasses.is_dataclass(self.model):
            raise ConfigError("model: must be a family config such as ToyLMConfig(...)")
        max_len = getattr(self.model, "max_seq_len", None)
        if max_len is not None and self.train.seq_len > max_len:
            raise ConfigError(
                f"train.seq_len = {self.train.seq_len}: must be <= model.max_seq_len ({max_len})")


# --------------------------------------------------------------------------- checks


def _fail(obj: Any, name: str, allowed: str) -> None:
    raise ConfigError(f"{_section(obj)}{name} = {getattr(obj, name)!r}: {allowed}")


def _section(obj: Any) -> str:
    return getattr(obj, "_config_path", "")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            _fail(obj, name, "must be > 0")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) >= 0:
            _fail(obj, name, "must be >= 0")


def _fraction(obj: Any, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(obj, name) <= 1.0:
            _fail(obj, name, "must be between 0 and 1")


def _choice(obj: Any, name: str, allowed: tuple) -> None:
    if getattr(obj, name) not in allowed:
        _fail(obj, name, "allowed: " + ", ".join(map(repr, allowed)))


# Family configs call these too (they live in jaxlm/models and import from here).
positive, non_negative, fraction, choice, fail = _positive, _non_negative, _fraction, _choice, _fail


def validate(cfg: Config) -> Config:
    """Type-check every field against its annotation, then run each section's checks."""
    _check_types(cfg, "")
    cfg.validate()
    return cfg


def _sections(obj: Any, prefix: str):
    """Yield (dotted prefix, dataclass) for obj and every dataclass inside it."""
    yield prefix, obj
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, f"{prefix}{field.name}.")


def _check_types(obj: Any, prefix: str) -> None:
    for path, section in _sections(obj, prefix):
        object.__setattr__(section, "_config_path", path)
        hints = typing.get_type_hints(type(section))
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            expected = hints[field.name]
            if not dataclasses.is_dataclass(value) and not _matches(value, expected):
                raise ConfigError(
                    f"{path}{field.name} = {value!r}: expected {_type_name(expected)}, "
                    f"got {type(value).__name__}")
        if section is not obj and hasattr(section, "validate"):
            section.validate()


def _matches(value: Any, expected: Any) -> bool:
    if expected is Any:
        return True
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(expected)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(expected))
    return getattr(expected, "__name__", str(expected)).replace("NoneType", "None")


# --------------------------------------------------------------------------- loading


CONFIG_DIRS = (pathlib.Path.cwd() / "configs", pathlib.Path(__file__).resolve().parent.parent / "configs")


def find_config_file(name: str) -> pathlib.Path:
    """``crowfeather.py`` -> ``configs/crowfeather.py``; an existing path is taken as it is."""
    path = pathlib.Path(os.path.expanduser(name))
    if path.is_file():
        return path
    candidates = [d / path.name for d in CONFIG_DIRS] + [d / (path.name + ".py") for d in CONFIG_DIRS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted({p.name for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.py")})
    raise ConfigError(f"config {name!r} not found; give a path or one of: {', '.join(known) or '(none)'}")


def load_config(name: str, overrides: list[str] = ()) -> Config:
    """Load a config file, apply ``section.field=value`` overrides, validate."""
    path = find_config_file(name)
    module = load_config_module(name)
    with _beside(path):
        try:
            cfg = module.get_config()
        except JaxlmError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's Python: say where it broke, not a traceback
            raise ConfigError(f"{path}: {_where_it_broke(error, path)}; fix the config file") from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected jaxlm.config.Config")
    for item in overrides:
        apply_override(cfg, item)
    return validate(cfg)


def load_config_module(name: str):
    """The config file as a module (its ``get_config`` not yet called)."""
    path = find_config_file(name)
    # Whatever the file's suffix: a config is Python source.
    loader = importlib.machinery.SourceFileLoader(f"jaxlm_config_{path.stem}", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    with _beside(path):
        try:
            spec.loader.exec_module(module)
        except JaxlmError:
            raise
        except Exception as error:  # noqa: BLE001 - as in load_config
            raise ConfigError(f"{path}: {_where_it_broke(error, path)}; fix the config file") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a config file must define get_config() returning jaxlm.config.Config")
    return module


@contextlib.contextmanager
def _beside(path: pathlib.Path):
    """A config may build on a sibling (shard.py starts from crowfeather.py): its folder is importable."""
    sys.path.insert(0, str(path.parent))
    try:
        yield
    finally:
        sys.path.remove(str(path.parent))


def _where_it_broke(error: Exception, path: pathlib.Path) -> str:
    """``line 3: NameError: name 'x' is not defined``: the innermost frame of the config file."""
    if isinstance(error, SyntaxError) and error.lineno is not None:
        return f"line {error.lineno}: SyntaxError: {error.msg}"
    line = None
    tb = error.__traceback__
    while tb is not None:
        if pathlib.Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = tb.tb_lineno
        tb = tb.tb_next
    message = (str(error).splitlines() or [""])[0][:200]
    return f"{'line %d: ' % line if line else ''}{type(error).__name__}: {message}"


def parse_args_with_overrides(parser, argv) -> tuple[Any, list[str]]:
    """``parser``'s own arguments, and the ``--config.SECTION.FIELD=VALUE`` overrides as
    ``SECTION.FIELD=VALUE``; any other argument is a usage error."""
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}; config fields are set as --config.train.steps=200")
        overrides.append(item[len("--config."):])
    return args, overrides


def apply_override(cfg: Config, item: str) -> None:
    """Set one field from ``train.steps=200`` (the value is parsed for the field's type)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.field=value, e.g. train.steps=200")
    dotted, text = item.split("=", 1)
    *parents, name = dotted.strip().split(".")
    target = cfg
    for i, part in enumerate(parents):
        if not dataclasses.is_dataclass(target) or part not in _field_names(target):
            raise ConfigError(_unknown(".".join(parents[:i + 1]), target))
        target = getattr(target, part)
    if not dataclasses.is_dataclass(target) or name not in _field_names(target):
        raise ConfigError(_unknown(dotted, target))
    expected = typing.get_type_hints(type(target))[name]
    value = parse_value(text, expected)
    if not _matches(value, expected):
        raise ConfigError(f"{dotted} = {text!r}: expected {_type_name(expected)}")
    setattr(target, name, value)


def _field_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _unknown(dotted: str, section: Any) -> str:
    allowed = ", ".join(_field_names(section)) if dataclasses.is_dataclass(section) else "(not a section)"
    return f"unknown config key {dotted!r}; allowed here: {allowed}"


def parse_value(text: str, expected: Any) -> Any:
    """Parse a command-line string: Python literals, true/false/none, bare strings for str fields."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(value, list):
        value = tuple(value)
    accepts_str = _matches("", expected)
    if accepts_str and not _matches(value, expected):
        return text          # e.g. a str field given "123"
    declared = set(typing.get_args(expected)) or {expected}
    if isinstance(value, int) and not isinstance(value, bool) and float in declared and int not in declared:
        return float(value)  # "--config.optim.lr=1" means 1.0
    return value


# --------------------------------------------------------------------------- JSON


def to_dict(cfg: Any) -> dict:
    """A plain-JSON dict of a config (family configs carry their ``family`` name)."""
    out = {}
    if hasattr(cfg, "family"):
        out["family"] = cfg.family
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def dataclass_from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Rebuild a dataclass from ``to_dict`` output; unknown keys are an error, not dropped."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"family"})
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown keys {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        if name == "family":
            continue
        expected = hints[name]
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(expected, type) and dataclasses.is_dataclass(expected) and isinstance(value, dict):
            value = dataclass_from_dict(expected, value, f"{where}{name}.")
        kwargs[name] = value
    return cls(**kwargs)


def from_dict(data: dict, model_config_cls: type) -> Config:
    """Rebuild a full Config; the caller supplies the family's config class."""
    data = dict(data)
    model = dataclass_from_dict(model_config_cls, data.pop("model"), "model.")
    cfg = dataclass_from_dict(Config, {**data, "model": None})
    cfg.model = model
    return validate(cfg)
