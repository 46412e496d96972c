"""skinny_linear.cpp against its PyTorch reference (bit for bit), batch invariance, argument
checks, and the build cache in build.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from slipstream.kernels.cpu import build
from slipstream.kernels.cpu.build import KernelUnavailable, build_library, cpu_flags
from slipstream.kernels.cpu.skinny_linear import (
    can_pack,
    pack_skinny_weight,
    skinny_linear,
    skinny_linear_ref,
    skinny_unavailable_reason,
)

CAN_RUN = "avx512_bf16" in cpu_flags() and shutil.which("g++") is not None
needs_kernel = pytest.mark.skipif(
    skinny_unavailable_reason() is not None, reason=f"{skinny_unavailable_reason()}"
)


def test_kernel_builds_where_cpu_and_compiler_allow() -> None:
    # Guards the skips below: on the dev and CI machines (AVX512-BF16, g++) they must run.
    if CAN_RUN:
        assert skinny_unavailable_reason() is None
    else:
        assert skinny_unavailable_reason() is not None


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("m", "n", "k"),
    [
        (1, 16, 2),  # one block, one pair
        (1, 80, 64),  # 5 blocks: a group of 4 and a tail of 1 per thread split
        (5, 48, 38),
        (7, 112, 64),  # one 7-row chunk, groups of 3 blocks: 2 + a tail of 1 per thread
        (8, 80, 64),  # groups of 3: a tail of 2 per thread
        (12, 176, 30),  # one 12-row chunk, groups of 2 and tails of 1
        (13, 64, 30),  # two row chunks (7 + 6), groups of 3
        (24, 96, 20),  # two 12-row chunks
        (25, 80, 18),  # prefill-sized: chunks of at most 6 rows (5 x 5), groups of 4
        (40, 32, 16),
        (3, 1024, 96),  # threads split many blocks
    ],
)
def test_matches_the_reference_bit_for_bit(m: int, n: int, k: int, out_dtype: torch.dtype) -> None:
    x, w = _bf16(m, k, seed=m * 1000 + k), _bf16(n, k, seed=n)
    packed = pack_skinny_weight(w)
    for bias in (None, _bf16(n, seed=7)):
        got = skinny_linear(x, packed, bias, out_dtype)
        assert got.dtype == out_dtype and got.shape == (m, n)
        assert torch.equal(got, skinny_linear_ref(x, w, bias, out_dtype))


@needs_kernel
def test_close_to_a_float64_product() -> None:
    x, w = _bf16(9, 576, seed=1), _bf16(3072, 576, seed=2)
    got = skinny_linear(x, pack_skinny_weight(w), None, torch.float32)
    exact = (x.double() @ w.double().T).float()
    # 576 float32 adds of O(1) products: error ~ sqrt(576) * 2^-24 * |partial sums| << 1e-3.
    torch.testing.assert_close(got, exact, atol=1e-3, rtol=1e-5)


@needs_kernel
def test_a_row_does_not_depend_on_the_other_rows() -> None:
    w = _bf16(160, 96, seed=3)
    packed = pack_skinny_weight(w)
    x = _bf16(30, 96, seed=4)
    alone = torch.cat([skinny_linear(x[i : i + 1], packed) for i in range(30)])
    for rows in (2, 6, 8, 9, 12, 17, 24, 30):
        assert torch.equal(skinny_linear(x[:rows], packed), alone[:rows])


@needs_kernel
def test_thread_count_does_not_change_the_result() -> None:
    w, x = _bf16(256, 64, seed=5), _bf16(11, 64, seed=6)
    packed = pack_skinny_weight(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = skinny_linear(x, packed)
        torch.set_num_threads(2)
        two = skinny_linear(x, packed)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
def test_non_contiguous_input_and_no_rows() -> None:
    w = _bf16(32, 16, seed=8)
    packed = pack_skinny_weight(w)
    x = _bf16(16, 6, seed=9).T  # [6, 16], column-major view
    assert torch.equal(skinny_linear(x, packed), skinny_linear_ref(x, w))
    assert skinny_linear(x[:0], packed).shape == (0, 32)


@needs_kernel
def test_bad_arguments_raise() -> None:
    packed = pack_skinny_weight(_bf16(32, 8, seed=1))
    with pytest.raises(ValueError, match=r"x must be \[M, 8\] bf16"):
        skinny_linear(_bf16(2, 6, seed=1), packed)
    with pytest.raises(ValueError, match="x must be"):
        skinny_linear(torch.randn(2, 8), packed)
    with pytest.raises(ValueError, match=r"bias must be \[32\] bf16"):
        skinny_linear(_bf16(2, 8, seed=1), packed, _bf16(16, seed=1))
    with pytest.raises(ValueError, match="out_dtype"):
        skinny_linear(_bf16(2, 8, seed=1), packed, None, torch.float16)


def test_pack_refuses_what_the_kernel_cannot_take() -> None:
    assert can_pack(_bf16(32, 8, seed=1))
    for bad in (_bf16(24, 8, seed=1), _bf16(32, 7, seed=1), torch.randn(32, 8)):
        assert not can_pack(bad)
        with pytest.raises(ValueError, match="N % 16 == 0 and even K"):
            pack_skinny_weight(bad)


def test_pack_layout() -> None:
    w = torch.arange(32 * 6, dtype=torch.float32).reshape(32, 6).to(torch.bfloat16)
    packed = pack_skinny_weight(w)
    assert packed.shape == (2, 3, 16, 2)
    for b, p, i, j in [(0, 0, 0, 0), (1, 2, 15, 1), (0, 1, 7, 0), (1, 0, 3, 1)]:
        assert packed[b, p, i, j] == w[16 * b + i, 2 * p + j]


@needs_kernel
def test_one_openmp_runtime_is_loaded() -> None:
    # The kernel must share torch's OpenMP pool (build.py): one libgomp mapped, not two.
    skinny_linear(_bf16(1, 8, seed=1), pack_skinny_weight(_bf16(16, 8, seed=1)))
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp


SOURCE = 'extern "C" int answer(void) { return ANSWER; }\n'


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_build_caches_by_source_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIPSTREAM_KERNEL_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "answer.cpp"
    src.write_text(SOURCE)
    lib = build_library(src, ("-O1", "-DANSWER=41"), needs_cpu=())
    assert lib.answer() == 41
    built = sorted((tmp_path / "cache").glob("answer-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert build_library(src, ("-O1", "-DANSWER=41"), needs_cpu=()).answer() == 41
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert build_library(src, ("-O1", "-DANSWER=42"), needs_cpu=()).answer() == 42
    assert len(list((tmp_path / "cache").glob("answer-*.so"))) == 2
    assert not list((tmp_path / "cache").glob("tmp*"))  # no half-written files left


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_build_errors_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIPSTREAM_KERNEL_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "broken.cpp"
    src.write_text("this is not C++\n")
    with pytest.raises(KernelUnavailable, match="failed"):
        build_library(src, ("-O1",), needs_cpu=())
    assert not list((tmp_path / "cache").glob("*"))
    src.write_text(SOURCE)
    with pytest.raises(KernelUnavailable, match="lacks no_such_flag"):
        build_library(src, ("-DANSWER=1",), needs_cpu=("no_such_flag",))
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(KernelUnavailable, match="no C\\+\\+ compiler"):
        build_library(src, ("-DANSWER=1",), needs_cpu=())


def test_turned_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIPSTREAM_CPU_KERNELS", "0")
    assert skinny_unavailable_reason() == "turned off by SLIPSTREAM_CPU_KERNELS=0"
