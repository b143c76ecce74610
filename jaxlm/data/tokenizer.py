"""Tokenizers: deterministic byte-level BPE training, loading with checks, a cache, a CLI.

Every tokenizer is a Hugging Face ``tokenizers.Tokenizer``, whatever file it came from:

- ``tokenizer.json`` (``tokenizers`` form: a BPE trained here, GPT-2, DeepSeek-V4, ...), with the
  ``tokenizer_config.json`` beside it, when there is one, naming its BOS/EOS tokens;
- a SentencePiece ``tokenizer.model`` (Llama 2), converted by ``transformers``' SentencePiece
  converter (optional dependency: ``pip install 'transformers>=5.24' protobuf``), which follows the
  model's own normalizer settings and ranks BPE merges by piece score, so that ids equal
  ``sentencepiece``'s; its control pieces become special tokens and ``encode`` puts BOS in front
  of the ids, as ``sentencepiece`` users do (``add_special_tokens=False``: the bare ids);
- a directory holding one of them (``tokenizer.json`` first).

    python -m jaxlm.data.tokenizer train --source data/fineweb-edu --docs 100000 \\
        --vocab-size 8192 --out tokenizer.json
    python -m jaxlm.data.tokenizer encode --source corpus.jsonl --tokenizer tokenizer.json \\
        --out corpus.bin                      # nanoGPT-style flat uint16 tokens, EOS after each doc
    python -m jaxlm.data.tokenizer encode --source raw/shard_00000.txt --tokenizer tokenizer.model \\
        --lines --eos '' --out shard_00000.bin   # Llama Think's layout: BOS + ids per line

Training is deterministic: the same documents, vocabulary size and special tokens give a
byte-identical ``tokenizer.json`` (the BPE trainer breaks ties between equally frequent
pairs by the pair itself, and the JSON is written with sorted vocabulary).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from jaxlm.config import DataConfig, DataSource
from jaxlm.data import sources, token_shards
from jaxlm.errors import ArgumentParser, ConfigError, DataError, JaxlmError, non_negative_int, positive_int

log = logging.getLogger("jaxlm.data")

DEFAULT_EOS = "<|endoftext|>"
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
# SentencePiece piece types (sentencepiece_model.proto): these never come out of text.
_SP_UNKNOWN, _SP_CONTROL = 2, 3
_SP_UNIGRAM, _SP_BPE = 1, 2
# Bumped when the trained tokenizer changes for the same inputs, so stale cache entries are not reused.
_TRAINING_RECIPE = "byte-level-bpe-v1"


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (DEFAULT_EOS,)):
    """Train a GPT-2-style byte-level BPE; special tokens take the first ids, in the order given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    min_size = 256 + len(special_tokens)
    if vocab_size < min_size:
        raise ConfigError(f"tokenizer vocab_size = {vocab_size}: a byte-level BPE needs at least "
                          f"{min_size} (256 bytes + {len(special_tokens)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        # All 256 bytes are in the vocabulary even if the corpus lacks some: any text encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer, path: str | os.PathLike) -> pathlib.Path:
    """Write atomically, so that concurrent runs sharing a cache never read half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """A tokenizer's own document markers as its files declare them (None: not declared)."""

    bos: str | None = None
    bos_id: int | None = None
    eos: str | None = None
    eos_id: int | None = None


def tokenizer_file(path: str | os.PathLike) -> pathlib.Path:
    """The file a ``data.tokenizer`` names: the path itself, or in a directory its tokenizer file."""
    path = pathlib.Path(os.path.expanduser(str(path)))
    if path.is_dir():
        for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL):
            if (path / name).is_file():
                return path / name
        raise DataError(f"tokenizer {path}: a directory without {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL}")
    if not path.is_file():
        raise DataError(f"tokenizer {path}: file not found")
    return path


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None, eos_token: str | None = DEFAULT_EOS):
    """Load a tokenizer (see the module docstring) and check it fits a model of ``vocab_size``."""
    path = tokenizer_file(path)
    if path.suffix == ".model":
        tokenizer = _sentencepiece_tokenizer(path)
    else:
        tokenizer = _json_tokenizer(path)
    declared = special_tokens(path, tokenizer)
    _apply_tokenizer_config(tokenizer, path, declared)
    check_tokenizer(tokenizer, str(path), vocab_size, eos_token, own_eos=declared.eos)
    return tokenizer


