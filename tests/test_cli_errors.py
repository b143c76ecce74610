"""Every command-line tool against the bad input a new user gives it.

One table: each CLI x each path argument x (missing, empty, truncated, random bytes, wrong kind),
each numeric flag x bad numbers, and broken config files. Every row runs the CLI's ``main(argv)``
and must end with exit status 2, exactly one line on stderr, and no traceback.

Most rows of one CLI share a process (``_drive``: each row's output is captured at the file
descriptors, so C++ noise counts, and "once" warnings are reset between rows), since importing JAX
in a fresh process per row was most of the time. The first row of every CLI and verb, and the rows
whose failure could only show at interpreter exit, run alone as ``python -m MODULE``; each driver
process must exit quietly too.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, subprocess_env, xla_flags

VOCAB = 96  # the tiny model's vocabulary


def _tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly ``vocab_size`` ids (EOS first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return tok


def _make_files(root: pathlib.Path) -> dict[str, str]:
    """The good and bad files of every row, in ``root``."""
    from jaxlm import config as C
    from jaxlm import formats
    sys.path.insert(0, str(REPO / "tests"))
    from test_formats_hf import TINY, toylm_conv  # a random tiny ToyLM, as the converter holds it

    assert TINY.vocab_size == VOCAB
    good = root / "good"
    good.mkdir()
    formats.write_checkpoint(toylm_conv(), good / "model.pt")
    _tokenizer(VOCAB).save(str(good / "tokenizer.json"))
    _tokenizer(VOCAB + 1).save(str(root / "big_tokenizer.json"))
    pt = (good / "model.pt").read_bytes()
    rng = np.random.default_rng(0)
    files = {
        "good_pt": good / "model.pt",
        "good_tok": good / "tokenizer.json",
        "big_tok": root / "big_tokenizer.json",
        "missing": root / "does_not_exist.pt",
        "empty": root / "empty.pt",
        "trunc_pt": root / "truncated.pt",
        "random": root / "random.bin",
        "trunc_tok": root / "truncated_tokenizer.json",
        "not_tok_json": root / "not_a_tokenizer.json",
        "text": root / "text.txt",
        "empty_dir": root / "empty_dir",
        "syntax_cfg": root / "syntax_error.py",
        "raising_cfg": root / "raising.py",
        "wrong_cfg": root / "wrong_return.py",
        "random_cfg": root / "random_bytes.py",
        "run": root / "run",
        "out": root / "out",
    }
    files["empty"].write_bytes(b"")
    files["trunc_pt"].write_bytes(pt[: len(pt) // 2])
    files["random"].write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    tok_text = files["good_tok"].read_text()
    files["trunc_tok"].write_text(tok_text[: len(tok_text) // 2])
    files["not_tok_json"].write_text(json.dumps({"hello": [1, 2, 3]}))
    files["text"].write_text("w1 w2 w3 w4\n" * 50)
    files["empty_dir"].mkdir()
    files["syntax_cfg"].write_text("def get_config(:\n    pass\n")
    files["raising_cfg"].write_text("def get_config():\n    return undefined_name\n")
    files["wrong_cfg"].write_text("def get_config():\n    return 42\n")
    files["random_cfg"].write_bytes(files["random"].read_bytes())
    # A run directory with its config and no checkpoint (what a run killed before its first save leaves).
    cfg = C.load_config("quickstart.py", [f"out_dir={files['run']}"])
    (files["run"] / "checkpoints").mkdir(parents=True)
    (files["run"] / "config.json").write_text(C.to_json(cfg))
    return {k: str(v) for k, v in files.items()}


F = {}  # filled by the fixture: the names above -> paths


def _rows():
    """``pytest.param(module, args, id=...)``: ``python -m module *args`` must fail in one line."""
    rows = []

    def add(name, module, *args):
        rows.append(pytest.param(module, args, id=name))

    bad_files = ("missing", "empty", "trunc_pt", "random", "not_tok_json", "empty_dir")
    some_bad_files = ("missing", "trunc_pt", "random")
    bad_tokenizers = ("missing", "empty", "trunc_tok", "random", "not_tok_json", "empty_dir", "big_tok")
    qs = ("--config", "quickstart.py")
    # train
    for cfg in ("missing", "empty", "syntax_cfg", "raising_cfg", "wrong_cfg", "random_cfg", "empty_dir"):
        add(f"train-config-{cfg}", "jaxlm.train", "--config", f"{{{cfg}}}", "--dry_run")
    for value in ("abc", "0", "10"):  # 10 < the quickstart's warmup + decay: a check between fields
        add(f"train-steps-{value}", "jaxlm.train", *qs, "--dry_run", f"--config.train.steps={value}")
    add("train-lr-nan", "jaxlm.train", *qs, "--dry_run", "--config.optim.lr=nan")
    add("train-unknown-flag", "jaxlm.train", *qs, "--dry_run", "--stepz=3")
    for bad in some_bad_files:
        add(f"train-init_from-{bad}", "jaxlm.train", *qs, "--config.out_dir={out}", "--init_from", f"{{{bad}}}")
    # generate
    gen = ("--checkpoint", "{good_pt}", "--prompt", "w1 w2")
    for bad in bad_files:
        add(f"generate-checkpoint-{bad}", "jaxlm.generate", "--checkpoint", f"{{{bad}}}", "--prompt", "w1")
    for bad in bad_tokenizers:
        add(f"generate-tokenizer-{bad}", "jaxlm.generate", *gen, "--tokenizer", f"{{{bad}}}")
    for bad in ("missing", "empty", "random", "empty_dir"):
        add(f"generate-prompts_file-{bad}", "jaxlm.generate", "--checkpoint", "{good_pt}", "--prompts_file",
            f"{{{bad}}}")
    for flag, values in {"--max_new_tokens": ("0", "abc"), "--temperature": ("nan",), "--top_p": ("1.5",),
                         "--top_k": ("-1",), "--repetition_penalty": ("0",), "--chunk_size": ("0",),
                         "--seed": ("abc",)}.items():
        for value in values:
            add(f"generate{flag}={value}", "jaxlm.generate", *gen, flag, value)
    # bench
    for cfg in ("missing", "syntax_cfg", "raising_cfg"):
        add(f"bench-config-{cfg}", "jaxlm.bench", "--config", f"{{{cfg}}}")
    for flag, value in (("--batch", "abc"), ("--batch", "16,0"), ("--seq", "0"), ("--grad_accum", "0"),
                        ("--steps", "0"), ("--repeats", "-1"), ("--warmup", "-1"), ("--peak_tflops", "-5"),
                        ("--timeout", "0")):
        add(f"bench{flag}={value}", "jaxlm.bench", *qs, flag, value)
    # checkpoint export
    for bad in ("missing", "empty", "random", "empty_dir"):
        add(f"export-run_dir-{bad}", "jaxlm.checkpoint", "export", f"{{{bad}}}", "{out}/exp")
    add("export-step-999", "jaxlm.checkpoint", "export", "{run}", "{out}/exp", "--step", "999")
    add("export-step-abc", "jaxlm.checkpoint", "export", "{run}", "{out}/exp", "--step", "abc")
    add("export-no-checkpoint", "jaxlm.checkpoint", "export", "{run}", "{out}/exp")
    add("export-dst-is-file", "jaxlm.checkpoint", "export", "{run}", "{random}")
    # data.tokenizer
    enc = ("encode", "--source", "{text}", "--out", "{out}/t.bin")
    for bad in bad_tokenizers[:-1]:
        add(f"tokenizer-encode-tokenizer-{bad}", "jaxlm.data.tokenizer", *enc, "--tokenizer", f"{{{bad}}}")
    for bad in ("missing", "empty_dir"):
        add(f"tokenizer-encode-source-{bad}", "jaxlm.data.tokenizer", "encode", "--source", f"{{{bad}}}",
            "--tokenizer", "{good_tok}", "--out", "{out}/t.bin")
        add(f"tokenizer-train-source-{bad}", "jaxlm.data.tokenizer", "train", "--source", f"{{{bad}}}",
            "--out", "{out}/tok.json")
    add("tokenizer-encode-docs=-1", "jaxlm.data.tokenizer", *enc, "--tokenizer", "{good_tok}", "--docs", "-1")
    for value in ("0", "abc", "200"):  # 200 < 256 bytes + 1 special: refused before reading
        add(f"tokenizer-train-vocab={value}", "jaxlm.data.tokenizer", "train", "--source", "{text}",
            "--vocab-size", value, "--out", "{out}/tok.json")
    add("tokenizer-no-command", "jaxlm.data.tokenizer")
    # data.tfds_builder
    tfds = ("--name", "x", "--data-dir", "{out}/tfds")
    for bad in ("missing", "random", "not_tok_json"):
        add(f"tfds-tokenizer-{bad}", "jaxlm.data.tfds_builder", "--source", "{text}", "--tokenizer", f"{{{bad}}}",
            *tfds)
    add("tfds-source-missing", "jaxlm.data.tfds_builder", "--source", "{missing}", "--tokenizer", "{good_tok}", *tfds)
    add("tfds-docs=abc", "jaxlm.data.tfds_builder", "--source", "{text}", "--tokenizer", "{good_tok}", *tfds,
        "--docs", "abc")
    add("tfds-docs=-1", "jaxlm.data.tfds_builder", "--source", "{text}", "--tokenizer", "{good_tok}", *tfds,
        "--docs", "-1")
    # data.bench
    for flag, value in (("--seq-len", "abc"), ("--batch-size", "0"), ("--seconds", "-1"), ("--workers", "-1"),
                        ("--read-threads", "0"), ("--tokens", "0")):
        add(f"data-bench{flag}={value}", "jaxlm.data.bench", flag, value)
    # tools.torch_port
    tp = "tools.torch_port"
    for bad in bad_files:
        add(f"torch_port-inspect-{bad}", tp, "inspect", f"{{{bad}}}")
    for bad in some_bad_files:  # the other verbs read their source through the same function
        add(f"torch_port-to-orbax-{bad}", tp, "to-orbax", f"{{{bad}}}", "{out}/orbax")
        add(f"torch_port-to-torch-{bad}", tp, "to-torch", f"{{{bad}}}", "{out}/back.pt")
        add(f"torch_port-probe-{bad}", tp, "probe", f"{{{bad}}}", "--tokenizer", "{good_tok}", "--text", "{text}")
    for bad in bad_tokenizers:  # read and checked against the model before anything is written
        add(f"torch_port-to-orbax-tokenizer-{bad}", tp, "to-orbax", "{good_pt}", f"{{out}}/orbax-{bad}",
            "--tokenizer", f"{{{bad}}}")
        add(f"torch_port-to-torch-tokenizer-{bad}", tp, "to-torch", "{good_pt}", f"{{out}}/back-{bad}.pt",
            "--tokenizer", f"{{{bad}}}")
        add(f"torch_port-probe-tokenizer-{bad}", tp, "probe", "{good_pt}", "--tokenizer", f"{{{bad}}}",
            "--text", "{text}")
    for bad in ("missing", "empty", "random", "empty_dir"):
        add(f"torch_port-probe-text-{bad}", tp, "probe", "{good_pt}", "--tokenizer", "{good_tok}", "--text",
            f"{{{bad}}}")
    for flag, value in (("--seq-len", "abc"), ("--seq-len", "0"), ("--max-tokens", "-1")):
        add(f"torch_port-probe{flag}={value}", tp, "probe", "{good_pt}", "--tokenizer", "{good_tok}", "--text",
            "{text}", flag, value)
    add("torch_port-no-verb", tp)
    return rows


ROWS = _rows()
# Rows whose failure could only show in a process of their own: they open an Orbax manager on a real
# run directory, whose threads can print at interpreter exit. The first row of every CLI (and verb)
# also runs alone (``_alone``), so that import-time noise (runpy, absl, TFDS) is seen.
ALONE = {"export-step-999", "export-no-checkpoint"}


def _alone(rows) -> set[str]:
    first = {}
    for p in rows:
        module, args = p.values
        verb = args[0] if args and not args[0].startswith("-") else ""
        first.setdefault((module, verb), p.id)
    return ALONE | set(first.values())


def _env() -> dict:
    return subprocess_env(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=xla_flags(None))


def _run_alone(module: str, argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def _run_driver(rows: list[tuple[str, str, list[str]]], folder: pathlib.Path) -> tuple[dict, dict]:
    """Many rows of one CLI in one process (``_drive``): ``({row: result}, the process's own result)``."""
    spec = folder / f"{rows[0][0]}.rows.json"
    spec.write_text(json.dumps(rows))
    out = spec.with_suffix(".results.json")
    done = subprocess.run([sys.executable, __file__, "--drive", str(spec), str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    results = json.loads(out.read_text()) if out.is_file() else {}
    return results, {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


class _RowTimeout(BaseException):  # not an Exception: no CLI's ``except Exception`` catches it
    pass


def _drive(spec: str, out: str) -> None:
    """Call each row's ``main(argv)`` in this process, as ``python -m MODULE ARGV`` would, and write
    ``{row: {rc, stdout, stderr}}`` to ``out``. Standard output and error are captured at the file
    descriptors, so what C++ (XLA, TensorStore) prints is seen as in a process of its own; an uncaught
    exception is printed with its traceback, as the interpreter would print it."""
    import importlib
    import signal
    import tempfile
    import traceback
    import warnings

    def timeout(*_):
        raise _RowTimeout("the row ran for more than 90 s")

    signal.signal(signal.SIGALRM, timeout)
    results = {}
    for name, module, argv in json.loads(pathlib.Path(spec).read_text()):
        warnings.onceregistry.clear()  # a warning shown once per process is shown again, as in a fresh one
        for loaded in list(sys.modules.values()):  # (through __dict__: a lazy module's __getattr__ may import)
            registry = getattr(loaded, "__dict__", {}).get("__warningregistry__")
            if isinstance(registry, dict):
                registry.clear()
        with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
            sys.stdout.flush(), sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(out_f.fileno(), 1), os.dup2(err_f.fileno(), 2)
            signal.alarm(90)
            try:
                target = importlib.import_module(module)
                if hasattr(target, "__path__"):  # a package: ``python -m`` runs its __main__
                    target = importlib.import_module(f"{module}.__main__")
                rc = target.main(argv) or 0
            except SystemExit as exit_:
                rc = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc()
                rc = 1
            finally:
                signal.alarm(0)
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])
            out_f.seek(0), err_f.seek(0)
            results[name] = {"rc": rc, "stdout": out_f.read().decode(errors="replace"),
                             "stderr": err_f.read().decode(errors="replace")}
    pathlib.Path(out).write_text(json.dumps(results))


DRIVERS = {}  # module -> the driver process's own result (its exit must be quiet too)


@pytest.fixture(scope="module")
def results(tmp_path_factory, request):
    pytest.importorskip("torch")  # the tools.torch_port rows and the .pt writer's round trips
    root = tmp_path_factory.mktemp("cli_errors")
    F.update(_make_files(root))
    selected = {item.callspec.id for item in request.session.items if hasattr(item, "callspec")}  # -k works
    rows = [p for p in ROWS if p.id in selected]
    alone = _alone(ROWS)
    groups: dict[str, list] = {}
    for p in rows:
        if p.id not in alone:
            module, args = p.values
            groups.setdefault(module, []).append((p.id, module, [a.format(**F) for a in args]))
    found = {}
    # Two cores: the largest groups first, the single rows filling in around them.
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        drivers = {module: pool.submit(_run_driver, group, root)
                   for module, group in sorted(groups.items(), key=lambda g: -len(g[1]))}
        singles = {p.id: pool.submit(_run_alone, p.values[0], [a.format(**F) for a in p.values[1]])
                   for p in rows if p.id in alone}
        for module, future in drivers.items():
            found_here, DRIVERS[module] = future.result()
            found.update(found_here)
        found.update({name: future.result() for name, future in singles.items()})
    return found


@pytest.mark.parametrize("module,args", ROWS)
def test_bad_input_ends_in_one_line(results, request, module, args):
    name = request.node.callspec.id
    assert name in results, f"{name}: no result (its driver process died?) {DRIVERS.get(module)}"
    proc = results[name]
    stderr_lines = [line for line in proc["stderr"].splitlines() if line.strip()]
    how = "alone" if name in _alone(ROWS) else "in a driver process"
    where = (f"{module} {' '.join(a.format(**F) for a in args)} ({how})\nstdout: {proc['stdout'][-800:]}\n"
             f"stderr: {proc['stderr'][-3000:]}")
    assert "Traceback" not in proc["stderr"] + proc["stdout"], where
    assert proc["rc"] == 2, where
    assert len(stderr_lines) == 1, where
    assert stderr_lines[0].startswith("error: "), where


def test_one_bad_file_is_described_alike_by_every_cli(results):
    """generate, train --init_from and each torch_port verb read a checkpoint through one function, so
    that a file is called the same thing everywhere; an empty file says what it is and the fix."""
    for bad in ("empty", "trunc_pt", "random"):
        rows = [f"{reader}-{bad}" for reader in ("generate-checkpoint", "train-init_from", "torch_port-inspect",
                                                 "torch_port-to-orbax", "torch_port-to-torch", "torch_port-probe")]
        rows = [name for name in rows if name in results]
        lines = {name: results[name]["stderr"].strip() for name in rows}
        assert len(set(lines.values())) == 1, lines
    if "generate-checkpoint-empty" in results:
        assert results["generate-checkpoint-empty"]["stderr"].strip() == (
            f"error: {F['empty']}: an empty file (0 bytes), not a checkpoint; copy or download it again")


def test_the_driver_processes_exit_quietly(results):
    """What the rows run in one process leave behind prints nothing at exit (Orbax threads, atexit)."""
    for module, proc in DRIVERS.items():
        assert proc["rc"] == 0 and not proc["stdout"].strip() and not proc["stderr"].strip(), (module, proc)


def test_a_damaged_newest_checkpoint_is_skipped_quietly(tmp_path):
    """``export`` of a run whose newest checkpoint has damaged array data falls back to the older one,
    and says so in one line: none of the tracebacks of the reads Orbax abandoned when the first failed
    ("Event loop is closed", "Exception ignored in: <coroutine ...>")."""
    import jax
    from jaxlm import checkpoint, sharding
    from jaxlm import config as C
    from jaxlm.models.toylm import ToyLMConfig
    from jaxlm.state import plan_state
    # Many arrays, so that many reads are in flight when the first damaged one fails.
    cfg = C.validate(C.Config(model=ToyLMConfig(vocab_size=96, dim=32, n_layers=8, n_heads=2, head_dim=16,
                                                mlp_hidden=48, max_seq_len=64, sliding_window=8),
                              train=C.TrainConfig(seq_len=32), out_dir=str(tmp_path / "run")))
    plan = plan_state(cfg, sharding.make_mesh(cfg.mesh))  # over the 8 test devices: a read per shard
    rng = np.random.default_rng(0)  # a state of the run's structure, without compiling its init
    state = jax.tree.map(lambda a: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), a.sharding),
                         plan.abstract)
    ckpt = checkpoint.Checkpointer(cfg)
    ckpt.check_config()
    for step in (1, 2):
        ckpt.save(step, {**state, "step": jax.device_put(np.asarray(step, state["step"].dtype), state["step"].sharding)})
        ckpt.wait()
    ckpt.close()
    # The arrays' data (not the JSON metadata, which fails before any array is read) of step 2.
    data = [p for p in (tmp_path / "run" / "checkpoints" / "2" / "state").rglob("*")
            if p.is_file() and p.parent.name == "d"]
    assert data
    for path in data:
        path.write_bytes(b"garbage" + path.read_bytes()[: path.stat().st_size // 3])
    # The abandoned reads print only when they end after Orbax closed its loop: four exports in one
    # process, so that a regression shows almost surely (one alone shows it about half the time).
    code = ("import sys; from jaxlm.checkpoint import main; "
            "sys.exit(max(main(['export', sys.argv[1], f'{sys.argv[2]}/{i}']) for i in range(4)))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), str(tmp_path / "exported")], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoints/2 is damaged") == 4 and done.stdout.count("exported to") == 4, done.stdout
    assert (tmp_path / "exported" / "3" / "params").is_dir()
    for noise in ("Exception ignored", "Traceback", "Event loop is closed"):
        assert noise not in done.stderr, done.stderr[-3000:]


def test_generation_ends_at_the_tokenizers_own_eos_without_grain(tmp_path):
    """A tokenizer without ``<|endoftext|>`` (SentencePiece's ``</s>``, DeepSeek's) names its EOS in
    ``tokenizer_config.json``: ``jaxlm.load`` finds it (``lm.eos_id``), in a process without Grain."""
    pytest.importorskip("tokenizers")
    from jaxlm import formats
    sys.path.insert(0, str(REPO / "tests"))
    from test_formats_hf import toylm_conv

    formats.write_checkpoint(toylm_conv(), tmp_path / "model.pt")
    tok = _tokenizer(VOCAB)
    vocab = tok.get_vocab()
    assert "</s>" not in vocab
    # the same ids, with "</s>" in place of "<|endoftext|>" at id 0
    from tokenizers import Tokenizer, models, pre_tokenizers
    renamed = {("</s>" if k == "<|endoftext|>" else k): v for k, v in vocab.items()}
    sp_like = Tokenizer(models.WordLevel(renamed, unk_token="[UNK]"))
    sp_like.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    sp_like.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w7", "bos_token": "</s>"}))
    code = ("import sys, jaxlm; lm = jaxlm.load(sys.argv[1]); "
            "print(lm.eos_id, lm.tokenizer.token_to_id('w7'), 'grain' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt")], capture_output=True, text=True,
                          env=subprocess_env(JAX_PLATFORMS="cpu"), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    eos_id, expected, grain_loaded = done.stdout.split()
    assert eos_id == expected and grain_loaded == "False"


if __name__ == "__main__" and sys.argv[1:2] == ["--drive"]:
    _drive(*sys.argv[2:])
