#!/usr/bin/env bash
# The default model on a lent GPU machine, whose calls carry at most 64 MiB while the GGUF
# is 98 MB: split here, carried over two calls, put together there (session 15's recipe).
#
#   here:           bash benchmarks/gpu_model.sh pack      (after `make install`; writes .dev/)
#   device call 1:  carry [".dev/a"], command starts with `bash benchmarks/gpu_model.sh stage`
#   device call 2:  carry [".dev/b"], while the machine is still warm (30 s), command starts
#                   with `eval "$(bash benchmarks/gpu_model.sh assemble)"`, which sets MODEL
#                   and PYTHONPATH; then e.g. `bash benchmarks/gpu_check.sh spec_decode`
#
# .dev/ must be git-ignored (pack adds it to .git/info/exclude). The model there is byte for
# byte this one: pack records the GGUF's md5 and assemble checks it.
set -eu
mode=${1:?usage: gpu_model.sh pack|stage|assemble}
PY=${PYTHON:-python3}
case $mode in
pack)
    PY=${PYTHON:-.venv/bin/python}
    gguf=$("$PY" -c 'from slipstream.engine.models.default_model import find_default_gguf as f; print(f())')
    folder=$("$PY" -c 'from slipstream.engine.models.default_model import resolve_model_path as r; print(r(None))')
    grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
    rm -rf .dev && mkdir -p .dev/a .dev/b/hf
    head -c 60000000 "$gguf" > .dev/a/gguf.part_aa
    tail -c +60000001 "$gguf" > .dev/b/gguf.part_ab
    md5sum < "$gguf" | cut -d' ' -f1 > .dev/b/gguf.md5
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json \
        chat_template.jinja slipstream_source.json; do
        [ -f "$folder/$f" ] && cp "$folder/$f" .dev/b/hf/
    done
    gguf_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')
    "$PY" -m pip download -q --no-deps "gguf==$gguf_version" -d .dev/b
    du -sh .dev/a .dev/b
    ;;
stage)  # device call 1: keep part one outside the checkout, where the next call finds it
    mkdir -p /tmp/m && cp .dev/a/gguf.part_aa /tmp/m/
    ;;
assemble)  # device call 2: prints the exports for eval
    cat /tmp/m/gguf.part_aa .dev/b/gguf.part_ab > /tmp/m/model.gguf
    [ "$(md5sum < /tmp/m/model.gguf | cut -d' ' -f1)" = "$(cat .dev/b/gguf.md5)" ] || {
        echo "echo 'gpu_model.sh: the assembled GGUF does not match' >&2; false"; exit 0; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/b/gguf-*.whl >&2
    rm -rf /tmp/m/hf && cp -r .dev/b/hf /tmp/m/hf
    PYTHONPATH="/tmp/site:$PWD" "$PY" - >&2 <<'PYEOF'
import torch
from pathlib import Path
from safetensors.torch import save_file
from slipstream.engine.models.gguf_file import read_gguf
_, tensors = read_gguf(Path("/tmp/m/model.gguf"))  # as convert_gguf_to_hf writes them
tensors = {name: t.to(torch.bfloat16) for name, t in tensors.items()}
save_file(tensors, "/tmp/m/hf/model.safetensors", metadata={"format": "pt"})
PYEOF
    echo "export MODEL=/tmp/m/hf PYTHONPATH=/tmp/site\${PYTHONPATH:+:\$PYTHONPATH}"
    ;;
*) echo "usage: gpu_model.sh pack|stage|assemble" >&2; exit 2 ;;
esac
