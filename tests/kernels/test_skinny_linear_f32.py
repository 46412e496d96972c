"""skinny_linear_f32.cpp (AVX2) against its PyTorch reference, batch invariance, calls of
MAX_ROWS rows up to CHUNKED_MAX_ROWS and the F.linear hand-off above, argument checks,
bf16 weights (the float32 bits from an exact bf16 copy), and the engine's float32 path on
it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slipstream.engine.models import load_model
from slipstream.kernels.cpu.build import cpu_flags
from slipstream.kernels.cpu.skinny_linear_f32 import (
    CHUNKED_MAX_ROWS,
    MAX_ROWS,
    GroupedBf16Weight,
    RowSplit,
    pack_grouped_bf16,
    skinny_f32_unavailable_reason,
    skinny_linear_f32,
    skinny_linear_f32_ref,
    unpack_grouped_bf16,
)
from slipstream.testing.tiny_model import make_tiny_model_dir
from tests.engine.test_models import run_two_steps

CAN_RUN = {"avx2", "fma"} <= cpu_flags() and shutil.which("g++") is not None
needs_kernel = pytest.mark.skipif(
    skinny_f32_unavailable_reason() is not None, reason=f"{skinny_f32_unavailable_reason()}"
)


def test_kernel_builds_where_cpu_and_compiler_allow() -> None:
    # Guards the skips below: every x86-64 dev and CI machine so far has AVX2 and g++.
    if CAN_RUN:
        assert skinny_f32_unavailable_reason() is None
    else:
        assert skinny_f32_unavailable_reason() is not None


def _f32(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Row chunks as float32 weights in place split them (grouped bf16 copies in brackets: their
# chunks are 4 rows, the rest last); each chunk in tiles as wide as its rows allow, within
# blocks of 6.
SHAPES = [
    (1, 6, 8),  # one block of 6 outputs, one lane chunk
    (1, 13, 20),  # blocks 6 + 6 + 1 over two threads; K tail of 4 lanes
    (1, 22, 8),  # a thread's blocks of 6 and a tail block of 4
    (2, 14, 16),  # 2 rows tile a block as 4 + 2; a tail block of 2
    (2, 9, 3),  # K shorter than a chunk: only the masked tail
    (3, 17, 13),  # 3 x 3 tiles
    (4, 40, 64),  # one 4-row chunk, 4 x 3 tiles
    (5, 50, 64),  # one 5-row chunk, 5 x 2 tiles [chunks 4 + 1]
    (9, 96, 576),  # the default model's K: one 9-row chunk (10 fit in L1), 9 x 1 [4 + 4 + 1]
    (12, 30, 64),  # the widest tile, 12 rows x 1 output [4 + 4 + 4]
    (13, 33, 31),  # chunks 6 + 7, tiles 6 x 2 and 7 x 1 [4 + 4 + 4 + 1]
    (7, 20, 1536),  # K = 1536: 4 rows fit in L1, chunks 3 + 4 [4 + 3]
    (17, 40, 576),  # chunks 8 + 9 [4 + 4 + 4 + 4 + 1]
    (32, 24, 40),  # MAX_ROWS: still the kernel, chunks of 10 + 11 + 11 [8 of 4]
]


@needs_kernel
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_matches_the_reference(m: int, n: int, k: int, with_bias: bool) -> None:
    x, w = _f32(m, k, seed=m * 1000 + k), _f32(n, k, seed=n)
    bias = _f32(n, seed=7) if with_bias else None
    got = skinny_linear_f32(x, w, bias)
    want = skinny_linear_f32_ref(x, w, bias)
    # The reference rounds each FMA through float64, which can differ from one rounding in
    # a rare tie; the order is the kernel's, so anything beyond an ulp is a real bug.
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    exact = (x.double() @ w.double().T + (0 if bias is None else bias.double())).float()
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize(
    ("m", "n", "k"),
    [*SHAPES, (1, 96, 576), (2, 10, 24), (6, 48, 1536), (2, 5, 8), (3, 1, 9)],
)
def test_grouped_bf16_weights_give_the_float32_bits(m: int, n: int, k: int) -> None:
    # Weights that bf16 holds exactly, as a bf16 checkpoint upcast to float32 has. Shapes
    # with N not a multiple of 6 end in a padded group; 2 rows tile a group as 4 + 2.
    w = _f32(n, k, seed=n).bfloat16().float()
    x, bias = _f32(m, k, seed=m * 1000 + k), _f32(n, seed=7)
    grouped = pack_grouped_bf16(w)
    assert grouped is not None and grouped.shape == w.shape
    assert torch.equal(skinny_linear_f32(x, grouped, bias), skinny_linear_f32(x, w, bias))
    assert torch.equal(skinny_linear_f32(x, grouped), skinny_linear_f32(x, w))


def test_grouped_bf16_layout_round_trips_and_pads_with_zeros() -> None:
    w = _f32(13, 21, seed=3).bfloat16().float()
    grouped = pack_grouped_bf16(w)
    assert grouped is not None
    assert grouped.packed.shape == (3, 3, 6, 8)  # ceil(13 / 6) groups, ceil(21 / 8) blocks
    assert torch.equal(unpack_grouped_bf16(grouped).float(), w)
    # Output 7, elements 8 .. 15: group 1, block 1, slot 1.
    assert torch.equal(grouped.packed[1, 1, 1].float(), w[7, 8:16])
    padding = grouped.packed.float().sum() - w.sum()
    assert (
        grouped.packed[2, :, 1:].abs().sum() == 0 and grouped.packed[:, 2, :, 5:].abs().sum() == 0
    )
    assert abs(padding) < 1e-3


def test_pack_grouped_bf16_refuses_weights_bf16_would_round() -> None:
    w = _f32(8, 16, seed=3).bfloat16().float()
    assert pack_grouped_bf16(w) is not None
    w[3, 5] += 2.0**-20  # one value off the bf16 grid: a copy would change the product
    assert pack_grouped_bf16(w) is None


@needs_kernel
def test_grouped_bf16_above_the_chunked_rows_runs_f_linear_on_the_float32_weight() -> None:
    w = _f32(24, 40, seed=5).bfloat16().float()
    grouped = pack_grouped_bf16(w)
    assert grouped is not None
    x = _f32(CHUNKED_MAX_ROWS + 5, 40, seed=4)
    assert torch.equal(skinny_linear_f32(x, grouped), torch.nn.functional.linear(x, w))
    with pytest.raises(ValueError, match="packed weight must be"):
        bad = GroupedBf16Weight(grouped.packed[:, :4], grouped.dense)
        skinny_linear_f32(x[:2], bad)


@needs_kernel
@pytest.mark.parametrize("grouped", [False, True])
def test_a_rows_bits_do_not_depend_on_its_neighbours(grouped: bool) -> None:
    # A row's tile differs with the rows sharing the call (alone: 1 x 6; of 9: 4 x 3, or
    # 9 x 1 in float32; of 13 float32 rows: 7 x 1), its bits may not.
    x, dense, bias = _f32(MAX_ROWS, 100, seed=1), _f32(70, 100, seed=2), _f32(70, seed=3)
    w: torch.Tensor | GroupedBf16Weight = dense
    if grouped:
        packed = pack_grouped_bf16(dense.bfloat16().float())
        assert packed is not None
        w = packed
    whole = skinny_linear_f32(x, w, bias)
    for rows in (5, 9, 13):
        assert torch.equal(skinny_linear_f32(x[:rows], w, bias), whole[:rows])
    for i in (0, 1, 4, 9, 31):
        assert torch.equal(skinny_linear_f32(x[i : i + 1], w, bias)[0], whole[i])
    order = torch.randperm(MAX_ROWS, generator=torch.Generator().manual_seed(0))[:11]
    assert torch.equal(skinny_linear_f32(x[order], w, bias), whole[order])


@needs_kernel
@pytest.mark.parametrize("grouped", [False, True])
def test_rows_past_max_rows_run_the_kernel_in_calls_until_the_chunked_limit(grouped: bool) -> None:
    dense, bias = _f32(70, 100, seed=5).bfloat16().float(), _f32(70, seed=3)
    w: torch.Tensor | GroupedBf16Weight = dense
    if grouped:
        packed = pack_grouped_bf16(dense)
        assert packed is not None
        w = packed
    x = _f32(2 * MAX_ROWS + 7, 100, seed=4)  # calls of 32 + 32 + 7 rows
    got = skinny_linear_f32(x, w, bias)
    # Each row has its bits from a call of its own: nothing depends on the other rows.
    for i in (0, MAX_ROWS - 1, MAX_ROWS, 2 * MAX_ROWS + 6):
        assert torch.equal(got[i], skinny_linear_f32(x[i : i + 1], w, bias)[0]), i
    assert torch.equal(
        got, skinny_linear_f32_ref(x, unpack_grouped_bf16(w) if grouped else w, bias)
    )
    mkl = torch.nn.functional.linear(x, dense, bias)
    assert not torch.equal(got, mkl)  # these shapes round differently in MKL: the call is seen
    assert torch.equal(skinny_linear_f32(x, w, bias, chunked_max_rows=MAX_ROWS + 6), mkl)
    many = _f32(CHUNKED_MAX_ROWS + 1, 100, seed=6)
    assert torch.equal(
        skinny_linear_f32(many, w, bias), torch.nn.functional.linear(many, dense, bias)
    )
    unlimited = skinny_linear_f32(many, w, bias, chunked_max_rows=None)
    assert torch.equal(unlimited[-1], skinny_linear_f32(many[-1:], w, bias)[0])


@needs_kernel
@needs_kernel
def test_a_row_split_keeps_decode_rows_off_mkl_at_any_step_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The engine's float32 steps over CHUNKED_MAX_ROWS rows: decode and draft rows (sequences
    # of few rows) keep the kernel's bits, long prefill chunks alone go to MKL.
    assert RowSplit.of([0, 200], CHUNKED_MAX_ROWS) is None  # a lone prefill: MKL for all
    split = RowSplit.of([0, 1, 10, 210, 214], CHUNKED_MAX_ROWS)
    assert split is not None
    assert split.few.tolist() == [*range(10), *range(210, 214)]
    assert split.many.tolist() == list(range(10, 210))
    x, w, bias = _f32(214, 64, seed=3), _f32(24, 64, seed=4), _f32(24, seed=5)
    mkl_rows: list[int] = []
    real = torch.nn.functional.linear

    def counted(inp: torch.Tensor, *rest: object) -> torch.Tensor:
        mkl_rows.append(inp.shape[0])
        return real(inp, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "linear", counted)
    y = split.linear(x, w, bias)
    assert mkl_rows == [200]
    for row in (*range(10), *range(210, 214)):  # each as if computed alone
        assert torch.equal(y[row], skinny_linear_f32(x[row : row + 1], w, bias)[0])
    torch.testing.assert_close(y[10:210], real(x[10:210], w, bias))
    # 40 sequences of 4 draft rows: 160 rows, all on the kernel.
    many_trees = RowSplit.of(list(range(0, 161, 4)), CHUNKED_MAX_ROWS)
    assert many_trees is not None and not many_trees.many.numel()
    y = many_trees.linear(x[:160], w, bias)
    assert mkl_rows == [200]
    assert torch.equal(y[77], skinny_linear_f32(x[77:78], w, bias)[0])


def test_rejects_what_it_cannot_run() -> None:
    w = _f32(16, 8, seed=6)
    with pytest.raises(ValueError, match="x must be"):
        skinny_linear_f32(_f32(2, 9, seed=0), w)
    with pytest.raises(ValueError, match="x must be"):
        skinny_linear_f32(_f32(2, 8, seed=0).double(), w)
    with pytest.raises(ValueError, match="weight must be"):
        skinny_linear_f32(_f32(2, 8, seed=0), _f32(8, 16, seed=0).T)
    with pytest.raises(ValueError, match="bias must be"):
        skinny_linear_f32(_f32(2, 8, seed=0), w, _f32(15, seed=0))


@needs_kernel
def test_float32_model_runs_its_products_through_the_kernel(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", tie_word_embeddings=False)
    plain, config = load_model(str(folder), torch.float32, torch.device("cpu"))
    fast, _ = load_model(str(folder), torch.float32, torch.device("cpu"))
    assert fast.pack_for_cpu() == "skinny_linear_f32"  # type: ignore[operator]
    layer = fast.layers[0]  # type: ignore[index]
    # Random float32 weights are not bf16-exact: they are used in place, not copied.
    assert layer.skinny[0] is layer.qkv_weight
    assert fast.lm_head_f32 is fast.lm_head  # type: ignore[union-attr]
    # Prefill of 19 rows then a 6-row step: MKL and the kernel sum in other orders.
    for a, b in zip(run_two_steps(plain, config), run_two_steps(fast, config), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("tied", [False, True])
def test_a_bf16_checkpoint_runs_from_bf16_copies_with_the_same_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tied: bool
) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", tie_word_embeddings=tied)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v.bfloat16() for k, v in weights.items()}, str(folder / "model.safetensors"))
    copies, config = load_model(str(folder), torch.float32, torch.device("cpu"))
    assert copies.pack_for_cpu() == "skinny_linear_f32"  # type: ignore[operator]
    monkeypatch.setenv("SLIPSTREAM_F32_BF16_WEIGHTS", "0")
    in_place, _ = load_model(str(folder), torch.float32, torch.device("cpu"))
    assert in_place.pack_for_cpu() == "skinny_linear_f32"  # type: ignore[operator]
    for layer in copies.layers:  # type: ignore[union-attr]
        own = layer.projection_weights()
        assert all(isinstance(c, GroupedBf16Weight) for c in layer.skinny)
        # The float32 parameters themselves (no copy) for F.linear above MAX_ROWS.
        assert all(
            c.dense.data_ptr() == w.data_ptr() for c, w in zip(layer.skinny, own, strict=True)
        )
        assert all(
            torch.equal(unpack_grouped_bf16(c).float(), w)
            for c, w in zip(layer.skinny, own, strict=True)
        )
    head = copies.embed_tokens if tied else copies.lm_head  # type: ignore[union-attr]
    assert isinstance(copies.lm_head_f32, GroupedBf16Weight)
    assert copies.lm_head_f32.dense.data_ptr() == head.data_ptr()
    assert in_place.layers[0].skinny[0] is in_place.layers[0].qkv_weight  # type: ignore[index]
    # Prefill (MKL over the float32 parameters) and a 6-row step (the kernel): same bits.
    for a, b in zip(run_two_steps(in_place, config), run_two_steps(copies, config), strict=True):
        assert torch.equal(a, b)
