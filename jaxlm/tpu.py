"""Does a config fit a TPU slice? Compile its training step for the slice, on a host without one.

    python -m jaxlm.train --config crowfeather_tpu.py --dry_run --compile_for v5e-8

libtpu (the ``[tpu]`` extra) holds the TPU compiler, and ``jax.experimental.topologies``
describes a slice's chips without any being attached. The real training step
(``jaxlm.train.jit_train_step``: the config's mesh over the slice's devices, its optimizer,
loss, fast paths and splash attention) is lowered on abstract arguments (``plan.abstract`` and
a token batch's shape) and compiled by the TPU compiler: no weight is created, nothing runs.
What it reports is XLA's plan for each chip (arguments, outputs, temporaries) against the
chip's HBM, the compiled FLOPs next to the config's own count, and any sequence x sequence
buffer (the dense attention that splash attention replaces). The TPU compiler itself refuses a
program larger than the chip's HBM; that refusal is a "does not fit by X GiB".

What this cannot check: speed (nothing runs), and pods of several hosts (only one-host slices
are named here: a pod's data loading and collectives between hosts are not in the program).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import sys
import tempfile
import time

from jaxlm import config as C
from jaxlm.errors import ConfigError, JaxlmError

GiB = 2**30

# libtpu's topology names (chips per side) of the one-host slices, with their Cloud / Colab names.
TOPOLOGIES = {
    "v2:2x2": ("v2-8",),
    "v3:2x2": ("v3-8",),
    "v5e:1x1": ("v5e-1", "v5litepod-1"),
    "v5e:2x2": ("v5e-4", "v5litepod-4"),
    "v5e:2x4": ("v5e-8", "v5litepod-8"),
    "v6e:1x1": ("v6e-1",),
    "v6e:2x2": ("v6e-4",),
    "v6e:2x4": ("v6e-8",),
    "v5p:2x2x1": ("v5p-8",),
}

# HBM per JAX device by device kind (a v2 or v3 chip is two devices, one per core), from Google
# Cloud's TPU pages: libtpu cannot be asked without a chip.
HBM_BYTES = {
    "TPU v2": 8 * GiB,
    "TPU v3": 16 * GiB,
    "TPU v4": 32 * GiB,        # one device per chip (its two cores act as one)
    "TPU v5 lite": 16 * GiB,   # v5e
    "TPU v5": 95 * GiB,        # v5p
    "TPU v6 lite": 32 * GiB,   # v6e
}

MISSING_LIBTPU = "libtpu is not installed: install the [tpu] extra: pip install -e '.[tpu]'"
DOES_NOT_FIT = "does not fit by"


def known_names() -> str:
    return ", ".join(f"{name} ({' / '.join(cloud)})" for name, cloud in TOPOLOGIES.items())


def resolve(name: str) -> str:
    """libtpu's name of a slice given by either of its names (``v5e-8`` -> ``v5e:2x4``)."""
    for topology, cloud in TOPOLOGIES.items():
        if name.strip().lower() in (topology, *cloud):
            return topology
    raise ConfigError(f"--compile_for {name}: unknown TPU slice; known: {known_names()}")


def cloud_name(topology: str) -> str:
    return TOPOLOGIES[topology][0]


# --------------------------------------------------------------------------- the presets

# A TPU preset (``configs/*_tpu.py``, one per family) is written for a slice of this many JAX
# devices of this much HBM each (a v5e-8); ``slice_overrides`` carries it to any other slice.
PRESET_DEVICES = 8
PRESET_HBM_GIB = 16


def preset(cfg: C.Config, per_device: dict[int, int], out_dir: str) -> C.Config:
    """``cfg`` as a TPU preset: FSDP over all devices and the recipe's tokens per step, with
    ``per_device[PRESET_HBM_GIB]`` sequences per device per micro-batch on ``PRESET_DEVICES``
    devices (the rest accumulated).

    ``per_device`` maps GiB of HBM per device to the sequences per device that fit there, as
    ``--compile_for`` found them; ``slice_overrides`` reads it for other slices."""
    if PRESET_HBM_GIB not in per_device:
        raise ConfigError(f"PER_DEVICE = {per_device}: a TPU preset gives the sequences per device that fit "
                          f"{PRESET_HBM_GIB} GiB (the {PRESET_DEVICES} devices it is written for)")
    cfg.mesh = C.MeshConfig(data=1, fsdp=-1, tensor=1)
    cfg.train.batch_size, cfg.train.grad_accum = _micro_batches(cfg.train, PRESET_DEVICES * per_device[PRESET_HBM_GIB])
    cfg.out_dir = out_dir
    return cfg


