"""Token sampling: penalties, temperature, min-p, top-k, top-p, seeds and logprobs.

Semantics follow vLLM (v1):
    raw logits -> logprobs for reporting (the model's raw log-softmax)
    -> min_tokens (EOS and stop_token_ids at -inf until min_tokens outputs exist)
    -> logit_bias (added to the listed tokens' logits)
    -> repetition penalty (prompt + output tokens: positive logits / p, negative * p)
    -> frequency and presence penalties (output tokens: - f * count - p * [count > 0])
    -> greedy rows: argmax here (ties: lowest index)
    -> temperature -> min-p (relative to the max prob) -> top-k -> top-p -> sample.

Sampling inverts the row's CDF at one uniform draw from the row's own torch.Generator, so a
seeded request gets the same tokens whatever else is in the batch. (The exponential race,
argmax(probs / E) with E ~ Exponential(1), needed V draws a row: 0.93 ms a row at V = 49152 on
2 cores, 8-10% of a sampled decode step, against ~0.08 ms for a float64 cumsum and one draw.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from slipstream.engine.outputs import Logprob, TokenLogprobs
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.sequence import Sequence as Seq
from slipstream.engine.vocab_topk import vocab_argmax


@dataclass
class SamplingContext:
    """What the sampler needs to know about one row: params, history and RNG."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None

    @classmethod
    def of(cls, seq: Seq) -> SamplingContext:
        """The context for sampling a sequence's next token."""
        return cls(
            params=seq.params,
            prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
            generator=seq.generator,
        )

    @property
    def suppresses_stop(self) -> bool:
        """min_tokens not reached yet: EOS and stop tokens must not be sampled."""
        return len(self.output_token_ids) < self.params.min_tokens


