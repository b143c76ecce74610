"""Test setup shared by every test file.

Eight fake CPU devices are requested before JAX is imported, so that mesh and
sharding tests run on any machine; single-device tests simply use device 0.
"""

import atexit
import os
import pathlib
import queue
import shutil
import subprocess
import tempfile
import threading
import time
# pytest's unraisable-exception hook imports tracemalloc when a finalizer raises. While
# tensorflow_datasets imports its modules, etils replaces ``builtins.__import__`` in every thread;
# an import made then yields a lazy stand-in, tracemalloc's own imports fail, and pytest turns its
# failed hook into a test error. Imported here, before TFDS, the hook finds the real module.
import tracemalloc  # noqa: F401
from collections.abc import Mapping

import pytest



def xla_flags(devices: int | None) -> str:
    """``XLA_FLAGS`` for this process and the processes tests start: ``devices`` fake CPU devices
    (None: XLA's default, one), and the CPU backend's optimisation level 0: the suite's programs
    are tiny, so compiling is most of its time, and level 0 compiles faster for slower code (the
    figures are in the README)."""
    count = "" if devices is None else f"--xla_force_host_platform_device_count={devices} "
    return count + "--xla_backend_optimization_level=0"


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this test session, shared by pytest-xdist's workers and by
# every subprocess a test starts (they inherit the environment): the many tiny runs of the same
# configs compile once. A fresh folder per session, so that a session's time never depends on an
# earlier one; the process that made it removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402  (after the flags above)

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("JAXLM_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixture_dir(name: str) -> pathlib.Path:
    """The golden-file folder ``../shared/fixtures/<name>``, or skip the test saying why."""
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"golden fixtures not found at {path} (set JAXLM_FIXTURES to the shared/fixtures folder)")
    return path


def subprocess_env(*first: str | os.PathLike, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a process a test starts: ``base`` (default: this process's environment)
    with ``extra`` set, and PYTHONPATH = ``first``, this checkout, then ``base``'s own entries. The
    child imports this checkout's jaxlm, not whatever an install elsewhere points at."""
    env = dict(os.environ if base is None else base)
    inherited = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    # No empty entry when there were none: an empty entry would put the child's working folder on sys.path.
    env["PYTHONPATH"] = os.pathsep.join([*map(str, first), str(REPO), *inherited])
    return {**env, **extra}


def read_until(process: subprocess.Popen, done, timeout: float = 300.0, or_end: bool = False) -> list[str]:
    """The lines ``process`` prints (a text ``stdout`` pipe) up to and including the first for which
    ``done(line)`` is true (or, with ``or_end``, all of them if none is); the rest stays in the pipe
    for ``communicate``. A test never waits on a process for ever: if ``timeout`` seconds pass (the
    process is then killed), or the output ends first without ``or_end``, this fails the test with
    what was read."""
    lines: queue.Queue = queue.Queue()

    def reader():
        for line in process.stdout:
            lines.put(line)
            if done(line):
                return
        lines.put(None)   # end of output

    threading.Thread(target=reader, daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            process.kill()
            pytest.fail(f"no line awaited within {timeout:.0f} s; the process printed:\n{''.join(seen)[-3000:]}")
        if line is None:
            process.wait(timeout=60)
            if or_end:
                return seen
            pytest.fail(f"the process ended (exit {process.returncode}) before the line awaited:\n"
                        f"{''.join(seen)[-3000:]}")
        seen.append(line)
        if done(line):
            return seen


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (still part of CI)")
