"""The convention probe finds the setting a checkpoint was made with.

Text sampled from a random PyTorch ToyLM under non-default conventions is most likely under
those same conventions, so the probe must name them on its ``best:`` line.
"""

import pytest

torch = pytest.importorskip("torch", reason="the probe's test samples text with the PyTorch ToyLM")

from test_torch_port import card_cfg, torch_model  # noqa: E402

from tools.torch_port.__main__ import main as cli  # noqa: E402

TRUE = {"rope_pairing": "interleaved", "sliding_parity": "odd", "embed_scale": True}


def word_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_probe_names_the_generating_convention(tmp_path, capsys):
    model = torch_model(seed=3, **TRUE)
    torch.save({"cfg": card_cfg(model), "model": model.state_dict(), "conventions": {}}, tmp_path / "m.pt")
    torch.manual_seed(0)
    seqs = model.generate(torch.randint(0, model.cfg.vocab_size, (24, 1)), 16, temperature=0.7, top_p=1.0)
    (tmp_path / "text.txt").write_text(" ".join(f"t{i}" for i in seqs.flatten().tolist()))
    word_tokenizer(tmp_path / "tok.json", model.cfg.vocab_size)
    assert cli(["probe", str(tmp_path / "m.pt"), "--tokenizer", str(tmp_path / "tok.json"),
                "--text", str(tmp_path / "text.txt"), "--seq-len", "16"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    best = out[-1]
    assert best.startswith("best: ")
    for name, value in TRUE.items():
        assert f"{name}={value}" in best, best
    assert "--config.model.rope_pairing=interleaved" in best
    assert sum("loss" in line for line in out) >= 10  # the table: every setting tried, with its loss


def test_probe_errors_are_one_line(tmp_path, capsys):
    model = torch_model()
    torch.save({"cfg": card_cfg(model), "model": model.state_dict()}, tmp_path / "m.pt")
    word_tokenizer(tmp_path / "big.json", 500)
    (tmp_path / "text.txt").write_text("t499 t3 t4")
    assert cli(["probe", str(tmp_path / "m.pt"), "--tokenizer", str(tmp_path / "big.json"),
                "--text", str(tmp_path / "text.txt")]) == 2
    err = capsys.readouterr().err  # refused as jaxlm.load refuses it: read with the model's vocabulary
    assert err.startswith("error: tokenizer ") and "500 tokens do not fit the model's vocab_size 96" in err
