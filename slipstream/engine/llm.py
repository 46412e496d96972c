"""The offline API, shaped like vLLM's: LLM(...).generate(prompts, params) / .chat(...)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from slipstream.config import CacheConfig, DecoderSpec, EngineConfig, ModelConfig, SchedulerConfig
from slipstream.engine.engine import LLMEngine
from slipstream.engine.outputs import RequestOutput
from slipstream.engine.sampling_params import SamplingParams

# A string, token ids, or vLLM's {"prompt": str} / {"prompt_token_ids": [...]}.
PromptInput = str | list[int] | dict[str, Any]
Message = dict[str, Any]


class LLM:
    """Generate offline with the native engine.

    Example:
        llm = LLM()   # the default model
        params = SamplingParams(max_tokens=8, temperature=0)
        out = llm.generate(["The capital of France is"], params)
        print(out[0].outputs[0].text)
    """

    def __init__(
        self,
        model: str | None = None,
        decoder: str = "standard",
        decoder_config: dict[str, Any] | None = None,
        dtype: str = ModelConfig.dtype,
        device: str = ModelConfig.device,
        max_model_len: int | None = None,
        max_num_seqs: int = SchedulerConfig.max_num_seqs,
        max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
        block_size: int = CacheConfig.block_size,
        kv_cache_memory_gib: float = CacheConfig.kv_cache_memory_gib,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
        seed: int = 0,
        batch_invariant: bool = False,
    ) -> None:
        config = EngineConfig(
            model=ModelConfig(
                model=model,
                dtype=dtype,  # type: ignore[arg-type]
                device=device,  # type: ignore[arg-type]
                max_model_len=max_model_len,
                seed=seed,
                batch_invariant=batch_invariant,
            ),
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory_gib=kv_cache_memory_gib,
                num_blocks=num_kv_blocks,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
            ),
            decoder=DecoderSpec(name=decoder, options=dict(decoder_config or {})),
        )
        self._init_engine(config)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """Build from a complete EngineConfig (the CLI does this)."""
        llm = cls.__new__(cls)
        llm._init_engine(config)
        return llm

    def _init_engine(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        """The model's transformers tokenizer."""
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in input order. A prompt is a string, a list of
        token ids, or vLLM's dict forms {"prompt": str} and {"prompt_token_ids": [...]}. A
        prompt the engine refuses raises ValueError, and none of the prompts runs."""
        items = [_text_and_ids(p, self.tokenizer) for p in _as_prompt_list(prompts)]
        params = _as_params_list(sampling_params, len(items))
        ids: list[str] = []
        try:
            for (text, token_ids), p in zip(items, params, strict=True):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, token_ids, p, prompt=text)
                ids.append(request_id)
        except BaseException:
            for request_id in ids:  # the ones queued before the refused one
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, progress)

    def chat(
        self,
        conversations: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate; each
        output's `prompt` is the rendered text, as in vLLM. `continue_final_message` (with
        `add_generation_prompt=False`) continues the last message instead of answering it."""
        from slipstream.engine.tokenizer import chat_prompt

        convs: list[list[Message]]
        if conversations and isinstance(conversations[0], dict):
            convs = [conversations]
        else:
            convs = conversations  # type: ignore[assignment]
        for conv in convs:
            if isinstance(conv, (str, bytes)) or not all(isinstance(m, dict) for m in conv):
                raise TypeError(
                    "chat() takes a conversation (a list of {'role': ..., 'content': ...} "
                    f"messages) or a list of them, got {conv!r}"
                )
        prompts: list[PromptInput] = []
        for conv in convs:
            text, ids = chat_prompt(
                self.tokenizer, conv, add_generation_prompt, continue_final_message
            )
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, progress)

    def _run(
        self, ids: list[str], progress: Callable[[int, int], None] | None
    ) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        if progress is not None:
                            progress(len(final), len(ids))
        except BaseException:
            # A failed step (or Ctrl-C): the call's requests leave with it, or the next call
            # would run them again and fail the same way.
            for request_id in ids:
                if request_id not in final:
                    self.engine.abort_request(request_id)
            raise
        return [final[i] for i in ids]

    def get_stats(self) -> dict[str, Any]:
        """Engine and decoder statistics since start (steps, tokens, decoder counters)."""
        return self.engine.get_stats()


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, (str, dict, bytes, bytearray)):
        return [prompts]  # bytes: refused by _text_and_ids
    try:
        items = list(prompts)
    except TypeError:
        raise TypeError(f"prompts: a prompt or a list of them, not {prompts!r}") from None
    if items and all(isinstance(x, int) for x in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _text_and_ids(prompt: PromptInput, tokenizer: Any) -> tuple[str | None, list[int]]:
    """(the prompt's text if it has one, its token ids)."""
    if isinstance(prompt, dict):  # vLLM's TextPrompt / TokensPrompt
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], tokenizer.encode(prompt["prompt"])
        raise TypeError(
            f"a dict prompt needs 'prompt' (a string) or 'prompt_token_ids', got {prompt!r}"
        )
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, (bytes, bytearray)):
        raise TypeError(f"a prompt is a string or a list of token ids, not bytes: {prompt!r}")
    try:  # token ids: a list, a tuple, an array
        return None, list(cast(Iterable[int], prompt))
    except TypeError:
        raise TypeError(f"a prompt is a string or a list of token ids, not {prompt!r}") from None


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, Sequence) or not all(isinstance(p, SamplingParams) for p in params):
        raise TypeError(f"sampling_params: a SamplingParams or a list of them, got {params!r}")
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return list(params)
