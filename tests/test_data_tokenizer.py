"""Tokenizer training (deterministic bytes), loading checks, the cache and the CLI."""

import hashlib
import json

import pytest

from conftest import subprocess_env
from jaxlm.config import DataConfig, DataSource
from jaxlm.data import tokenizer as tokmod
from jaxlm.data.tokenizer import load_tokenizer, load_tokenizer_for, main, save_tokenizer, train_tokenizer
from jaxlm.errors import ConfigError, DataError


def _write_jsonl(path, n):
    lines = [json.dumps({"text": f"Document {i}: the quick brown fox {i % 7} jumps over {i * 13 % 31} lazy dogs."})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_training_twice_gives_byte_identical_files(tmp_path):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", 200)
    outs = []
    for name in ("a.json", "b.json"):
        out = tmp_path / name
        assert main(["train", "--source", str(corpus), "--docs", "150", "--vocab-size", "320",
                     "--special", "<|endoftext|>", "--special", "<|pad|>", "--out", str(out)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    tok = load_tokenizer(tmp_path / "a.json", vocab_size=320)
    assert tok.get_vocab_size() == 320
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|pad|>") == 1
    text = "Document 3: the quick brown fox — ünïcödé 🦊"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: any text round-trips


def test_training_uses_only_the_first_n_documents(tmp_path):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", 50)
    cfg = DataConfig(source=str(corpus))
    from jaxlm.data import sources

    texts = list(sources.training_texts(cfg, 20))
    assert len(texts) == 20 and texts[0].startswith("Document 0:") and texts[-1].startswith("Document 19:")
    direct = train_tokenizer(texts, 300)
    via_cli = tmp_path / "tok.json"
    main(["train", "--source", str(corpus), "--docs", "20", "--vocab-size", "300", "--out", str(via_cli)])
    assert via_cli.read_text(encoding="utf-8") == direct.to_str(pretty=True)


def test_vocabulary_larger_than_the_model_is_refused(tmp_path):
    path = save_tokenizer(train_tokenizer(["hello world"] * 20, 300), tmp_path / "tok.json")
    size = load_tokenizer(path).get_vocab_size()  # a tiny corpus stops BPE before 300
    assert 257 < size <= 300
    assert load_tokenizer(path, vocab_size=size).get_vocab_size() == size
    with pytest.raises(DataError, match=rf"tok\.json: {size} tokens do not fit the model's vocab_size {size - 1}"):
        load_tokenizer(path, vocab_size=size - 1)


def test_missing_eos_and_bad_files_are_named(tmp_path):
    path = save_tokenizer(train_tokenizer(["hello world"] * 20, 300, special_tokens=("<s>",)), tmp_path / "t.json")
    with pytest.raises(DataError, match=r"t\.json: has no token '<\|endoftext\|>'"):
        load_tokenizer(path, vocab_size=512)
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="junk.json: not a Hugging Face tokenizers JSON"):
        load_tokenizer(tmp_path / "junk.json")
    with pytest.raises(ConfigError, match="at least 257"):
        train_tokenizer(["x"], 256)


def test_load_tokenizer_for_trains_once_then_reuses_the_cache(tmp_path, monkeypatch):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", 100)
    cfg = DataConfig(source=str(corpus), cache_dir=str(tmp_path / "cache"), vocab_size=300)
    first = load_tokenizer_for(cfg, vocab_size=512)
    assert first.get_vocab_size() == 300
    cached = list((tmp_path / "cache" / "tokenizers").glob("*.json"))
    assert len(cached) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(tokmod, "train_tokenizer", no_training)
    again = load_tokenizer_for(cfg, vocab_size=512)
    assert again.to_str() == first.to_str()
    # Another vocabulary is another cache entry (and needs training).
    with pytest.raises(AssertionError, match="retrained"):
        load_tokenizer_for(DataConfig(source=str(corpus), cache_dir=str(tmp_path / "cache")), vocab_size=400)
    # Changing the corpus changes the key.
    _write_jsonl(corpus, 101)
    with pytest.raises(AssertionError, match="retrained"):
        load_tokenizer_for(cfg, vocab_size=512)


def test_load_tokenizer_for_defaults_to_the_model_vocabulary_and_checks_data_vocab(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))  # pydoc
    tok = load_tokenizer_for(cfg, vocab_size=384)
    assert tok.get_vocab_size() == 384 and tok.token_to_id("<|endoftext|>") == 0
    with pytest.raises(ConfigError, match="data.vocab_size = 500: larger than the model's vocab_size 384"):
        load_tokenizer_for(DataConfig(cache_dir=str(tmp_path), vocab_size=500), vocab_size=384)
    named = DataConfig(tokenizer=str(next((tmp_path / "tokenizers").glob("*.json"))))
    with pytest.raises(DataError, match="do not fit the model's vocab_size 300"):
        load_tokenizer_for(named, vocab_size=300)


def test_pretokenized_sources_need_a_named_tokenizer(tmp_path):
    import numpy as np

    (tmp_path / "train.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    cfg = DataConfig(source=DataSource(str(tmp_path / "train.bin")), cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="train.bin: is already tokenized; .* set data.tokenizer"):
        load_tokenizer_for(cfg, vocab_size=512)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert main(["train", "--source", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.jsonl: no such file or directory" in err


def test_trained_file_hash_is_stable_across_processes(tmp_path):
    """Determinism across interpreters, not just within one (hash seeds, thread pools)."""
    import subprocess
    import sys

    corpus = _write_jsonl(tmp_path / "corpus.jsonl", 120)
    digests = set()
    for i, threads in enumerate(("1", "2")):
        out = tmp_path / f"t{i}.json"
        subprocess.run([sys.executable, "-m", "jaxlm.data.tokenizer", "train", "--source", str(corpus),
                        "--vocab-size", "330", "--out", str(out)], check=True, capture_output=True, timeout=300,
                       # base={}: only what is set here, so the two runs differ in threads and hash seed alone.
                       env=subprocess_env(base={}, RAYON_NUM_THREADS=threads, PYTHONHASHSEED=str(i),
                                          PATH="/usr/bin:/bin"))
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_encode_cli_writes_flat_and_array_record_tokens(tmp_path):
    import numpy as np

    from jaxlm.data.token_shards import TokenArrayRecords, TokenFile

    corpus = _write_jsonl(tmp_path / "corpus.jsonl", 30)
    tok_path = tmp_path / "tok.json"
    main(["train", "--source", str(corpus), "--vocab-size", "300", "--out", str(tok_path)])
    tok = load_tokenizer(tok_path)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    eos = tok.token_to_id("<|endoftext|>")
    assert main(["encode", "--source", str(corpus), "--tokenizer", str(tok_path), "--out", str(tmp_path / "c.bin")]) == 0
    expected = np.concatenate([tok.encode(d).ids + [eos] for d in docs])
    np.testing.assert_array_equal(TokenFile(str(tmp_path / "c.bin")).tokens(), expected)
    assert main(["encode", "--source", str(corpus), "--tokenizer", str(tok_path), "--docs", "7",
                 "--out", str(tmp_path / "c.array_record")]) == 0
    records = TokenArrayRecords([str(tmp_path / "c.array_record")])
    assert len(records) == 7 and all(records[i].tolist() == tok.encode(docs[i]).ids for i in range(7))

