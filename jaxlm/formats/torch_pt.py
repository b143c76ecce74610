"""PyTorch ``.pt`` files (the ``torch.save`` zip format), read and written without torch.

Why not ``torch.load``: ``jaxlm.load`` must open a released checkpoint from a plain install
(torch is an optional extra), and a ``.pt`` is a pickle, whose loading runs whatever callables
the file names. Here the pickle is read by an Unpickler whose ``find_class`` knows only what a
checkpoint needs: torch's tensor-rebuild functions and storage types, ``collections.OrderedDict``,
a few inert value types (torch dtypes and sizes, numpy scalars and arrays), and any class whose
name ends in ``Config`` (or an ``argparse.Namespace``) — rebuilt as a :class:`PickledConfig`
record of its fields, never imported, so the upstream ``config.Config`` loads without its module. Anything else
(``posix.system``, ``builtins.eval``, ``subprocess.Popen``, ...) stops the load with a
``CheckpointError`` naming the global, before anything is called.

The container is a zip of uncompressed records under one top folder: ``data.pkl`` (the pickle),
``byteorder``, ``version`` and one ``data/<key>`` record of raw bytes per storage; a tensor is a
view (offset, size, stride) into a storage. Records are memory-mapped, so reading costs no copy
until a tensor is transposed or cast; tensors come back as numpy arrays (bf16 as
``ml_dtypes.bfloat16``, bit for bit).

The writer produces the same format, readable by ``torch.load(weights_only=True)``. Its pickle
comes from a small protocol-2 encoder for the closed set of types a checkpoint holds, because
the standard Pickler cannot name ``torch._utils._rebuild_tensor_v2`` without importing torch.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import mmap
import os
import pathlib
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from jaxlm.errors import CheckpointError

# torch's legacy typed-storage classes (what torch.save still writes) -> numpy dtype.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64), "ComplexDoubleStorage": np.dtype(np.complex128),
}
STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}

# torch dtype names (``torch.bfloat16`` pickles as the global ``torch bfloat16``) -> numpy dtype;
# the dtypes newer than the legacy storages are saved as untyped bytes plus one of these.
TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}

CONFIG_CLASS_NAME = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*)?Config")
FIELD_RECORDS = ("argparse.Namespace", "types.SimpleNamespace")  # attribute bags training scripts save as cfg
ARCHIVE_ROOT = "archive"
STORAGE_ALIGNMENT = 64


# =========================================================================== reading


class PickledConfig:
    """A pickled config object, rebuilt as its fields without importing its class.

    ``origin`` is where the class lived (``"config.Config"``); ``fields`` its instance
    attributes in pickled order; ``args`` any positional constructor arguments.
    Fields read as attributes too (``cfg.dim``).
    """

    origin = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.__dict__["fields"] = dict(kwargs)
        self.__dict__["args"] = list(args)
        return self

    def __init__(self, *args, **kwargs):  # REDUCE-style pickles call the class
        pass

    def __setstate__(self, state):
        # A dataclass pickles its __dict__; a slotted one a (dict, slots) pair.
        parts = state if isinstance(state, tuple) else (state,)
        for part in parts:
            if isinstance(part, dict):
                self.fields.update(part)

    def __getattr__(self, name):
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self):
        body = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"PickledConfig[{self.origin}]({body})"


class _Storage:
    """One ``data/<key>`` record viewed as a 1-D array of its dtype (None: untyped bytes)."""

    def __init__(self, array: np.ndarray, typed: bool):
        self.array, self.typed = array, typed
        self.views: dict[tuple, np.ndarray] = {}  # the same view twice (a tied head) is one array


class _TorchDtype(str):
    """A pickled ``torch.<dtype>`` global; a str so that it prints and JSON-encodes as its name."""


class _TensorMarker:
    """``torch.Tensor`` / ``torch.nn.Parameter`` named as the type of ``_rebuild_from_type_v2``."""


def _check_ints(*values) -> None:
    for value in values:
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise CheckpointError(f"a tensor record has a non-integer size/offset ({value!r}); the file is damaged")


def _tensor_view(storage: _Storage, offset, size, stride, dtype=None) -> np.ndarray:
    """The tensor ``(offset, size, stride)`` of a storage, checked to lie inside it."""
    if not isinstance(storage, _Storage):
        raise CheckpointError("a tensor record does not point at a storage; the file is damaged")
    size, stride = tuple(size), tuple(stride)
    _check_ints(offset, *size, *stride)
    key = (offset, size, stride, None if dtype is None else np.dtype(dtype).str)
    if key not in storage.views:
        storage.views[key] = _new_view(storage, offset, size, stride, dtype)
    return storage.views[key]


def _new_view(storage: _Storage, offset, size, stride, dtype) -> np.ndarray:
    base = storage.array
    if dtype is not None and not storage.typed:
        if base.size % np.dtype(dtype).itemsize:
            raise CheckpointError("a tensor record's byte size does not fit its dtype; the file is damaged")
        base = base.view(dtype)
    if len(size) != len(stride) or offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise CheckpointError(f"a tensor record has an impossible layout (size {size}, stride {stride}); "
                              "the file is damaged")
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, base.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= base.size:
        raise CheckpointError(f"a tensor record points past the end of its storage ({last} >= {base.size}); "
                              "the file is damaged")
    contiguous = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    if all(st == c for st, c, n in zip(stride, contiguous, size) if n > 1):
        return base[offset:offset + numel].reshape(size)
    item = base.itemsize
    view = np.lib.stride_tricks.as_strided(base[offset:], shape=size, strides=[s * item for s in stride])
    return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _tensor_view(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *unused):
    if not isinstance(dtype, _TorchDtype):
        raise CheckpointError(f"a tensor record names dtype {dtype!r}, not a torch dtype; the file is damaged")
    return _tensor_view(storage, storage_offset, size, stride, TORCH_DTYPES[dtype])


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter) or new_type is not _TensorMarker:
        raise CheckpointError("a tensor record rebuilds through something other than a tensor function; "
                              "refusing to load")
    return func(*args)


def _bytes_from_text(text, encoding="latin1"):
    # protocol-2 pickles write bytes as _codecs.encode(text, "latin1"); allow only plain text codecs.
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8") or not isinstance(text, str):
        raise CheckpointError(f"the pickle asks _codecs.encode for {encoding!r}; refusing to load")
    return text.encode(encoding)


def _safe_numpy_dtype(spec, *unused):
    dtype = np.dtype(spec)
    if dtype.kind not in "biufc?":
        raise CheckpointError(f"the pickle holds a numpy {dtype} value; only numbers are allowed")
    return dtype


def _numpy_scalar(dtype, data=b""):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc?":
        raise CheckpointError("the pickle holds a numpy scalar of a non-numeric type; refusing to load")
    return np.frombuffer(data, dtype, count=1)[0]


def _numpy_reconstruct(cls, shape, typecode):
    # numpy arrays pickle as _reconstruct(ndarray, (0,), b'b') + __setstate__ (shape, dtype, raw bytes).
    if cls is not np.ndarray:
        raise CheckpointError("the pickle rebuilds a numpy subclass; refusing to load")
    return np.ndarray.__new__(np.ndarray, shape, np.uint8)


def _torch_size(*args):
    return tuple(args[0]) if args else ()


def _torch_device(*args):
    return ":".join(str(a) for a in args)


SAFE_GLOBALS = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": _TensorMarker,
    "torch.nn.parameter.Parameter": _TensorMarker,
    "torch.Size": _torch_size,
    "torch.device": _torch_device,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "_codecs.encode": _bytes_from_text,
    "numpy.dtype": _safe_numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy.ndarray": np.ndarray,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, records: "_Records", source: str):
        super().__init__(io.BytesIO(data))
        self.records, self.source = records, source
        self.storages: dict[str, _Storage] = {}
        self.config_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles spell Python 3 names the Python 2 way (__builtin__.set); the default
        # find_class translates them, this one must too.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in SAFE_GLOBALS:
            return SAFE_GLOBALS[full]
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if full in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
            return "UntypedStorage"
        if module == "torch" and name in TORCH_DTYPES:
            return _TorchDtype(name)
        if CONFIG_CLASS_NAME.fullmatch(name) or full in FIELD_RECORDS:
            if full not in self.config_classes:
                self.config_classes[full] = type(name, (PickledConfig,), {"origin": full})
            return self.config_classes[full]
        raise CheckpointError(
            f"{self.source}: refusing to load: its pickle calls {full}, which a checkpoint never needs "
            "(only tensors, containers and a Config are allowed); the file may be malicious, so nothing was run")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unknown persistent record {str(pid)[:80]}; not a torch checkpoint")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, str) or not isinstance(key, str):
            raise CheckpointError(f"{self.source}: a storage record is malformed; the file is damaged")
        if key not in self.storages:
            _check_ints(numel)
            typed = storage_type != "UntypedStorage"
            dtype = STORAGE_DTYPES[storage_type] if typed else np.dtype(np.uint8)
            raw = self.records.array(f"data/{key}")
            if raw.size != numel * dtype.itemsize:
                raise CheckpointError(f"{self.source}: storage data/{key} holds {raw.size} bytes, "
                                      f"expected {numel * dtype.itemsize}; the file is truncated or damaged")
            array = raw.view(dtype)
            if self.records.big_endian and dtype.itemsize > 1:
                array = array.byteswap()
            self.storages[key] = _Storage(array, typed)
        return self.storages[key]


# The first bytes of a torch < 1.6 file: a pickle (protocol 2) of the legacy magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _not_a_zip(path: pathlib.Path) -> str:
    """Why a file is no readable torch zip: empty, cut short, a legacy file, or something else."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        return "an empty file, not a torch checkpoint: the save or the copy did not finish; copy it again"
    if head.startswith(b"PK\x03\x04"):
        return (f"a damaged torch checkpoint ({size:,} bytes, the zip's directory is missing: truncated by an "
                "interrupted save, download or copy); copy or download it again")
    if head.startswith(_LEGACY_MAGIC):
        return ("a torch < 1.6 legacy file, which is not supported: re-save it with a current torch "
                "(torch.save(torch.load(path), path))")
    return "not a torch checkpoint (no zip archive, no torch file of any version)"


