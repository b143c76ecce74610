"""llama2.c ``model.bin`` version 3: the file the Llama Think code's ``export.py --version 3`` writes
for its C runner (``run.c``), read and written with numpy alone.

Layout (little-endian; SPEC §13). A 512-byte header, zero-padded::

    0   u32  magic 0x616b3432 ("ak42")       40  3 x f32  rope_base, partial_rotary_factor, norm_eps
    4   i32  version = 3                      52  6 x i32  GDN key heads, value heads, key dim, value dim,
    8   7 x i32  dim, hidden_dim, n_layers,            conv kernel, attnres_block_size
             n_heads, n_kv_heads,             76  u8   1 if the classifier is the embedding
             vocab_size, max_seq_len          77  n_layers x u8: 0 = linear (GDN), 1 = any attention
    36  i32  head_dim

then float32 tensors in PyTorch ``(out, in)`` row-major order: the embedding; per layer its
``attention_norm``, either ``wq wk wv wo q_norm k_norm`` (type 1) or ``in_proj_qkv in_proj_z
in_proj_b in_proj_a conv1d dt_bias A_log norm out_proj`` (type 0), the four BlockAttnRes tensors
when ``attnres_block_size > 0``, then ``ffn_norm w1 w2 w3``; the final norm; the classifier only
when it is not the embedding. :func:`layout` is the one statement of that order.

**The format is lossy.** It has no place for CSA's ``compress_k`` / ``compress_v`` /
``blend_gate`` nor for the hyper-connection scales: a CSA layer is written as type 1 and the C
runner runs it as plain full causal attention with its own ``wq wk wv wo q_norm k_norm``; every
residual becomes a plain sum. So :func:`read_bin` returns the model ``run.c`` computes (layer
types ``linear``/``full`` only, ``hyper_connections=False``, ``llama2c_lossy=True``), which does
not reproduce the PyTorch logits of the checkpoint the file came from; :func:`dropped_keys` names
what an export leaves out.

Header values are taken the way ``export.py`` takes them from ``ModelArgs(**model_args)``: unset
fields get ModelArgs' defaults, ``n_kv_heads`` defaults to ``n_heads``, ``head_dim`` to
``dim // n_heads``, and ``hidden_dim`` is the width of layer 0's ``w1``. The shared-classifier
byte is ``torch.equal(embedding, output)`` on the model, whose head is tied to the embedding: 1
unless the embedding holds a NaN (NaN != NaN), in which case the export appends the same table
again as the classifier; this writer does the same, so its files match the exporter's byte for byte.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import pathlib
import re
import struct

import numpy as np

from jaxlm.errors import CheckpointError

MAGIC = 0x616B3432
VERSION = 3
HEADER_BYTES = 512
# magic, version, 7 base ints, head_dim, 3 floats, 6 GDN/attnres ints, shared-classifier byte
_HEADER = struct.Struct("<Ii7ii3f6iB")
_FLOAT = np.dtype("<f4")
PREFIX = "_orig_mod."  # what torch.compile puts before every key of the upstream state_dict

# The upstream ModelArgs defaults of the fields the header needs (model.py); a checkpoint's
# model_args may leave any of them out, as train.py does with norm_eps and hidden_dim.
MODEL_ARGS_DEFAULTS = {
    "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": None, "head_dim": None,
    "vocab_size": 32000, "hidden_dim": None, "multiple_of": 256, "norm_eps": 1e-6, "max_seq_len": 2048,
    "rope_base": 10_000_000.0, "partial_rotary_factor": 0.25, "layer_types": None,
    "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "attnres_block_size": 0,
    "hyper_connections": False,
}
LAYER_KINDS = ("full", "window", "csa", "linear")  # what upstream's Transformer accepts
DEFAULT_PATTERN = ("linear", "linear", "linear", "full")  # its layer pattern when layer_types is None
# Constant attention masks the upstream modules keep as buffers; the C runner rebuilds them.
_MASK_BUFFER = re.compile(r"\.(local_mask|comp_mask|mask)$")

LOSSY_NOTE = ("model.bin v3 is lossy: it has no place for CSA's compress_k/compress_v/blend_gate or the "
              "hyper-connection scales, so CSA layers run as full attention and residuals as plain sums "
              "(what llama2.c's run.c computes)")


@dataclasses.dataclass(frozen=True)
class Header:
    """The header's fields, in file order; ``layer_bits[i]`` is 0 for a GDN layer, 1 otherwise."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    head_dim: int
    rope_base: float
    partial_rotary_factor: float
    norm_eps: float
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    attnres_block_size: int
    shared_classifier: int
    layer_bits: tuple[int, ...]

    def pack(self) -> bytes:
        fields = dataclasses.astuple(self)[:-1]
        raw = _HEADER.pack(MAGIC, VERSION, *fields) + bytes(self.layer_bits)
        if len(raw) > HEADER_BYTES:
            raise CheckpointError(f"{self.n_layers} layers do not fit the {HEADER_BYTES}-byte model.bin header "
                                  f"(at most {HEADER_BYTES - _HEADER.size})")
        return raw + b"\0" * (HEADER_BYTES - len(raw))


