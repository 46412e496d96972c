#!/usr/bin/env bash
# Every GPU check and timing this project needs, in one device call (device time is ~15
# minutes per session, machine start included, so one prepared command, not many).
#
#   device run:  bash benchmarks/gpu_check.sh        (timeout_s 540; results under $OUT)
#   here (CPU):  OUT=/tmp/gpu_check PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#                (a dry run: the tests skip, the benchmarks say they need CUDA)
#
# Steps, each with its own time limit so that one slow step cannot eat the others:
#   1. the `gpu`-marked kernel tests (Triton compiled for the card vs the PyTorch references)
#   2. benchmarks/kernels_gpu.py: dense paged attention and store_kv, Triton vs torch
#   3. benchmarks/sparse_attention.py --parts kernel: block top-k and HiP decode attention
#      vs dense SDPA (flash) at 32k and 128k on random data (issue #7's kernel targets)
# The device image has torch, triton and pytest; slipstream runs from the checkout.
# At most 8 files come back from $OUT: this writes 6.
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}  # the device image's python3 holds torch
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton",
        triton.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'
} > "$summary" 2>&1

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, record rc and time
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? seconds=$((SECONDS - start))" >> "$summary"
}

step pytest_gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/kernels
step kernels_gpu 150 "$PY" benchmarks/kernels_gpu.py --out "$OUT/kernels_gpu.json"
step sparse_kernel 180 "$PY" benchmarks/sparse_attention.py --parts kernel \
    --kernel-contexts 32768,131072 --kernel-batch 4 --out "$OUT/sparse_kernel.json"
cat "$summary"
