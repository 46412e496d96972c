"""Compile a C++ kernel file into a shared library on first use, cache it, load it (ctypes).

Why not torch.utils.cpp_extension: that needs ninja, Python headers and ~30 s to compile
against torch's headers; these kernels need none of torch, so plain `g++ -shared` builds one
in ~2 s and ctypes calls it with raw pointers (~2 us a call).

OpenMP: the library links libgomp.so.1. torch (imported first) has already loaded its own
libgomp.so.1, and the dynamic loader reuses a loaded library of the same soname, so the
kernels share torch's thread pool instead of starting a second one that would spin against
it on the same cores.

The cache key hashes the source, the headers beside it, the flags and the compiler's
version, so an edited kernel or another compiler builds anew. SLIPSTREAM_KERNEL_CACHE moves
the cache (default ~/.cache/slipstream/kernels, or $XDG_CACHE_HOME/slipstream/kernels).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or run here; the message says why."""


def cpu_flags() -> frozenset[str]:
    """Instruction-set flags of this CPU from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cache_dir() -> Path:
    explicit = os.environ.get("SLIPSTREAM_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slipstream" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CXX", ""), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    raise KernelUnavailable("no C++ compiler found (set CXX or install g++)")


def build_library(
    source: Path, flags: tuple[str, ...], needs_cpu: tuple[str, ...], also: tuple[Path, ...] = ()
) -> ctypes.CDLL:
    """The loaded library built from `source` (and the sources `also`, linked in: a kernel
    that calls other kernels' C entry points); KernelUnavailable when it cannot be.

    needs_cpu: /proc/cpuinfo flags the kernel's instructions need (checked before building,
    since a library built with -mavx512bf16 would die with SIGILL on a CPU without it).
    """
    missing = [f for f in needs_cpu if f not in cpu_flags()]
    if missing:
        raise KernelUnavailable(f"this CPU lacks {', '.join(missing)}")
    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    # The headers beside the source count too: the kernels include them.
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256(
        "\0".join(
            [source.read_text(), *(a.read_text() for a in also), *headers, *flags]
            + [compiler, version]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: processes starting together never load a
        # half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, *flags, "-shared", "-fPIC", str(source), *map(str, also), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            os.unlink(tmp)
            raise KernelUnavailable(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        raise KernelUnavailable(f"cannot load {target}: {e}") from e


# The CPU kernels' instruction sets: AVX512 with the bf16 dot product (VDPBF16PS).
AVX512_BF16_FLAGS = (
    "-O3",
    "-std=c++17",
    "-fopenmp",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512bf16",
    "-mfma",
)
# Float32 kernels for CPUs without AVX512 (AVX2 with FMA: Haswell on, AMD Zen 1-3).
AVX2_FMA_FLAGS = ("-O3", "-std=c++17", "-fopenmp", "-mavx2", "-mfma")
# Instruction set name -> (compiler flags, /proc/cpuinfo flags the kernels need).
INSTRUCTION_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512_bf16": (AVX512_BF16_FLAGS, ("avx512f", "avx512_bf16")),
    "avx2_fma": (AVX2_FMA_FLAGS, ("avx2", "fma")),
}
_BUILD_LOCK = threading.Lock()


def cpu_kernels_turned_off() -> str | None:
    """Why the engine must not use the C++ kernels (SLIPSTREAM_CPU_KERNELS=0), or None."""
    if os.environ.get("SLIPSTREAM_CPU_KERNELS", "1") == "0":
        return "turned off by SLIPSTREAM_CPU_KERNELS=0"
    return None


@functools.cache
def _load(source_name: str, also: tuple[str, ...], isa: str) -> ctypes.CDLL | str:
    here = Path(__file__).parent
    flags, needs = INSTRUCTION_SETS[isa]
    try:
        return build_library(
            here / source_name,
            flags,
            needs_cpu=needs,
            also=tuple(here / name for name in also),
        )
    except KernelUnavailable as e:
        return str(e)


class CppFunction:
    """One C function of a kernel in this folder, built for its instruction set (`isa`, a
    key of INSTRUCTION_SETS) and given its ctypes signature on first use; one build attempt
    a process, whatever the outcome.

    `get()` is the hot path (a C++ call per layer): after the first call it is an attribute
    read. The functions return an int status, 0 for success.
    """

    def __init__(
        self,
        source_name: str,
        symbol: str,
        argtypes: list[Any],
        also: tuple[str, ...] = (),
        isa: str = "avx512_bf16",
    ) -> None:
        self.source_name, self.symbol, self.argtypes = source_name, symbol, argtypes
        self.also = also  # further sources of this folder linked into the library
        self.isa = isa
        self._fn: Callable[..., int] | None = None
        # Why the build failed, once it has: the engine asks per layer (~4 us a lock and a
        # cache lookup each time, for a build this CPU cannot run).
        self._failed: str | None = None

    def _load(self) -> Callable[..., int] | str:
        if self._failed is not None:
            return self._failed
        with _BUILD_LOCK:
            lib = _load(self.source_name, self.also, self.isa)
        if isinstance(lib, str):
            self._failed = lib
            return lib
        fn = getattr(lib, self.symbol)
        fn.argtypes = self.argtypes
        fn.restype = ctypes.c_int
        self._fn = fn
        return fn

    def get(self) -> Callable[..., int]:
        """The function; RuntimeError saying why when it cannot be built here."""
        fn = self._fn if self._fn is not None else self._load()
        if isinstance(fn, str):
            raise RuntimeError(f"{self.symbol} is unavailable: {fn}")
        return fn

    def unavailable_reason(self) -> str | None:
        """None when the engine should use the kernel, else why not: no compiler, a CPU
        without its instruction set, or SLIPSTREAM_CPU_KERNELS=0 (the engine then runs
        PyTorch)."""
        off = cpu_kernels_turned_off()
        if off is not None:
            return off
        fn = self._fn if self._fn is not None else self._load()
        return fn if isinstance(fn, str) else None