@dataclass
class SamplerOutput:
    """One sampled token per row, and its logprobs when the row asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    """Turns logits rows into tokens under each row's SamplingParams."""

    def __init__(
        self,
        eos_token_ids: frozenset[int],
        decode_token: Callable[[int], str] | None = None,
    ) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        # Fills Logprob.decoded when given (e.g. lambda i: tokenizer.decode([i])).
        self.decode_token = decode_token

    # ------------------------------------------------------------------ public API

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingContext]) -> SamplerOutput:
        """Sample one token per row. logits: [R, V]."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        if all(_is_plain_greedy(c) for c in rows):
            # Hot path (greedy, batch 1 included): one argmax, one host sync.
            return SamplerOutput(vocab_argmax(logits).tolist(), [None] * len(rows))
        processed, greedy = self._process(logits, rows)  # [R, V], [R] bool
        random_rows = [i for i, is_greedy in enumerate(greedy) if not is_greedy]
        if not random_rows:
            token_ids = vocab_argmax(processed)  # [R]
        elif len(random_rows) == len(rows):
            probs = torch.softmax(processed, dim=-1)  # [R, V]
            token_ids = self._pick(probs, [c.generator for c in rows])
        else:
            token_ids = processed.argmax(dim=-1)
            probs = torch.softmax(processed[random_rows], dim=-1)  # [R', V]
            token_ids[random_rows] = self._pick(probs, [rows[i].generator for i in random_rows])
        ids: list[int] = token_ids.tolist()
        return SamplerOutput(ids, self._logprobs(logits, rows, ids))

    def processed_logits(
        self, logits: torch.Tensor, rows: Sequence[SamplingContext]
    ) -> torch.Tensor:
        """Logits after penalties, temperature and masks (-inf = never sampled). [R, V].

        Greedy rows get penalties and min_tokens only (no temperature or truncation).
        """
        return self._process(logits, rows)[0]

    def processed_probs(
        self, logits: torch.Tensor, rows: Sequence[SamplingContext]
    ) -> torch.Tensor:
        """The distribution each row is sampled from; a one-hot at the argmax for greedy rows.

        logits: [R, V] -> [R, V] float32. Speculative and cautious decoders compare these.
        """
        processed, greedy = self._process(logits, rows)
        probs = torch.softmax(processed, dim=-1)  # [R, V]
        if any(greedy):
            rows_idx = torch.tensor(
                [i for i, g in enumerate(greedy) if g], device=logits.device, dtype=torch.long
            )
            one_hot = torch.zeros_like(probs[rows_idx])
            one_hot.scatter_(1, processed[rows_idx].argmax(dim=-1, keepdim=True), 1.0)
            probs[rows_idx] = one_hot
        return probs

    def processed_logprobs(
        self, logits: torch.Tensor, rows: Sequence[SamplingContext]
    ) -> torch.Tensor:
        """log(processed_probs): -inf outside each row's support. [R, V]."""
        return torch.log(self.processed_probs(logits, rows))

    def sample_from_probs(
        self, probs: torch.Tensor, rows: Sequence[SamplingContext]
    ) -> torch.Tensor:
        """Draw one token per row from given distributions (e.g. a speculative residual).

        probs: [R, V], rows need not be normalised. Returns [R] long. Uses each row's generator.
        """
        return self._pick(probs.float(), [c.generator for c in rows])

    def uniform(self, rows: Sequence[SamplingContext], device: torch.device | str) -> torch.Tensor:
        """One U[0, 1) draw per row from the row's generator (acceptance tests). [R]."""
        out = torch.empty(len(rows), dtype=torch.float32, device=device)
        for i, c in enumerate(rows):
            if c.generator is None:
                out[i : i + 1].uniform_()
            else:
                out[i : i + 1] = _draw(c.generator, 1, out.device, out.dtype)
        return out

    # ------------------------------------------------------------------ pipeline

    def _process(
        self, logits: torch.Tensor, rows: Sequence[SamplingContext]
    ) -> tuple[torch.Tensor, list[bool]]:
        """Apply the whole pipeline; returns ([R, V] float32 logits, greedy flag per row)."""
        # NOTE: always a copy: the caller's logits are reused (logprobs, other decoders).
        x = logits.to(dtype=torch.float32, copy=True)  # [R, V]
        greedy = [c.params.is_greedy for c in rows]
        self._apply_min_tokens(x, rows)
        _apply_logit_bias(x, rows)
        _apply_penalties(x, rows)
        if all(greedy):
            return x, greedy
        device = x.device
        # Greedy rows keep temperature 1 and no truncation: their argmax is unchanged anyway.
        temps = [1.0 if g else c.params.temperature for g, c in zip(greedy, rows, strict=True)]
        if any(t != 1.0 for t in temps):
            x.div_(torch.tensor(temps, device=device, dtype=torch.float32).unsqueeze(1))
        min_p = [0.0 if g else c.params.min_p for g, c in zip(greedy, rows, strict=True)]
        if any(p > 0 for p in min_p):
            _apply_min_p(x, torch.tensor(min_p, device=device, dtype=torch.float32))
        vocab = x.shape[1]
        top_k = [
            vocab if g or c.params.top_k < 1 else min(c.params.top_k, vocab)
            for g, c in zip(greedy, rows, strict=True)
        ]
        top_p = [1.0 if g else c.params.top_p for g, c in zip(greedy, rows, strict=True)]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            _apply_top_k_top_p(
                x,
                torch.tensor(top_k, device=device, dtype=torch.long),
                torch.tensor(top_p, device=device, dtype=torch.float32),
            )
        return x, greedy

    def _apply_min_tokens(self, x: torch.Tensor, rows: Sequence[SamplingContext]) -> None:
        """Forbid EOS and stop_token_ids in rows that have not reached min_tokens. x: [R, V]."""
        vocab = x.shape[1]
        row_idx: list[int] = []
        tok_idx: list[int] = []
        for i, c in enumerate(rows):
            if c.suppresses_stop:
                stops = {t for t in (*self.eos_token_ids, *c.params.stop_token_ids) if t < vocab}
                row_idx.extend([i] * len(stops))
                tok_idx.extend(stops)
        if row_idx:
            x[_long(row_idx, x.device), _long(tok_idx, x.device)] = float("-inf")

    def _pick(
        self, probs: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> torch.Tensor:
        """Token i with probability probs[i] / sum(probs), per row. probs: [R, V] -> [R].

        The first index whose float64 running sum passes u * total, u ~ U[0, 1): a token of
        probability 0 adds nothing to the sum, so it is never the first to pass.
        """
        rows, vocab = probs.shape
        cdf = probs.to(torch.float64).cumsum_(dim=-1)  # [R, V]
        u = torch.empty(rows, 1, dtype=torch.float64, device=probs.device)  # [R, 1]
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if len(unseeded) == rows:
            u.uniform_()
        else:
            if unseeded:
                u[unseeded] = torch.rand(len(unseeded), 1, dtype=u.dtype, device=u.device)
            for i, g in enumerate(generators):
                # NOTE: each seeded row draws exactly one number from its own generator, so
                # its stream does not depend on the batch it happens to be in.
                if g is not None:
                    u[i] = _draw(g, 1, u.device, u.dtype)
        target = u * cdf[:, -1:]  # [R, 1]
        picked = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [R]
        # Rounding can put the target at the total itself: take the last possible token.
        past = picked >= vocab
        if bool(past.any()):
            last = vocab - 1 - (probs[past].flip(-1) > 0).int().argmax(dim=-1)
            picked[past] = last
        return picked

    def _logprobs(
        self, logits: torch.Tensor, rows: Sequence[SamplingContext], token_ids: list[int]
    ) -> list[TokenLogprobs | None]:
        """The chosen token's raw logprob and the top-N raw alternatives, for rows asking."""
        wanted = [i for i, c in enumerate(rows) if c.params.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(rows)
        if not wanted:
            return out
        found = raw_token_logprobs(
            logits[wanted],
            [token_ids[i] for i in wanted],
            [rows[i].params.logprobs or 0 for i in wanted],
            self._logprob,
        )
        for i, entry in zip(wanted, found, strict=True):
            out[i] = entry
        return out

    def _logprob(self, token_id: int, value: float) -> Logprob:
        """A Logprob with its decoded text when a decoder was given."""
        text = self.decode_token(token_id) if self.decode_token is not None else ""
        return Logprob(token_id=token_id, logprob=value, decoded=text)


def raw_token_logprobs(
    logits: torch.Tensor,  # [W, V] one row per scored token
    token_ids: list[int],  # [W] the token each row scores
    num_top: list[int],  # [W] alternatives wanted per row
    make: Callable[[int, float], Logprob],
) -> list[TokenLogprobs]:
    """Each token's logprob and its row's top alternatives, from the raw distribution.

    vLLM's default: logprobs of the model's distribution before any processing (temperature,
    penalties). Shared by output logprobs (the sampler) and prompt logprobs.
    """
    raw = torch.log_softmax(logits.float(), dim=-1)  # [W, V]
    chosen: list[float] = (
        raw.gather(1, _long(token_ids, raw.device).unsqueeze(1)).squeeze(1).tolist()
    )
    most = min(max(num_top, default=0), raw.shape[1])
    top_vals: list[list[float]] = [[] for _ in token_ids]
    top_ids: list[list[int]] = [[] for _ in token_ids]
    if most > 0:
        vals, idx = raw.topk(most, dim=-1)  # [W, N]
        top_vals, top_ids = vals.tolist(), idx.tolist()
    return [
        TokenLogprobs(
            chosen=make(tok, value),
            top=[make(t, v) for t, v in zip(ti[:n], tv[:n], strict=True)],
        )
        for tok, value, n, ti, tv in zip(token_ids, chosen, num_top, top_ids, top_vals, strict=True)
    ]


def _is_plain_greedy(c: SamplingContext) -> bool:
    """Greedy with nothing that changes the argmax or needs extra outputs."""
    p = c.params
    return (
        p.is_greedy
        and p.logprobs is None
        and p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and not p.logit_bias
        and not c.suppresses_stop
    )


def _apply_logit_bias(x: torch.Tensor, rows: Sequence[SamplingContext]) -> None:
    """Add each row's logit_bias to its logits (ids past the vocabulary are ignored; the
    server refuses them first). x: [R, V]."""
    vocab = x.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    values: list[float] = []
    for i, c in enumerate(rows):
        for tok, bias in c.params.logit_bias:
            if tok < vocab:
                row_idx.append(i)
                tok_idx.append(tok)
                values.append(bias)
    if row_idx:
        index = (_long(row_idx, x.device), _long(tok_idx, x.device))
        x.index_put_(index, torch.tensor(values, device=x.device, dtype=x.dtype), accumulate=True)


def _apply_penalties(x: torch.Tensor, rows: Sequence[SamplingContext]) -> None:
    """Repetition (prompt + output) and frequency/presence (output) penalties. x: [R, V]."""
    vocab = x.shape[1]
    device = x.device
    rep = [i for i, c in enumerate(rows) if c.params.repetition_penalty != 1.0]
    if rep:
        # seen[r, t] = token t occurs in row r's prompt or output.
        seen = torch.zeros((len(rep), vocab), dtype=torch.bool, device=device)  # [R', V]
        row_idx, tok_idx = _flatten(
            [list(rows[i].prompt_token_ids) + list(rows[i].output_token_ids) for i in rep]
        )
        seen[_long(row_idx, device), _long(tok_idx, device)] = True
        penalty = torch.tensor(
            [rows[i].params.repetition_penalty for i in rep], device=device, dtype=torch.float32
        ).unsqueeze(1)  # [R', 1]
        sub = x[rep]  # [R', V] (a copy)
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        x[rep] = torch.where(seen, penalised, sub)
    freq = [
        i
        for i, c in enumerate(rows)
        if c.params.frequency_penalty != 0.0 or c.params.presence_penalty != 0.0
    ]
    if freq:
        counts = torch.zeros((len(freq), vocab), dtype=torch.float32, device=device)  # [R', V]
        row_idx, tok_idx = _flatten([list(rows[i].output_token_ids) for i in freq])
        if row_idx:
            counts.index_put_(
                (_long(row_idx, device), _long(tok_idx, device)),
                torch.ones(len(row_idx), dtype=torch.float32, device=device),
                accumulate=True,
            )
        f = torch.tensor([rows[i].params.frequency_penalty for i in freq], device=device)
        p = torch.tensor([rows[i].params.presence_penalty for i in freq], device=device)
        x[freq] -= f.unsqueeze(1) * counts + p.unsqueeze(1) * (counts > 0).float()


def _apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> None:
    """Mask tokens whose prob is below min_p * (the row's max prob). x: [R, V], min_p: [R]."""
    probs = torch.softmax(x, dim=-1)  # [R, V]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [R, 1]
    x.masked_fill_(probs < threshold, float("-inf"))


def _apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """Keep each row's top_k logits, then its smallest top set with mass >= top_p.

    x: [R, V]; top_k: [R] (V = off); top_p: [R] (1.0 = off). Ties at the k-th value are all
    kept (as vLLM does), so a row may keep more than k tokens.
    """
    vocab = x.shape[1]
    sorted_x, order = x.sort(dim=-1, descending=False)  # [R, V] ascending
    # The k-th largest value sits at ascending position V - k.
    kth = sorted_x.gather(1, (vocab - top_k).unsqueeze(1))  # [R, 1]
    sorted_x.masked_fill_(sorted_x < kth, float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)  # [R, V]
    # Drop a token when the tokens below it (itself included) hold at most 1 - p of the mass.
    cum = probs.cumsum(dim=-1)  # [R, V]
    drop = cum <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # the top token always survives
    sorted_x.masked_fill_(drop, float("-inf"))
    x.scatter_(1, order, sorted_x)


def _draw(
    generator: torch.Generator,
    n: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """n U[0, 1) draws from a row's generator, made on the generator's device, returned on
    device."""
    out = torch.empty(n, dtype=dtype, device=generator.device)
    out.uniform_(generator=generator)
    # A CPU generator with CUDA logits still works (slower: one copy per seeded row).
    return out.to(device, non_blocking=True)


def _flatten(lists: list[list[int]]) -> tuple[list[int], list[int]]:
    """(row index, value) pairs of a ragged list of lists, flattened."""
    row_idx: list[int] = []
    values: list[int] = []
    for r, vals in enumerate(lists):
        row_idx.extend([r] * len(vals))
        values.extend(vals)
    return row_idx, values


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    """A 1-D long tensor on device."""
    return torch.tensor(values, dtype=torch.long, device=device)
