"""Tokenizers of the three families load through one API: a SentencePiece ``tokenizer.model``
(Llama Think, checked id for id against the ``sentencepiece`` library), a byte-level BPE
``tokenizer.json`` with its ``tokenizer_config.json`` (DeepSeek-V4's form), and a BPE trained
here; each is refused when it has more ids than the model's vocabulary."""

import json
import random
import shutil
import sys

import pytest

from conftest import fixture_dir
from jaxlm.config import DataConfig
from jaxlm.data import make_batch_iterator
from jaxlm.data.tokenizer import (SpecialTokens, load_tokenizer, load_tokenizer_for, plain_text_encoder,
                                  save_tokenizer, special_tokens, train_tokenizer)
from jaxlm.errors import DataError

SAMPLE = (
    "The history of jaxlm began on 3 March 2024, at 09:41 -- 1,234,567 tokens later, version 0.1.0 shipped.\n"
    "\n"
    "Café, naïve façade, Ærøskøbing and Zürich: accents everywhere.  Two spaces,   three spaces,\tone tab.\n"
    "東京は日本の首都です。北京欢迎你！ 한국어도 조금. Emoji: 🦊🎉 👩‍👩‍👧‍👦 ✓\n"
    "\n\n"
    "    Indented line with trailing spaces   \n"
    "Numbers: 3.14159, 2.71828, 10000000000, 0x1F, 1e-5; a <s> and </s> in the middle of text.\n"
    "Last paragraph."
)
DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"


@pytest.fixture(scope="module")
def spm_path():
    return fixture_dir("llama_think") / "tokenizer.model"


@pytest.fixture(scope="module")
def sp(spm_path):
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(spm_path))


@pytest.fixture(scope="module")
def llama(spm_path):
    pytest.importorskip("transformers.convert_slow_tokenizer")
    return load_tokenizer(spm_path, vocab_size=32000, eos_token="</s>")


def _fuzz_texts(count: int, seed: int = 0) -> list[str]:
    """Short strings over characters where conversions go wrong: runs of spaces, newlines, tabs,
    a literal '▁', digits, accents, CJK, emoji (byte fallback) and special-token spellings."""
    alphabet = list("ab Z  \n\t1 9é東😀▁.,") + ["<s>", "</s>", "  ", "\n\n"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(count)]


# --------------------------------------------------------------------------- SentencePiece (Llama 2)


