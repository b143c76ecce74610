"""What an accelerator can do at best: the peak dense bf16 FLOP/s used for MFU."""

from __future__ import annotations

import jax

# Dense (not sparse) bf16 peak per device, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 70e12,
    "TPU v2": 45e12 / 2,   # per core: a v2 chip (45 TFLOP/s) has two cores, each a JAX device
    "TPU v3": 123e12 / 2,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e
}


def peak_flops_per_device(device=None, override: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of ``device`` (default: the first), or None when unknown (e.g. CPU)."""
    if override:
        return override
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None