def layout(h: Header) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the payload, in file order, with its upstream name and PyTorch shape."""
    D, F, hd = h.dim, h.hidden_dim, h.head_dim
    Hk, Hv, dk, dv = h.linear_num_key_heads, h.linear_num_value_heads, h.linear_key_head_dim, h.linear_value_head_dim
    key_dim, value_dim = Hk * dk, Hv * dv
    conv = 2 * key_dim + value_dim
    out = [("tok_embeddings.weight", (h.vocab_size, D))]
    for i, bit in enumerate(h.layer_bits):
        p = f"layers.{i}."
        out.append((p + "attention_norm.weight", (D,)))
        a = p + "attention."
        if bit:
            out += [(a + "wq.weight", (2 * h.n_heads * hd, D)), (a + "wk.weight", (h.n_kv_heads * hd, D)),
                    (a + "wv.weight", (h.n_kv_heads * hd, D)), (a + "wo.weight", (D, h.n_heads * hd)),
                    (a + "q_norm.weight", (hd,)), (a + "k_norm.weight", (hd,))]
        else:
            out += [(a + "in_proj_qkv.weight", (conv, D)), (a + "in_proj_z.weight", (value_dim, D)),
                    (a + "in_proj_b.weight", (Hv, D)), (a + "in_proj_a.weight", (Hv, D)),
                    (a + "conv1d.weight", (conv, 1, h.linear_conv_kernel_dim)), (a + "dt_bias", (Hv,)),
                    (a + "A_log", (Hv,)), (a + "norm.weight", (dv,)), (a + "out_proj.weight", (D, value_dim))]
        if h.attnres_block_size > 0:
            out += [(p + f"{r}.{t}", s) for r in ("attn_res", "mlp_res")
                    for t, s in (("proj.weight", (1, D)), ("norm.weight", (D,)))]
        out += [(p + "ffn_norm.weight", (D,)), (p + "feed_forward.w1.weight", (F, D)),
                (p + "feed_forward.w2.weight", (D, F)), (p + "feed_forward.w3.weight", (F, D))]
    out.append(("norm.weight", (D,)))
    if not h.shared_classifier:
        out.append(("output.weight", (h.vocab_size, D)))
    return out


def _payload_bytes(h: Header) -> int:
    return sum(int(np.prod(shape)) for _, shape in layout(h)) * _FLOAT.itemsize


# =========================================================================== writing


def strip_prefix(state_dict: dict) -> dict:
    """The state_dict with torch.compile's ``_orig_mod.`` key prefix removed (as export.py does)."""
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state_dict.items()}


def _int(args: dict, name: str) -> int:
    try:
        return operator.index(args[name])
    except TypeError:
        raise CheckpointError(f"model_args[{name!r}] = {args[name]!r} is not an integer") from None


