"""Turns appended tokens into stop decisions, streamed text and RequestOutputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from slipstream.engine.detokenizer import IncrementalDetokenizer
from slipstream.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.sequence import Sequence


@dataclass
class RequestState:
    """A request's visible sequences (its n completions) and their text so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    # Output tokens of each sequence already checked for stops and detokenized.
    num_processed: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Every completion is done."""
        return all(seq.finish_reason is not None for seq in self.seqs)


class OutputProcessor:
    """Stop conditions (EOS, stop ids, max_tokens, context length, stop strings) and outputs."""

    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def new_state(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seqs: list[Sequence],
        arrival_time: float,
    ) -> RequestState:
        """Track a new request."""
        detoks = [
            IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
            for _ in seqs
        ]
        return RequestState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            seqs=seqs,
            detokenizers=detoks,
            metrics=RequestMetrics(arrival_time=arrival_time),
            num_processed=[0] * len(seqs),
        )

    def process(self, state: RequestState, index: int) -> bool:
        """Check seq `index`'s new output tokens; returns True if it just finished."""
        seq = state.seqs[index]
        if seq.finish_reason is not None or seq.hold_output:
            return False
        start = state.num_processed[index]
        new = seq.output_token_ids[start:]
        if not new:
            return False
        now = time.monotonic()
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
        state.metrics.last_token_time = now
        cut = self._token_stop(seq, start, new)
        if cut is not None:
            _keep_outputs(seq, start + cut)
            new = new[:cut]
        detok = state.detokenizers[index]
        # A token that stops the sequence (EOS, a stop token id) adds no text unless the
        # request asks for it, as in vLLM; it stays in the output's token ids.
        stopped_by_token = cut is not None and seq.finish_reason == "stop"
        text_tokens = new
        if stopped_by_token and not seq.params.include_stop_str_in_output:
            text_tokens = new[:-1]
        if detok.stop and len(text_tokens) > 1:
            # Several tokens in one step (speculative decoding): one at a time, so that a stop
            # string ends the output at the token that completed it, as one-token steps do;
            # the tokens after it are dropped (token ids, logprobs, usage).
            for j, token in enumerate(text_tokens):
                detok.add_tokens([token])
                if detok.stopped_by is not None:
                    _keep_outputs(seq, start + j + 1)
                    break
        else:
            detok.add_tokens(text_tokens)
        state.num_processed[index] = seq.num_output_tokens
        if detok.stopped_by is not None:
            seq.finish_reason = "stop"
            seq.stop_reason = detok.stopped_by
        elif seq.finish_reason is not None:
            detok.flush()
        return seq.finish_reason is not None

    def _token_stop(self, seq: Sequence, start: int, new: list[int]) -> int | None:
        """Set finish_reason from token-level stops; return how many new tokens to keep."""
        params = seq.params
        for j, token in enumerate(new):
            count = start + j + 1  # output tokens including this one
            if count > params.min_tokens or params.min_tokens == 0:
                if not params.ignore_eos and token in self.eos_token_ids:
                    seq.finish_reason = "stop"
                    seq.stop_reason = None
                    return j + 1
                if token in params.stop_token_ids:
                    seq.finish_reason = "stop"
                    seq.stop_reason = token
                    return j + 1
            if params.max_tokens is not None and count >= params.max_tokens:
                seq.finish_reason = "length"
                return j + 1
            if seq.num_prompt_tokens + count >= self.max_model_len:
                seq.finish_reason = "length"
                return j + 1
        return None

    def make_output(self, state: RequestState) -> RequestOutput:
        """The cumulative RequestOutput of a request."""
        outputs = []
        for i, seq in enumerate(state.seqs):
            detok = state.detokenizers[i]
            lps = seq.output_logprobs if seq.params.logprobs is not None else None
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=detok.text,
                    token_ids=seq.output_token_ids[: state.num_processed[i]],
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=self._decoded(lps[: state.num_processed[i]]) if lps else lps,
                )
            )
        finished = state.finished
        prompt_lps = None
        first = state.seqs[0] if state.seqs else None
        # Reported once complete (with the first output tokens, as vLLM does).
        if (
            first is not None
            and first.params.prompt_logprobs is not None
            and len(first.prompt_logprobs) == first.num_prompt_tokens
        ):
            prompt_lps = self._decoded(list(first.prompt_logprobs))
        if finished and state.metrics.finished_time is None:
            state.metrics.finished_time = time.monotonic()
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=min((s.num_cached_tokens for s in state.seqs), default=0),
            metrics=state.metrics,
            prompt_logprobs=prompt_lps,
        )

    def _decoded(self, logprobs: list[Any]) -> list[Any]:
        for entry in logprobs:
            if entry is None:  # the first prompt token's entry
                continue
            for lp in (entry.chosen, *entry.top):
                if not lp.decoded:
                    lp.decoded = self.tokenizer.decode([lp.token_id])
        return logprobs


def _keep_outputs(seq: Sequence, count: int) -> None:
    """Drop the sequence's output tokens (and their logprobs) after the first `count`."""
    del seq.token_ids[seq.num_prompt_tokens + count :]
    del seq.output_logprobs[count:]
