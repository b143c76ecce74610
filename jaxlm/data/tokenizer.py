"""Byte-level BPE tokenizers: deterministic training, loading with checks, a cache, a CLI.

    python -m jaxlm.data.tokenizer train --source data/fineweb-edu --docs 100000 \\
        --vocab-size 8192 --out tokenizer.json
    python -m jaxlm.data.tokenizer encode --source corpus.jsonl --tokenizer tokenizer.json \\
        --out corpus.bin                      # nanoGPT-style flat uint16 tokens, EOS after each doc

Training is deterministic: the same documents, vocabulary size and special tokens give a
byte-identical ``tokenizer.json`` (the BPE trainer breaks ties between equally frequent
pairs by the pair itself, and the JSON is written with sorted vocabulary).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence

from jaxlm.errors import ConfigError, DataError, JaxlmError

log = logging.getLogger("jaxlm.data")

DEFAULT_EOS = "<|endoftext|>"
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


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None, eos_token: str | None = DEFAULT_EOS):
    """Load any Hugging Face ``tokenizers`` JSON and check it fits a model of ``vocab_size``."""
    from tokenizers import Tokenizer

    path = pathlib.Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise DataError(f"tokenizer {path}: file not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exceptions with long messages
        raise DataError(f"tokenizer {path}: not a Hugging Face tokenizers JSON ({str(e).splitlines()[0]})") from None
    check_tokenizer(tokenizer, str(path), vocab_size, eos_token)
    return tokenizer


def plain_text_encoder(tokenizer):
    """A copy that encodes special-token strings inside a document as plain text.

    A web page that happens to contain "<|endoftext|>" must not end its document early.
    (``tokenizers`` forgets this setting when pickled, so copy it where it is used.)
    """
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    return copy


def check_tokenizer(tokenizer, name: str, vocab_size: int | None, eos_token: str | None) -> None:
    """The model must have an embedding row for every id the tokenizer can produce."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size > vocab_size:
        raise DataError(f"tokenizer {name}: {size} tokens do not fit the model's vocab_size {vocab_size}; "
                        f"raise model.vocab_size to >= {size} or use a smaller tokenizer")
    if eos_token:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer {name}: has no token {eos_token!r} to end documents with; "
                            f"set data.eos_token to one of its special tokens")
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
    from jaxlm.data import sources

    texts = sources.training_texts(data_cfg, data_cfg.tokenizer_train_docs)
    log.info("tokenizer: training a %d-token byte-level BPE on up to %d documents of %s",
             size, data_cfg.tokenizer_train_docs, sources.describe(data_cfg))
    tokenizer = train_tokenizer(texts, size, special)
    save_tokenizer(tokenizer, path)
    log.info("tokenizer: cached as %s", path)
    check_tokenizer(tokenizer, str(path), vocab_size, data_cfg.eos_token)
    return tokenizer


def special_tokens_of(data_cfg) -> tuple[str, ...]:
    return (data_cfg.eos_token,) + tuple(t for t in data_cfg.special_tokens if t != data_cfg.eos_token)


def cached_tokenizer_path(data_cfg, vocab_size: int) -> pathlib.Path:
    from jaxlm.data import sources

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


# --------------------------------------------------------------------------- CLI


def _data_config(args):
    from jaxlm.config import DataConfig, DataSource

    cfg = DataConfig(source=DataSource(args.source, kind=args.kind), text_column=args.text_column)
    cfg.validate()
    return cfg


def _cmd_train(args) -> None:
    from jaxlm.data import sources

    cfg = _data_config(args)
    special = tuple(args.special) if args.special else (DEFAULT_EOS,)
    tokenizer = train_tokenizer(sources.training_texts(cfg, args.docs), args.vocab_size, special)
    path = save_tokenizer(tokenizer, args.out)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"wrote {path}: {tokenizer.get_vocab_size()} tokens, sha256 {digest}")


def _cmd_encode(args) -> None:
    from jaxlm.data import token_shards

    cfg = _data_config(args)
    tokenizer = load_tokenizer(args.tokenizer, None, args.eos)
    n_docs, n_tokens = token_shards.encode_to_file(cfg, tokenizer, args.eos, args.out, args.dtype, args.docs)
    print(f"wrote {args.out}: {n_docs} documents, {n_tokens} tokens ({args.dtype})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.data.tokenizer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_source_args(p):
        p.add_argument("--source", required=True, help="pydoc, a file, directory, glob, hf://org/name or tfds:name")
        p.add_argument("--kind", default="auto", help="source kind when the path does not tell (see docs/DATA.md)")
        p.add_argument("--text-column", default="text", help="field holding the text, or a '{a} {b}' template")

    train = commands.add_parser("train", help="train a byte-level BPE on the first N documents of a source")
    add_source_args(train)
    train.add_argument("--docs", type=int, default=100_000, help="documents to train on (in source order)")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--special", action="append", help=f"special token (repeatable; default {DEFAULT_EOS})")
    train.add_argument("--out", required=True, help="tokenizer.json to write")
    train.set_defaults(run=_cmd_train)

    encode = commands.add_parser("encode", help="pre-tokenize a source into a flat token file")
    add_source_args(encode)
    encode.add_argument("--tokenizer", required=True)
    encode.add_argument("--eos", default=DEFAULT_EOS, help="token appended after every document")
    encode.add_argument("--docs", type=int, default=0, help="stop after N documents (0: all)")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