def layer_types(model_args: dict) -> list[str]:
    """The layer kinds upstream's Transformer builds from ``model_args`` (its default pattern if unset)."""
    args = {**MODEL_ARGS_DEFAULTS, **model_args}
    n_layers = _int(args, "n_layers")
    if args["layer_types"] is None:
        return [DEFAULT_PATTERN[i % len(DEFAULT_PATTERN)] for i in range(n_layers)]
    kinds = list(args["layer_types"])
    unknown = sorted({str(k) for k in kinds if k not in LAYER_KINDS})
    if unknown:
        raise CheckpointError(f"model_args layer_types names unknown kind(s) {unknown}; the upstream model "
                              f"knows {list(LAYER_KINDS)}")
    if len(kinds) != n_layers:
        raise CheckpointError(f"model_args layer_types has {len(kinds)} entries but n_layers = {n_layers}")
    return kinds


def header_from(model_args: dict, state_dict: dict) -> Header:
    """The header ``export.py --version 3`` writes for this checkpoint (see the module docstring)."""
    args = {**MODEL_ARGS_DEFAULTS, **model_args}
    kinds = layer_types(args)
    dim, n_heads = _int(args, "dim"), _int(args, "n_heads")
    if dim <= 0 or n_heads <= 0:
        raise CheckpointError(f"model_args dim = {dim} and n_heads = {n_heads} must be positive")
    n_kv = n_heads if args["n_kv_heads"] is None else _int(args, "n_kv_heads")
    head_dim = dim // n_heads if args["head_dim"] is None else _int(args, "head_dim")
    if args["hyper_connections"] and _int(args, "attnres_block_size") > 0:
        raise CheckpointError("model_args sets both hyper_connections and attnres_block_size > 0, which the "
                              "upstream model refuses")
    if args["hidden_dim"] is None:  # upstream FeedForward's SwiGLU width, rounded up to multiple_of
        multiple = _int(args, "multiple_of")
        hidden = multiple * ((int(2 * (4 * dim) / 3) + multiple - 1) // multiple)
    else:
        hidden = _int(args, "hidden_dim")
    emb = state_dict.get("tok_embeddings.weight")
    shared = 1 if emb is None else int(np.array_equal(emb, emb))  # torch.equal(e, e): False only with a NaN
    return Header(
        dim=dim, hidden_dim=hidden, n_layers=len(kinds), n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=_int(args, "vocab_size"), max_seq_len=_int(args, "max_seq_len"), head_dim=head_dim,
        rope_base=float(args["rope_base"]), partial_rotary_factor=float(args["partial_rotary_factor"]),
        norm_eps=float(args["norm_eps"]),
        **{f: _int(args, f) for f in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                      "linear_value_head_dim", "linear_conv_kernel_dim", "attnres_block_size")},
        shared_classifier=shared, layer_bits=tuple(0 if k == "linear" else 1 for k in kinds))


def _tied_output(state_dict: dict) -> None:
    emb, out = state_dict.get("tok_embeddings.weight"), state_dict.get("output.weight")
    if emb is not None and out is not None and not np.array_equal(np.asarray(emb), np.asarray(out), equal_nan=True):
        raise CheckpointError("output.weight differs from tok_embeddings.weight, but the Llama Think model and "
                              "model.bin tie the classifier to the embedding; export a checkpoint with a tied head")


def dropped_keys(state_dict: dict, model_args: dict) -> list[str]:
    """The state_dict tensors a model.bin has no place for (CSA extras, hyper-connection scales, ...);
    the tied ``output.weight`` and the constant mask buffers are not counted (nothing is lost)."""
    sd = strip_prefix(state_dict)
    kept = {name for name, _ in layout(header_from(model_args, sd))} | {"output.weight"}
    return [k for k in sd if k not in kept and not _MASK_BUFFER.search(k)]


