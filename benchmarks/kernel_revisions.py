"""A C++ CPU kernel built from a git revision or from the working tree, for in-process A/B
scripts (attention_kernel_ab.py, attention_engine_ab.py, skinny_linear_ab.py): both builds
are then called through the same wrapper, alternating, so the machine's drift hits both
alike."""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from slipstream.kernels.cpu.build import INSTRUCTION_SETS, build_library

KERNEL_DIR = "slipstream/kernels/cpu"
REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout


def build_kernel_at(
    revision: str | None,  # None: the working tree
    source: str,  # file name in slipstream/kernels/cpu/, e.g. "skinny_linear.cpp"
    function: str,  # its C entry point
    argtypes: Sequence[Any],
    workdir: Path,  # where a revision's source and headers are written
    isa: str = "avx512_bf16",  # a key of INSTRUCTION_SETS: "avx2_fma" for the *_f32.cpp files
) -> Callable[..., int]:
    """The kernel's C function, built (or taken from the build cache) for `revision`."""
    if revision is None:
        path = REPO / KERNEL_DIR / source
    else:
        folder = workdir / revision.replace("/", "_")
        folder.mkdir(exist_ok=True)
        for name in _git("ls-tree", "--name-only", f"{revision}:{KERNEL_DIR}").split():
            if name == source or name.endswith(".h"):  # the source and the headers it includes
                (folder / name).write_text(_git("show", f"{revision}:{KERNEL_DIR}/{name}"))
        path = folder / source
    flags, needs_cpu = INSTRUCTION_SETS[isa]
    lib = build_library(path, flags, needs_cpu=needs_cpu)
    fn = getattr(lib, function)
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def build_base_and_working_tree(
    base: str, source: str, function: str, argtypes: Sequence[Any], isa: str = "avx512_bf16"
) -> dict[str, Callable[..., int]]:
    """{base: the kernel at revision `base`, "working tree": the kernel as it is now}."""
    with tempfile.TemporaryDirectory() as tmp:
        return {
            name: build_kernel_at(rev, source, function, argtypes, Path(tmp), isa)
            for name, rev in ((base, base), ("working tree", None))
        }


def print_ab_table(
    title: str,
    first_column: str,
    names: Sequence[str],  # (base revision, "working tree")
    times: dict[tuple[str, Any], list[float]],  # (build, row) -> seconds per round
    same_bits: dict[Any, bool],  # row -> whether both builds gave the same outputs
) -> None:
    """The A/B as a markdown table: median ms per build, their ratio, same bits."""
    print(title)
    print(f"| {first_column} | {names[0]} | {names[1]} | ratio | same bits |")
    print("| --- | --- | --- | --- | --- |")
    for row, same in same_bits.items():
        a, b = (statistics.median(times[(n, row)]) * 1e3 for n in names)
        print(f"| {row} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {'yes' if same else 'NO'} |")


def interleaved_rounds(
    builds: dict[str, Callable[..., int]],
    cases: Sequence[Any],
    rounds: int,
    run_case: Callable[[Callable[..., int], Any], list[torch.Tensor]],
) -> tuple[dict[tuple[str, Any], list[float]], dict[Any, bool]]:
    """Seconds of run_case(build's function, case) per (build, case) over `rounds` rounds
    after a warm-up round, the builds' order flipping every round; and per case whether the
    two builds' outputs (run_case's tensors, from the warm-up) have the same bits."""
    names = list(builds)
    times: dict[tuple[str, Any], list[float]] = {(b, c): [] for b in names for c in cases}
    outs: dict[tuple[str, Any], list[torch.Tensor]] = {}
    for r in range(rounds + 1):  # round 0 warms up and keeps the outputs
        for name in names if r % 2 else names[::-1]:
            for case in cases:
                start = time.perf_counter()
                got = run_case(builds[name], case)
                if r:
                    times[(name, case)].append(time.perf_counter() - start)
                else:
                    outs[(name, case)] = got
    same = {
        c: all(
            torch.equal(x, y) for x, y in zip(outs[(names[0], c)], outs[(names[1], c)], strict=True)
        )
        for c in cases
    }
    return times, same
