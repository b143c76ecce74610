"""Where documents come from: resolving a ``DataSource`` into something Grain can read.

A source resolves to one of three shapes, which the pipeline reads differently:

- ``Documents``: random access to documents (text, or token arrays without EOS): CPython's
  pydoc topics, text files (one document per file), JSON lines, TFDS datasets, ArrayRecord token
  shards. Shuffled globally per epoch by Grain.
- ``StreamedDocuments``: Parquet shards (local, or on the Hugging Face hub), read in order
  file by file, interleaved and window-shuffled by Grain — random access into Parquet would
  decode a whole row group per document.
- ``TokenStream``: flat token files (nanoGPT / llm.c ``.bin``) whose documents are already
  joined by EOS; cut straight into windows.

Every file problem is a ``DataError`` naming the file (and line or record where there is one).
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import logging
import mmap
import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxlm.data import tfds_source, token_shards
from jaxlm.data.documents import decode_utf8, template_fields, text_of
from jaxlm.errors import ConfigError, DataError

log = logging.getLogger("jaxlm.data")

PYDOC = "pydoc"
HUB_PREFIXES = ("hf://", "hf:")  # "hf://org/name" or the shorter "hf:org/name"
TFDS_PREFIX = "tfds:"
# Offline machines may mirror hub datasets as <mirror>/<org>/<name>/...; hf:// specs then read there.
HUB_MIRROR_ENV = "JAXLM_HUB_MIRROR"

_ARRAY_RECORD = re.compile(r"\.array_record(-\d+-of-\d+)?$")
_SUFFIX_KINDS = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                 ".parquet": "parquet", ".bin": "tokens"}
_GLOB_CHARS = re.compile(r"[*?\[]")


def kind_of_file(path: str) -> str | None:
    if _ARRAY_RECORD.search(path):
        return "array_record"
    return _SUFFIX_KINDS.get(os.path.splitext(path)[1].lower())


# --------------------------------------------------------------------------- resolved shapes


@dataclasses.dataclass
class Documents:
    """Random access to documents: ``reader[i]`` is a ``str``, or a token array when ``tokenized``."""

    name: str
    reader: Any
    tokenized: bool = False


@dataclasses.dataclass
class StreamedDocuments:
    """Parquet shards read front to back; ``filesystem`` is a pyarrow filesystem for remote files."""

    name: str
    files: list[str]
    text_column: str
    filesystem: Any = None


@dataclasses.dataclass
class TokenStream:
    """Flat token files (``token_shards.TokenFile``), EOS already between documents."""

    name: str
    files: list


def resolve(entry, data_cfg) -> Documents | StreamedDocuments | TokenStream:
    """Turn one ``DataSource`` of the config into a readable shape (see the module docstring)."""
    column = entry.text_column or data_cfg.text_column
    kind = entry.kind
    path = entry.path
    if path == PYDOC and kind in ("auto", "pydoc"):
        return Documents(PYDOC, PydocTopics())
    if kind == "pydoc":
        raise ConfigError(f"data source {path!r}: kind 'pydoc' takes the path 'pydoc'")
    if path.startswith(HUB_PREFIXES) or kind == "hf":
        files, filesystem = hub_parquet_files(path)
        return StreamedDocuments(path, files, column, filesystem)
    if path.startswith(TFDS_PREFIX) or kind == "tfds":
        reader = tfds_source.TfdsRecords(path.removeprefix(TFDS_PREFIX), entry.split,
                                          tfds_data_dir(data_cfg), column)
        return Documents(path, reader, tokenized=reader.tokenized)
    files, kind = local_files(path, kind)
    if kind == "text":
        return Documents(path, TextFiles(files))
    if kind == "jsonl":
        return Documents(path, JsonLines(files, column))
    if kind == "parquet":
        return StreamedDocuments(path, files, column)
    if kind == "tokens":
        return TokenStream(path, [token_shards.TokenFile(f, entry.token_dtype) for f in files])
    return Documents(path, token_shards.TokenArrayRecords(files, entry.token_dtype), tokenized=True)


def tfds_data_dir(data_cfg) -> str:
    return os.path.expanduser(data_cfg.tfds_data_dir or os.path.join(data_cfg.cache_dir, "tfds"))


def local_files(path: str, kind: str = "auto") -> tuple[list[str], str]:
    """The sorted data files a path, directory or glob names, and their (single) kind."""
    expanded = os.path.expanduser(path)
    if _GLOB_CHARS.search(expanded):
        candidates = sorted(p for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p))
        explicit = True
    elif os.path.isdir(expanded):
        candidates = sorted(str(p) for p in pathlib.Path(expanded).rglob("*")
                            if p.is_file() and not _hidden(p.relative_to(expanded)))
        explicit = False
    elif os.path.isfile(expanded):
        candidates, explicit = [expanded], True
    else:
        raise DataError(f"data source {path}: no such file or directory")
    if kind != "auto" and explicit:
        return _non_empty(candidates, path), kind
    by_kind: dict[str, list[str]] = {}
    for f in candidates:
        by_kind.setdefault(kind_of_file(f) or "", []).append(f)
    ignored = by_kind.pop("", [])
    if kind != "auto":
        ignored += [f for k, fs in by_kind.items() if k != kind for f in fs]
        by_kind = {kind: by_kind.get(kind, [])}
    if ignored:
        log.info("data source %s: ignoring %d files that are not %s data (e.g. %s)", path, len(ignored),
                 kind if kind != "auto" else "recognised", ignored[0])
    if len(by_kind) > 1:
        summary = ", ".join(f"{len(fs)} {k}" for k, fs in sorted(by_kind.items()))
        raise DataError(f"data source {path}: holds several kinds of files ({summary}); "
                        f"name one kind with DataSource(kind=...) or a glob")
    if not by_kind:
        raise DataError(f"data source {path}: no data files (.txt, .jsonl, .parquet, .bin, .array_record)")
    (found_kind, files), = by_kind.items()
    return _non_empty(files, path), found_kind


def _hidden(relative: pathlib.Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _non_empty(files: list[str], path: str) -> list[str]:
    if not files:
        raise DataError(f"data source {path}: matches no files")
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"{f}: empty file")
    return files


# --------------------------------------------------------------------------- random-access readers


class PydocTopics:
    """CPython's own documentation, one document per pydoc topic (sorted by key), no download."""

    def __init__(self):
        from pydoc_data.topics import topics

        self._texts = [topics[key] for key in sorted(topics)]

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> str:
        return self._texts[index]


