"""Test setup shared by every test file.

Eight fake CPU devices are requested before JAX is imported, so that mesh and
sharding tests run on any machine; single-device tests simply use device 0.
"""

import os
import pathlib

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