class _Records:
    """The records of a torch zip, memory-mapped where stored uncompressed."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise CheckpointError(f"{path}: {_not_a_zip(path)}") from None
        names = self.zip.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            raise CheckpointError(f"{path}: a zip without data.pkl; not a torch checkpoint")
        self.root = pickles[0][: -len("data.pkl")]
        self.infos = {info.filename: info for info in self.zip.infolist()}
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else None
        order = self.bytes("byteorder") if self.root + "byteorder" in self.infos else b"little"
        self.big_endian = order.strip() == b"big"

    def bytes(self, name: str) -> bytes:
        return self.zip.read(self.root + name)

    def release(self) -> None:
        if self.mm is not None and hasattr(self.mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self.mm.madvise(mmap.MADV_DONTNEED)

    def array(self, name: str) -> np.ndarray:
        info = self.infos.get(self.root + name)
        if info is None:
            raise CheckpointError(f"{self.path}: record {name} is missing; the file is truncated or damaged")
        if info.compress_type != zipfile.ZIP_STORED:
            return np.frombuffer(self.zip.read(info), np.uint8)
        header = self.mm[info.header_offset:info.header_offset + 30]
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: record {name} has a damaged zip header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > len(self.mm):
            raise CheckpointError(f"{self.path}: record {name} runs past the end of the file; it is truncated")
        return np.frombuffer(self.mm, np.uint8, count=info.file_size, offset=start)


def is_torch_zip(path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load(path) -> Any:
    """The object a ``.pt`` file holds, tensors as numpy arrays, configs as :class:`PickledConfig`."""
    return load_mapped(path)[0]


def load_mapped(path) -> tuple[Any, Callable[[], None]]:
    """:func:`load`, plus a function that drops the file's pages from this process's memory.

    Tensors are views of the memory-mapped file; once they have been copied elsewhere (converted,
    written), the pages they were read from still count against the process until released.
    Releasing keeps every view valid: a later access reads the page in again.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    records = _Records(path)
    unpickler = _RestrictedUnpickler(records.bytes("data.pkl"), records, str(path))
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except Exception as error:  # a corrupt pickle raises many things; none is the user's to debug
        raise CheckpointError(f"{path}: the pickle in it cannot be read ({type(error).__name__}: "
                              f"{str(error)[:120]}); the file is damaged") from None
    return obj, records.release