def _micro_batches(t: C.TrainConfig, batch: int) -> tuple[int, int]:
    """``(batch_size, grad_accum)`` that keep ``t``'s tokens per step at ``batch`` sequences a micro-batch."""
    rows = t.batch_size * t.grad_accum
    if rows % batch:
        raise ConfigError(f"train.batch_size = {t.batch_size} x train.grad_accum = {t.grad_accum} sequences a step "
                          f"are not whole micro-batches of {batch}; set train.batch_size and train.grad_accum")
    return batch, rows // batch


def presets() -> dict[str, str]:
    """``family -> file name`` of every TPU preset, ``configs/*_tpu.py``."""
    found = {}
    for directory in C.CONFIG_DIRS:
        for path in sorted(directory.glob("*_tpu.py")):
            found.setdefault(C.load_config(str(path)).model.family, path.name)
    return found


def sequences_per_device(preset_name: str, device_kind: str) -> int:
    """A preset's sequences per device per micro-batch on a device of ``device_kind`` (its
    ``PER_DEVICE`` entry for the most HBM not above the device's)."""
    per_device = getattr(C.load_config_module(preset_name), "PER_DEVICE", None)
    if not isinstance(per_device, dict):
        raise ConfigError(f"{preset_name}: a TPU preset defines PER_DEVICE = {{GiB of HBM per device: sequences}}")
    if device_kind not in HBM_BYTES:
        raise ConfigError(f"{device_kind!r}: HBM unknown; known TPU kinds: {', '.join(HBM_BYTES)}")
    hbm_gib = HBM_BYTES[device_kind] // GiB
    fitting = [gib for gib in per_device if gib <= hbm_gib]
    if not fitting:
        raise ConfigError(f"{preset_name}: no micro-batch is known to fit {hbm_gib} GiB per device "
                          f"(PER_DEVICE = {per_device}); find one with --compile_for")
    return per_device[max(fitting)]


def slice_overrides(preset_name: str, devices: int, device_kind: str) -> list[str]:
    """The overrides that run a TPU preset on ``devices`` devices of ``device_kind``: the
    sequences per device that fit that device, and the recipe's tokens per step."""
    batch = devices * sequences_per_device(preset_name, device_kind)
    batch_size, grad_accum = _micro_batches(C.load_config(preset_name).train, batch)
    return [f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}"]


# --------------------------------------------------------------------------- libtpu, quietly


def prepare_host() -> None:
    """Before JAX starts a backend: this process compiles for a TPU but runs on the CPU.

    Without ``jax_platforms=cpu``, JAX with libtpu installed would try to open a TPU here."""
    if importlib.util.find_spec("libtpu") is None:
        raise JaxlmError(MISSING_LIBTPU)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")   # no TPU metadata server to ask on this host
    # libtpu locks /tmp/libtpu_lockfile to guard the chips; compiling opens none, so another
    # process compiling at the same time is no conflict.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    jax.config.update("jax_platforms", "cpu")


@contextlib.contextmanager
def libtpu_quiet(what: str):
    """Keep libtpu's start-up messages (written by C++ straight to file descriptor 2: it finds
    no TPU host, no worker addresses) away from the user; on an error, its log is kept and named."""
    log = tempfile.NamedTemporaryFile(prefix="jaxlm-libtpu-", suffix=".log", delete=False)
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    keep = False
    try:
        yield
    except Exception as error:
        if isinstance(error, JaxlmError):
            raise
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        keep = os.path.getsize(log.name) > 0
        raise JaxlmError(f"{what}: {first[:300]}" + (f" (libtpu's log: {log.name})" if keep else "")) from None
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        log.close()
        if not keep:
            os.unlink(log.name)


def topology_devices(topology: str):
    """The devices of a one-host slice, described by libtpu (no TPU needed)."""
    from jax.experimental import topologies

    sides = [int(side) for side in topology.split(":")[1].split("x")]
    with libtpu_quiet(f"libtpu could not describe {topology}"):
        # One host holds the whole slice (libtpu's default splits a 2x4 over two hosts).
        return topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            chips_per_host_bounds=tuple(sides + [1] * (3 - len(sides)))).devices


