"""Llama Think's pre-tokenized shards (spec §14) are a data source as they are: raw little-endian
uint16 with no header, every non-empty stripped line of the raw text encoded with BOS in front and
no EOS, ``data/fineweb/shard_NNNNN.bin`` beside the raw text in ``data/fineweb/raw/``.

The files here are written the way the upstream ``pretokenize`` writes them, independently of jaxlm's
writers, and read back through ``data.source``."""

import numpy as np
import pytest

from conftest import fixture_dir
from jaxlm.config import DataConfig, DataSource
from jaxlm.data import make_batch_iterator
from jaxlm.data.sources import TokenStream, resolve
from jaxlm.data.token_shards import TokenFile
from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer
from jaxlm.errors import DataError

BOS, EOS = "<s>", "</s>"
WORDS = "whale ocean krill deep current salt wave tide reef coral".split()


@pytest.fixture(scope="module")
def tok():
    """A custom-vocabulary tokenizer (upstream's ``data/fw_tok{V}/`` shards), with BOS/EOS like Llama's."""
    return train_tokenizer([" ".join(WORDS)] * 20 + ["0123456789 line"] * 5, 300, special_tokens=(EOS, BOS))


def _raw_text(shard: int, docs: int = 12, seed: int = 0) -> str:
    """A raw shard as ``download`` writes it: documents stripped, each followed by a newline,
    internal newlines (paragraphs, blank lines, indentation) kept."""
    rng = np.random.default_rng(seed + shard)
    out = []
    for d in range(docs):
        paragraphs = [f"s{shard}d{d}p{p} " + " ".join(rng.choice(WORDS, int(rng.integers(3, 12))))
                      for p in range(int(rng.integers(1, 4)))]
        out.append("\n\n  ".join(paragraphs).strip() + "\n")
    return "".join(out)


def _pretokenize(raw: str, encode, bos_id: int) -> np.ndarray:
    """Upstream ``pretokenize`` for one shard: line by line, BOS + ids of each non-empty stripped line."""
    ids = []
    for line in raw.split("\n"):
        line = line.strip()
        if line:
            ids += [bos_id] + list(encode(line))
    return np.asarray(ids, dtype="<u2")


def _upstream_layout(root, tok, shards=3):
    """``root/raw/shard_NNNNN.txt`` and ``root/shard_NNNNN.bin``; returns each shard's tokens."""
    (root / "raw").mkdir(parents=True)
    bos = tok.token_to_id(BOS)
    tokens = []
    for s in range(shards):
        raw = _raw_text(s)
        (root / "raw" / f"shard_{s:05d}.txt").write_text(raw, encoding="utf-8")
        ids = _pretokenize(raw, lambda line: tok.encode(line, add_special_tokens=False).ids, bos)
        (root / f"shard_{s:05d}.bin").write_bytes(ids.tobytes())  # raw little-endian uint16, no header
        tokens.append(ids)
    return tokens


