"""float32 linear for AVX2 CPUs (skinny_linear_f32.cpp) and its PyTorch reference.

y[M, N] = x[M, K] @ w[N, K]^T + bias for the few rows of decode and speculative steps,
straight from the weight's own layout. The engine runs float32 models' products through it
on CPUs with AVX2 and FMA (float32 is the default where the CPU lacks native bf16) up to
MAX_ROWS rows a call. Up to CHUNKED_MAX_ROWS rows (short prefills, prompt-seeding and
prompt-logprob LM heads, wide speculative batches) run as several calls of up to MAX_ROWS
rows; longer prefills go to PyTorch (MKL), whose blocked GEMM reuses x across outputs where
this kernel re-reads it for every few outputs.

Like skinny_linear (bf16), a row's output has the same bits whatever other rows share the
call, so a speculative step's verification rows match what one-row decoding computes.

The weight may also come as a GroupedBf16Weight (`pack_grouped_bf16`): a bf16 copy that
holds the float32 weight's values exactly, in groups of 6 outputs. The kernel widens it as
it reads, for the same bits from half the bytes. A float32 model loaded from a bf16
checkpoint (the default model) has such weights.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass

import torch

from slipstream.kernels.cpu.build import CppFunction

# Rows in one call of the kernel: its tiles keep up to 12 rows in registers, and a call's
# rows go in chunks that stream each weight block from DRAM once. Decode batches and a
# speculative tree of up to 32 rows are one call.
MAX_ROWS = 32
# Above MAX_ROWS, up to this many rows run as calls of MAX_ROWS rows (each streams the
# weights again); above it, F.linear (MKL). On a 2-core AMD EPYC Zen 3, the default model's
# shapes over bf16 copies (benchmarks/prefill_products.py, session 29), a layer's four
# projections took 3.41 -> 2.46 ms at 33 rows, 5.41 -> 4.27 at 64, 13.1 -> 10.6 at 128,
# 19.2 -> 17.3 at 256 (the calls faster), and 40.8 -> 44.3 at 512 (MKL faster). The LM
# head [49152, 576], which MKL reads slowly at every size, took 49.5 -> 21.6 ms at 33 rows,
# 59.7 -> 36.7 at 64, 114 -> 71 at 128, and the same at 256-512: its caller lifts the limit.
# A one-token chat on ~50-token prompts (prefill and first token) went 244 -> 138 ms.
CHUNKED_MAX_ROWS = 128

_SKINNY_F32 = CppFunction(
    "skinny_linear_f32.cpp",
    "slipstream_skinny_linear_f32",
    [
        ctypes.c_void_p,  # x
        ctypes.c_int64,  # M
        ctypes.c_int64,  # K
        ctypes.c_void_p,  # weight [N, K]
        ctypes.c_int64,  # N
        ctypes.c_void_p,  # bias or NULL
        ctypes.c_void_p,  # y
        ctypes.c_int,  # threads
    ],
    isa="avx2_fma",
)
_SKINNY_F32_GROUPED_BF16 = CppFunction(
    "skinny_linear_f32.cpp",
    "slipstream_skinny_linear_f32_bf16g",
    _SKINNY_F32.argtypes,  # the same, the weight as GroupedBf16Weight.packed
    isa="avx2_fma",
)
GROUP = 6  # outputs a group of the bf16 layout (the kernel's one-row tile)
LANES = 8  # K is padded to this (a ymm register of float32)


@dataclass(frozen=True)
class GroupedBf16Weight:
    """A float32 weight [N, K] whose values bf16 holds exactly, with a bf16 copy for the
    kernel to stream: output n's elements k .. k + 7 (k a multiple of 8) lie at packed[n //
    6, k // 8, n % 6], zero-padded to whole groups and blocks, so a thread reads one
    contiguous stream (skinny_linear_f32.cpp says why)."""

    packed: torch.Tensor  # [ceil(N / 6), ceil(K / 8), 6, 8] bf16
    dense: torch.Tensor  # [N, K] float32: what the copy holds; F.linear above MAX_ROWS

    @property
    def shape(self) -> torch.Size:
        return self.dense.shape


def skinny_f32_unavailable_reason() -> str | None:
    """None when the engine should use the kernel, else why not (no compiler, no AVX2 +
    FMA, turned off by SLIPSTREAM_CPU_KERNELS=0)."""
    return _SKINNY_F32.unavailable_reason()


def can_run_f32(weight: torch.Tensor) -> bool:
    """Whether skinny_linear_f32 takes this weight: 2-D contiguous float32 on CPU."""
    return (
        weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.is_contiguous()
    )


def pack_grouped_bf16(weight: torch.Tensor) -> GroupedBf16Weight | None:
    """The GroupedBf16Weight of a float32 weight [N, K] when bf16 holds every value exactly
    (a bf16 checkpoint upcast), else None: skinny_linear_f32 over it gives the same bits."""
    dense = weight.detach()
    copy = dense.to(torch.bfloat16)
    if not torch.equal(copy.float(), dense):
        return None
    n, k = copy.shape
    groups, blocks = -(-n // GROUP), -(-k // LANES)
    padded = torch.nn.functional.pad(copy, (0, blocks * LANES - k, 0, groups * GROUP - n))
    # [groups, 6, blocks, 8] -> [groups, blocks, 6, 8]
    packed = padded.view(groups, GROUP, blocks, LANES).transpose(1, 2).contiguous()
    return GroupedBf16Weight(packed, dense)


def unpack_grouped_bf16(weight: GroupedBf16Weight) -> torch.Tensor:  # [N, K] bf16
    """The bf16 values of a GroupedBf16Weight in [N, K] order (for tests and references)."""
    n, k = weight.shape
    groups, blocks = weight.packed.shape[:2]
    rows = weight.packed.transpose(1, 2).reshape(groups * GROUP, blocks * LANES)
    return rows[:n, :k]


def skinny_linear_f32(
    x: torch.Tensor,  # [M, K] float32
    weight: torch.Tensor | GroupedBf16Weight,  # [N, K] float32, contiguous
    bias: torch.Tensor | None = None,  # [N] float32
    chunked_max_rows: int | None = CHUNKED_MAX_ROWS,  # None: no limit
) -> torch.Tensor:  # [M, N] float32
    """x @ weight.T + bias: the C++ kernel, in calls of up to MAX_ROWS rows, up to
    `chunked_max_rows` rows; F.linear (over the float32 weight) above. A row's bits are the
    same in any call, so they do not depend on M either, up to the limit.

    RuntimeError if the kernel is unavailable. Checks only what would make it read out of
    bounds (121 calls a decode step).
    """
    # dense: the float32 [N, K] weight; data: what the kernel reads (it, or the bf16 copy).
    if isinstance(weight, GroupedBf16Weight):
        grouped, dense, data = True, weight.dense, weight.packed
    else:
        grouped, dense, data = False, weight, weight
    if chunked_max_rows is not None and x.shape[0] > max(chunked_max_rows, MAX_ROWS):
        return torch.nn.functional.linear(x, dense, bias)
    fn = (_SKINNY_F32_GROUPED_BF16 if grouped else _SKINNY_F32).get()
    n, k = dense.shape
    if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.float32:
        raise ValueError(f"x must be [M, {k}] float32, got {tuple(x.shape)} {x.dtype}")
    if grouped:
        want = (-(-n // GROUP), -(-k // LANES), GROUP, LANES)
        if data.shape != want or data.dtype != torch.bfloat16 or not data.is_contiguous():
            raise ValueError(f"packed weight must be contiguous bf16 {want}")
    elif not can_run_f32(data):
        raise ValueError(
            "weight must be a contiguous 2-D float32 CPU tensor, got "
            f"{tuple(data.shape)} {data.dtype} on {data.device}"
        )
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32):
        raise ValueError(f"bias must be [{n}] float32, got {tuple(bias.shape)} {bias.dtype}")
    if not x.is_contiguous():
        x = x.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    threads = torch.get_num_threads()
    for row in range(0, m, MAX_ROWS):  # float32 rows: 4 bytes an element (none for m = 0)
        status = fn(
            x.data_ptr() + 4 * row * k,
            min(MAX_ROWS, m - row),
            k,
            data.data_ptr(),
            n,
            None if bias is None else bias.data_ptr(),
            y.data_ptr() + 4 * row * n,
            threads,
        )
        if status != 0:  # unreachable after the checks above; kept so a mismatch cannot pass
            raise RuntimeError(f"skinny_linear_f32 returned {status}")
    return y


@dataclass(frozen=True)
class RowSplit:
    """A step's rows in two sets: those of sequences that feed few rows (decode, draft
    trees), whose products must not depend on the step, and those of long prefill chunks.

    Why: above CHUNKED_MAX_ROWS rows skinny_linear_f32 hands the whole product to MKL, whose
    rounding follows the shape; a decode row sharing its step with a prefill chunk, or with
    more than 128 other decode and draft rows, then got other bits than decoding alone, and
    a speculative decoder's greedy answer could leave standard's under load. `linear` keeps
    the few rows on the kernel (any count, in calls of MAX_ROWS: at 256 rows faster than
    MKL, at 512 ~9% slower, per the numbers above) and gives MKL only the long chunks.
    """

    few: torch.Tensor  # [F] int64 row indices
    many: torch.Tensor  # [M] int64 row indices

    @staticmethod
    def of(query_starts: list[int], few_max: int) -> RowSplit | None:
        """Rows of sequences with at most few_max rows against the rest; None where no
        sequence feeds few rows (prefill chunks only: MKL for all)."""
        few: list[int] = []
        many: list[int] = []
        for start, end in itertools.pairwise(query_starts):
            (few if end - start <= few_max else many).extend(range(start, end))
        if not few:
            return None
        return RowSplit(torch.tensor(few), torch.tensor(many, dtype=torch.int64))

    def linear(
        self,
        x: torch.Tensor,  # [F + M, K] float32
        weight: torch.Tensor | GroupedBf16Weight,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [F + M, N] float32
        """skinny_linear_f32 on the few rows (whatever their count), MKL on the rest."""
        if not self.many.numel():
            return skinny_linear_f32(x, weight, bias, None)
        n = weight.dense.shape[0] if isinstance(weight, GroupedBf16Weight) else weight.shape[0]
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        y.index_copy_(
            0, self.few, skinny_linear_f32(x.index_select(0, self.few), weight, bias, None)
        )
        y.index_copy_(0, self.many, skinny_linear_f32(x.index_select(0, self.many), weight, bias))
        return y


def skinny_linear_f32_ref(
    x: torch.Tensor,  # [M, K] float32
    weight: torch.Tensor,  # [N, K] float32 or bf16 (unpack_grouped_bf16)
    bias: torch.Tensor | None = None,  # [N] float32
) -> torch.Tensor:  # [M, N] float32
    """The kernel's summation order in PyTorch: 8 lanes, lane l summing k = l mod 8 in
    increasing k (each step rounded once: float64 holds the exact product and the sum,
    then rounds to float32, as an FMA does but for rare double-rounding ties), then the
    lanes added as ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), then the bias."""
    m, k = x.shape
    n = weight.shape[0]
    pad = (-k) % 8
    xp = torch.nn.functional.pad(x.double(), (0, pad)).view(m, -1, 8)
    wp = torch.nn.functional.pad(weight.double(), (0, pad)).view(n, -1, 8)
    lanes = torch.zeros(m, n, 8, dtype=torch.float32)
    for c in range(xp.shape[1]):
        lanes = (lanes.double() + xp[:, None, c, :] * wp[None, :, c, :]).float()
    half = lanes[..., :4] + lanes[..., 4:]  # (0 + 4), (1 + 5), (2 + 6), (3 + 7)
    pairs = half[..., :2] + half[..., 2:]  # (0 + 4) + (2 + 6), (1 + 5) + (3 + 7)
    y = pairs[..., 0] + pairs[..., 1]
    if bias is not None:
        y = y + bias
    return y
