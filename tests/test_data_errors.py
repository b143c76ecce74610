"""Bad input ends in one clear line naming the file (and line or record), as a DataError/ConfigError."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxlm.config import Config, DataConfig, DataSource, validate
from jaxlm.data import make_batch_iterator, sources, train_tokenizer
from jaxlm.data.sources import resolve
from jaxlm.data.token_shards import TokenFile, write_token_array_record, write_token_file
from jaxlm.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["plain words and more words"] * 10, 300)


def _first_batch(path, tok, **kw):
    data = DataConfig(source=DataSource(str(path), **kw), heldout_fraction=0.0)
    return next(make_batch_iterator(data, tok, seq_len=7, batch_size=1, seed=0))


def _raises(error, pattern, fn, *args, **kw):
    with pytest.raises(error, match=pattern) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value), "one line"
    return info.value


def test_missing_paths_and_empty_files(tmp_path, tok):
    _raises(DataError, r"nope\.jsonl: no such file or directory", _first_batch, tmp_path / "nope.jsonl", tok)
    for name in ("empty.txt", "empty.jsonl", "empty.parquet", "empty.bin"):
        (tmp_path / name).write_bytes(b"")
        _raises(DataError, rf"{name}: empty file", _first_batch, tmp_path / name, tok)
    (tmp_path / "blank.jsonl").write_text("\n\n  \n".replace("  ", ""))
    _raises(DataError, r"blank\.jsonl: no documents \(only blank lines\)", _first_batch, tmp_path / "blank.jsonl", tok)
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "norows.parquet")
    _raises(DataError, r"norows\.parquet: empty file \(no rows\)", _first_batch, tmp_path / "norows.parquet", tok)


def test_invalid_utf8_names_the_file_and_line(tmp_path, tok):
    (tmp_path / "bad.txt").write_bytes(b"good start \xff\xfe bad bytes")
    _raises(DataError, r"bad\.txt: invalid UTF-8 at byte 11", _first_batch, tmp_path / "bad.txt", tok)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    _raises(DataError, r"bad\.jsonl:2: invalid UTF-8", _first_batch, tmp_path / "bad.jsonl", tok)


def test_bad_json_lines_name_file_and_line(tmp_path, tok):
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    _raises(DataError, r"broken\.jsonl:2: not valid JSON", _first_batch, tmp_path / "broken.jsonl", tok)
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    _raises(DataError, r"list\.jsonl:2: a JSON list, expected an object", _first_batch, tmp_path / "list.jsonl", tok)
    (tmp_path / "array.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    _raises(DataError, r"array\.json: a JSON array, not JSON lines", _first_batch, tmp_path / "array.json", tok)


def test_missing_text_column_names_the_file_and_the_columns(tmp_path, tok):
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    _raises(DataError, r"d\.jsonl:1: no 'text' field; fields: content, id; set data.text_column",
            _first_batch, tmp_path / "d.jsonl", tok)
    pq.write_table(pa.table({"content": ["x"], "id": ["1"]}), tmp_path / "p.parquet")
    _raises(DataError, r"p\.parquet: no 'text' column; columns: content, id", _first_batch, tmp_path / "p.parquet", tok)
    data = DataConfig(source=str(tmp_path / "p.parquet"))
    _raises(DataError, r"p\.parquet: no 'text' column", lambda: list(sources.training_texts(data, 5)))
    _raises(DataError, r"d\.jsonl:1: field 'answer' of the template",
            _first_batch, tmp_path / "d.jsonl", tok, text_column="{content} {answer}")
    (tmp_path / "n.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    _raises(DataError, r"n\.jsonl:1: field 'text' is int, not text", _first_batch, tmp_path / "n.jsonl", tok)


def test_token_files_of_the_wrong_size_or_vocabulary(tmp_path, tok):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    _raises(DataError, r"odd\.bin: 3 bytes is not a whole number of uint16 tokens", _first_batch, tmp_path / "odd.bin", tok)
    (tmp_path / "six.bin").write_bytes(bytes(6))
    _raises(DataError, r"six\.bin: 6 bytes is not a whole number of uint32 tokens",
            TokenFile, str(tmp_path / "six.bin"), "uint32")
    header = np.zeros(256, np.int32)
    header[:3] = (20240520, 1, 100)
    (tmp_path / "short.bin").write_bytes(header.tobytes() + np.arange(50, dtype=np.uint16).tobytes())
    _raises(DataError, r"short\.bin: header promises 100 tokens, the file holds 50", TokenFile, str(tmp_path / "short.bin"))
    vocab = tok.get_vocab_size()
    write_token_file(str(tmp_path / "big.bin"), np.r_[np.arange(20), vocab, np.arange(20)])
    big = DataConfig(source=str(tmp_path / "big.bin"), heldout_fraction=0.0)
    it = make_batch_iterator(big, tok, seq_len=7, batch_size=1, seed=0)
    _raises(DataError, rf"big\.bin: token id {vocab} >= vocabulary size {vocab} \(near token 20\)",
            lambda: [next(it) for _ in range(5)])
    write_token_array_record(str(tmp_path / "big.array_record"), [np.arange(5), np.array([1, vocab - 1, vocab])])
    data = DataConfig(source=str(tmp_path / "big.array_record"), heldout_fraction=0.0)
    it = make_batch_iterator(data, tok, seq_len=3, batch_size=1, seed=0)
    _raises(DataError, rf"big\.array_record record 1: token id {vocab} >= vocabulary size {vocab}",
            lambda: [next(it) for _ in range(10)])
    _raises(DataError, r"does not fit uint16; use uint32", write_token_file, str(tmp_path / "w.bin"), np.array([70000]))


def test_array_record_of_another_token_size(tmp_path, tok):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "odd.array_record"), "group_size:1")
    writer.write(b"\x01\x00\x02")
    writer.close()
    _raises(DataError, r"odd\.array_record record 0: 3 bytes is not a whole number of uint16 tokens",
            _first_batch, tmp_path / "odd.array_record", tok)


def test_errors_from_worker_processes_keep_their_type_and_message(tmp_path, tok):
    (tmp_path / "w.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{oops\n')
    data = DataConfig(source=str(tmp_path / "w.jsonl"), heldout_fraction=0.0, num_workers=2)
    it = make_batch_iterator(data, tok, seq_len=7, batch_size=1, seed=0)
    try:
        _raises(DataError, r"w\.jsonl:3: not valid JSON", lambda: [next(it) for _ in range(20)])
    finally:
        it.close()


def test_ambiguous_directories_and_unknown_datasets(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    pq.write_table(pa.table({"text": ["b"]}), tmp_path / "b.parquet")
    _raises(DataError, r"holds several kinds of files \(1 jsonl, 1 parquet\)", _first_batch, tmp_path, tok)
    assert resolve(DataSource(str(tmp_path), kind="parquet"), DataConfig()).files == [str(tmp_path / "b.parquet")]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.md").write_text("hi")
    _raises(DataError, r"notes: no data files", _first_batch, tmp_path / "notes", tok)
    data = DataConfig(source="tfds:no_such_dataset", tfds_data_dir=str(tmp_path))
    _raises(DataError, r"tfds:no_such_dataset split 'train' in .*: cannot open",
            make_batch_iterator, data, tok, seq_len=7, batch_size=1, seed=0)


def test_mixture_config_errors_name_the_entry():
    def check(data):
        validate(Config(model=_Model(), data=data))

    _raises(ConfigError, r"data.source\[1\].weight = 0: must be > 0", check,
            DataConfig(source=(DataSource("a"), DataSource("b", weight=0))))
    _raises(ConfigError, r"data.source\[0\].kind = 'csv'", check, DataConfig(source=(DataSource("a", kind="csv"),)))
    _raises(ConfigError, r"data.source = \(\): an empty mixture", check, DataConfig(source=()))
    _raises(ConfigError, r"data.source\[0\].token_dtype = 'int8'", check,
            DataConfig(source=(DataSource("a.bin", token_dtype="int8"),)))


class _Model:
    """Stands in for a family config: only DataConfig is under test here."""


_Model = __import__("dataclasses").dataclass(_Model)