def _epoch(cfg, tok, seq_len):
    """Every window of one epoch (heldout 0), as sorted tuples."""
    stream = resolve(cfg.sources[0], cfg)
    count = sum(f.count // (seq_len + 1) for f in stream.files)
    it = make_batch_iterator(cfg, tok, seq_len=seq_len, batch_size=1, seed=3)
    try:
        return sorted(tuple(next(it)[0].tolist()) for _ in range(count))
    finally:
        it.close()


def _windows(tokens, seq_len):
    """Non-overlapping windows of seq_len + 1 tokens of each shard (a shard's short tail unused)."""
    w = seq_len + 1
    return sorted(tuple(int(x) for x in t[i * w:(i + 1) * w]) for t in tokens for i in range(len(t) // w))


def test_upstream_shards_read_as_they_are_from_a_file_a_glob_and_a_directory(tmp_path, tok):
    tokens = _upstream_layout(tmp_path / "fineweb", tok)
    bos = tok.token_to_id(BOS)
    seq_len = 15
    for source in (DataSource(str(tmp_path / "fineweb" / "*.bin")),           # a glob
                   DataSource(str(tmp_path / "fineweb"), kind="tokens")):     # the directory, raw/ beside
        cfg = DataConfig(source=(source,), eos_token=EOS, heldout_fraction=0.0)
        stream = resolve(cfg.sources[0], cfg)
        assert isinstance(stream, TokenStream) and [f.offset for f in stream.files] == [0, 0, 0]
        assert [f.count for f in stream.files] == [len(t) for t in tokens]
        assert _epoch(cfg, tok, seq_len) == _windows(tokens, seq_len)
    one = DataConfig(source=str(tmp_path / "fineweb" / "shard_00001.bin"), eos_token=EOS, heldout_fraction=0.0)
    assert _epoch(one, tok, seq_len) == _windows(tokens[1:2], seq_len)
    # The stream is what upstream trains on: lines joined by BOS, no EOS, no newline tokens.
    ids = TokenFile(str(tmp_path / "fineweb" / "shard_00000.bin")).tokens()
    lines = [line.strip() for line in _raw_text(0).split("\n") if line.strip()]
    assert int((ids == bos).sum()) == len(lines) and ids[0] == bos and tok.token_to_id(EOS) not in ids
    starts = np.flatnonzero(ids == bos)
    first_line = tok.decode(ids[starts[0] + 1:starts[1]].tolist())
    assert first_line == lines[0]


def test_a_directory_of_shards_only_and_a_held_out_split(tmp_path, tok):
    tokens = _upstream_layout(tmp_path / "fw_tok300", tok, shards=2)
    for raw in (tmp_path / "fw_tok300" / "raw").iterdir():
        raw.unlink()
    (tmp_path / "fw_tok300" / "raw").rmdir()
    cfg = DataConfig(source=str(tmp_path / "fw_tok300"), eos_token=EOS, heldout_fraction=0.2)
    train, held = (make_batch_iterator(cfg, tok, seq_len=7, batch_size=2, seed=0, split=s) for s in ("train", "heldout"))
    try:
        seen_train = {tuple(row) for _ in range(20) for row in next(train).tolist()}
        seen_held = {tuple(row) for _ in range(5) for row in next(held).tolist()}
    finally:
        train.close()
        held.close()
    all_windows = set(_windows(tokens, 7))
    assert seen_train <= all_windows and seen_held <= all_windows and not seen_train & seen_held


def test_upstream_layout_directory_without_a_kind_and_foreign_ids_are_named(tmp_path, tok):
    _upstream_layout(tmp_path / "fineweb", tok, shards=1)
    cfg = DataConfig(source=str(tmp_path / "fineweb"), eos_token=EOS)
    with pytest.raises(DataError, match=r"holds several kinds of files \(1 text, 1 tokens\); name one kind"):
        resolve(cfg.sources[0], cfg)
    # Shards made with a larger vocabulary than the tokenizer in use.
    np.asarray([1, 5, 299, 300, 7] * 10, "<u2").tofile(tmp_path / "big.bin")
    cfg = DataConfig(source=str(tmp_path / "big.bin"), eos_token=EOS, heldout_fraction=0.0)
    it = make_batch_iterator(cfg, tok, seq_len=4, batch_size=1, seed=0)
    try:
        with pytest.raises(DataError, match=r"big\.bin: token id 300 >= vocabulary size 300 .* another tokenizer"):
            for _ in range(10):
                next(it)
    finally:
        it.close()
    # An odd number of bytes is not uint16 tokens.
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match=r"odd\.bin: 3 bytes is not a whole number of uint16 tokens"):
        TokenFile(str(tmp_path / "odd.bin"))


def test_llama2_shards_decode_back_to_their_lines(tmp_path):
    """With the real Llama 2 tokenizer.model: ids from the ``sentencepiece`` library, as upstream wrote them."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers.convert_slow_tokenizer")
    model = fixture_dir("llama_think") / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    raw = "Café au lait, 3 €.\n\n  東京タワー 🗼 333 m  \nLast line.\n"
    ids = _pretokenize(raw, sp.encode, sp.bos_id())
    (tmp_path / "shard_00000.bin").write_bytes(ids.tobytes())
    tok = load_tokenizer(model, vocab_size=32000, eos_token=EOS)
    cfg = DataConfig(source=str(tmp_path / "shard_00000.bin"), tokenizer=str(model), eos_token=EOS,
                     heldout_fraction=0.0)
    window = len(ids) - 1
    it = make_batch_iterator(cfg, tok, seq_len=window, batch_size=1, seed=0)
    try:
        batch = next(it)[0]
    finally:
        it.close()
    assert batch.tolist() == ids.tolist()
    pieces = np.split(batch, np.flatnonzero(batch == 1)[1:])
    assert [tok.decode(p.tolist()) for p in pieces] == [line.strip() for line in raw.split("\n") if line.strip()]
    assert tok.encode("Last line.").ids == ids[-len(sp.encode("Last line.")) - 1:].tolist()  # BOS + the line


def test_encode_cli_writes_the_upstream_layout_byte_for_byte(tmp_path):
    """``encode --lines --eos ''`` with the tokenizer.model gives what upstream's pretokenize writes."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers.convert_slow_tokenizer")
    from jaxlm.data.tokenizer import main

    model = fixture_dir("llama_think") / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    raw = _raw_text(0, docs=6) + "Ünïcode line, 東京 🦊  \n\n\n   \nA last  line.\n"
    (tmp_path / "shard_00000.txt").write_text(raw, encoding="utf-8")
    out = tmp_path / "shard_00000.bin"
    assert main(["encode", "--source", str(tmp_path / "shard_00000.txt"), "--tokenizer", str(model),
                 "--lines", "--eos", "", "--out", str(out)]) == 0
    assert out.read_bytes() == _pretokenize(raw, sp.encode, sp.bos_id()).tobytes()