def _json_tokenizer(path: pathlib.Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exceptions with long messages
        raise DataError(f"tokenizer {path}: not a Hugging Face tokenizers JSON ({str(e).splitlines()[0]})") from None


def _sentencepiece_proto(path: pathlib.Path):
    """The parsed ``ModelProto``, through the protobuf module ``transformers`` reads it with."""
    try:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
        model_pb2 = import_protobuf()
    except ImportError:
        raise DataError(f"tokenizer {path}: a SentencePiece model; converting it needs transformers >= 5.24 "
                        f"and protobuf (pip install 'transformers>=5.24' protobuf)") from None
    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        raise DataError(f"tokenizer {path}: this transformers has no SentencePiece converter that follows the "
                        f"model's settings; pip install 'transformers>=5.24'")
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # google.protobuf.message.DecodeError, with the reason
        raise DataError(f"tokenizer {path}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise DataError(f"tokenizer {path}: not a SentencePiece model (no pieces)")
    return proto, SpmConverter


def _sentencepiece_tokenizer(path: pathlib.Path):
    from tokenizers import AddedToken, processors

    proto, converter = _sentencepiece_proto(path)
    model_type = proto.trainer_spec.model_type
    if model_type == _SP_BPE:
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    elif model_type == _SP_UNIGRAM:
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    else:
        raise DataError(f"tokenizer {path}: a SentencePiece model of type {model_type}; "
                        f"only BPE ({_SP_BPE}) and unigram ({_SP_UNIGRAM}) models convert")
    if len(vocab) != len(proto.pieces):
        raise DataError(f"tokenizer {path}: the SentencePiece model repeats a piece; corrupt?")
    tokenizer = converter.build_tokenizer_from_spm_proto(proto, vocab)
    tokenizer.add_special_tokens([AddedToken(piece.piece, special=True, normalized=False)
                                  for piece in proto.pieces if piece.type in (_SP_UNKNOWN, _SP_CONTROL)])
    # SentencePiece encodes "<s>" written in a text as text; so does this copy (the setting is not
    # serialised: the pipeline's plain_text_encoder sets it again on its own copy).
    tokenizer.encode_special_tokens = True
    bos_id = proto.trainer_spec.bos_id
    if 0 <= bos_id < len(proto.pieces):
        bos = proto.pieces[bos_id].piece
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, bos_id)])
    return tokenizer


def special_tokens(path: str | os.PathLike, tokenizer=None) -> SpecialTokens:
    """BOS/EOS as the tokenizer's files name them: a SentencePiece model's ``bos_id``/``eos_id``,
    else ``bos_token``/``eos_token`` of the ``tokenizer_config.json`` beside a ``tokenizer.json``."""
    path = tokenizer_file(path)
    if path.suffix == ".model":
        proto, _ = _sentencepiece_proto(path)
        pieces = [piece.piece for piece in proto.pieces]
        bos, eos = (pieces[i] if 0 <= i < len(pieces) else None  # -1: the model has none
                    for i in (proto.trainer_spec.bos_id, proto.trainer_spec.eos_id))
    else:
        config = _tokenizer_config(path)
        bos, eos = _token_name(config.get("bos_token")), _token_name(config.get("eos_token"))
    if tokenizer is None:
        tokenizer = load_tokenizer(path, eos_token=None)
    ids = {}
    for name in (bos, eos):
        if name is not None:
            ids[name] = tokenizer.token_to_id(name)
            if ids[name] is None:
                raise DataError(f"tokenizer {path}: {path.with_name(TOKENIZER_CONFIG)} names {name!r}, which "
                                f"the tokenizer does not have; the two files do not belong together")
    return SpecialTokens(bos, ids.get(bos), eos, ids.get(eos))


def _tokenizer_config(path: pathlib.Path) -> dict:
    config_path = path.with_name(TOKENIZER_CONFIG)
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise DataError(f"{config_path}: a JSON {type(config).__name__}, expected an object")
    return config


def _token_name(value) -> str | None:
    """``"<s>"``, or the ``{"content": "<s>", ...}`` form older configs write."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _apply_tokenizer_config(tokenizer, path: pathlib.Path, declared: SpecialTokens) -> None:
    """``add_bos_token``/``add_eos_token`` of a ``tokenizer_config.json`` decide what ``encode``
    adds, as in ``transformers``; without them the tokenizer's own post-processor stays."""
    if path.suffix == ".model":
        return
    config = _tokenizer_config(path)
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    from tokenizers import processors

    parts, specials = ["$A"], []
    if config.get("add_bos_token") and declared.bos is not None:
        parts.insert(0, declared.bos)
        specials.append((declared.bos, declared.bos_id))
    if config.get("add_eos_token") and declared.eos is not None:
        parts.append(declared.eos)
        specials.append((declared.eos, declared.eos_id))
    tokenizer.post_processor = processors.TemplateProcessing(single=" ".join(parts), special_tokens=specials)


