"""Test setup shared by every test file.

Eight fake CPU devices are requested before JAX is imported, so that mesh and
sharding tests run on any machine; single-device tests simply use device 0.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (still part of CI)")
