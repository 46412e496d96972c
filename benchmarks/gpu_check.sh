#!/usr/bin/env bash
# Every GPU check and timing this project needs, in one or two device calls (device time is
# ~15 minutes per session, machine start included, so prepared commands, not many).
#
#   device run:  bash benchmarks/gpu_check.sh [STEP...]   (results under $OUT)
#   here (CPU):  OUT=/tmp/gpu_check PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#                (a dry run: the tests skip, the benchmarks say they need CUDA)
#
# Steps (all by default), each with its own time limit so that one slow step cannot eat
# the others:
#   smoke          benchmarks/gpu_engine_smoke.py: every decoder end to end on CUDA (tiny model)
#   pytest_gpu     the `gpu`-marked kernel tests (Triton compiled for the card vs the references)
#   kernels_gpu    benchmarks/kernels_gpu.py: dense paged attention and store_kv, Triton vs torch
#   spec_decode    benchmarks/spec_decode.py on $MODEL (an HF folder; default: the default
#                  model): standard, ngram and token recycling (faithful tree cold and hot,
#                  calibrated hot), interleaved, batch 1, 2 prompts per builtin category
#                  (issue #5's GPU target: >= 1.8x standard on the faithful tree)
#   spec_decode_fp32, spec_decode_unseen: the same in float32 (6 builtin prompts), and in bf16
#                  on 12 of benchmarks/data/unseen_prompts.jsonl (not in the default list)
#   spec_decode_bi the faithful tree with --batch-invariant, bf16, 12 builtin prompts: are the
#                  answers now all equal to standard's (they were 4-6/12 without), and at what
#                  speed (the invariant kernels give up cuBLAS and flash-style tiles)
#   sparse_kernel  benchmarks/sparse_attention.py --parts kernel: block top-k and HiP decode
#                  attention vs dense SDPA (flash) at 32k and 128k on random data (issue #7)
# The device image has torch, triton and pytest; slipstream runs from the checkout. The
# default model's GGUF (98 MB) is larger than what one call carries (64 MiB):
# benchmarks/gpu_model.sh splits it here and puts it together there over two calls, and
# sets MODEL for the spec_decode steps.
# At most 8 files come back from $OUT: any two steps write at most 7.
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
} >> "$summary" 2>&1

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, record rc and time
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? seconds=$((SECONDS - start))" >> "$summary"
}

model_args=()
if [ -n "${MODEL:-}" ]; then model_args=(--model "$MODEL"); fi
spec() {  # spec NAME SECONDS ARGS...: spec_decode.py, batch 1, 256 tokens, interleaved
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PY" benchmarks/spec_decode.py "${model_args[@]}" --interleave \
        --max-tokens 256 --no-penalty-workload --json "$OUT/$name.json" "$@"
}
faithful="standard,TR faithful cold,TR faithful hot"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(smoke pytest_gpu kernels_gpu spec_decode sparse_kernel)
for s in "${steps[@]}"; do
    case $s in
    smoke) step smoke 150 "$PY" benchmarks/gpu_engine_smoke.py --out "$OUT/smoke.json" ;;
    pytest_gpu) step pytest_gpu 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/kernels ;;
    kernels_gpu) step kernels_gpu 100 "$PY" benchmarks/kernels_gpu.py --out "$OUT/kernels_gpu.json" ;;
    spec_decode)
        spec spec_decode 220 --per-category 2 \
            --configs "standard,ngram k=8,TR faithful cold,TR faithful hot,TR calibrated hot" ;;
    spec_decode_fp32)  # float32: do greedy answers equal standard's without bf16 rounding?
        spec spec_decode_fp32 150 --dtype float32 --per-category 1 --configs "$faithful" ;;
    spec_decode_unseen)  # the faithful tree on prompts never tuned on
        spec spec_decode_unseen 180 --prompts benchmarks/data/unseen_prompts.jsonl \
            --per-category 2 --configs "$faithful" ;;
    spec_decode_bi)
        spec spec_decode_bi 260 --batch-invariant --per-category 2 --configs "$faithful" ;;
    sparse_kernel)
        step sparse_kernel 150 "$PY" benchmarks/sparse_attention.py --parts kernel \
            --kernel-contexts 32768,131072 --kernel-batch 4 --out "$OUT/sparse_kernel.json" ;;
    *) echo "unknown step $s" >> "$summary" ;;
    esac
done
cat "$summary"
