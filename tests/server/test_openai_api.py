"""The official openai client (sync and async, streaming and not) against a live server."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.server.conftest import MODEL, LiveServer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture
def oai(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=30)


def _tokenize(server: LiveServer, text: str) -> list[int]:
    return list(server.engine.tokenizer.encode(text))


def test_chat_completion_usage_matches_token_ids(oai: openai.OpenAI, server: LiveServer) -> None:
    resp = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12)  # type: ignore[arg-type]
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == MODEL
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 12
    submitted = server.engine.submitted[-1]  # type: ignore[attr-defined]
    assert resp.usage.prompt_tokens == len(submitted.prompt_token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    # The prompt is the chat template applied to the messages.
    from slipstream.engine.tokenizer import apply_chat_template

    assert submitted.prompt_token_ids == apply_chat_template(server.engine.tokenizer, CHAT)
    assert choice.message.content == server.engine.tokenizer.decode(_gen_ids(server, resp.id))


def _gen_ids(server: LiveServer, request_id: str) -> list[int]:
    # The fake engine is deterministic: re-derive the tokens from its script for this request.
    engine = server.engine
    req = next(r for r in engine.submitted if r.request_id == request_id)  # type: ignore[attr-defined]
    base = sum(req.prompt_token_ids)
    start = engine.starts[base % len(engine.starts)]  # type: ignore[attr-defined]
    script = engine.script  # type: ignore[attr-defined]
    return [script[(start + i) % len(script)] for i in range(req.params.max_tokens)]


def test_sampling_params_reach_the_engine(oai: openai.OpenAI, server: LiveServer) -> None:
    oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_completion_tokens=7,
        temperature=0.3,
        top_p=0.9,
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        stop=["zz"],
        logit_bias={"5": 2.5, "11": -100},
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "ignore_eos": True,
            "stop_token_ids": [3],
        },
    )
    params = server.engine.submitted[-1].params  # type: ignore[attr-defined]
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (7, 0.3, 0.9, 42)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (5, 0.1, 1.2)
    assert params.ignore_eos and params.stop == ("zz",) and params.stop_token_ids == (3,)
    assert params.logit_bias == ((5, 2.5), (11, -100.0))


def test_chat_n_and_logprobs(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=5,
        n=3,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage is not None and resp.usage.completion_tokens == 15
    for choice in resp.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        content = choice.logprobs.content
        assert len(content) == 5
        # Tokens may hold part of a character; their bytes always add up to the text.
        text = bytes(b for t in content for b in t.bytes or []).decode()
        assert text == choice.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
        assert content[0].bytes == list(content[0].token.encode())


def test_chat_stop_string(oai: openai.OpenAI) -> None:
    full = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, seed=0)  # type: ignore[arg-type]
    text = full.choices[0].message.content or ""
    stop = text[10:13]
    resp = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=30,
        seed=0,
        stop=[stop],
    )
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == text[: text.index(stop)]


def test_chat_stream_sync(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20)  # type: ignore[arg-type]
    assert text == full.choices[0].message.content
    # Only a completion cut off by max_tokens mid-character may end in U+FFFD; no delta
    # before the last one splits a character.
    assert content and all("\ufffd" not in (c.choices[0].delta.content or "") for c in content[:-1])


def test_completions_prompt_shapes(oai: openai.OpenAI, server: LiveServer) -> None:
    ids = _tokenize(server, "The river ran")
    by_text = oai.completions.create(model=MODEL, prompt="The river ran", max_tokens=6)
    by_ids = oai.completions.create(model=MODEL, prompt=ids, max_tokens=6)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage is not None and by_text.usage.prompt_tokens == len(ids)
    batch = oai.completions.create(model=MODEL, prompt=["a b", "c d"], max_tokens=4, n=2)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.usage is not None and batch.usage.completion_tokens == 16
    batch_ids = oai.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=3)
    assert len(batch_ids.choices) == 2


def test_completions_echo_and_logprobs(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(
        model=MODEL, prompt="The river", max_tokens=4, echo=True, logprobs=2
    )
    choice = resp.choices[0]
    assert choice.text.startswith("The river")
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert resp.usage is not None
    num_prompt = resp.usage.prompt_tokens
    assert len(lp.tokens) == num_prompt + 4
    assert "".join(lp.tokens[:num_prompt]) == "The river"  # echoed prompt tokens come first
    assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert lp.top_logprobs is not None and len(lp.top_logprobs[-1] or {}) <= 2


def test_completions_stream_sync(oai: openai.OpenAI) -> None:
    stream = oai.completions.create(
        model=MODEL,
        prompt=["one", "two"],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    full = oai.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=10)
    assert texts == {c.index: c.text for c in full.choices}


def test_models_list_and_retrieve(oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_unknown_model_is_a_404(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="gpt-9", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert "gpt-9" in str(info.value) and info.value.code == "model_not_found"


async def _one_stream(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, int, list]:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"request number {i}"}],
        max_tokens=16 + i % 5,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, chunks = "", None, -1, []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return text, finish, usage, chunks


def test_32_concurrent_streams_async(server: LiveServer) -> None:
    async def main() -> list[tuple[str, str | None, int, list]]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="x", max_retries=0, timeout=60
        ) as client:
            return await asyncio.gather(*(_one_stream(client, i) for i in range(32)))

    results = asyncio.run(main())
    engine = server.engine
    for i, (text, finish, usage, chunks) in enumerate(results):
        assert finish == "length"
        assert usage == 16 + i % 5
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len({c.id for c in chunks}) == 1
        final = engine.results[chunks[0].id].outputs[0]  # type: ignore[attr-defined]
        assert usage == len(final.token_ids) and text == final.text


def test_async_non_streaming(server: LiveServer) -> None:
    async def main() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
            chat = await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
            text = await c.completions.create(model=MODEL, prompt="hi", max_tokens=4)
            return chat.choices[0].message.content or "", text.choices[0].text

    chat_text, completion_text = asyncio.run(main())
    assert chat_text and completion_text
