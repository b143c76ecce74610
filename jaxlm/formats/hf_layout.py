"""The Hugging Face layout, for every family: a directory with ``config.json`` and its weights in
``model.safetensors``, or sharded as ``model-0000N-of-0000M.safetensors`` with
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {key: shard}}``).

Reading gives the tensors (memory-mapped) and the config fields; the family is the one whose naming
module claims the keys and config.json (``keymap.choose``), as for any other file. Writing puts
the family's (or the source's) key names, shapes and dtypes into shards of at most
``max_shard_size`` bytes each, in state_dict order, as ``transformers``' ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from jaxlm.errors import CheckpointError
from jaxlm.formats import safetensors_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FORMAT = "model-{:05d}-of-{:05d}.safetensors"
DEFAULT_MAX_SHARD = 5 * 2**30  # what save_pretrained writes by default (5 GB)


def is_hf_dir(path) -> bool:
    path = pathlib.Path(path)
    return path.is_dir() and ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file())


def parse_size(size) -> int:
    """``"2GB"``, ``"500MB"``, ``"10KiB"`` or a number of bytes."""
    if isinstance(size, (int, np.integer)):
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"shard size {size!r}: expected bytes or a size like 2GB, 500MB")
    power = " KMGT".index(m[2].upper() or " ")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


def read_dir(path) -> tuple[dict[str, np.ndarray], dict | None, dict[str, str], list[str]]:
    """(tensors, config.json fields or None, metadata of the first shard, shard file names) of a directory."""
    path = pathlib.Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{path / INDEX_FILE}: not a safetensors index (a JSON object with a "
                                  "weight_map {key: shard file})") from None
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX_FILE} names the shard {missing[0]}, which is not in {path}"
                                  f"{f' (+{len(missing) - 1} more missing)' if len(missing) > 1 else ''}; "
                                  "download every shard")
        tensors, metadata = {}, {}
        for shard in shards:
            part, meta = safetensors_file.load(path / shard)
            metadata = metadata or meta
            listed = {k for k, s in weight_map.items() if s == shard}
            absent, extra = sorted(listed - set(part)), sorted(set(part) - listed)
            if absent:
                raise CheckpointError(f"{path / INDEX_FILE} puts {absent[0]} in {shard}, which does not hold it"
                                      f"{f' (+{len(absent) - 1} more)' if len(absent) > 1 else ''}; the download "
                                      "is incomplete or the index belongs to other files")
            if extra:
                raise CheckpointError(f"{path / shard} holds {extra[0]}, which {INDEX_FILE} does not list"
                                      f"{f' (+{len(extra) - 1} more)' if len(extra) > 1 else ''}; the index "
                                      "belongs to other files")
            tensors.update(part)
        tensors = {k: tensors[k] for k in weight_map}  # the index's order (the writer's state_dict order)
    else:
        shards = [WEIGHTS_FILE]
        tensors, metadata = safetensors_file.load(path / WEIGHTS_FILE)
    config = None
    if (path / CONFIG_FILE).is_file():
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path / CONFIG_FILE}: not JSON ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / CONFIG_FILE}: expected a JSON object of config fields")
    return tensors, config, metadata, shards


def _nbytes(array) -> int:
    return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize


def write_dir(tensors: dict, config: dict, directory, *, metadata: dict[str, str] | None = None,
              max_shard_size=None) -> pathlib.Path:
    """``directory/config.json`` and the tensors in one file, or in shards of at most ``max_shard_size``
    bytes (a tensor larger than that gets a shard of its own) with the index beside them."""
    directory = pathlib.Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_MAX_SHARD
    groups, size = [[]], 0
    for name, array in tensors.items():
        n = _nbytes(array)
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    metadata = {"format": "pt", **(metadata or {})}
    for stale in [directory / WEIGHTS_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a shard left from an earlier write would confuse readers
    if len(groups) == 1:
        safetensors_file.save(tensors, directory / WEIGHTS_FILE, metadata)
    else:
        weight_map = {}
        for i, names in enumerate(groups):
            shard = SHARD_FORMAT.format(i + 1, len(groups))
            safetensors_file.save({n: tensors[n] for n in names}, directory / shard, metadata)
            weight_map.update({n: shard for n in names})
        index = {"metadata": {"total_size": sum(_nbytes(a) for a in tensors.values())}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory
