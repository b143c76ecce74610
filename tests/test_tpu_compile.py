"""``--compile_for``: every TPU preset compiles for the TPU slices a Colab / Cloud user gets, and fits.

The TPU compiler (libtpu, the ``[tpu]`` extra that ``[dev]`` includes) compiles the real training
step for a slice on this CPU host; without libtpu the compile tests skip. A full-size step takes
minutes of one core to compile (docs/PERFORMANCE.md, "TPU presets"), so ``JAXLM_TPU_COMPILE``
chooses what is compiled:

* ``presets`` (the default, what CI runs): every preset for a v2-8, whose 8 GiB cores are the
  least HBM per device a preset is written for and whose compiles are the quickest, and a config
  made too big;
* ``all``: every preset for every slice below (a v5e chip, a v5e-8, a v2-8);
* ``one``: the first preset for a v2-8 (a quick local check).

The compiles run as command-line processes two at a time, started once for the module; each test
reads its own.
"""

import concurrent.futures
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

from jaxlm import config as C
from jaxlm import tpu

# The first test to read ``compiled`` waits for every compile (two at a time, minutes each).
pytestmark = pytest.mark.timeout(2400)

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'): "
                                                         "compiling for a TPU needs the TPU compiler")

# The slices of a Colab / Cloud user, with their devices' kind: one v5e chip, a v5e-8 and a v2-8
# (compiled by default).
SLICE_KINDS = {"v5e:1x1": "TPU v5 lite", "v5e:2x4": "TPU v5 lite", "v2:2x2": "TPU v2"}
ALL_SLICES = tuple(SLICE_KINDS)
DEFAULT_SLICE = "v2:2x2"
PRESETS = sorted(path.name for path in (REPO / "configs").glob("*_tpu.py"))
CHOICE = os.environ.get("JAXLM_TPU_COMPILE", "presets")
if CHOICE not in ("one", "presets", "all"):
    raise ValueError(f"JAXLM_TPU_COMPILE={CHOICE!r}: choose one, presets or all")
COMPILED = {(p, s) for p in (PRESETS[:1] if CHOICE == "one" else PRESETS)
            for s in (ALL_SLICES if CHOICE == "all" else (DEFAULT_SLICE,))}
# A config made far too big for a v5e-8, through jaxlm.bench (the train CLI compiles the others):
# the quickstart's, whose refusal takes seconds to compile.
TOO_BIG = ("quickstart.py", "v5e:2x4", ["--batch", "65536", "--grad_accum", "1"])
LIBTPU_NOISE = ("TPU_WORKER_HOSTNAMES", "TPU accelerator type", "libtpu", "E0000", "InitGoogle",
                "Source Location Trace")


def slice_overrides(preset: str, topology: str) -> list[str]:
    """The README's overrides for a preset on a slice other than the 8 v5e chips it is written for."""
    devices = 1 if topology.endswith(":1x1") else tpu.PRESET_DEVICES
    return ["--config." + o for o in tpu.slice_overrides(preset, devices, SLICE_KINDS[topology])]


def compile_for(preset: str, topology: str, extra: list[str], cli: str = "train") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", f"jaxlm.{cli}", "--config", preset, "--compile_for", topology, *extra]
    if cli == "train":
        command.append("--dry_run")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)


@pytest.fixture(scope="module")
def compiled():
    """``(preset, slice) -> CompletedProcess`` of the chosen compiles, and of the too-big one."""
    jobs = {(p, s): (slice_overrides(p, s), "train") for p, s in sorted(COMPILED)}
    jobs[TOO_BIG[:2] + ("too big",)] = (TOO_BIG[2], "bench")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:   # a compile keeps one core busy
        futures = {key: pool.submit(compile_for, key[0], key[1], *job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def compiled_table(compiled, preset, topology) -> tuple[str, dict]:
    if (preset, topology) not in compiled:
        pytest.skip(f"{preset} for {topology}: compiled with JAXLM_TPU_COMPILE=all (minutes of CPU each)")
    done = compiled[(preset, topology)]
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, f"{preset} on {topology}:\n{out}\n{err}"
    assert not any(noise in err for noise in LIBTPU_NOISE), f"libtpu's start-up noise reached stderr:\n{err}"
    return out, dict(re.findall(r"^\s*(\w[\w ]*?)\s{2,}(.+)$", out, re.M))


@needs_libtpu
@pytest.mark.parametrize("topology", ALL_SLICES)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_fits_the_slice(compiled, preset, topology):
    out, table = compiled_table(compiled, preset, topology)
    assert out.splitlines()[-1].startswith("fits: "), out
    hbm = tpu.HBM_BYTES[SLICE_KINDS[topology]] / tpu.GiB
    total = float(re.search(r"total\s+([\d.]+) GiB", out).group(1))
    assert 0 < total <= hbm and f"of {hbm:.2f} GiB HBM" in out
    for row in ("arguments", "outputs", "temporaries", "program"):
        assert float(table[row].split()[0]) >= 0, table[row]
    assert table["compiled for"].startswith(f"{topology} ("), table["compiled for"]
    # FLOPs: the config's own count, and the compiled program's.
    assert re.fullmatch(r"config [\d,.]+ TFLOP \([\d,.]+ per (chip|core)\)", table["FLOPs per step"]), out
    assert re.match(r"[\d,.]+ TFLOP per (chip|core), each loop's body counted once", table["compiled"]), out


@needs_libtpu
@pytest.mark.parametrize("preset", PRESETS)
def test_the_compiled_step_has_no_sequence_by_sequence_buffer(compiled, preset):
    """Attention in the TPU step is splash attention's: no T x T scores or mask anywhere in the program."""
    out, table = compiled_table(compiled, preset, DEFAULT_SLICE)
    assert table["T x T buffers"] == "none", out


@needs_libtpu
def test_a_preset_made_too_big_does_not_fit(compiled):
    done = compiled[TOO_BIG[:2] + ("too big",)]
    assert done.returncode == tpu.EXIT_DOES_NOT_FIT, done.stdout + done.stderr
    last = done.stdout.splitlines()[-1]
    over = float(re.fullmatch(r"does not fit by ([\d.]+) GiB per chip", last).group(1))
    assert over > 0
    assert "refused" in done.stdout and not any(noise in done.stderr for noise in LIBTPU_NOISE), done.stderr


def test_every_family_has_a_tpu_preset():
    """A family added later fails here until it has a configs/<name>_tpu.py."""
    probe = ("import json; from jaxlm import models, tpu; "
             "print(json.dumps([[f.name for f in models.all_families()], tpu.presets()]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True,
                          timeout=300)
    families, presets = json.loads(done.stdout.splitlines()[-1])
    assert set(presets) == {C.load_config(p).model.family for p in PRESETS}
    assert not set(families) - set(presets), f"families without a TPU preset: {set(families) - set(presets)}"


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_keep_their_recipe_on_any_slice(preset):
    """FSDP over every device; on 1, 4 or 8 devices of any kind the sequences per device its HBM
    fits (the preset's own on a v5e) and the recipe's tokens per step."""
    cfg = C.load_config(preset)
    t = cfg.train
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)
    per_device = C.load_config_module(preset).PER_DEVICE
    assert t.batch_size == tpu.PRESET_DEVICES * per_device[tpu.PRESET_HBM_GIB]
    for kind in ("TPU v5 lite", "TPU v6 lite", "TPU v2"):
        per = tpu.sequences_per_device(preset, kind)
        assert per == per_device[max(g for g in per_device if g <= tpu.HBM_BYTES[kind] // tpu.GiB)]
        for devices in (1, 4, 8):
            scaled = C.load_config(preset, tpu.slice_overrides(preset, devices, kind)).train
            assert scaled.batch_size == devices * per
            assert scaled.batch_size * scaled.grad_accum == t.batch_size * t.grad_accum


def test_a_device_no_micro_batch_is_known_to_fit_is_refused(tmp_path):
    big_chips_only = tmp_path / "big_chips_only_tpu.py"
    big_chips_only.write_text("PER_DEVICE = {32: 1}\n\n\ndef get_config():\n    raise NotImplementedError\n")
    with pytest.raises(tpu.ConfigError, match="no micro-batch is known to fit 8 GiB per device"):
        tpu.sequences_per_device(str(big_chips_only), "TPU v2")
    with pytest.raises(tpu.ConfigError, match="HBM unknown"):
        tpu.sequences_per_device(PRESETS[0], "TPU v9")
    with pytest.raises(tpu.ConfigError, match="the sequences per device that fit 16 GiB"):
        tpu.preset(C.load_config(PRESETS[0]), {8: 2}, out_dir=str(tmp_path))


def test_slice_names():
    assert tpu.resolve("v5e-8") == tpu.resolve("v5litepod-8") == tpu.resolve("v5e:2x4") == "v5e:2x4"
    assert tpu.resolve("v2-8") == "v2:2x2" and tpu.resolve("V6E-1") == "v6e:1x1"
    with pytest.raises(tpu.ConfigError, match=r"unknown TPU slice; known: v2:2x2 \(v2-8\)"):
        tpu.resolve("v9-8")


def test_refusal_messages_are_read():
    assert tpu.parse_refusal("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                             "temporaries (22.76G) exceeds available HBM (15.75G).") == \
        (int(22.76 * 2**30), int(15.75 * 2**30))
    assert tpu.parse_refusal("Ran out of memory in memory space hbm. Used 17.50G of 15.75G hbm. Exceeded hbm "
                             "capacity by 1.75G.") == (int(17.5 * 2**30), int(15.75 * 2**30))
    assert tpu.parse_refusal("INTERNAL: something else") is None


def test_square_buffers():
    hlo = "%a = bf16[2,8,4096,4096]{3,2,1,0} fusion(), %b = f32[16,4096,512]{2,1,0} dot(), %c = pred[4096,4096]"
    assert tpu.square_buffers(hlo, 4096) == ["bf16[2,8,4096,4096]", "pred[4096,4096]"]
    assert tpu.square_buffers("%p = f32[1,1024,1024] add()", 1000) == ["f32[1,1024,1024]"]   # padded to 1024
    assert tpu.square_buffers(hlo, 2048) == []


ATTENTION_HLO = """
import json
import jax, jax.numpy as jnp
from jaxlm import sharding, switches, tpu
from jaxlm.config import MeshConfig
from jaxlm.models import layers
tpu.prepare_host()
mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1), devices=tpu.topology_devices("v5e:1x1"))
x = jax.ShapeDtypeStruct((2, 512, 4, 64), jnp.bfloat16, sharding=sharding.batch_sharding(mesh))
loss = lambda q, k, v: jnp.sum(layers.causal_attention(q, k, v, window=None).astype(jnp.float32))
found = {}
for implementation in ("xla", "splash"):
    with switches.PLATFORM.scope("tpu"), sharding.use_mesh(mesh), layers.ATTENTION.scope(implementation), \\
            tpu.libtpu_quiet("compiling"):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
    found[implementation] = tpu.square_buffers(hlo, 512)
print(json.dumps(found))
"""


@needs_libtpu
def test_sequence_by_sequence_buffers_are_found_in_a_compiled_tpu_program():
    """The check above looks where dense attention would be: XLA's attention compiled for a TPU
    shows its T x T buffers, splash attention's shows none."""
    done = subprocess.run([sys.executable, "-c", ATTENTION_HLO], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["xla"] and all("512,512" in shape for shape in found["xla"]), found
    assert found["splash"] == [], found


def test_cli_errors_are_one_line():
    unknown = subprocess.run([sys.executable, "-m", "jaxlm.train", "--config", PRESETS[0], "--dry_run",
                              "--compile_for", "v9-8"], capture_output=True, text=True, cwd=REPO,
                             timeout=300)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert "unknown TPU slice; known: v2:2x2 (v2-8)" in unknown.stderr and "v5e:2x4 (v5e-8" in unknown.stderr
    # Without libtpu: the extra to install, in one line.
    no_libtpu = ("import importlib.util as u, sys; find = u.find_spec; "
                 "u.find_spec = lambda name, *a: None if name == 'libtpu' else find(name, *a); "
                 "from jaxlm.train import main; sys.exit(main(sys.argv[1:]))")
    for module in ("jaxlm.train", "jaxlm.bench"):
        args = ["--config", PRESETS[0], "--compile_for", "v5e-8"] + (["--dry_run"] if module == "jaxlm.train" else [])
        code = no_libtpu.replace("jaxlm.train", module)
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                              timeout=300)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr == f"error: {tpu.MISSING_LIBTPU}\n", done.stderr
