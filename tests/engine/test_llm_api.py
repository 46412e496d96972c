"""The offline API on the tiny model: prompt forms, and refusals that leave nothing behind."""

from __future__ import annotations

import numpy as np
import pytest

from slipstream.engine.llm import LLM
from slipstream.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: str) -> LLM:
    return LLM(model=tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=4)


def _tokens(outs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_prompt_forms_give_the_same_answer(llm: LLM) -> None:
    """A string, its ids (list, tuple, array), and vLLM's dict forms are the same prompt."""
    text = "hello there"
    ids = llm.tokenizer.encode(text)
    want = _tokens(llm.generate(text, GREEDY))
    forms = [
        [text],
        ids,
        [ids],
        [tuple(ids)],
        [np.array(ids)],
        {"prompt": text},
        [{"prompt": text}],
        [{"prompt_token_ids": ids}],
    ]
    for form in forms:
        outs = llm.generate(form, GREEDY)  # type: ignore[arg-type]
        assert _tokens(outs) == want, form
    assert llm.generate({"prompt": text}, GREEDY)[0].prompt == text


@pytest.mark.parametrize(
    "bad",
    [
        [{"text": "hi"}],  # a dict without a prompt
        [3.5],  # a number that is not a token id list
        42,
    ],
)
def test_prompts_of_no_known_form_are_a_type_error(llm: LLM, bad: object) -> None:
    with pytest.raises(TypeError):
        llm.generate(bad, GREEDY)  # type: ignore[arg-type]
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("bad_ids", [[5, -1], [5, 10**6], [5, 2.0], [True, 5]])
def test_a_token_id_outside_the_vocabulary_is_refused_and_leaves_nothing(
    llm: LLM, bad_ids: list
) -> None:
    """Refused when added: it once failed inside the step and stayed queued, failing every
    later call too."""
    with pytest.raises(ValueError, match="not in the vocabulary"):
        llm.generate([bad_ids], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert len(_tokens(llm.generate([[5, 6, 7]], GREEDY))[0]) == 5


def test_a_refused_prompt_runs_none_of_its_batch(llm: LLM) -> None:
    """The prompts before a refused one were queued, and ran in the next call."""
    before = llm.get_stats()["generation_tokens"]
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[5, 6, 7], [8, 9], []], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert llm.get_stats()["generation_tokens"] == before
    one = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([[5, 6, 7]], one)
    assert llm.get_stats()["generation_tokens"] == before + 1


def test_chat_outputs_carry_the_rendered_prompt(llm: LLM) -> None:
    """As vLLM's LLM.chat: the prompt text the chat template made."""
    conv = [{"role": "user", "content": "hi there"}]
    out = llm.chat(conv, GREEDY)[0]
    assert isinstance(out.prompt, str) and "hi there" in out.prompt
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)
    for bad in ("hello", ["hello"]):
        with pytest.raises(TypeError, match="conversation"):
            llm.chat(bad, GREEDY)  # type: ignore[arg-type]


def test_chat_can_continue_the_final_message(llm: LLM) -> None:
    """vLLM's LLM.chat options: the assistant's prefilled words stay open for the model."""
    conv = [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the"},
    ]
    out = llm.chat(conv, GREEDY, add_generation_prompt=False, continue_final_message=True)[0]
    assert isinstance(out.prompt, str) and out.prompt.endswith("Why did the")
    closed = llm.chat(conv, GREEDY, add_generation_prompt=False)[0]
    assert isinstance(closed.prompt, str) and closed.prompt.startswith(out.prompt)
    assert not closed.prompt.endswith("Why did the")
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(conv, GREEDY, continue_final_message=True)


def test_a_failed_step_leaves_no_request_behind(llm: LLM) -> None:
    """One failing step failed every later call on the same LLM: its requests stayed
    queued. Now the call's requests leave with the error."""
    forward = llm.engine.runner.forward

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a broken step")

    llm.engine.runner.forward = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="a broken step"):
            llm.generate([[5, 6, 7], [8, 9]], GREEDY)
    finally:
        llm.engine.runner.forward = forward  # type: ignore[method-assign]
    assert not llm.engine.has_unfinished_requests()
    assert len(_tokens(llm.generate([[5, 6, 7]], GREEDY))[0]) == 5
    llm.engine.block_manager.check_invariants()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stop": [1, 2]}, "stop must be strings"),
        ({"max_tokens": 3.5}, "max_tokens must be an int"),
        ({"n": 2.0}, "n must be an int"),
        ({"top_k": 2.5}, "top_k must be an int"),
        ({"temperature": "0.5"}, "temperature must be a number"),
        ({"temperature": float("nan")}, "temperature must be a number"),
        ({"stop_token_ids": ["x"]}, "stop_token_ids must be ints"),
    ],
)
def test_sampling_params_of_the_wrong_type(kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_seed_range_and_list_types(llm: LLM) -> None:
    with pytest.raises(ValueError, match="seed must be in"):
        SamplingParams(seed=2**70)
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate(["x"], {"temperature": 0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not bytes"):
        llm.generate(b"hello", GREEDY)  # type: ignore[arg-type]
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("decoder", "params"),
    [
        ("ngram", SamplingParams(temperature=0.0, max_tokens=13, stop=[" the"])),
        ("token_recycling", SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)),
        ("cautious", SamplingParams(temperature=0.7, max_tokens=12, seed=3)),
    ],
)
def test_generation_tokens_count_the_tokens_returned(
    tiny_model_dir: str, decoder: str, params: SamplingParams
) -> None:
    """get_stats' generation_tokens (generate's "generated N tokens") counted drafts
    accepted past a stop or max_tokens and cautious sampling's trials: 13 for 11 returned
    with ngram, 39 for 12 with cautious."""
    llm = LLM(
        model=tiny_model_dir, dtype="float32", num_kv_blocks=128, block_size=4, decoder=decoder
    )
    loop = "one two three four one two three four one two three four one two three four"
    prompts = [loop, "the river ran past the mill and the river ran past the mill", "hi"]
    outs = llm.generate(prompts, params)
    returned = sum(len(o.outputs[0].token_ids) for o in outs)
    assert returned > 0
    assert llm.get_stats()["generation_tokens"] == returned
