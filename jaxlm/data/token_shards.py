"""Pre-tokenized shards: flat token files (nanoGPT, llama2.c, llm.c) and ArrayRecord documents.

Flat files are little-endian token ids back to back, documents already separated by EOS:
nanoGPT's ``train.bin`` and llama2.c's ``data*.bin`` are raw uint16; llm.c's FineWeb shards
(``fineweb_train_000001.bin``) start with a 256 x int32 header (magic 20240520, version 1 =
uint16 / 2 = uint32, token count). They are memory-mapped and cut into windows, so reading is
a copy per window.

ArrayRecord shards hold one document per record as raw little-endian ids (no EOS; the
pipeline appends it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from jaxlm.errors import DataError

LLMC_MAGIC = 20240520
LLMC_HEADER_INTS = 256
_LLMC_VERSION_DTYPES = {1: np.uint16, 2: np.uint32}
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class TokenFile:
    """One flat token file: its dtype, where the tokens start and how many there are."""

    def __init__(self, path: str, dtype: str = ""):
        self.path = path
        size = os.path.getsize(path)
        if size == 0:
            raise DataError(f"{path}: empty file")
        header = np.fromfile(path, dtype="<i4", count=min(LLMC_HEADER_INTS, size // 4))
        if len(header) == LLMC_HEADER_INTS and header[0] == LLMC_MAGIC:
            self._from_llmc_header(header, size, dtype)
        else:
            self.dtype = np.dtype(DTYPES[dtype or "uint16"]).newbyteorder("<")
            self.offset = 0
            if size % self.dtype.itemsize:
                raise DataError(f"{path}: {size} bytes is not a whole number of {self.dtype.name} tokens "
                                f"({self.dtype.itemsize} bytes each); truncated, or another token size?")
            self.count = size // self.dtype.itemsize

    def _from_llmc_header(self, header: np.ndarray, size: int, dtype: str) -> None:
        version, count = int(header[1]), int(header[2])
        if version not in _LLMC_VERSION_DTYPES:
            raise DataError(f"{self.path}: llm.c token file of unknown version {version}")
        self.dtype = np.dtype(_LLMC_VERSION_DTYPES[version]).newbyteorder("<")
        if dtype and np.dtype(DTYPES[dtype]) != self.dtype.newbyteorder("="):
            raise DataError(f"{self.path}: its header says {self.dtype.name} tokens, the config says {dtype}")
        self.offset = LLMC_HEADER_INTS * 4
        self.count = count
        if self.offset + count * self.dtype.itemsize != size:
            raise DataError(f"{self.path}: header promises {count} tokens, the file holds "
                            f"{(size - self.offset) / self.dtype.itemsize:g}; truncated?")

    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.count,))


class TokenWindows:
    """Random access to consecutive, non-overlapping windows of ``window`` tokens of flat files.

    A file's tail shorter than a window is not used; windows never span two files.
    Every window is checked against the vocabulary as it is read.
    """

    def __init__(self, files: list[TokenFile], window: int, vocab_size: int):
        self.files, self.window, self.vocab_size = files, window, vocab_size
        counts = [f.count // window for f in files]
        self._ends = np.cumsum(counts)
        if self._ends[-1] == 0:
            raise DataError(f"{files[0].path}: fewer tokens than one window of {window}")
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __setstate__(self, state):
        self.__dict__.update(state, _maps={})

    def __getitem__(self, index: int) -> np.ndarray:
        file_index = int(np.searchsorted(self._ends, index, side="right"))
        first = index - (int(self._ends[file_index - 1]) if file_index else 0)
        if file_index not in self._maps:
            self._maps[file_index] = self.files[file_index].tokens()
        start = first * self.window
        window = self._maps[file_index][start:start + self.window].astype(np.int32)
        if window.max() >= self.vocab_size:
            position = start + int(np.argmax(window >= self.vocab_size))
            raise DataError(f"{self.files[file_index].path}: token id {int(window.max())} >= vocabulary size "
                            f"{self.vocab_size} (near token {position}); the data was made with another tokenizer")
        return window


class TokenArrayRecords:
    """Random access to tokenized documents stored one per ArrayRecord record."""

    def __init__(self, files: list[str], dtype: str = ""):
        from array_record.python.array_record_module import ArrayRecordReader

        self.files = files
        self.dtype = np.dtype(DTYPES[dtype or "uint16"]).newbyteorder("<")
        counts = []
        for path in files:
            try:
                reader = ArrayRecordReader(path)
            except Exception as e:  # the C++ reader raises RuntimeError/ValueError with the reason
                raise DataError(f"{path}: not a readable ArrayRecord file ({e})") from None
            counts.append(reader.num_records())
            reader.close()
            if counts[-1] == 0:
                raise DataError(f"{path}: empty file (no records)")
        self._ends = np.cumsum(counts)
        self._source = None

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

    def where(self, index: int) -> str:
        file_index = int(np.searchsorted(self._ends, index, side="right"))
        first = index - (int(self._ends[file_index - 1]) if file_index else 0)
        return f"{self.files[file_index]} record {first}"

    def __getitem__(self, index: int) -> np.ndarray:
        import grain

        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.files)
        raw = self._source[index]
        if len(raw) % self.dtype.itemsize:
            raise DataError(f"{self.where(index)}: {len(raw)} bytes is not a whole number of "
                            f"{self.dtype.name} tokens; another token size?")
        return np.frombuffer(raw, self.dtype)


# --------------------------------------------------------------------------- writers


def write_token_file(path: str, tokens: np.ndarray, dtype: str = "uint16") -> None:
    """A raw flat token file, as nanoGPT's prepare.py writes it."""
    tokens = np.asarray(tokens)
    check_fits(tokens, dtype, path)
    tokens.astype(np.dtype(DTYPES[dtype]).newbyteorder("<")).tofile(path)


def write_token_array_record(path: str, documents: Iterable[np.ndarray], dtype: str = "uint16") -> int:
    """One record per document (ids without EOS); returns the number of records."""
    from array_record.python.array_record_module import ArrayRecordWriter

    # group_size:1 keeps every record its own chunk: random access without decoding neighbours.
    writer = ArrayRecordWriter(path, "group_size:1")
    count = 0
    for doc in documents:
        doc = np.asarray(doc)
        check_fits(doc, dtype, path)
        writer.write(doc.astype(np.dtype(DTYPES[dtype]).newbyteorder("<")).tobytes())
        count += 1
    writer.close()
    return count


def check_fits(tokens: np.ndarray, dtype: str, path: str) -> None:
    if tokens.size and int(tokens.max()) > np.iinfo(DTYPES[dtype]).max:
        raise DataError(f"{path}: token id {int(tokens.max())} does not fit {dtype}; use uint32")
