"""KV-cached generation: cached logits equal full recompute (past the sliding window), padding is
invisible, the jitted chunked loop equals a plain Python loop, EOS / stop strings, the CLI."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from jaxlm import generate as G
from jaxlm.errors import ConfigError
from jaxlm.models import kv_cache
from jaxlm.models.toylm import ToyLM, ToyLMConfig
from jaxlm.sampling import SamplingConfig

# Window 6, four layers (sliding, global, sliding, global): 40 tokens wrap the ring six times.
TINY = ToyLMConfig(vocab_size=128, dim=32, n_layers=4, n_heads=2, head_dim=16, mlp_hidden=64, max_seq_len=128,
                   sliding_window=6)
GREEDY = SamplingConfig(greedy=True)


def random_model(cfg=TINY, seed=0):
    """Larger-than-init weights and uneven norms: varied logits of a few units (no argmax near-ties,
    no degenerate repetition), so that every mistake in the cache shows. (Much larger weights
    amplify float32 rounding through the layers past 1e-5 by themselves.)"""
    model = ToyLM(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    state = jax.tree.map(lambda p: (1.0 + 0.3 * jax.random.normal(next(keys), p.shape) if p.ndim == 1
                                    else 0.15 * jax.random.normal(next(keys), p.shape)), state)
    return nnx.merge(graphdef, state)


def cached_logits(model, ids_BT, prompt_len, max_len, starts_B=None):
    """Logits ``[B, T - prompt_len + 1, V]`` for positions prompt_len-1 .. T-1 through prefill + decode_step."""
    prefill = jax.jit(lambda ids, cache, starts: model.prefill(ids, cache, starts))
    step = jax.jit(lambda ids, cache: model.decode_step(ids, cache))
    logits, cache = prefill(ids_BT[:, :prompt_len], model.init_cache(ids_BT.shape[0], max_len), starts_B)
    out = [logits]
    for t in range(prompt_len, ids_BT.shape[1]):
        logits, cache = step(ids_BT[:, t], cache)
        out.append(logits)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("prompt_len", [3, 17])          # prompt shorter / longer than the ring
@pytest.mark.parametrize("conventions", [{}, {"window_includes_query": False, "sliding_parity": "odd"}])
def test_cached_logits_equal_full_recompute_past_the_window(prompt_len, conventions):
    cfg = dataclasses.replace(TINY, **conventions)
    model = random_model(cfg)
    ids = jax.random.randint(jax.random.key(2), (2, 40), 0, cfg.vocab_size)
    full = np.asarray(jax.jit(lambda x: model(x))(ids))[:, prompt_len - 1:]
    cached = cached_logits(model, ids, prompt_len, max_len=48)
    assert np.abs(full).max() > 1.0
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window, time", [(None, 0), (None, 40), (None, 63), (64, 150), (20, 45)])
def test_pallas_decode_attention_equals_xla(window, time):
    """The GPU kernel, run by the Pallas interpreter: same outputs and cache as the XLA path, for
    a global cache partly filled, a full ring that has wrapped, and a window narrower than the cache."""
    B, H, S, K = 3, 2, 64, 16
    keys = jax.random.split(jax.random.key(time), 5)
    q, k, v = (jax.random.normal(keys[i], (B, H, K)) for i in range(3))
    k_cache, v_cache = (jax.random.normal(keys[i], (B, H, S, K)) for i in (3, 4))
    starts = jnp.array([0, min(time, 3), min(time, 7)], jnp.int32)   # a decoded token is never padding
    run = lambda impl: kv_cache.attend_one_token(q, k, v, k_cache, v_cache, jnp.int32(time), starts, window=window,
                                                 implementation=impl)
    for want, got in zip(run("xla"), run("pallas_interpret")):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_cached_logits_through_the_pallas_kernel(monkeypatch):
    cfg = dataclasses.replace(TINY, sliding_window=32)
    model = random_model(cfg)
    ids = jax.random.randint(jax.random.key(5), (2, 44), 0, cfg.vocab_size)   # past the 32-slot ring
    full = np.asarray(jax.jit(lambda x: model(x))(ids))[:, 39:]
    with kv_cache.IMPLEMENTATION.scope("pallas_interpret"):
        np.testing.assert_allclose(cached_logits(model, ids, 40, max_len=64), full, atol=1e-5, rtol=0)


def test_sliding_layers_keep_only_their_window():
    cache = random_model().init_cache(batch=3, max_len=1000)
    assert [layer.keys.shape for layer in cache.layers] == [(3, 2, 6, 16), (3, 2, 1000, 16)] * 2
    assert [layer.values.shape for layer in cache.layers] == [layer.keys.shape for layer in cache.layers]


def test_left_padded_rows_equal_each_prompt_alone():
    model = random_model()
    ids = np.asarray(jax.random.randint(jax.random.key(3), (1, 30), 0, TINY.vocab_size))
    alone = cached_logits(model, jnp.asarray(ids), 9, max_len=40)
    pad = 5
    padded = np.concatenate([np.full((1, pad), 7), ids], axis=1)  # pad tokens that are not zeros
    batch = np.concatenate([padded, np.asarray(jax.random.randint(jax.random.key(4), (1, 35), 0, 128))])
    got = cached_logits(model, jnp.asarray(batch), 9 + pad, max_len=40, starts_B=jnp.array([pad, 0]))
    np.testing.assert_allclose(got[:1], alone, atol=1e-5, rtol=0)


def python_greedy(model, prompt, n, penalty=1.0):
    """Reference: full recompute of the whole sequence for every new token. (The sequence sits in a
    fixed buffer so that one compile serves all steps; causal attention ignores what follows.)"""
    forward = jax.jit(lambda ids: model(ids))
    seq = list(prompt)
    for _ in range(n):
        buffer = np.zeros((1, len(prompt) + n), np.int32)
        buffer[0, :len(seq)] = seq
        logits = np.asarray(forward(jnp.asarray(buffer)))[0, len(seq) - 1]
        seen = np.isin(np.arange(len(logits)), seq)
        logits = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
        seq.append(int(np.argmax(logits)))
    return seq[len(prompt):]


def test_batched_chunked_greedy_equals_full_recompute():
    model = random_model()
    prompts = [[5, 9, 2], list(range(10, 30)), [77]]
    want = [python_greedy(model, p, 24, penalty=1.3) for p in prompts]
    sampling = SamplingConfig(greedy=True, repetition_penalty=1.3)
    for chunk in (5, 16):                                   # chunks that do and do not divide the steps
        got = G.generate_tokens(model, prompts, max_new_tokens=24, sampling=sampling, chunk_size=chunk)
        assert got == want, f"chunk_size={chunk}"
    assert len(set(map(tuple, want))) == 3 and all(len(set(w)) > 3 for w in want)   # varied, not degenerate
    # Each row of the batch is what that prompt gives alone.
    assert G.generate(model, prompts[1], max_new_tokens=24, sampling=sampling) == want[1]


def test_sampling_is_deterministic_whatever_the_chunking():
    model = random_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    run = lambda seed, chunk: G.generate_tokens(model, prompts, max_new_tokens=20, sampling=G.CARD_SAMPLING,
                                                seed=seed, chunk_size=chunk)
    assert run(1, 4) == run(1, 7) == run(1, 4)
    assert run(1, 4) != run(2, 4)


def test_decoding_compiles_once_for_every_chunk_and_similar_prompts():
    model = random_model()
    before = G._decode_chunk._cache_size()
    G.generate_tokens(model, [[1, 2, 3]], max_new_tokens=30, sampling=GREEDY, chunk_size=8)
    G.generate_tokens(model, [[4, 5, 6, 7, 8, 9]], max_new_tokens=30, sampling=GREEDY, chunk_size=8)
    assert G._decode_chunk._cache_size() - before == 1


def test_eos_cuts_each_row_and_stops_early():
    model = random_model()
    prompts = [[5, 9, 2], list(range(10, 30))]
    free = G.generate_tokens(model, prompts, max_new_tokens=16, sampling=GREEDY)
    eos = free[0][4]                                         # row 0 produces it at step 4
    got = G.generate_tokens(model, prompts, max_new_tokens=16, sampling=GREEDY, eos_id=eos)
    assert got[0] == free[0][:4]
    want_1 = free[1][:free[1].index(eos)] if eos in free[1] else free[1]
    assert got[1] == want_1
    calls = []
    G.generate_tokens(model, [[5, 9, 2]], max_new_tokens=60, sampling=GREEDY, eos_id=eos, chunk_size=4,
                      on_tokens=lambda new: calls.append(new))
    assert len(calls) <= 3                                   # stopped after EOS, not after 60 tokens


def test_too_long_or_empty_prompts_are_refused():
    model = random_model()
    with pytest.raises(ConfigError, match="max_seq_len"):
        G.generate_tokens(model, [[1] * 100], max_new_tokens=40, sampling=GREEDY)
    with pytest.raises(ConfigError, match="empty"):
        G.generate_tokens(model, [[1], []], max_new_tokens=4, sampling=GREEDY)


class CharTokenizer:
    """One token per character (ids = code points), enough to test the text layer."""

    def encode(self, text):
        return type("Encoding", (), {"ids": [ord(c) for c in text]})()

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def token_to_id(self, token):
        return None


def test_stop_strings_and_streaming_pieces():
    row = G._TextRow(CharTokenizer(), stop=["END"])
    pieces = [row.add([ord(c) for c in chunk], None) for chunk in ["hello E", "N", "D more"]]
    # " E" held back (two characters: could start "END"), then " " released once "EN" shows it can't.
    assert pieces == ["hello", " ", ""] and row.stopped
    assert row.finish() == "" and row.text == "hello "
    row = G._TextRow(CharTokenizer(), stop=["END"])
    streamed = row.add([ord(c) for c in "abc EN"], None) + row.add([ord(c) for c in "x"], None) + row.finish()
    assert streamed == row.text == "abc ENx"


def test_generate_text_streams_what_it_returns():
    model = random_model()
    streamed = {0: "", 1: ""}
    texts = G.generate_text(model, CharTokenizer(), ["ab", "xyz"], max_new_tokens=12, sampling=GREEDY,
                            chunk_size=5, on_text=lambda row, piece: streamed.__setitem__(row, streamed[row] + piece))
    assert [streamed[0], streamed[1]] == texts and all(len(t) == 12 for t in texts)


# ----------------------------------------------------------------------------- command line


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert G.main(["--checkpoint", str(tmp_path / "missing.pt"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pt" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        G.main(["--prompt", "hi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--checkpoint" in err and err.count("\n") == 1


def test_cli_on_a_converted_checkpoint(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="the checkpoint is made with the PyTorch ToyLM")
    from jaxlm.data import save_tokenizer, train_tokenizer
    from tools.torch_port import toylm_torch

    corpus = ["The capital of France is Paris. The capital of Italy is Rome."] * 20
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    torch.manual_seed(0)
    fields = dict(vocab_size=320, dim=32, n_layers=3, n_heads=2, head_dim=16, mlp_hidden=48, max_seq_len=128,
                  sliding_window=8)
    model = toylm_torch.ToyLM(toylm_torch.Config(**fields))
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"cfg": fields, "model": {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}},
               checkpoint)

    # No tokenizer beside the checkpoint and none given: one line, exit 2.
    assert G.main(["--checkpoint", str(checkpoint), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--tokenizer" in err and err.count("\n") == 1

    save_tokenizer(tokenizer, tmp_path / "tok.json")
    args = ["--checkpoint", str(checkpoint), "--tokenizer", str(tmp_path / "tok.json"), "--max_new_tokens", "12",
            "--temperature", "0.8", "--top_p", "0.9", "--repetition_penalty", "1.3", "--seed", "1"]
    run = lambda *extra: subprocess.run([sys.executable, "-m", "jaxlm.generate", *args, *extra], cwd=REPO,
                                        capture_output=True, text=True, timeout=120, env={"JAX_PLATFORMS": "cpu",
                                                                                          "PATH": "/usr/bin:/bin"})
    one = run("--prompt", "The capital of France is")
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("The capital of France is") and len(one.stdout) > len("The capital of France is\n")
    # In-process: the same seed gives the same text; a batch of prompts gives one block per prompt.
    assert G.main([*args, "--prompt", "The capital of France is"]) == 0
    assert capsys.readouterr().out == one.stdout
    assert G.main([*args, "--prompt", "The capital", "--prompt", "Rome", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital") and "\n\nRome" in out