def write_bin(state_dict: dict, model_args: dict, path) -> pathlib.Path:
    """Write ``model.bin`` version 3 from an upstream state_dict (PyTorch names, ``_orig_mod.`` optional)
    and its ``model_args``, exactly as ``export.py --version 3`` does. Lossy: see the module docstring.

    Every tensor the format holds must be present with the shape ``model_args`` implies (the
    exporter would silently write random init values for a missing one); the file is written to a
    temporary name and renamed, so a failed write never leaves a partial ``path``.
    """
    path = pathlib.Path(path).expanduser()
    sd = strip_prefix(state_dict)
    _tied_output(sd)
    if "tok_embeddings.weight" not in sd:
        raise CheckpointError("the state_dict has no tok_embeddings.weight; is this a Llama Think checkpoint?")
    header = header_from(model_args, sd)
    arrays = []
    for name, shape in layout(header):
        source = "tok_embeddings.weight" if name == "output.weight" else name  # the tied head is the embedding
        if source not in sd:
            raise CheckpointError(f"the state_dict has no {source} (shape {shape}) that model.bin needs; "
                                  "its keys do not match model_args")
        array = np.asarray(sd[source])
        if tuple(array.shape) != shape:
            raise CheckpointError(f"{source} has shape {tuple(array.shape)} but model_args imply {shape}")
        arrays.append(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.pack())
            for array in arrays:
                f.write(np.ascontiguousarray(array, dtype=_FLOAT).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_from_torch_object(top: dict, path) -> pathlib.Path:
    """:func:`write_bin` from a ``ckpt.pt``-style object: ``{"model": state_dict, "model_args": {...}}``."""
    if not isinstance(top, dict) or not isinstance(top.get("model"), dict) or not isinstance(top.get("model_args"), dict):
        raise CheckpointError("model.bin export needs a checkpoint with a 'model' state_dict and 'model_args' "
                              "(the upstream ckpt.pt layout)")
    return write_bin(top["model"], top["model_args"], path)


# =========================================================================== reading


def is_llama2c_bin(path) -> bool:
    """Whether the file starts with the llama2.c magic (any version)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == struct.pack("<I", MAGIC)
    except OSError:
        return False


def _f32(value: float) -> float:
    """The shortest decimal that names this float32 (1e-06, not 9.99999997e-07): rewriting it gives the same bits."""
    return float(str(np.float32(value)))


def read_header(path) -> Header:
    """The header of a version-3 ``model.bin``, checked against the file's size."""
    path = pathlib.Path(path).expanduser()
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for a model.bin header; the file is truncated")
    magic, version = struct.unpack_from("<Ii", raw)
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not a llama2.c model.bin (magic 0x{magic:08x}, expected 0x{MAGIC:08x})")
    if version != VERSION:
        raise CheckpointError(f"{path}: model.bin version {version}; jaxlm reads version {VERSION} "
                              "(write one with export.py --version 3 or python -m tools.torch_port to-bin)")
    if len(raw) < HEADER_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte model.bin header; "
                              "the file is truncated")
    fields = _HEADER.unpack_from(raw)[2:]
    n_layers = fields[2]
    if not 0 < n_layers <= HEADER_BYTES - _HEADER.size:
        raise CheckpointError(f"{path}: the header's n_layers = {n_layers} does not fit a model.bin header")
    bits = tuple(raw[_HEADER.size:_HEADER.size + n_layers])
    h = Header(*fields, layer_bits=bits)
    ints = {"dim": h.dim, "hidden_dim": h.hidden_dim, "n_heads": h.n_heads, "n_kv_heads": h.n_kv_heads,
            "vocab_size": h.vocab_size, "max_seq_len": h.max_seq_len, "head_dim": h.head_dim}
    if 0 in bits:  # the GDN sizes matter only where there are GDN layers
        ints.update({f.name: getattr(h, f.name) for f in dataclasses.fields(h) if f.name.startswith("linear_")})
    bad = [f"{k} = {v}" for k, v in ints.items() if v <= 0]
    if bad or h.attnres_block_size < 0 or set(bits) - {0, 1} or h.shared_classifier not in (0, 1) \
            or (1 in bits and h.n_heads % h.n_kv_heads):
        what = ", ".join(bad) or (f"layer types {list(bits)}, shared-classifier byte {h.shared_classifier}, "
                                  f"heads {h.n_heads}/{h.n_kv_heads}, attnres {h.attnres_block_size}")
        raise CheckpointError(f"{path}: impossible header values ({what}); the file is damaged")
    expected = HEADER_BYTES + _payload_bytes(h)
    if size < expected:
        raise CheckpointError(f"{path}: {size} bytes, but its header describes {expected}; the file is truncated")
    if size > expected:
        raise CheckpointError(f"{path}: {size} bytes, {size - expected} more than its header's sizes account "
                              f"for ({expected}); the header does not fit the payload")
    return h


