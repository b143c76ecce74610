"""Settings chosen for a scope rather than written into module globals.

Benchmarks and tests compare implementations of one function (XLA's attention against cuDNN's,
XLA's decode step against a kernel). Each such choice is a :class:`Switch`: code reads it with
``get()``, a caller chooses it for a block with ``with SWITCH.scope(value):``. The value lives in a
``contextvars.ContextVar``, so a scope ends with its block (also on error) and threads do not see
each other's choices. A switch is read while a function is traced: a jitted function keeps the
choice it was traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any


class Switch:
    def __init__(self, name: str, choices: tuple | None = None):
        self.name, self.choices = name, choices
        self._var: contextvars.ContextVar = contextvars.ContextVar(name, default=None)

    def get(self) -> Any:
        """The value chosen by the innermost enclosing scope, or None (let the code choose)."""
        return self._var.get()

    @contextlib.contextmanager
    def scope(self, value):
        """Within this block the switch reads ``value`` (None: back to the automatic choice)."""
        if value is not None and self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} = {value!r}: choose one of {', '.join(map(str, self.choices))}")
        token = self._var.set(value)
        try:
            yield value
        finally:
            self._var.reset(token)


# The platform the code is compiled for: the default backend, except while ``--compile_for``
# compiles a TPU program on a host without one (choices such as the attention kernel follow it).
PLATFORM = Switch("target platform", ("cpu", "gpu", "tpu"))


# Likewise the kind of device (``jax.Device.device_kind``, e.g. "TPU v2"): kernels whose support
# differs between generations of one platform follow it.
DEVICE_KIND = Switch("target device kind")


def target_platform() -> str:
    import jax
    return PLATFORM.get() or jax.default_backend()


def target_device_kind() -> str:
    import jax
    return DEVICE_KIND.get() or jax.devices()[0].device_kind