# =========================================================================== writing


class LazyTensor:
    """A tensor for :func:`save` that is computed only when its bytes are written, then dropped.

    Writing a converted checkpoint this way holds one converted tensor at a time instead of all.
    The same LazyTensor object twice is one shared storage (a tied head).
    """

    def __init__(self, shape, dtype, produce: Callable[[], np.ndarray]):
        self.shape, self.dtype, self.produce = tuple(shape), np.dtype(dtype), produce
        self.size = math.prod(self.shape)

    def __array__(self, dtype=None, copy=None):
        array = self.produce()
        return array if dtype is None else array.astype(dtype)


class _Global:
    """A ``module.name`` the encoder writes as a GLOBAL opcode without importing it."""

    def __init__(self, module: str, name: str):
        self.opcode = b"c" + module.encode() + b"\n" + name.encode() + b"\n"


REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
ORDERED_DICT = _Global("collections", "OrderedDict")
BYTES_CODEC = _Global("_codecs", "encode")


class _Encoder:
    """Pickle protocol 2 for dict/OrderedDict/list/tuple/str/bytes/int/float/bool/None/set and arrays."""

    def __init__(self):
        self.out = io.BytesIO()
        self.storages: list[np.ndarray] = []
        self.storage_keys: dict[int, str] = {}

    def encode(self, obj) -> bytes:
        self.out.write(b"\x80\x02")
        self.save(obj)
        self.out.write(b".")
        return self.out.getvalue()

    def save(self, obj) -> None:  # noqa: C901 - one branch per type is the clearest form
        w = self.out.write
        if obj is None:
            w(b"N")
        elif obj is True:
            w(b"\x88")
        elif obj is False:
            w(b"\x89")
        elif isinstance(obj, (np.ndarray, LazyTensor)):
            self.save_tensor(obj)
        elif isinstance(obj, np.generic):
            self.save(obj.item())
        elif isinstance(obj, int):
            self.save_int(obj)
        elif isinstance(obj, float):
            w(b"G" + struct.pack(">d", obj))
        elif isinstance(obj, str):
            data = obj.encode("utf-8", "surrogatepass")
            w(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(obj, bytes):
            w(BYTES_CODEC.opcode)
            self.save((obj.decode("latin1"), "latin1"))
            w(b"R")
        elif isinstance(obj, tuple):
            if not obj:
                w(b")")
                return
            if len(obj) > 3:
                w(b"(")
            for item in obj:
                self.save(item)
            w({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(obj), b"t"))
        elif isinstance(obj, list):
            w(b"]")
            for start in range(0, len(obj), 1000):
                w(b"(")
                for item in obj[start:start + 1000]:
                    self.save(item)
                w(b"e")
        elif isinstance(obj, (set, frozenset)):
            w(_Global("builtins", type(obj).__name__).opcode)
            self.save((list(obj),))
            w(b"R")
        elif isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict):
                w(ORDERED_DICT.opcode + b")R")
            else:
                w(b"}")
            items = list(obj.items())
            for start in range(0, len(items), 1000):
                w(b"(")
                for key, value in items[start:start + 1000]:
                    self.save(key)
                    self.save(value)
                w(b"u")
            attrs = getattr(obj, "__dict__", None)
            if isinstance(obj, collections.OrderedDict) and attrs:
                self.save(dict(attrs))
                w(b"b")
        else:
            raise CheckpointError(f"cannot write a {type(obj).__name__} into a .pt file "
                                  "(only tensors, numbers, strings and containers)")

    def save_int(self, value: int) -> None:
        w = self.out.write
        if 0 <= value < 256:
            w(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            w(b"M" + struct.pack("<H", value))
        elif -2**31 <= value < 2**31:
            w(b"J" + struct.pack("<i", value))
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            w(b"\x8a" + bytes([len(data)]) + data)

    def save_tensor(self, array: np.ndarray | LazyTensor) -> None:
        if array.dtype not in STORAGE_NAMES:
            raise CheckpointError(f"cannot write a {array.dtype} tensor into a .pt file")
        # One storage per array object: the same array twice (a tied head) shares its storage.
        key = self.storage_keys.get(id(array))
        if key is None:
            key = self.storage_keys[id(array)] = str(len(self.storages))
            self.storages.append(array)
        w = self.out.write
        w(REBUILD_TENSOR.opcode + b"(")            # the function, then MARK for its arguments
        w(b"(")                                    # the persistent id: a 5-tuple, then BINPERSID
        self.save("storage")
        w(_Global("torch", STORAGE_NAMES[array.dtype]).opcode)
        self.save(key)
        self.save("cpu")
        self.save(int(array.size))
        w(b"tQ")
        self.save(0)                               # storage offset
        shape = tuple(int(n) for n in array.shape)
        self.save(shape)
        self.save(tuple(math.prod(shape[i + 1:]) for i in range(len(shape))))  # contiguous strides
        w(b"\x89")                                 # requires_grad=False
        w(ORDERED_DICT.opcode + b")R")             # empty backward hooks
        w(b"tR")                                   # close the arguments, call


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int) -> tuple[zipfile.ZipInfo, bool]:
    """A ZipInfo whose data starts on a 64-byte boundary (as torch writes; mmap loaders rely on it)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    zip64 = size > 0x7FFFFFFF
    header = 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -(zf.fp.tell() + header) % STORAGE_ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB": torch's padding field
    return info, zip64


def _write_record(zf: zipfile.ZipFile, name: str, data) -> None:
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    info, zip64 = _aligned_info(zf, name, len(view))
    with zf.open(info, "w", force_zip64=zip64) as f:
        f.write(view)


def save(obj, path) -> pathlib.Path:
    """Write ``obj`` (containers of numpy arrays, numbers, strings) as a torch ``.pt`` zip.

    Arrays become contiguous CPU tensors of the same dtype; the same array object appearing
    twice is written once and shared, as torch does for tied weights.
    """
    path = pathlib.Path(path)
    encoder = _Encoder()
    pickled = encoder.encode(obj)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        root = ARCHIVE_ROOT + "/"
        _write_record(zf, root + "data.pkl", pickled)
        _write_record(zf, root + ".format_version", b"1")
        _write_record(zf, root + ".storage_alignment", str(STORAGE_ALIGNMENT).encode())
        _write_record(zf, root + "byteorder", b"little")
        for key in range(len(encoder.storages)):
            array = encoder.storages[key]
            data = np.asarray(array.produce() if isinstance(array, LazyTensor) else array, order="C")  # keeps 0-d
            if data.dtype != array.dtype or data.shape != tuple(array.shape):
                raise CheckpointError(f"a tensor came out as {data.dtype}{data.shape}, announced as "
                                      f"{array.dtype}{tuple(array.shape)}")
            _write_record(zf, root + f"data/{key}", data.reshape(-1).view(np.uint8))
            del data
        _write_record(zf, root + "version", b"3\n")
    os.replace(tmp, path)
    return path