class TextFiles:
    """One document per text file."""

    def __init__(self, files: list[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str:
        path = self.files[index]
        with open(path, "rb") as f:
            return decode_utf8(f.read(), path)


class JsonLines:
    """One document per line of JSON-lines files; ``column`` names the field or is a template.

    Opening indexes the line offsets of every file (one pass with numpy); reading a document
    is then one slice of a memory map. Blank lines are skipped and counted in the log.
    """

    _CHUNK = 1 << 26  # bytes scanned at a time while indexing

    def __init__(self, files: list[str], column: str):
        self.files = files
        self.column = column
        starts, ends, lines, counts = [], [], [], []
        for path in files:
            s, e, n = self._index(path)
            starts.append(s)
            ends.append(e)
            lines.append(n)
            counts.append(len(s))
        self._starts = np.concatenate(starts)
        self._ends = np.concatenate(ends)
        self._lines = np.concatenate(lines)
        self._file_end = np.cumsum(counts)
        self._maps: dict[int, mmap.mmap] = {}

    @classmethod
    def _index(cls, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, end, line number) of every non-blank line of a file."""
        size = os.path.getsize(path)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m[:64].lstrip().startswith(b"["):
                raise DataError(f"{path}: a JSON array, not JSON lines (one object per line); "
                                f"convert it, e.g. with jq -c '.[]'")
            data = np.frombuffer(m, np.uint8)
            newlines = np.concatenate([np.flatnonzero(data[i:i + cls._CHUNK] == 10) + i
                                       for i in range(0, size, cls._CHUNK)])
            starts = np.concatenate([[0], newlines + 1])
            ends = np.append(newlines, size)
            if starts[-1] == size:  # the file ends with a newline: no line after it
                starts, ends = starts[:-1], ends[:-1]
            lengths = ends - starts
            blank = lengths == 0
            one_byte = np.flatnonzero(lengths == 1)
            blank[one_byte] = data[starts[one_byte]] == 13  # a lone "\r" of a CRLF file
            del data  # the memory map cannot close while numpy views it
        line_numbers = np.arange(1, len(starts) + 1)
        if blank.any():
            log.info("%s: skipped %d blank lines", path, int(blank.sum()))
        keep = ~blank
        if not keep.any():
            raise DataError(f"{path}: no documents (only blank lines)")
        return starts[keep], ends[keep], line_numbers[keep]

    def __len__(self) -> int:
        return len(self._starts)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __setstate__(self, state):
        self.__dict__.update(state, _maps={})

    def __getitem__(self, index: int) -> str:
        file_index = int(np.searchsorted(self._file_end, index, side="right"))
        path = self.files[file_index]
        if file_index not in self._maps:
            with open(path, "rb") as f:
                self._maps[file_index] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        raw = self._maps[file_index][self._starts[index]:self._ends[index]]
        where = f"{path}:{self._lines[index]}"
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            decode_utf8(raw, where)
            raise
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: a JSON {type(record).__name__}, expected an object with {self.column!r}")
        return text_of(record, self.column, where)


# --------------------------------------------------------------------------- Parquet and the hub


def check_parquet(path: str, column: str, filesystem=None) -> int:
    """Fail early, naming the file, on an unreadable file, a missing column or no rows."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path, filesystem=filesystem).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError with the reason
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = meta.schema.to_arrow_schema().names
    for name in template_fields(column):
        if name not in names:
            raise DataError(f"{path}: no {name!r} column; columns: {', '.join(names)}; set data.text_column")
    if meta.num_rows == 0:
        raise DataError(f"{path}: empty file (no rows)")
    return meta.num_rows


def iter_parquet_texts(path: str, column: str, filesystem=None) -> Iterator[str]:
    """Texts of one Parquet file in row order, reading only the needed columns."""
    import pyarrow.parquet as pq

    check_parquet(path, column, filesystem)
    needed = template_fields(column)
    for batch in pq.ParquetFile(path, filesystem=filesystem).iter_batches(columns=needed, batch_size=1024):
        for record in batch.to_pylist():
            yield _parquet_text(record, column, path)


def _parquet_text(record: dict, column: str, path: str) -> str:
    if "{" not in column and record.get(column) is None:
        raise DataError(f"{path}: a row has a null {column!r}")
    return text_of(record, column, path)


class ParquetRowText:
    """Grain map: a Parquet row (dict of columns) -> its text; picklable for worker processes."""

    def __init__(self, column: str, path: str):
        self.column, self.path = column, path

    def __call__(self, row: dict) -> str:
        return _parquet_text(row, self.column, self.path)


def hub_parquet_files(spec: str, filesystem=None) -> tuple[list[str], Any]:
    """The Parquet files of a hub dataset: ``hf://org/name[@revision][/dir-or-glob]``.

    Without a sub-path, the files of the dataset's default config (the ``configs:`` block of
    its README.md, train split) are used, else every Parquet file of the repository. Returns
    the files and a pyarrow filesystem to read them through (None for local files).
    """
    bare = spec.removeprefix(HUB_PREFIXES[0]) if spec.startswith(HUB_PREFIXES[0]) else spec.removeprefix(HUB_PREFIXES[1])
    repo, _, sub = bare.removeprefix("datasets/").partition("/")
    name, _, sub = sub.partition("/")
    if not repo or not name:
        raise ConfigError(f"data source {spec!r}: expected hf://org/name[@revision][/dir-or-glob]")
    repo_id = f"{repo}/{name}"
    mirror = os.environ.get(HUB_MIRROR_ENV)
    if filesystem is None and mirror:
        import fsspec

        fs, root, pa_fs = fsspec.filesystem("file"), os.path.join(mirror, repo_id.split("@")[0]), None
    elif filesystem is None:
        try:
            from huggingface_hub import HfFileSystem
        except ImportError:
            raise DataError(f"data source {spec}: reading the hub needs huggingface_hub "
                            f"(pip install huggingface_hub)") from None
        import pyarrow.fs

        fs, root = HfFileSystem(), f"datasets/{repo_id}"
        pa_fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    else:
        fs, root, pa_fs = filesystem, repo_id, None
    try:
        patterns = _hub_patterns(fs, root, sub)
        files = sorted({f for p in patterns for f in fs.glob(f"{root}/{p}") if f.endswith(".parquet")})
    except Exception as e:  # network or permission problems surface as many exception types
        raise DataError(f"data source {spec}: cannot list the dataset's files ({e})") from None
    if not files:
        raise DataError(f"data source {spec}: no Parquet files under {root}/{sub or '(default config)'}")
    return files, pa_fs


def _hub_patterns(fs, root: str, sub: str) -> list[str]:
    if sub:
        return [sub] if _GLOB_CHARS.search(sub) else [f"{sub.rstrip('/')}/**"]
    try:
        with fs.open(f"{root}/README.md", "r", encoding="utf-8") as f:
            readme = f.read()
    except FileNotFoundError:
        return ["**"]
    return _default_config_patterns(readme) or ["**"]


def _default_config_patterns(readme: str) -> list[str]:
    """``data_files`` of the default config in a dataset card's YAML front matter (train split)."""
    import yaml

    match = re.match(r"---\s*\n(.*?)\n---", readme, re.S)
    if not match:
        return []
    meta = yaml.safe_load(match.group(1)) or {}
    configs = meta.get("configs") or []
    chosen = next((c for c in configs if c.get("default")), None) or next(
        (c for c in configs if c.get("config_name") == "default"), None)
    if chosen is None:
        return []
    data_files = chosen.get("data_files", [])
    if isinstance(data_files, str):
        return [data_files]
    patterns = []
    for item in data_files:
        if isinstance(item, str):
            patterns.append(item)
        elif item.get("split", "train") == "train":
            paths = item.get("path", [])
            patterns += [paths] if isinstance(paths, str) else list(paths)
    return patterns


# --------------------------------------------------------------------------- tokenizer training, cache keys


def training_texts(data_cfg, limit: int) -> Iterator[str]:
    """The first ``limit`` documents of the configured source(s), in source order.

    For a mixture, each text source contributes in proportion to its weight.
    """
    entries = data_cfg.sources
    total = sum(e.weight for e in entries)
    for entry in entries:
        quota = limit if len(entries) == 1 else max(1, round(limit * entry.weight / total))
        yield from _first_texts(entry, data_cfg, quota)


def _first_texts(entry, data_cfg, limit: int) -> Iterator[str]:
    resolved = resolve(entry, data_cfg)
    if isinstance(resolved, TokenStream) or getattr(resolved, "tokenized", False):
        raise ConfigError(f"data source {entry.path}: is already tokenized; a tokenizer cannot be trained "
                          f"on it; set data.tokenizer to the tokenizer.json it was made with")
    if isinstance(resolved, Documents):
        for i in range(min(limit, len(resolved.reader))):
            yield resolved.reader[i]
        return
    produced = 0
    for path in resolved.files:
        for text in iter_parquet_texts(path, resolved.text_column, resolved.filesystem):
            if produced == limit:
                return
            produced += 1
            yield text


def fingerprint(data_cfg) -> list:
    """What identifies the training data of a cached tokenizer: specs plus file sizes and times."""
    out = []
    for entry in data_cfg.sources:
        item: dict[str, Any] = {"path": entry.path, "kind": entry.kind,
                                "column": entry.text_column or data_cfg.text_column,
                                "weight": entry.weight if len(data_cfg.sources) > 1 else 1.0}
        if entry.path == PYDOC:
            text = "\x00".join(PydocTopics()._texts)
            item["pydoc"] = hashlib.sha256(text.encode()).hexdigest()
        elif not entry.path.startswith(HUB_PREFIXES + (TFDS_PREFIX,)):
            files, _ = local_files(entry.path, entry.kind)
            item["files"] = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
        out.append(item)
    return out


def describe(data_cfg) -> str:
    return " + ".join(f"{e.path} ({e.weight:g})" if len(data_cfg.sources) > 1 else e.path
                      for e in data_cfg.sources)

