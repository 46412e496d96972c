"""Test doubles: a whitespace tokenizer and synthetic request records."""

from __future__ import annotations

from pathlib import Path

from slipstream.loadtest.client import RequestRecord


class WordTokenizer:
    """Token i is the word `w{i}`; any other word is one token too. Round-trips exactly."""

    vocab_size = 500
    all_special_ids = (0,)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """One id per whitespace-separated word."""
        return [int(w[1:]) if w[:1] == "w" and w[1:].isdigit() else 1 for w in text.split()]

    def decode(self, token_ids: list[int]) -> str:
        """`w{id}` words joined by spaces."""
        return " ".join(f"w{i}" for i in token_ids)


def record(
    ttft: float,
    latency: float,
    output_tokens: int,
    num_chunks: int | None = None,
    start: float = 0.0,
    success: bool = True,
) -> RequestRecord:
    """A finished request whose chunks arrive evenly between ttft and latency."""
    n = num_chunks if num_chunks is not None else output_tokens
    step = (latency - ttft) / (n - 1) if n > 1 else 0.0
    r = RequestRecord(index=0, scheduled=start, prompt_len=10, start=start, success=success)
    r.ttft, r.latency, r.output_tokens = ttft, latency, output_tokens
    r.chunk_times = [ttft + i * step for i in range(n)]
    if not success:
        r.error_type, r.output_tokens, r.chunk_times = "HTTP 500", None, []
    return r


def hf_tokenizer_folder(path: Path) -> str:
    """Save a word-level HF tokenizer (`w0`..`w299`) into `path`: tests never download one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(300)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(str(path))
    return str(path)
