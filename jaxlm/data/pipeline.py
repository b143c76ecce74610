"""The Grain pipeline: documents -> tokens + EOS -> packed ``seq_len + 1`` windows -> batches.

Per source (see ``sources``), documents are split train/held-out, sharded by JAX process,
shuffled per epoch from the seed, tokenized (framed as the tokenizer frames a text) with EOS
appended (unless ``data.eos_token`` is empty) and packed by Grain's
concat-then-split packer into windows of ``seq_len + 1`` tokens (inputs ``[:, :-1]``, targets
``[:, 1:]``). A mixture interleaves the sources' windows with ``IterDataset.mix``, so the
weights are shares of tokens. Windows are batched, and ``num_workers`` Grain processes each
produce whole batches.

Everything is a Grain transformation, so the iterator's ``get_state()`` captures the exact
position, including inside worker processes and half-used documents.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import weakref
from typing import Any

import grain
import numpy as np
from grain.experimental import (ConcatThenSplitIterDataset, InterleaveIterDataset, ThreadPrefetchIterDataset,
                                WindowShuffleIterDataset)

from jaxlm.data import mixture
from jaxlm.data import sources as src
from jaxlm.data.token_shards import TokenWindows
from jaxlm.data.tokenizer import check_tokenizer, plain_text_encoder
from jaxlm.errors import ConfigError, DataError

log = logging.getLogger("jaxlm.data")

SPLITS = ("train", "heldout")
_FEATURE = "tokens"
_MAX_CYCLE_LENGTH = 4  # Parquet files open at once per process: each holds one decoded row group


def make_batch_iterator(data_cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                        split: str = "train", process_index: int = 0, process_count: int = 1):
    """An endless iterator of int32 batches ``[batch_size // process_count, seq_len + 1]``.

    ``split="train"`` repeats over epochs, reshuffled each epoch from ``seed``. ``split="heldout"``
    reads the held-out documents (``data.heldout_fraction``, never in train; the same ones for
    every seed) in a fixed order and also repeats, so ``next()`` never ends: make a fresh
    iterator for each evaluation to see the same batches each time.

    The result is a ``grain.DatasetIterator``: ``it.get_state()`` returns a JSON-serialisable
    dict (what Grain's Orbax integration writes with ``json.dumps``), and ``it.set_state(state)``
    -- also with a state that went through JSON -- makes the next batch equal, bit for bit, to
    the one that followed when the state was taken. Call ``it.close()`` to stop worker processes.
    """
    iterator = iter(make_dataset(data_cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                 split=split, process_index=process_index, process_count=process_count))
    _open_iterators.add(iterator)
    return iterator


# Iterators still open at exit are closed while Python still works: Grain's own clean-up,
# run later from __del__ during interpreter shutdown, prints tracebacks about missing modules.
_open_iterators: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_open_iterators):
        iterator.close()


def make_dataset(data_cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int, split: str = "train",
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The ``grain.IterDataset`` behind ``make_batch_iterator``."""
    if split not in SPLITS:
        raise ConfigError(f"data split {split!r}: allowed: {', '.join(SPLITS)}")
    if seq_len <= 0 or batch_size <= 0:
        raise ConfigError(f"seq_len = {seq_len}, batch_size = {batch_size}: both must be > 0")
    if not 0 <= process_index < process_count or batch_size % process_count:
        raise ConfigError(f"batch_size = {batch_size} over {process_count} processes (this is {process_index}): "
                          f"the global batch must divide evenly between processes")
    if split == "heldout" and data_cfg.heldout_fraction == 0:
        raise ConfigError("data.heldout_fraction = 0: there is no held-out split to evaluate on")
    check_tokenizer(tokenizer, "in use", None, data_cfg.eos_token)
    context = _Context(data_cfg, tokenizer, seq_len, seed, split, process_index, process_count)
    entries = data_cfg.sources
    # Each source's random choices derive from its key, not its place in the mixture, so that
    # reordering a mixture keeps every source's order (a checkpoint restores sources by key).
    keys = mixture.mixture_keys([entry.path for entry in entries])
    windows = [_source_windows(context, entry, key) for entry, key in zip(entries, keys)]
    ds = mixture.mix(windows, [entry.weight for entry in entries], keys)
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    if data_cfg.num_workers > 0:
        _absl_flags_at_defaults()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers,
                                                         per_worker_buffer_size=2))
    else:
        # The next batches are made in a thread while the accelerator runs the current step.
        ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
    return _OutputIterDataset(ds)