def test_sentencepiece_model_gives_the_sentencepiece_librarys_ids(llama, sp):
    assert llama.get_vocab_size(with_added_tokens=True) == sp.get_piece_size() == 32000
    assert [llama.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [sp.unk_id(), sp.bos_id(), sp.eos_id()] == [0, 1, 2]
    assert special_tokens(fixture_dir("llama_think") / "tokenizer.model", llama) == SpecialTokens("<s>", 1, "</s>", 2)
    # BOS as the spec says: encode puts it in front of the SentencePiece ids, no EOS.
    assert llama.encode("The history of").ids == [1] + sp.encode("The history of") == [1, 450, 4955, 310]
    assert llama.encode(SAMPLE, add_special_tokens=False).ids == sp.encode(SAMPLE)
    # What the pipeline encodes with: special-token spellings inside a text are text, as in SentencePiece.
    plain = plain_text_encoder(llama)
    assert plain.encode(SAMPLE).ids == [sp.bos_id()] + sp.encode(SAMPLE)
    for paragraph in SAMPLE.split("\n"):
        assert plain.encode(paragraph, add_special_tokens=False).ids == sp.encode(paragraph), paragraph
    mismatches = [t for t in _fuzz_texts(1500) if plain.encode(t, add_special_tokens=False).ids != sp.encode(t)]
    assert not mismatches, mismatches[:5]


def test_sentencepiece_decoding_round_trips(llama, sp):
    ids = llama.encode(SAMPLE).ids
    assert llama.decode(ids) == sp.decode(ids[1:]) == SAMPLE  # BOS is dropped when decoding
    assert 13 in ids  # newlines are byte-fallback pieces <0x0A>
    for text in _fuzz_texts(300, seed=1):
        assert llama.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


@pytest.mark.parametrize("eos_token", ["</s>", ""])
def test_pipeline_frames_sentencepiece_documents_with_bos(llama, sp, tmp_path, eos_token):
    """BOS as the tokenizer frames a text; EOS as the pipeline ends a document, or none with
    ``eos_token=""`` (upstream's framing: BOS in front, no EOS)."""
    doc = "One document: 42 cafés, 東京 🦊.\nWith  a newline."
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": doc}) + "\n", encoding="utf-8")
    cfg = DataConfig(source=str(tmp_path / "docs.jsonl"), tokenizer=str(fixture_dir("llama_think") / "tokenizer.model"),
                     eos_token=eos_token, heldout_fraction=0.0)
    tokenizer = load_tokenizer_for(cfg, vocab_size=32000)
    framed = [1] + sp.encode(doc) + ([2] if eos_token else [])
    it = make_batch_iterator(cfg, tokenizer, seq_len=len(framed) - 1, batch_size=1, seed=0)
    try:
        windows = [next(it)[0].tolist() for _ in range(2)]
    finally:
        it.close()
    assert windows == [framed, framed]


def test_sentencepiece_refusals_name_the_fix(spm_path, tmp_path):
    pytest.importorskip("transformers.convert_slow_tokenizer")
    with pytest.raises(DataError, match=r"tokenizer\.model: 32000 tokens do not fit the model's vocab_size 31999"):
        load_tokenizer(spm_path, vocab_size=31999, eos_token="</s>")
    with pytest.raises(DataError, match=r"no token '<\|endoftext\|>' .* set data\.eos_token \(its own EOS is '</s>'\)"):
        load_tokenizer(spm_path, vocab_size=32000)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    with pytest.raises(DataError, match=r"tokenizer\.model: not a SentencePiece model"):
        load_tokenizer(bad)
    shutil.copy(spm_path, tmp_path / "copy.model")
    assert load_tokenizer(tmp_path / "copy.model", eos_token="</s>").get_vocab_size() == 32000


def test_without_transformers_the_sentencepiece_model_names_what_to_install(spm_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.convert_slow_tokenizer", None)  # import fails
    with pytest.raises(DataError, match=r"tokenizer\.model: a SentencePiece model; converting it needs "
                                        r"transformers >= 5\.24 and protobuf \(pip install"):
        load_tokenizer(spm_path, eos_token="</s>")


# --------------------------------------------------------------------------- DeepSeek-V4 form


def _deepseek_like(folder, vocab_size=300, config=None):
    """A tiny byte-level BPE laid out like DeepSeek-V4's: special tokens at ids 0, 1, 2 and a
    post-processor that adds nothing, with the upstream tokenizer_config.json (or ``config``) beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = [f"Paragraph {i}: the whale swims {i * 7 % 13} leagues; 東京 café 🐋." for i in range(60)]
    save_tokenizer(train_tokenizer(texts, vocab_size, (DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_PAD)),
                   folder / "tokenizer.json")
    if config is None:
        shutil.copy(fixture_dir("nanowhale") / "tokenizer" / "tokenizer_config.json", folder / "tokenizer_config.json")
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_deepseek_form_finds_bos_and_eos_in_tokenizer_config(tmp_path):
    upstream = json.loads((fixture_dir("nanowhale") / "tokenizer" / "tokenizer_config.json").read_text("utf-8"))
    folder = _deepseek_like(tmp_path / "tok")
    for where in (folder, folder / "tokenizer.json"):
        tok = load_tokenizer(where, vocab_size=320, eos_token=upstream["eos_token"])
        found = special_tokens(where)
        assert (found.bos, found.eos) == (upstream["bos_token"], upstream["eos_token"])
        assert (found.bos_id, found.eos_id) == (tok.token_to_id(DEEPSEEK_BOS), tok.token_to_id(DEEPSEEK_EOS)) == (0, 1)
        text = "The whale swims 12 leagues — 東京 café 🐋\n\nnew  paragraph"
        ids = tok.encode(text).ids
        assert 0 not in ids and 1 not in ids  # its post-processor adds no BOS/EOS (as upstream's)
        assert tok.decode(ids) == text
    cfg = DataConfig(tokenizer=str(folder), eos_token=DEEPSEEK_EOS)
    assert load_tokenizer_for(cfg, vocab_size=320).token_to_id(DEEPSEEK_EOS) == 1


def test_tokenizer_config_add_bos_token_and_mismatches(tmp_path):
    folder = _deepseek_like(tmp_path / "bos", config={"bos_token": {"content": DEEPSEEK_BOS}, "eos_token": DEEPSEEK_EOS,
                                                       "add_bos_token": True, "add_eos_token": False})
    tok = load_tokenizer(folder, eos_token=DEEPSEEK_EOS)
    bare = tok.encode("whale", add_special_tokens=False).ids
    assert tok.encode("whale").ids == [0] + bare
    wrong = _deepseek_like(tmp_path / "wrong", config={"bos_token": "<s>", "eos_token": DEEPSEEK_EOS})
    with pytest.raises(DataError, match=r"tokenizer_config\.json names '<s>', which the tokenizer does not have"):
        load_tokenizer(wrong, eos_token=DEEPSEEK_EOS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a directory without tokenizer\.json or tokenizer\.model"):
        load_tokenizer(tmp_path / "empty")


# --------------------------------------------------------------------------- the vocabulary check, each kind


@pytest.mark.parametrize("kind", ["trained_bpe", "deepseek_json", "sentencepiece"])
def test_every_kind_is_refused_when_it_outgrows_the_model(kind, tmp_path):
    if kind == "trained_bpe":
        path, eos = save_tokenizer(train_tokenizer(["hello world, hello jax"] * 30, 270), tmp_path / "bpe.json"), \
            "<|endoftext|>"
    elif kind == "deepseek_json":
        path, eos = _deepseek_like(tmp_path / "ds"), DEEPSEEK_EOS
    else:
        pytest.importorskip("transformers.convert_slow_tokenizer")
        path, eos = fixture_dir("llama_think") / "tokenizer.model", "</s>"
    size = load_tokenizer(path, eos_token=eos).get_vocab_size(with_added_tokens=True)
    assert load_tokenizer(path, vocab_size=size, eos_token=eos).get_vocab_size(with_added_tokens=True) == size
    with pytest.raises(DataError, match=rf"{size} tokens do not fit the model's vocab_size {size - 1}; "
                                        rf"raise model\.vocab_size to >= {size}"):
        load_tokenizer_for(DataConfig(tokenizer=str(path), eos_token=eos), vocab_size=size - 1)