def model_args_of(h: Header) -> dict:
    """Upstream-style ``model_args`` of the model the C runner computes from this header (lossy)."""
    return {
        "dim": h.dim, "n_layers": h.n_layers, "n_heads": h.n_heads, "n_kv_heads": h.n_kv_heads,
        "head_dim": h.head_dim, "vocab_size": h.vocab_size, "hidden_dim": h.hidden_dim,
        "max_seq_len": h.max_seq_len, "dropout": 0.0, "rope_base": _f32(h.rope_base),
        "partial_rotary_factor": _f32(h.partial_rotary_factor), "norm_eps": _f32(h.norm_eps),
        "layer_types": tuple("full" if bit else "linear" for bit in h.layer_bits),
        "linear_num_key_heads": h.linear_num_key_heads, "linear_num_value_heads": h.linear_num_value_heads,
        "linear_key_head_dim": h.linear_key_head_dim, "linear_value_head_dim": h.linear_value_head_dim,
        "linear_conv_kernel_dim": h.linear_conv_kernel_dim, "attnres_block_size": h.attnres_block_size,
        "hyper_connections": False,
        "llama2c_lossy": True,  # from a model.bin: CSA ran as full attention, no residual scales
    }


def read_bin(path) -> tuple[dict[str, np.ndarray], dict]:
    """A version-3 ``model.bin`` as ``(state_dict, model_args)`` with upstream PyTorch names and shapes.

    **Lossy** (see the module docstring): the result is the model llama2.c's ``run.c`` computes —
    ``layer_types`` holds only ``"linear"`` and ``"full"`` (a CSA layer of the original comes back as
    ``"full"``, without ``compress_k``/``compress_v``/``blend_gate``), ``hyper_connections`` is False (no
    residual scales), and ``model_args["llama2c_lossy"]`` is True. ``hidden_dim`` and ``head_dim`` are
    explicit; ``output.weight`` is present only when the file stores a classifier of its own.
    Raises :class:`CheckpointError` for a wrong magic, another version, a truncated file and sizes that
    do not fit the header.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    h = read_header(path)
    payload = np.fromfile(path, dtype=_FLOAT, offset=HEADER_BYTES).astype(np.float32, copy=False)
    state_dict, at = {}, 0
    for name, shape in layout(h):
        n = int(np.prod(shape))
        state_dict[name] = payload[at:at + n].reshape(shape)
        at += n
    return state_dict, model_args_of(h)


# =========================================================================== the native-format protocol
# (``NATIVE_FORMATS`` of a naming module, ``jaxlm/formats/keymap.py``): what generic code calls.

NOTE = LOSSY_NOTE


def matches(path) -> bool:
    """Whether ``path`` is a model.bin (by its magic; the version is checked on reading)."""
    return is_llama2c_bin(path)


def read_object(path) -> dict:
    """The file as a ``ckpt.pt``-style object ``{"model": state_dict, "model_args": {...}}`` (lossy)."""
    state_dict, model_args = read_bin(path)
    return {"model": state_dict, "model_args": model_args}


def write_object(top: dict, path) -> pathlib.Path:
    """:func:`write_from_torch_object`; a jaxlm-written object names its fields ``cfg`` instead of ``model_args``."""
    if isinstance(top, dict) and "model_args" not in top and isinstance(top.get("cfg"), dict):
        top = {**top, "model_args": top["cfg"]}
    return write_from_torch_object(top, path)