def plain_text_encoder(tokenizer):
    """A copy that encodes special-token strings inside a document as plain text.

    A web page that happens to contain "<|endoftext|>" must not end its document early.
    (``tokenizers`` forgets this setting when pickled, so copy it where it is used.)
    """
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    return copy


def check_tokenizer(tokenizer, name: str, vocab_size: int | None, eos_token: str | None,
                    own_eos: str | None = None) -> None:
    """The model must have an embedding row for every id the tokenizer can produce."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size > vocab_size:
        raise DataError(f"tokenizer {name}: {size} tokens do not fit the model's vocab_size {vocab_size}; "
                        f"raise model.vocab_size to >= {size} or use a smaller tokenizer")
    if eos_token:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            hint = f"its own EOS is {own_eos!r}" if own_eos else "one of its special tokens"
            raise DataError(f"tokenizer {name}: has no token {eos_token!r} to end documents with; "
                            f"set data.eos_token ({hint})")
        if vocab_size is not None and eos_id >= vocab_size:
            raise DataError(f"tokenizer {name}: {eos_token!r} has id {eos_id} >= model vocab_size {vocab_size}")


def load_tokenizer_for(data_cfg, vocab_size: int):
    """The tokenizer a run uses: ``data.tokenizer`` if set, else one trained on the source and cached.

    A trained tokenizer is cached under ``data.cache_dir/tokenizers`` keyed by the source (with a
    fingerprint of its files), the vocabulary size, the special tokens and the number of training
    documents; the next run with the same key loads it instead of training again.
    """
    if data_cfg.tokenizer:
        return load_tokenizer(data_cfg.tokenizer, vocab_size, data_cfg.eos_token)
    size = data_cfg.vocab_size or vocab_size
    if size > vocab_size:
        raise ConfigError(f"data.vocab_size = {size}: larger than the model's vocab_size {vocab_size}")
    special = special_tokens_of(data_cfg)
    path = cached_tokenizer_path(data_cfg, size)
    if path.is_file():
        log.info("tokenizer: using cached %s", path)
        return load_tokenizer(path, vocab_size, data_cfg.eos_token)
    texts = sources.training_texts(data_cfg, data_cfg.tokenizer_train_docs)
    log.info("tokenizer: training a %d-token byte-level BPE on up to %d documents of %s",
             size, data_cfg.tokenizer_train_docs, sources.describe(data_cfg))
    tokenizer = train_tokenizer(texts, size, special)
    save_tokenizer(tokenizer, path)
    log.info("tokenizer: cached as %s", path)
    check_tokenizer(tokenizer, str(path), vocab_size, data_cfg.eos_token)
    return tokenizer


def special_tokens_of(data_cfg) -> tuple[str, ...]:
    eos = (data_cfg.eos_token,) if data_cfg.eos_token else ()
    return eos + tuple(t for t in data_cfg.special_tokens if t != data_cfg.eos_token)


def cached_tokenizer_path(data_cfg, vocab_size: int) -> pathlib.Path:
    key = {
        "recipe": _TRAINING_RECIPE,
        "sources": sources.fingerprint(data_cfg),
        "vocab_size": vocab_size,
        "special_tokens": special_tokens_of(data_cfg),
        "docs": data_cfg.tokenizer_train_docs,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = pathlib.Path(os.path.expanduser(data_cfg.cache_dir)) / "tokenizers"
    return cache / f"bpe{vocab_size}-{digest}.json"


# --------------------------------------------------------------------------- pre-tokenizing


def encode_batches(tokenizer, texts: Iterable[str], batch: int = 1024) -> Iterator:
    """``encode_batch`` over chunks (the Rust side tokenizes a chunk in parallel); each document is
    framed as the tokenizer frames it (a SentencePiece model's BOS in front), as the pipeline does."""
    chunk = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            yield from tokenizer.encode_batch(chunk)
            chunk = []
    if chunk:
        yield from tokenizer.encode_batch(chunk)


def encode_to_file(data_cfg, tokenizer, eos_token: str, out: str, dtype: str = "uint16", limit: int = 0,
                   lines: bool = False):
    """Tokenize a source's documents (in order) into a flat file or an ArrayRecord file.

    ``eos_token=""`` appends nothing. ``lines=True`` encodes every non-empty stripped line of a
    document on its own, as Llama Think's ``pretokenize`` does (with its tokenizer.model and no
    EOS, the flat file is then that layout: BOS + ids per line); ``limit`` still counts documents.
    """
    eos = tokenizer.token_to_id(eos_token) if eos_token else None
    if eos_token and eos is None:
        raise DataError(f"tokenizer has no token {eos_token!r} to end documents with")
    tokenizer = plain_text_encoder(tokenizer)
    texts = sources.training_texts(data_cfg, limit or 2**62)
    if lines:
        texts = _stripped_lines(texts)
    tail = np.asarray([] if eos is None else [eos], np.int64)
    docs = (np.asarray(enc.ids) for enc in encode_batches(tokenizer, texts))
    if sources.kind_of_file(out) == "array_record":
        counted = []
        n_docs = token_shards.write_token_array_record(out, (counted.append(len(d)) or d for d in docs), dtype)
        return n_docs, sum(counted)
    n_docs = n_tokens = 0
    with open(out, "wb") as f:
        for doc in docs:
            doc = np.append(doc, tail)
            token_shards.check_fits(doc, dtype, out)
            f.write(doc.astype(np.dtype(token_shards.DTYPES[dtype]).newbyteorder("<")).tobytes())
            n_docs, n_tokens = n_docs + 1, n_tokens + len(doc)
    return n_docs, n_tokens


def _stripped_lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty stripped lines, split at \\n, \\r\\n and \\r as a file read line by line in text mode is."""
    for text in texts:
        for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            line = line.strip()
            if line:
                yield line


# --------------------------------------------------------------------------- CLI


def _data_config(args):
    cfg = DataConfig(source=DataSource(args.source, kind=args.kind), text_column=args.text_column)
    cfg.validate()
    return cfg


def _cmd_train(args) -> None:
    cfg = _data_config(args)
    special = tuple(args.special) if args.special else (DEFAULT_EOS,)
    if args.vocab_size < 256 + len(special):  # byte-level: every byte is a token before any merge
        raise ConfigError(f"--vocab-size {args.vocab_size}: a byte-level BPE needs at least 256 + "
                          f"{len(special)} special = {256 + len(special)} tokens")
    tokenizer = train_tokenizer(sources.training_texts(cfg, args.docs), args.vocab_size, special)
    path = save_tokenizer(tokenizer, args.out)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"wrote {path}: {tokenizer.get_vocab_size()} tokens, sha256 {digest}")


def _cmd_encode(args) -> None:
    cfg = _data_config(args)
    tokenizer = load_tokenizer(args.tokenizer, None, args.eos)
    n_docs, n_tokens = encode_to_file(cfg, tokenizer, args.eos, args.out, args.dtype, args.docs, args.lines)
    print(f"wrote {args.out}: {n_docs} documents, {n_tokens} tokens ({args.dtype})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m jaxlm.data.tokenizer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_source_args(p):
        p.add_argument("--source", required=True, help="pydoc, a file, directory, glob, hf://org/name or tfds:name")
        p.add_argument("--kind", default="auto", help="source kind when the path does not tell (see docs/DATA.md)")
        p.add_argument("--text-column", default="text", help="field holding the text, or a '{a} {b}' template")

    train = commands.add_parser("train", help="train a byte-level BPE on the first N documents of a source")
    add_source_args(train)
    train.add_argument("--docs", type=positive_int, default=100_000, help="documents to train on (in source order)")
    train.add_argument("--vocab-size", type=positive_int, default=8192)
    train.add_argument("--special", action="append", help=f"special token (repeatable; default {DEFAULT_EOS})")
    train.add_argument("--out", required=True, help="tokenizer.json to write")
    train.set_defaults(run=_cmd_train)

    encode = commands.add_parser("encode", help="pre-tokenize a source into a flat token file")
    add_source_args(encode)
    encode.add_argument("--tokenizer", required=True, help="tokenizer.json, a SentencePiece .model, or their directory")
    encode.add_argument("--eos", default=DEFAULT_EOS, help="token appended after every document ('': none)")
    encode.add_argument("--lines", action="store_true",
                        help="encode each non-empty stripped line on its own (Llama Think's pretokenize layout)")
    encode.add_argument("--docs", type=non_negative_int, default=0, help="stop after N documents (0: all)")
    encode.add_argument("--dtype", choices=("uint16", "uint32"), default="uint16")
    encode.add_argument("--out", required=True, help=".bin (flat tokens) or .array_record (one record per doc)")
    encode.set_defaults(run=_cmd_encode)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.run(args)
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out in a folder that does not exist or cannot be written
        print(f"error: {e.filename or args.out}: {e.strerror or e}; check --out", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
