"""Reading a prepared TFDS dataset (ArrayRecord in a ``data_dir``) as random-access documents.

``tfds.data_source`` needs neither TensorFlow nor the builder that made the dataset, so any
dataset prepared as ArrayRecord can be named ``tfds:name[/config][:version]``: its ``tokens``
feature is read as token ids, else its text feature (``text_column``). ``tfds_builder`` makes
such datasets from a jaxlm source.
"""

from __future__ import annotations

import os

from jaxlm.data.documents import template_fields, text_of
from jaxlm.errors import DataError

TOKENS = "tokens"


def import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("TFDS sources need tensorflow-datasets (pip install 'jaxlm[tfds]')") from None
    return tfds


class TfdsRecords:
    """Random access to a prepared TFDS dataset: token arrays (``tokens``) or texts (``column``)."""

    def __init__(self, name: str, split: str, data_dir: str, column: str):
        self.name, self.split, self.data_dir, self.column = name, split, data_dir, column
        source = self._open()
        self._length = len(source)
        features = source.dataset_info.features
        self.tokenized = TOKENS in features
        if not self.tokenized and not set(template_fields(column)) <= set(features):
            raise DataError(f"tfds:{name}: no {column!r} feature; features: {', '.join(features)}; "
                            f"set data.text_column")
        if self._length == 0:
            raise DataError(f"tfds:{name} split {split!r} in {data_dir}: empty")
        metadata = source.dataset_info.metadata or {}
        self.vocab_size = metadata.get("vocab_size")
        self._source = source

    def _open(self):
        tfds = import_tfds()
        try:
            return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
        except Exception as e:  # DatasetNotFoundError, unknown split, wrong file format, ...
            prepared = sorted(p for p in os.listdir(self.data_dir) if not p.startswith(".")) \
                if os.path.isdir(self.data_dir) else []
            reason = str(e).strip().splitlines()[0]
            raise DataError(f"tfds:{self.name} split {self.split!r} in {self.data_dir}: cannot open ({reason}); "
                            f"datasets there: {', '.join(prepared) or '(none)'}") from None

    def __len__(self) -> int:
        return self._length

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

    def where(self, index: int) -> str:
        return f"tfds:{self.name} ({self.data_dir}) {self.split} record {index}"

    def __getitem__(self, index: int):
        if self._source is None:
            self._source = self._open()
        record = self._source[index]
        if self.tokenized:
            return record[TOKENS]
        return text_of(record, self.column, self.where(index))