# --------------------------------------------------------------------------- the report


@dataclasses.dataclass
class Report:
    topology: str
    device_kind: str
    devices: int
    hbm_bytes: int | None            # per device, from HBM_BYTES
    mesh: dict                       # axis -> size
    batch_size: int
    seq_len: int
    grad_accum: int
    config_flops: float              # per step, all devices: flops_per_token x tokens per step
    compile_s: float
    # From the compiled program, per device (None when the compiler refused it):
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    compiled_flops: float | None = None
    square_buffers: list = dataclasses.field(default_factory=list)   # shapes with two dims = seq_len
    # When the compiler refused it: what it needed and had, in bytes.
    refused_need: int | None = None
    refused_have: int | None = None

    @property
    def total_bytes(self) -> int | None:
        """What XLA plans per device: arguments + outputs not aliased to them + temporaries."""
        if self.temp_bytes is None:
            return None
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def over_bytes(self) -> int:
        """Bytes per device beyond its HBM (0 or less: it fits)."""
        if self.refused_need is not None:
            return self.refused_need - self.refused_have
        return self.total_bytes - self.hbm_bytes if self.hbm_bytes else 0

    @property
    def fits(self) -> bool:
        return self.over_bytes <= 0


def compile_report(cfg: C.Config, topology: str, jit_step) -> Report:
    """Compile ``cfg``'s training step for ``topology`` (a name of ``TOPOLOGIES``) and report.

    ``jit_step(plan, cfg)`` makes the jitted step as training runs it (``jaxlm.train.jit_train_step``,
    passed in by the entry points: this module sits below them)."""
    import jax

    from jaxlm import sharding, switches
    from jaxlm.state import plan_state

    prepare_host()
    topology = resolve(topology)
    devices = topology_devices(topology)
    t = cfg.train
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    kind = devices[0].device_kind
    report = Report(topology=topology, device_kind=kind, devices=len(devices), hbm_bytes=HBM_BYTES.get(kind),
                    mesh=dict(mesh.shape), batch_size=t.batch_size, seq_len=t.seq_len, grad_accum=t.grad_accum,
                    config_flops=cfg.model.flops_per_token(t.seq_len) * t.batch_size * t.seq_len * t.grad_accum,
                    compile_s=0.0)
    start = time.perf_counter()
    with switches.PLATFORM.scope("tpu"), switches.DEVICE_KIND.scope(kind):
        plan = plan_state(cfg, mesh)
        tokens = jax.ShapeDtypeStruct((t.grad_accum, t.batch_size, t.seq_len + 1), "int32",
                                      sharding=sharding.batch_sharding(mesh, batch_axis=1))
        with sharding.use_mesh(mesh), libtpu_quiet(f"compiling for {topology} failed"):
            lowered = jit_step(plan, cfg).lower(plan.abstract, tokens)
            try:
                compiled = lowered.compile()
            except Exception as error:  # noqa: BLE001 - the TPU compiler's refusal is an answer
                refusal = parse_refusal(str(error))
                if refusal is None:
                    raise
                report.refused_need, report.refused_have = refusal
                compiled = None
    report.compile_s = time.perf_counter() - start
    if compiled is not None:
        memory = compiled.memory_analysis()
        report.argument_bytes = memory.argument_size_in_bytes
        report.output_bytes = memory.output_size_in_bytes
        report.alias_bytes = memory.alias_size_in_bytes
        report.temp_bytes = memory.temp_size_in_bytes
        report.code_bytes = memory.generated_code_size_in_bytes
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost   # a list of one on older JAX
        report.compiled_flops = float(cost.get("flops", 0.0)) if cost else None
        report.square_buffers = square_buffers(compiled.as_text(), t.seq_len)
    return report


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
# The TPU compiler's two forms of "out of HBM": the temporaries alone exceed it, or the whole
# program does (the sizes are its own, in powers of 1024).
_REFUSALS = (
    re.compile(rf"memory required for HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
)


def parse_refusal(message: str) -> tuple[int, int] | None:
    """``(bytes needed, bytes available)`` from the TPU compiler's out-of-memory error, or None."""
    def size(number, unit):
        return int(float(number) * 1024 ** "BKMGT".index(unit or "B"))
    for pattern in _REFUSALS:
        found = pattern.search(message)
        if found:
            need_n, need_u, have_n, have_u = found.groups()
            return size(need_n, need_u), size(have_n, have_u)
    return None


_SHAPE = re.compile(r"\b(?:pred|[subf]\d+|bf16)\[([\d,]+)\]")


def square_buffers(hlo_text: str, seq_len: int) -> list[str]:
    """Array shapes of the compiled program with two dimensions of the sequence length (or that
    length padded to whole 128-lane blocks): the T x T scores or masks of dense attention."""
    lengths = {seq_len, -(-seq_len // 128) * 128}
    found = set()
    for match in _SHAPE.finditer(hlo_text):
        dims = [int(d) for d in match.group(1).split(",")]
        if sum(d in lengths for d in dims) >= 2:
            found.add(match.group(0))
    return sorted(found)


def versions() -> str:
    import jax
    try:
        libtpu = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        libtpu = "?"
    return f"libtpu {libtpu}, jax {jax.__version__}"


def format_report(r: Report) -> str:
    """The table ``--compile_for`` prints; its last line says ``fits`` or ``does not fit by X GiB``."""
    gib = lambda b: f"{b / GiB:7.2f} GiB"
    per_device = "core" if r.device_kind in ("TPU v2", "TPU v3") else "chip"
    hbm = f"{r.hbm_bytes / GiB:.0f} GiB HBM per {per_device}" if r.hbm_bytes else "HBM unknown"
    mesh = " x ".join(f"{axis} {size}" for axis, size in r.mesh.items())
    per = r.batch_size / r.devices
    lines = [
        f"compiled for      {r.topology} ({cloud_name(r.topology)}): {r.devices} x {r.device_kind}, {hbm}; "
        f"{versions()}; {r.compile_s:.0f} s",
        f"mesh              {mesh}",
        f"micro-batch       {r.batch_size} x {r.seq_len} tokens ({per:g} sequence{'' if per == 1 else 's'} per "
        f"{per_device}), {r.grad_accum} per step",
    ]
    if r.refused_need is not None:
        lines.append(f"refused           the TPU compiler needs {r.refused_need / GiB:.2f} GiB per {per_device}, "
                     f"{r.refused_have / GiB:.2f} GiB is available")
    else:
        lines += [
            f"memory per {per_device}   XLA's plan",
            f"  arguments       {gib(r.argument_bytes)}",
            f"  outputs         {gib(r.output_bytes)}  ({r.alias_bytes / GiB:.2f} GiB of them aliased to the "
            "arguments: the donated state)",
            f"  temporaries     {gib(r.temp_bytes)}",
            f"  total           {gib(r.total_bytes)}"
            + (f"  of {r.hbm_bytes / GiB:.2f} GiB HBM" if r.hbm_bytes else ""),
            f"  program         {gib(r.code_bytes)}  (the compiled code, not in the total)",
        ]
    lines.append(f"FLOPs per step    config {r.config_flops / 1e12:,.2f} TFLOP "
                 f"({r.config_flops / r.devices / 1e12:,.2f} per {per_device})")
    if r.compiled_flops is not None:
        lines.append(f"  compiled        {r.compiled_flops / 1e12:,.2f} TFLOP per {per_device}, each loop's body "
                     "counted once (XLA's cost analysis: micro-batches, scanned layers and loss chunks are loops)")
    if r.refused_need is None:
        squares = ("none" if not r.square_buffers else
                   f"{len(r.square_buffers)} shapes, e.g. {', '.join(r.square_buffers[:3])} (dense attention)")
        lines.append(f"T x T buffers     {squares}")
    if r.fits:
        free = f": {-r.over_bytes / GiB:.2f} GiB of HBM left per {per_device}" if r.hbm_bytes else \
            " (the compiler accepted it; this chip's HBM is not in jaxlm.tpu.HBM_BYTES)"
        lines.append("fits" + free)
    else:
        lines.append(f"{DOES_NOT_FIT} {r.over_bytes / GiB:.2f} GiB per {per_device}")
    return "\n".join(lines)


# The exit status of a config that does not fit (0: it fits; 2: an error, as everywhere).
EXIT_DOES_NOT_FIT = 3
