"""The Grain pipeline: packing, epochs, determinism, held-out split, sharding, state restore."""

import json

import numpy as np
import pytest

from jaxlm.config import DataConfig
from jaxlm.data import load_tokenizer_for, make_batch_iterator, train_tokenizer
from jaxlm.errors import ConfigError, DataError

SEQ = 31  # windows of 32 tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 JSONL documents of varied length, each starting with a unique marker word."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "paper", "light"]
    docs = [f"doc{i:03d} " + " ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for i in range(60)]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tok = train_tokenizer(docs, 400)
    return path, docs, tok


def _cfg(path, **kw):
    return DataConfig(source=str(path), **kw)


def _encoded(tok, docs):
    eos = tok.token_to_id("<|endoftext|>")
    return [tuple(tok.encode(d).ids) + (eos,) for d in docs]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _segments(stream, eos):
    """Split a token stream after each EOS: (complete documents, leftover tail)."""
    cuts = np.flatnonzero(stream == eos) + 1
    parts = np.split(stream, cuts)
    return [tuple(p) for p in parts[:-1]], parts[-1]


def test_one_epoch_is_every_train_document_once_packed_into_windows(corpus):
    path, docs, tok = corpus
    cfg = _cfg(path, heldout_fraction=0.0)
    total = sum(map(len, _encoded(tok, docs)))
    windows_per_epoch = total // (SEQ + 1)
    it = make_batch_iterator(cfg, tok, seq_len=SEQ, batch_size=1, seed=3)
    first = _take(it, windows_per_epoch)
    assert all(b.shape == (1, SEQ + 1) and b.dtype == np.int32 for b in first)
    stream = np.concatenate(first).ravel()
    complete, tail = _segments(stream, tok.token_to_id("<|endoftext|>"))
    expected = set(_encoded(tok, docs))
    assert len(complete) == len(set(complete))          # no document twice in an epoch
    assert set(complete) <= expected                      # each is a document, tokenized + EOS
    assert len(complete) >= len(docs) - 1                 # only the one cut by the epoch end is partial
    missing = expected - set(complete)
    assert all(doc[:len(tail)] == tuple(tail) for doc in missing)


def test_epochs_are_reshuffled_and_runs_are_deterministic(corpus):
    path, docs, tok = corpus
    cfg = _cfg(path, heldout_fraction=0.0)
    eos = tok.token_to_id("<|endoftext|>")
    per_epoch = sum(map(len, _encoded(tok, docs)))

    def doc_order(seed, epochs=2):
        it = make_batch_iterator(cfg, tok, seq_len=SEQ, batch_size=4, seed=seed)
        stream = np.concatenate(_take(it, epochs * per_epoch // (4 * (SEQ + 1)))).ravel()
        return _segments(stream, eos)[0]

    a, b, c = doc_order(0), doc_order(0), doc_order(1)
    assert a == b
    assert a != c
    first, second = a[:len(docs) - 1], a[len(docs) + 1:2 * len(docs) - 2]
    assert first != second[:len(first)]   # the second epoch is in another order


def test_heldout_documents_never_appear_in_train(corpus):
    path, docs, tok = corpus
    cfg = _cfg(path, heldout_fraction=0.1)
    eos = tok.token_to_id("<|endoftext|>")
    held = make_batch_iterator(cfg, tok, seq_len=SEQ, batch_size=2, seed=0, split="heldout")
    held_docs = set(_segments(np.concatenate(_take(held, 6)).ravel(), eos)[0])
    train = make_batch_iterator(cfg, tok, seq_len=SEQ, batch_size=4, seed=0)
    train_docs = set(_segments(np.concatenate(_take(train, 60)).ravel(), eos)[0])
    encoded = _encoded(tok, docs)
    assert len(held_docs) == 6 and held_docs <= set(encoded)   # round(0.1 * 60) documents
    assert len(train_docs) == 54 and not held_docs & train_docs
    # Fixed documents whatever the training seed; the held-out iterator repeats in a fixed order.
    again = make_batch_iterator(cfg, tok, seq_len=SEQ, batch_size=2, seed=99, split="heldout")
    assert all((x == y).all() for x, y in zip(_take(again, 6), _take(make_batch_iterator(
        cfg, tok, seq_len=SEQ, batch_size=2, seed=0, split="heldout"), 6)))


def test_processes_get_disjoint_documents_and_their_share_of_the_batch(corpus):
    path, docs, tok = corpus
    cfg = _cfg(path, heldout_fraction=0.0)
    eos = tok.token_to_id("<|endoftext|>")
    seen = []
    for index in range(2):
        it = make_batch_iterator(cfg, tok, seq_len=SEQ, batch_size=4, seed=0, process_index=index, process_count=2)
        batches = _take(it, 25)
        assert batches[0].shape == (2, SEQ + 1)
        seen.append(set(_segments(np.concatenate(batches).ravel(), eos)[0]))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) >= len(docs) - 2
    with pytest.raises(ConfigError, match="batch_size = 5 over 2 processes"):
        make_batch_iterator(cfg, tok, seq_len=SEQ, batch_size=5, seed=0, process_index=0, process_count=2)


def _assert_restores(cfg, tok, skip, check=4):
    it = make_batch_iterator(cfg, tok, seq_len=SEQ, batch_size=3, seed=5)
    _take(it, skip)
    state = json.loads(json.dumps(it.get_state()))   # as Grain's Orbax handler stores it
    expected = _take(it, check)
    it.close()
    resumed = make_batch_iterator(cfg, tok, seq_len=SEQ, batch_size=3, seed=5)
    resumed.set_state(state)
    got = _take(resumed, check)
    resumed.close()
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)


@pytest.mark.parametrize("skip", [0, 1, 7, 23])
def test_state_restores_exactly_in_process(corpus, skip):
    path, _, tok = corpus
    _assert_restores(_cfg(path), tok, skip)


def test_state_restores_exactly_mid_epoch_with_worker_processes(corpus):
    path, _, tok = corpus
    _assert_restores(_cfg(path, num_workers=2), tok, skip=9)


def test_each_worker_packs_its_own_share_of_the_documents(corpus):
    path, docs, tok = corpus
    eos = tok.token_to_id("<|endoftext|>")
    it = make_batch_iterator(_cfg(path, heldout_fraction=0.0, num_workers=2), tok, seq_len=SEQ, batch_size=2, seed=0)
    batches = _take(it, 16)
    it.close()
    # Grain hands out the workers' batches in turn; each worker packs a disjoint slice of documents.
    per_worker = [set(_segments(np.concatenate(batches[w::2]).ravel(), eos)[0]) for w in range(2)]
    assert all(per_worker) and not per_worker[0] & per_worker[1]
    assert per_worker[0] | per_worker[1] <= set(_encoded(tok, docs))


def test_documents_cannot_fake_an_eos(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "before <|endoftext|> after"}) + "\n", encoding="utf-8")
    tok = train_tokenizer(["before after"] * 10, 300)
    it = make_batch_iterator(_cfg(path, heldout_fraction=0.0), tok, seq_len=63, batch_size=1, seed=0)
    window = next(it)[0]
    eos = tok.token_to_id("<|endoftext|>")
    first_doc = window[:np.flatnonzero(window == eos)[0] + 1]
    assert tok.decode(first_doc.tolist(), skip_special_tokens=False) == "before <|endoftext|> after<|endoftext|>"


def test_pydoc_quickstart_needs_no_files(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    tok = load_tokenizer_for(cfg, vocab_size=512)
    batch = next(make_batch_iterator(cfg, tok, seq_len=128, batch_size=8, seed=0))
    assert batch.shape == (8, 129) and batch.dtype == np.int32 and 0 <= batch.min() and batch.max() < 512
    held = next(make_batch_iterator(cfg, tok, seq_len=128, batch_size=8, seed=0, split="heldout"))
    assert held.shape == (8, 129)
    assert "the" in tok.decode(batch[0].tolist())


def test_pipeline_arguments_are_checked(corpus):
    path, _, tok = corpus
    with pytest.raises(ConfigError, match="data split 'eval'"):
        make_batch_iterator(_cfg(path), tok, seq_len=8, batch_size=2, seed=0, split="eval")
    with pytest.raises(ConfigError, match="heldout_fraction = 0"):
        make_batch_iterator(_cfg(path, heldout_fraction=0.0), tok, seq_len=8, batch_size=2, seed=0, split="heldout")
    with pytest.raises(DataError, match="has no token '<eos>'"):
        make_batch_iterator(_cfg(path, eos_token="<eos>"), tok, seq_len=8, batch_size=2, seed=0)