def _absl_flags_at_defaults() -> None:
    """Grain's worker processes read absl flags, which only an absl ``app.run`` parses (grain 0.2.18)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _Context:
    """What every source of one pipeline shares."""

    def __init__(self, data_cfg, tokenizer, seq_len, seed, split, process_index, process_count):
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        # data.eos_token "" ends documents with nothing (Llama Think frames a text with BOS only).
        self.eos_id = tokenizer.token_to_id(data_cfg.eos_token) if data_cfg.eos_token else None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.window = seq_len + 1
        self.seed = seed
        self.split = split
        self.process_index = process_index
        self.process_count = process_count

    def derived_seed(self, *parts: Any) -> int:
        """A 32-bit seed for one random choice, different for each source and purpose."""
        text = repr((self.seed,) + parts).encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")

    def read_options(self) -> grain.ReadOptions:
        threads = self.cfg.read_threads
        return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(16, 16 * threads))


def _source_windows(ctx: _Context, entry, key: str) -> grain.IterDataset:
    resolved = src.resolve(entry, ctx.cfg)
    if isinstance(resolved, src.TokenStream):
        return _stream_windows(ctx, resolved, key)
    if isinstance(resolved, src.StreamedDocuments):
        docs = _streamed_documents(ctx, resolved, key)
    else:
        docs = _random_access_documents(ctx, resolved, key)
    return _pack(docs, ctx.window)


def _random_access_documents(ctx: _Context, resolved: src.Documents, key: str) -> grain.IterDataset:
    reader = resolved.reader
    if resolved.tokenized:
        made_for = getattr(reader, "vocab_size", None)  # recorded by our TFDS builder
        if made_for and made_for > ctx.vocab_size:
            raise DataError(f"data source {resolved.name}: tokenized with a {made_for}-token vocabulary, "
                            f"the tokenizer in use has {ctx.vocab_size}; set data.tokenizer to the one it was made with")
        reader = _CheckedTokens(reader, ctx.vocab_size, ctx.eos_id)
    chosen = split_indices(len(reader), ctx.cfg.heldout_fraction, ctx.split, resolved.name)
    docs = grain.MapDataset.source(reader if chosen is None else _Subset(reader, chosen))
    docs = _shard_and_order(ctx, docs, resolved.name, key, "documents")
    if not resolved.tokenized:
        docs = docs.map(_Encode(ctx.tokenizer, ctx.eos_id))
    return docs.to_iter_dataset(ctx.read_options())


def _streamed_documents(ctx: _Context, resolved: src.StreamedDocuments, key: str) -> grain.IterDataset:
    files = resolved.files[ctx.process_index::ctx.process_count]
    if not files:
        raise DataError(f"data source {resolved.name}: {len(resolved.files)} files for {ctx.process_count} "
                        f"processes; each process needs one (prepare it with TFDS, or split the files)")
    order = grain.MapDataset.source(files)
    if ctx.split == "train":
        order = order.shuffle(seed=ctx.derived_seed(key, "files"))
    order = order.repeat().map(_OpenParquet(resolved.text_column, resolved.filesystem))
    docs = InterleaveIterDataset(order, cycle_length=min(_MAX_CYCLE_LENGTH, len(files)))
    if ctx.cfg.heldout_fraction > 0:
        docs = docs.filter(_InSplit(ctx.cfg.heldout_fraction, ctx.split == "heldout"))
    if ctx.split == "train":
        docs = WindowShuffleIterDataset(docs, window_size=ctx.cfg.shuffle_buffer,
                                        seed=ctx.derived_seed(key, "documents"))
    return docs.map(_Encode(ctx.tokenizer, ctx.eos_id))


def _stream_windows(ctx: _Context, resolved: src.TokenStream, key: str) -> grain.IterDataset:
    reader = TokenWindows(resolved.files, ctx.window, ctx.vocab_size)
    chosen = split_indices(len(reader), ctx.cfg.heldout_fraction, ctx.split, resolved.name, "windows")
    windows = grain.MapDataset.source(reader if chosen is None else _Subset(reader, chosen))
    windows = _shard_and_order(ctx, windows, resolved.name, key, "windows")
    # Reading a window is a memcpy: threads would only add GIL contention.
    return windows.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def _shard_and_order(ctx: _Context, ds: grain.MapDataset, name: str, key: str, unit: str) -> grain.MapDataset:
    total = len(ds)
    ds = ds[ctx.process_index::ctx.process_count]
    if len(ds) == 0:
        raise DataError(f"data source {name}: {total} {unit} in the {ctx.split} split, fewer than "
                        f"the {ctx.process_count} processes reading it")
    if ctx.split == "train":
        ds = ds.shuffle(seed=ctx.derived_seed(key, unit))
    return ds.repeat()


def _pack(docs: grain.IterDataset, window: int) -> grain.IterDataset:
    packed = ConcatThenSplitIterDataset(docs, length_struct={_FEATURE: window})
    return packed.map(_tokens_only)


def _tokens_only(packed: dict) -> np.ndarray:
    return packed[_FEATURE]


# --------------------------------------------------------------------------- held-out selection


def split_indices(count: int, fraction: float, split: str, name: str, unit: str = "documents") -> np.ndarray | None:
    """Sorted indices of ``split`` among ``count`` items, or None for "all of them".

    The held-out items are the ``round(fraction * count)`` (at least one) with the smallest hash
    of their index: fixed for a source whatever the seed, and spread over the whole source.
    """
    if fraction == 0:
        return None
    if count < 2:
        if split == "heldout":
            raise DataError(f"data source {name}: {count} {unit}; too few to hold any out for evaluation")
        log.warning("data source %s: one of %s, so nothing is held out for evaluation", name, unit)
        return None
    held_count = min(count - 1, max(1, round(fraction * count)))
    held = np.zeros(count, bool)
    held[np.argpartition(_mix64(np.arange(count, dtype=np.uint64)), held_count - 1)[:held_count]] = True
    if split == "train":
        log.info("data source %s: %d of %d %s held out for evaluation", name, held_count, count, unit)
    return np.flatnonzero(held if split == "heldout" else ~held)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed, well-spread hash of 64-bit integers."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0x5EEDDA7A)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class _InSplit:
    """Streamed documents have no index: a hash of the text decides (duplicates stay together)."""

    def __init__(self, fraction: float, heldout: bool):
        self.threshold = int(fraction * 2**64)
        self.heldout = heldout

    def __call__(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return (int.from_bytes(digest, "little") < self.threshold) == self.heldout


# --------------------------------------------------------------------------- per-element functions


class _Encode:
    """Grain map: text -> {"tokens": int32 ids + EOS}.

    The ids are framed as the tokenizer frames them (a SentencePiece model's BOS in front; a BPE
    trained here adds nothing), as ``tokenizer.encode_batches`` does for pre-tokenized files.
    Special-token strings inside a document are encoded as plain text, so a document cannot
    fake an EOS. Pickled as JSON, since ``tokenizers`` drops that setting when pickled.
    """

    def __init__(self, tokenizer, eos_id: int | None):
        self._json = tokenizer.to_str()
        self._eos = eos_id
        self._tokenizer = None

    def __getstate__(self):
        return {"_json": self._json, "_eos": self._eos, "_tokenizer": None}

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = plain_text_encoder(Tokenizer.from_str(self._json))
        ids = self._tokenizer.encode(text).ids
        if self._eos is not None:
            ids.append(self._eos)
        return {_FEATURE: np.asarray(ids, np.int32)}


class _CheckedTokens:
    """Pre-tokenized documents: ids checked against the vocabulary, EOS appended (if any)."""

    def __init__(self, reader, vocab_size: int, eos_id: int | None):
        self.reader, self.vocab_size, self.eos_id = reader, vocab_size, eos_id

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        tokens = np.asarray(self.reader[index])
        if tokens.size and tokens.max() >= self.vocab_size:
            bad = int(tokens.max())
            raise DataError(f"{self.reader.where(index)}: token id {bad} >= vocabulary size {self.vocab_size}; "
                            f"the data was made with another tokenizer")
        tail = [] if self.eos_id is None else [self.eos_id]
        return {_FEATURE: np.append(tokens.astype(np.int32), np.asarray(tail, np.int32))}


class _Subset:
    """Random access to chosen indices of a reader (the train or held-out documents)."""

    def __init__(self, reader, indices: np.ndarray):
        self.reader, self.indices = reader, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.reader[int(self.indices[index])]


class _OpenParquet:
    """Grain map: a Parquet file -> an IterDataset of its texts, checked when opened."""

    def __init__(self, column: str, filesystem):
        self.column, self.filesystem = column, filesystem

    def __call__(self, path: str) -> grain.IterDataset:
        src.check_parquet(path, self.column, self.filesystem)
        kwargs = {"filesystem": self.filesystem} if self.filesystem is not None else {}
        rows = grain.experimental.ParquetIterDataset(path, **kwargs)
        return rows.map(src.ParquetRowText(self.column, path))


# --------------------------------------------------------------------------- output


class _OutputIterDataset(grain.IterDataset):
    """The pipeline's end: plain ndarray batches, and a state that survives JSON.

    Worker processes hand batches over in shared memory (``SharedMemoryArray``), freed only
    when the array is collected; a copy (a few hundred KB) decouples the train loop from that.
    Grain's Orbax integration saves ``json.dumps(get_state())``; JSON turns the packer's
    ``(-1, -1)`` "no remainder" slices into lists, which the packer then takes for a real
    remainder (grain 0.2.18): ``set_state`` puts the tuples back before Grain sees them.
    """

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self):
        return _OutputIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "OutputIterDataset"


class _OutputIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)

    def __next__(self) -> np.ndarray:
        batch = next(self._parent)
        return batch if type(batch) is np.ndarray else np.array(batch)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state: Any) -> Any:
    if isinstance(state, dict):
        return {key: {feature: tuple(sl) for feature, sl in value.items()}
                if key == "remainder_slices" and isinstance(value, dict) else _slices_as_tuples(value)
                for key, value in state.items()}
    if isinstance(state, list):
        return [_slices_as_tuples(value) for value in state]
    return state
