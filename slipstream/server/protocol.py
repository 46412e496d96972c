"""Pydantic models of the OpenAI API (plus vLLM's extras) that the server speaks."""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from slipstream.engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, SEED_MAX, SEED_MIN

# OpenAI caps n at 128; more choices per request only let one client monopolise the engine.
MAX_N = 128


class _Request(BaseModel):
    """Requests: unknown fields are ignored (as OpenAI does), known ones are typed strictly."""

    # strict: "5" is not an integer and 1.0 is not a count; no NaN or infinity.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default_and_text_is_unicode(cls, data: Any) -> Any:
        """`null` for a field that cannot hold it means the field's default: OpenAI's schema
        marks n, stream, logprobs, echo and others nullable, and clients send null for "unset"
        (vLLM accepts it too). And text must be encodable: JSON can carry an unpaired
        surrogate escape ("\\ud800"), which no tokenizer can encode (a 400 here, not a 500
        from the tokenizer). Nested models check their own fields."""
        if not isinstance(data, dict):
            return data
        out = {}
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if value is None and field is not None and not _takes_null(field):
                continue  # the default (a default_factory's too)
            for text in value if isinstance(value, list) else (value,):
                if isinstance(text, str) and not _encodable(text):
                    raise ValueError(
                        f"{name}: text is not valid Unicode (it holds an unpaired surrogate)"
                    )
            out[name] = value
        return out


def _takes_null(field: FieldInfo) -> bool:
    """Whether null is a value of the field itself (`int | None`: max_tokens null fills the
    context, where its default is 16), or the field is required (null is then an error)."""
    return field.is_required() or type(None) in typing.get_args(field.annotation)


def _encodable(text: str) -> bool:
    """Whether text encodes to UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    """`stream_options`: a final usage chunk, or (vLLM) usage on every chunk."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(_Request):
    """One part of a message's content; only text parts are served."""

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type not in ("text", "input_text"):
            raise ValueError(
                f"content part type {self.type!r} is not supported; this model takes text only"
            )
        if self.text is None:
            raise ValueError("a text content part needs a 'text' string")
        return self


class ChatMessage(_Request):
    """One chat message; string or text-part content."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)


class _SamplingRequest(_Request):
    """Fields shared by chat and text completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Token id (as a string, OpenAI's format) -> bias added to its logit, in [-100, 100].
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = (
        None
    )
    # vLLM's extras (sent in the body, e.g. via the openai client's extra_body).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(default=0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        """`stop` as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    # vLLM's: leave the last message open for the model to continue (an assistant prefill);
    # needs add_generation_prompt false.
    continue_final_message: bool = False
    # Accepted only so that using them gives a clear 400 instead of being silently dropped.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's legacy default; 0 only with echo (the prompt's logprobs, nothing generated).
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)


class TokenizeRequest(_Request):
    """POST /tokenize: a prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


# ---- responses -------------------------------------------------------------------------


class ErrorDetail(_Response):
    """The inside of OpenAI's error envelope."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    """{"error": {...}}."""

    error: ErrorDetail


class PromptTokensDetails(_Response):
    """How many prompt tokens came from the prefix cache."""

    cached_tokens: int = 0


class Usage(_Response):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Response):
    """An alternative token at one position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    """The chosen token at one position, with the alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    """choices[i].logprobs of a chat completion."""

    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(_Response):
    """The assistant's answer."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Response):
    """One of n chat answers."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's extra: the stop string or token id that ended the answer.
    stop_reason: str | int | None = None


class ChatCompletionResponse(_Response):
    """Non-streaming chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(_Response):
    """Legacy completions logprobs (parallel lists)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    """One of n text completions."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(_Response):
    """Non-streaming text completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(_Response):
    """One served model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slipstream"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    decoder: str | None = None


class ModelList(_Response):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    """POST /tokenize."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    """POST /detokenize."""

    prompt: str


class VersionResponse(_Response):
    """GET /version."""

    version: str


class HealthResponse(_Response):
    """GET /health."""

    status: Literal["ok"] = "ok"
