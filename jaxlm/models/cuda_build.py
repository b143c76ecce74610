"""Building a family's CUDA kernel with nvcc and registering it with XLA's FFI, once per shape.

A family that brings a hand-written kernel (``toylm/decode_kernel.py``) keeps its sources in its
own package and calls :func:`ffi_target` with them and its compile-time defines. The library is
built into ``~/.cache/jaxlm/kernels`` (``JAXLM_CACHE_DIR`` moves it), keyed by a hash of the
sources and flags, so it is built once per shape and reused by later processes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax

from jaxlm.errors import JaxlmError


def find_nvcc() -> str | None:
    """``$JAXLM_NVCC``, else ``nvcc`` on the PATH, else the CUDA toolkit's (``$CUDA_HOME``)."""
    candidates = [os.environ.get("JAXLM_NVCC"), shutil.which("nvcc")]
    candidates += [os.path.join(root, "bin", "nvcc") for root in
                   (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if root]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(os.environ.get("JAXLM_CACHE_DIR", "~/.cache/jaxlm"))) / "kernels"


def compile_library(name: str, source: pathlib.Path, headers: tuple[pathlib.Path, ...], arch: str,
                    defines: dict, description: str) -> pathlib.Path:
    """The shared library of ``source`` for one set of ``-DJAXLM_<K>=<V>`` defines, built with nvcc
    for ``sm_<arch>`` unless the cache already holds it. ``name`` prefixes the file; ``description``
    ("the ToyLM CUDA decode kernel") names it in errors."""
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wno-return-type",
             "-diag-suppress", "940,2473", f"-gencode=arch=compute_{arch},code=sm_{arch}",
             "-I", jax.ffi.include_dir(), *(f"-DJAXLM_{k}={v}" for k, v in defines.items())]
    code = b"".join(path.read_bytes() for path in (source, *headers))
    key = hashlib.sha256(code + " ".join(flags).encode()).hexdigest()[:16]
    directory = cache_dir()
    library = directory / f"{name}_{key}.so"
    if library.exists():
        return library
    nvcc = find_nvcc()
    if nvcc is None:
        raise JaxlmError(f"building {description} needs nvcc: set JAXLM_NVCC or CUDA_HOME")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:   # built aside, then moved: never half a file
        built = pathlib.Path(tmp) / library.name
        result = subprocess.run([nvcc, *flags, str(source), "-o", str(built)], capture_output=True, text=True)
        if result.returncode:
            lines = result.stderr.splitlines()
            errors = [line for line in lines if "error" in line.lower()] or lines or ["no message"]
            raise JaxlmError(f"building {description} with {nvcc} failed: {errors[0].strip()}")
        os.replace(built, library)
    return library


@functools.cache
def ffi_target(library: pathlib.Path, handler: str) -> tuple[str, ctypes.CDLL]:
    """Register the library's FFI ``handler`` with XLA for CUDA: ``(target name, the loaded library)``."""
    lib = ctypes.cdll.LoadLibrary(str(library))
    target = f"jaxlm_{library.stem}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, handler)), platform="CUDA")
    return target, lib
