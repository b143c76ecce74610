"""``.safetensors`` files, read (memory-mapped) and written with numpy alone.

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}`` and the raw bytes.
The ``safetensors`` package is not a jaxlm dependency (``jaxlm.load`` must work from a plain
install) and its numpy loader has no bf16, so these few lines stand in for it.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

from jaxlm.errors import CheckpointError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20


def is_safetensors(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and struct.unpack("<Q", head[:8])[0] < MAX_HEADER and head[8:9] == b"{"


def load(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file; tensors are read-only views of the mapped file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors header: it says {header_len:,} bytes, the file "
                                  f"has {size - 8:,} after the length; copy or download the file again")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    data = np.memmap(path, np.uint8, mode="r", offset=8 + header_len) if size > 8 + header_len else np.zeros(0, np.uint8)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name} has an unreadable header entry {info}") from None
        if not 0 <= begin <= end <= data.size or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} points outside the file; it is truncated or damaged")
        tensors[name] = np.asarray(data[begin:end]).view(dtype).reshape(shape)
    return tensors, metadata


def save(tensors: dict, path, metadata: dict[str, str] | None = None) -> pathlib.Path:
    """Write ``tensors`` (any order kept) with string ``metadata``.

    A value may be any object with ``shape``, ``dtype`` and ``__array__`` (``torch_pt.LazyTensor``):
    the header needs only its shape and dtype, and its bytes are made as the writer reaches them,
    so one converted tensor at a time is in memory.
    """
    path = pathlib.Path(path)
    header, offset, arrays = {}, 0, []
    for name, array in tensors.items():
        if not hasattr(array, "__array__") or not hasattr(array, "shape"):
            array = np.asarray(array)
        dtype, shape = np.dtype(array.dtype), tuple(array.shape)
        if dtype not in NAMES:
            raise CheckpointError(f"cannot write a {dtype} tensor ({name}) into a safetensors file")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append((array, dtype, shape))
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for array, dtype, shape in arrays:
            data = np.ascontiguousarray(np.asarray(array), dtype=dtype).reshape(shape)
            f.write(memoryview(data.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
    return path
