"""TFDS: prepare a corpus into tokenized ArrayRecord shards once, read any prepared dataset back.

    python -m jaxlm.data.tfds_builder --source data/fineweb-edu --tokenizer tokenizer.json \\
        --name fineweb_edu --data-dir ~/tensorflow_datasets

writes ``<data-dir>/jaxlm_tokenized/fineweb_edu/1.0.0/*.array_record-*`` (one example per
document, ``{"tokens": uint16|uint32[n]}`` without EOS), which a config then names as
``DataSource("tfds:jaxlm_tokenized/fineweb_edu")`` with ``data.tfds_data_dir``. Reading
(``tfds_source``) goes through ``tfds.data_source`` and needs neither TensorFlow nor this builder class: any dataset
prepared as ArrayRecord in a ``data_dir`` can be named the same way (``tfds:name[/config][:version]``),
with a ``tokens`` feature or a text feature (``text_column``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import re
import sys

import numpy as np

from jaxlm.config import DataConfig, DataSource
from jaxlm.data import sources
from jaxlm.data.tfds_source import TOKENS, import_tfds
from jaxlm.data.tokenizer import encode_batches, load_tokenizer, plain_text_encoder, tokenizer_file
from jaxlm.errors import ArgumentParser, DataError, JaxlmError, non_negative_int

log = logging.getLogger("jaxlm.data")

BUILDER_NAME = "jaxlm_tokenized"


def _builder_class():
    """Defined on first use, so that importing jaxlm.data does not import TFDS."""
    tfds = import_tfds()

    @dataclasses.dataclass
    class TokenizedConfig(tfds.core.BuilderConfig):
        source: str = ""
        kind: str = "auto"
        text_column: str = "text"
        tokenizer: str = ""
        dtype: str = "uint16"
        max_docs: int = 0

    class JaxlmTokenized(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A jaxlm source tokenized once: one example per document, ids without EOS."""

        VERSION = tfds.core.Version("1.0.0")
        name = BUILDER_NAME
        # Nothing is downloaded, so there is no checksums file to find next to the code; looking
        # for it needs the importlib_resources backport in TFDS 4.9.10.
        code_path = None

        def _info(self):
            cfg = self.builder_config
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"{cfg.source} tokenized with {os.path.basename(cfg.tokenizer)}",
                features=tfds.features.FeaturesDict({TOKENS: tfds.features.Tensor(
                    shape=(None,), dtype=np.dtype(cfg.dtype), encoding=tfds.features.Encoding.ZLIB)}),
                metadata=tfds.core.MetadataDict(**self._tokenizer_metadata()),
            )

        def _tokenizer_metadata(self) -> dict:
            cfg = self.builder_config
            tokenizer = load_tokenizer(cfg.tokenizer, eos_token=None)
            with open(tokenizer_file(cfg.tokenizer), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            return {"source": cfg.source, "tokenizer_sha256": digest,
                    "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            cfg = self.builder_config
            data_cfg = DataConfig(source=DataSource(cfg.source, kind=cfg.kind), text_column=cfg.text_column)
            tokenizer = plain_text_encoder(load_tokenizer(cfg.tokenizer, eos_token=None))
            limit = np.iinfo(np.dtype(cfg.dtype)).max
            texts = sources.training_texts(data_cfg, cfg.max_docs or 2**62)
            for index, encoding in enumerate(encode_batches(tokenizer, texts)):
                tokens = np.asarray(encoding.ids)
                if tokens.size and tokens.max() > limit:
                    raise DataError(f"{cfg.source}: token id {tokens.max()} does not fit {cfg.dtype}; use uint32")
                yield index, {TOKENS: tokens.astype(cfg.dtype)}

    return JaxlmTokenized, TokenizedConfig


def prepare(source: str, tokenizer: str, name: str, data_dir: str, *, kind: str = "auto",
            text_column: str = "text", max_docs: int = 0, overwrite: bool = False) -> str:
    """Tokenize ``source`` into ``data_dir/jaxlm_tokenized/<name>``; returns the ``tfds:`` spec."""
    tfds = import_tfds()

    if not re.fullmatch(r"[a-z0-9_\-.]+", name):
        raise DataError(f"TFDS name {name!r}: use lower-case letters, digits, '_', '-' and '.'")
    vocab = load_tokenizer(tokenizer, eos_token=None).get_vocab_size(with_added_tokens=True)
    # The source is opened here (its first document read), so that a missing or unreadable one is
    # reported before TFDS starts preparing.
    next(iter(sources.training_texts(DataConfig(source=DataSource(source, kind=kind), text_column=text_column), 1)),
         None)
    builder_cls, config_cls = _builder_class()
    config = config_cls(name=name, source=source, kind=kind, text_column=text_column, tokenizer=tokenizer,
                        dtype="uint16" if vocab <= 2**16 else "uint32", max_docs=max_docs)
    builder = builder_cls(config=config, data_dir=os.path.expanduser(data_dir), file_format="array_record")
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return f"tfds:{BUILDER_NAME}/{name}"


def quiet_tfds() -> None:
    """No TFDS progress bars and "Downloading and preparing" lines on a command line's console:
    the command prints its own one-line result."""
    import_tfds().disable_progress_bar()
    for name in ("absl", "tensorflow_datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m jaxlm.data.tfds_builder",
                                     description="Tokenize a corpus into TFDS ArrayRecord shards.")
    parser.add_argument("--source", required=True, help="a file, directory, glob or hf://org/name (see docs/DATA.md)")
    parser.add_argument("--kind", default="auto")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json")
    parser.add_argument("--name", required=True, help="the dataset's config name, e.g. fineweb_edu")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--docs", type=non_negative_int, default=0, help="stop after N documents (0: all)")
    parser.add_argument("--overwrite", action="store_true", help="prepare again even if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("jaxlm.data").setLevel(logging.INFO)
    try:
        quiet_tfds()
        spec = prepare(args.source, args.tokenizer, args.name, args.data_dir, kind=args.kind,
                       text_column=args.text_column, max_docs=args.docs, overwrite=args.overwrite)
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a data directory that cannot be written
        print(f"error: {e.filename or args.data_dir}: {e.strerror or e}; choose another --data-dir", file=sys.stderr)
        return 2
    print(f"prepared {spec} in {args.data_dir}; use DataSource({spec!r}) with data.tfds_data_dir={args.data_dir!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
