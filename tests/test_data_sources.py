"""Sources: text, JSONL, Parquet (FineWeb layout), the hub code path on a local mirror, pre-tokenized files."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxlm.config import DataConfig, DataSource
from jaxlm.data import make_batch_iterator, sources, train_tokenizer
from jaxlm.data.sources import Documents, StreamedDocuments, TokenStream, resolve
from jaxlm.data.token_shards import (TokenArrayRecords, TokenFile, TokenWindows, write_token_array_record,
                                     write_token_file)
from jaxlm.errors import DataError

WORDS = "the school students learn science history math reading water energy".split()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([" ".join(WORDS)] * 20 + ["doc0123456789"] * 5, 320)


def _docs(prefix, n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"{prefix}{i:03d} " + " ".join(rng.choice(WORDS, int(rng.integers(4, 30)))) for i in range(n)]


def make_fineweb(root, docs_per_shard=30, dumps=("CC-MAIN-2024-10", "CC-MAIN-2024-18"), shards=2):
    """A directory laid out like HuggingFaceFW/fineweb-edu: data/<dump>/<shard>.parquet + a card."""
    texts, n = [], 0
    for dump in dumps:
        folder = root / "data" / dump
        folder.mkdir(parents=True)
        for shard in range(shards):
            part = _docs("doc", docs_per_shard, seed=n)
            part = [f"fw{n + i:04d} {t}" for i, t in enumerate(part)]
            table = pa.table({"text": part, "id": [f"<urn:uuid:{n + i}>" for i in range(len(part))],
                              "dump": [dump] * len(part), "score": np.linspace(2.5, 4.0, len(part))})
            pq.write_table(table, folder / f"{shard:03d}_00000.parquet", row_group_size=11)
            texts += part
            n += len(part)
    sample = root / "sample" / "10BT"
    sample.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["sample only"], "id": ["x"]}), sample / "000_00000.parquet")
    (root / "README.md").write_text(
        "---\nlicense: odc-by\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/*/*\n- config_name: sample-10BT\n  data_files:\n  - split: train\n"
        "    path: sample/10BT/*\n---\n# FineWeb-Edu\n", encoding="utf-8")
    return texts


def _window_docs(batches, tok):
    """Documents (as text) completed inside a stream of batches from one process and worker."""
    eos = tok.token_to_id("<|endoftext|>")
    stream = np.concatenate(batches).ravel()
    cuts = np.flatnonzero(stream == eos)
    pieces = np.split(stream, cuts + 1)[:-1]
    return [tok.decode(p[:-1].tolist()) for p in pieces]


# --------------------------------------------------------------------------- text and JSONL


def test_text_files_are_one_document_each_and_hidden_files_are_ignored(tmp_path):
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second\n\ndocument", encoding="utf-8")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c.txt").write_text("not data")
    (tmp_path / "README.md").write_text("not data either")
    resolved = resolve(DataSource(str(tmp_path)), DataConfig())
    assert isinstance(resolved, Documents)
    assert [resolved.reader[i] for i in range(len(resolved.reader))] == ["first document", "second\n\ndocument"]


def test_jsonl_reads_every_line_and_counts_skipped_blank_lines(tmp_path, caplog):
    docs = ["alpha", "beta \u00e9\u4e2d", "gamma"]
    body = json.dumps({"text": docs[0], "id": 1}) + "\r\n\r\n" + json.dumps({"text": docs[1]}) + "\n\n\n" + \
        json.dumps({"text": docs[2]})  # CRLF, blank lines, no final newline
    (tmp_path / "d.jsonl").write_text(body, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="jaxlm.data"):
        reader = resolve(DataSource(str(tmp_path / "d.jsonl")), DataConfig()).reader
    assert [reader[i] for i in range(len(reader))] == docs
    assert "skipped 3 blank lines" in caplog.text


def test_jsonl_template_joins_fields(tmp_path):
    (tmp_path / "qa.jsonl").write_text(json.dumps({"query": "2+2?", "response": "4"}) + "\n", encoding="utf-8")
    entry = DataSource(str(tmp_path / "qa.jsonl"), text_column="Q: {query}\nA: {response}")
    assert resolve(entry, DataConfig()).reader[0] == "Q: 2+2?\nA: 4"


def test_glob_selects_files_across_shards(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "other"}) + "\n")
    reader = resolve(DataSource(str(tmp_path / "part-*.jsonl")), DataConfig()).reader
    assert [reader[i] for i in range(len(reader))] == ["doc 0", "doc 1", "doc 2"]


# --------------------------------------------------------------------------- Parquet and the hub


def test_fineweb_parquet_directory_streams_every_document(tmp_path, tok):
    texts = make_fineweb(tmp_path / "fw")
    data = DataConfig(source=str(tmp_path / "fw" / "data"), heldout_fraction=0.0, shuffle_buffer=16)
    resolved = resolve(data.sources[0], data)
    assert isinstance(resolved, StreamedDocuments) and len(resolved.files) == 4
    tokens = sum(len(tok.encode(t).ids) + 1 for t in texts)
    it = make_batch_iterator(data, tok, seq_len=63, batch_size=2, seed=0)
    seen = _window_docs([next(it) for _ in range(3 * tokens // 128)], tok)
    # Files are read whole and the next epoch's files open as earlier ones finish, so epochs
    # overlap a little: over three epochs' worth, every document is seen 2 to 4 times.
    counts = {t: seen.count(t) for t in texts}
    assert set(seen) == set(texts) and min(counts.values()) >= 2 and max(counts.values()) <= 4
    assert seen[:10] != texts[:10]   # shuffled, not in file order


def test_hub_dataset_reads_the_default_config_of_a_local_mirror(tmp_path, monkeypatch, tok):
    texts = make_fineweb(tmp_path / "mirror" / "HuggingFaceFW" / "fineweb-edu")
    monkeypatch.setenv(sources.HUB_MIRROR_ENV, str(tmp_path / "mirror"))
    files, filesystem = sources.hub_parquet_files("hf://HuggingFaceFW/fineweb-edu")
    assert [f.split("fineweb-edu/")[1] for f in files] == [
        "data/CC-MAIN-2024-10/000_00000.parquet", "data/CC-MAIN-2024-10/001_00000.parquet",
        "data/CC-MAIN-2024-18/000_00000.parquet", "data/CC-MAIN-2024-18/001_00000.parquet"]
    sample, _ = sources.hub_parquet_files("hf:HuggingFaceFW/fineweb-edu/sample/10BT")
    assert len(sample) == 1 and sample[0].endswith("sample/10BT/000_00000.parquet")
    # Through the whole pipeline, as a config names it; first documents in file order train the tokenizer.
    data = DataConfig(source="hf://HuggingFaceFW/fineweb-edu", shuffle_buffer=8)
    assert list(sources.training_texts(data, 3)) == texts[:3]
    batch = next(make_batch_iterator(data, tok, seq_len=31, batch_size=2, seed=0))
    assert batch.shape == (2, 32)
    with pytest.raises(DataError, match="no Parquet files under .*fineweb-edu/nothing"):
        sources.hub_parquet_files("hf://HuggingFaceFW/fineweb-edu/nothing")


def test_streamed_state_restores_exactly_through_json(tmp_path, tok):
    make_fineweb(tmp_path / "fw")
    data = DataConfig(source=str(tmp_path / "fw" / "data"), shuffle_buffer=16)
    it = make_batch_iterator(data, tok, seq_len=31, batch_size=2, seed=1)
    for _ in range(13):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = make_batch_iterator(data, tok, seq_len=31, batch_size=2, seed=1)
    resumed.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(resumed), e)


def test_streamed_heldout_is_disjoint_from_train(tmp_path, tok):
    texts = make_fineweb(tmp_path / "fw")
    data = DataConfig(source=str(tmp_path / "fw" / "data"), heldout_fraction=0.2, shuffle_buffer=8)
    held_it = make_batch_iterator(data, tok, seq_len=31, batch_size=2, seed=0, split="heldout")
    held = set(_window_docs([next(held_it) for _ in range(20)], tok))
    train_it = make_batch_iterator(data, tok, seq_len=31, batch_size=2, seed=0)
    train = set(_window_docs([next(train_it) for _ in range(80)], tok))
    assert held and train and not held & train
    assert held | train <= set(texts)
    assert 0.05 < len(held) / len(texts) < 0.4   # a hash decides: about the fraction asked


# --------------------------------------------------------------------------- pre-tokenized


def test_flat_token_files_are_cut_into_consecutive_windows(tmp_path):
    tokens = np.arange(1000, dtype=np.int64) % 500
    write_token_file(str(tmp_path / "train.bin"), tokens, "uint16")
    assert (tmp_path / "train.bin").stat().st_size == 2000
    windows = TokenWindows([TokenFile(str(tmp_path / "train.bin"))], window=33, vocab_size=500)
    assert len(windows) == 1000 // 33
    np.testing.assert_array_equal(windows[0], tokens[:33])
    np.testing.assert_array_equal(windows[29], tokens[29 * 33:30 * 33])
    assert windows[5].dtype == np.int32


def test_llmc_header_and_uint32_files(tmp_path):
    tokens = np.arange(70_000, 70_500, dtype=np.uint32)
    header = np.zeros(256, np.int32)
    header[:3] = (20240520, 2, len(tokens))
    (tmp_path / "fineweb_train_000001.bin").write_bytes(header.tobytes() + tokens.tobytes())
    file = TokenFile(str(tmp_path / "fineweb_train_000001.bin"))
    assert file.dtype == np.uint32 and file.count == 500
    np.testing.assert_array_equal(file.tokens(), tokens)
    write_token_file(str(tmp_path / "raw32.bin"), tokens, "uint32")
    np.testing.assert_array_equal(TokenFile(str(tmp_path / "raw32.bin"), "uint32").tokens(), tokens)


def test_token_files_through_the_pipeline_restore_and_hold_out(tmp_path, tok):
    stream = np.arange(6000) % 317  # ids < 320; the 60 windows all differ (317 is prime)
    write_token_file(str(tmp_path / "a.bin"), stream[:3000])
    write_token_file(str(tmp_path / "b.bin"), stream[3000:])
    data = DataConfig(source=str(tmp_path / "*.bin"), heldout_fraction=0.1)
    assert isinstance(resolve(data.sources[0], data), TokenStream)
    it = make_batch_iterator(data, tok, seq_len=99, batch_size=4, seed=0)
    train = np.concatenate([next(it) for _ in range(14)])           # 56 windows: one epoch of 54, repeated
    held = next(make_batch_iterator(data, tok, seq_len=99, batch_size=6, seed=0, split="heldout"))
    as_rows = lambda a: {r.tobytes() for r in a}                    # noqa: E731
    windows = {stream[i:i + 100].astype(np.int32).tobytes() for i in range(0, 6000, 100)}
    assert as_rows(train) | as_rows(held) <= windows
    assert len(as_rows(train)) == 54 and len(as_rows(held)) == 6 and not as_rows(train) & as_rows(held)
    state = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    resumed = make_batch_iterator(data, tok, seq_len=99, batch_size=4, seed=0)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed), expected)


def test_array_record_documents_get_eos_and_pack(tmp_path, tok):
    docs = [np.arange(i + 1, i + 6 + i % 7) for i in range(40)]  # no id 0: that is EOS
    write_token_array_record(str(tmp_path / "docs.array_record"), docs)
    reader = TokenArrayRecords([str(tmp_path / "docs.array_record")])
    assert len(reader) == 40 and all((reader[i] == docs[i]).all() for i in range(40))
    data = DataConfig(source=str(tmp_path / "docs.array_record"), heldout_fraction=0.0)
    eos = tok.token_to_id("<|endoftext|>")
    it = make_batch_iterator(data, tok, seq_len=15, batch_size=1, seed=0)
    stream = np.concatenate([next(it) for _ in range(20)]).ravel()
    pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]
    expected = {tuple(d) + (eos,) for d in docs}
    assert len(pieces) > 10 and all(tuple(p) in expected for p in pieces)
