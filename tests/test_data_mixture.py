"""Mixtures end to end: FineWeb-layout Parquet -> tokenizer CLI -> TFDS ArrayRecord, mixed 70/30 with JSONL."""

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxlm.config import DataConfig, DataSource, load_config
from jaxlm.data import load_tokenizer, make_batch_iterator, tfds_builder
from jaxlm.data.tokenizer import main as tokenizer_cli
from jaxlm.errors import DataError

SEQ = 63


def _words(marker, n, rng):
    """Short documents (well under a window) that each carry their source's marker word."""
    vocab = "river stone cloud paper light water field green north seven".split()
    return [f"{marker} " + " ".join(rng.choice(vocab, int(rng.integers(2, 9)))) for _ in range(n)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    fineweb = root / "fineweb-edu"
    parquet_docs = []
    for dump in ("CC-MAIN-2024-10", "CC-MAIN-2024-18"):
        (fineweb / "data" / dump).mkdir(parents=True)
        docs = _words("parquetdoc", 150, rng)
        pq.write_table(pa.table({"text": docs, "id": [f"<urn:{dump}:{i}>" for i in range(150)]}),
                       fineweb / "data" / dump / "000_00000.parquet", row_group_size=50)
        parquet_docs += docs
    jsonl = root / "extra.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in _words("jsonldoc", 200, rng)))
    tokenizer = root / "tokenizer.json"
    assert tokenizer_cli(["train", "--source", str(fineweb), "--docs", "300", "--vocab-size", "320",
                          "--out", str(tokenizer)]) == 0
    spec = tfds_builder.prepare(str(fineweb), str(tokenizer), "fineweb_edu", str(root / "tfds"))
    return root, spec, tokenizer, parquet_docs, jsonl


def _shares(batches, tok, markers):
    counts = dict.fromkeys(markers, 0)
    for window in np.concatenate(batches):
        text = tok.decode(window.tolist())
        found = [m for m in markers if m in text]
        assert len(found) == 1, f"a window holds one source's tokens: {text!r}"
        counts[found[0]] += 1
    total = sum(counts.values())
    return {m: c / total for m, c in counts.items()}


def test_tfds_preparation_stores_each_document_tokenized(prepared):
    root, spec, tokenizer, parquet_docs, _ = prepared
    import tensorflow_datasets as tfds

    source = tfds.data_source(spec.removeprefix("tfds:"), split="train", data_dir=str(root / "tfds"))
    tok = load_tokenizer(tokenizer)
    stored = {tuple(source[i]["tokens"].tolist()) for i in range(len(source))}
    assert len(source) == 300 and stored == {tuple(tok.encode(d).ids) for d in parquet_docs}
    assert source[0]["tokens"].dtype == np.uint16
    assert "tensorflow" not in sys.modules   # prepared and read without TensorFlow


def test_mixture_70_30_of_tfds_and_jsonl_matches_the_weights(prepared):
    root, spec, tokenizer, _, jsonl = prepared
    tok = load_tokenizer(tokenizer)
    data = DataConfig(source=(DataSource(spec, 0.7), DataSource(str(jsonl), 0.3)), tokenizer=str(tokenizer),
                      tfds_data_dir=str(root / "tfds"))
    it = make_batch_iterator(data, tok, seq_len=SEQ, batch_size=8, seed=0)
    shares = _shares([next(it) for _ in range(50)], tok, ["parquetdoc", "jsonldoc"])
    assert abs(shares["parquetdoc"] - 0.7) < 0.02 and abs(shares["jsonldoc"] - 0.3) < 0.02


def test_mixture_state_restores_exactly_with_workers(prepared):
    root, spec, tokenizer, _, jsonl = prepared
    tok = load_tokenizer(tokenizer)
    data = DataConfig(source=(DataSource(spec, 0.7), DataSource(str(jsonl), 0.3)), tokenizer=str(tokenizer),
                      tfds_data_dir=str(root / "tfds"), num_workers=2)
    it = make_batch_iterator(data, tok, seq_len=SEQ, batch_size=4, seed=2)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    it.close()
    resumed = make_batch_iterator(data, tok, seq_len=SEQ, batch_size=4, seed=2)
    resumed.set_state(state)
    try:
        for e in expected:
            np.testing.assert_array_equal(next(resumed), e)
    finally:
        resumed.close()


def test_a_tokenizer_too_small_for_the_prepared_data_is_refused(prepared, tmp_path):
    root, spec, tokenizer, _, _ = prepared
    from jaxlm.data import train_tokenizer

    small = train_tokenizer(["a b"] * 5, 300)
    made_with = load_tokenizer(tokenizer).get_vocab_size()
    assert small.get_vocab_size() < made_with
    data = DataConfig(source=spec, tfds_data_dir=str(root / "tfds"))
    with pytest.raises(DataError, match=rf"tokenized with a {made_with}-token vocabulary, "
                                        rf"the tokenizer in use has {small.get_vocab_size()}"):
        make_batch_iterator(data, small, seq_len=SEQ, batch_size=2, seed=0)


def _anneal_mirror(root, rng):
    """Local stand-ins for the seven anneal corpora, each with the fields the config reads."""
    def parquet(name, columns):
        (root / name).mkdir()
        pq.write_table(pa.table(columns), root / name / "train-00000-of-00001.parquet")

    n = 60
    parquet("fineweb_edu", {"text": _words("fwedu", n, rng)})
    parquet("open_web_math", {"text": _words("owmath", n, rng)})
    parquet("cosmopedia", {"text": _words("cosmo", n, rng)})
    parquet("numina_math", {"problem": _words("numina", n, rng), "solution": _words("sol", n, rng)})
    parquet("arxiv", {"article": _words("arxivpaper", n, rng)})
    parquet("ai2_arc", {"question": _words("arcq", n, rng), "answerKey": ["B"] * n,
                        "choices": [{"text": ["x", "y"], "label": ["A", "B"]}] * n})
    (root / "metamathqa").mkdir()
    with open(root / "metamathqa" / "train.jsonl", "w") as f:
        for q in _words("metamath", n, rng):
            f.write(json.dumps({"query": q, "response": "so the answer is 4"}) + "\n")


def test_shard_anneal_config_expresses_the_card(prepared, tmp_path, monkeypatch):
    _, _, tokenizer, _, _ = prepared
    _anneal_mirror(tmp_path, np.random.default_rng(1))
    monkeypatch.setenv("JAXLM_ANNEAL_DATA", str(tmp_path))
    cfg = load_config("shard_anneal.py", [f"data.tokenizer={tokenizer}"])
    assert cfg.train.steps == 20_000 and cfg.optim.warmup_steps == 0 and cfg.optim.decay_fraction == 1.0
    names = [os.path.basename(s.path) for s in cfg.data.sources]
    assert names == ["fineweb_edu", "open_web_math", "cosmopedia", "numina_math", "metamathqa", "arxiv", "ai2_arc"]
    weights = {name: s.weight for name, s in zip(names, cfg.data.sources)}
    assert abs(sum(weights.values()) - 1) < 1e-9
    tok = load_tokenizer(tokenizer)
    it = make_batch_iterator(cfg.data, tok, seq_len=SEQ, batch_size=10, seed=0)
    markers = {"fineweb_edu": "fwedu", "open_web_math": "owmath", "cosmopedia": "cosmo", "numina_math": "numina",
               "metamathqa": "metamath", "arxiv": "arxivpaper", "ai2_arc": "arcq"}
    shares = _shares([next(it) for _ in range(40)], tok, list(markers.values()))
    for name, marker in markers.items():
        assert abs(shares[marker] - weights[name]) < 0.02, (name, shares[marker], weights[name])


@pytest.mark.slow
def test_training_on_the_mixture(prepared, tmp_path):
    """The mixture feeds the real train loop (a tiny ToyLM, a few steps, a checkpoint with the data state)."""
    root, spec, tokenizer, _, jsonl = prepared
    from jaxlm.config import CheckpointConfig, Config, OptimConfig, TrainConfig, validate
    from jaxlm.models.toylm import ToyLMConfig
    from jaxlm.train import train

    cfg = validate(Config(
        model=ToyLMConfig(vocab_size=320, dim=32, n_layers=2, n_heads=2, head_dim=16, mlp_hidden=64,
                          max_seq_len=64, sliding_window=16),
        train=TrainConfig(steps=6, batch_size=8, seq_len=SEQ, compute_dtype="float32", log_every=2, eval_batches=2,
                          sample_prompt=""),
        optim=OptimConfig(warmup_steps=1, decay_fraction=0.5),
        data=DataConfig(source=(DataSource(spec, 0.7), DataSource(str(jsonl), 0.3)), tokenizer=str(tokenizer),
                        tfds_data_dir=str(root / "tfds"), heldout_fraction=0.1),
        checkpoint=CheckpointConfig(every_steps=3, async_save=False),
        out_dir=str(tmp_path / "run")))
    result = train(cfg)
    assert result["step"] == 6
    assert np.isfinite(result["eval_loss"])
    saved = sorted((tmp_path / "run" / "checkpoints").glob("*/data/*.json"))
    assert saved and "parents" in json.loads(saved[-1].read_text())  # the mixture's per-source positions
