"""The Decoder interface: how a decoding strategy plugs into LLMEngine.step().

Each step the engine calls, in order:
    num_lookahead_slots(seq, num_running)   while scheduling: extra KV slots to reserve
    build_inputs(batch)                      tokens, positions and tree shape to feed
    (model forward, once for the whole batch; attention via attention_backend(...))
    select(batch, inputs, logits)            accepted tokens, KV to keep, forks, drops
    on_fork(parent, children) / on_finish(seq)

Every hook defaults to plain autoregressive decoding, so a decoder overrides only what it
changes. Everything a decoder needs from the engine is declared here (lookahead slots, a
tree mask, KV compaction, fork/drop/adopt, a per-layer attention backend, per-step stats);
the engine never checks a decoder's type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from slipstream.engine.batch import Batch, ScheduledSeq
from slipstream.engine.outputs import TokenLogprobs
from slipstream.engine.sequence import Sequence

if TYPE_CHECKING:
    from slipstream.engine.attention import AttentionBackend
    from slipstream.engine.sampler import Sampler


@dataclass(frozen=True)
class NoOptions:
    """A decoder without options."""


@dataclass(frozen=True)
class DecoderContext:
    """What the engine tells a decoder about the model it serves."""

    vocab_size: int
    eos_token_ids: frozenset[int]
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    max_model_len: int
    # Paged KV cache geometry (for decoders that keep per-block state, e.g. page mean keys).
    num_kv_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    sampler: Sampler
    # Decodes token ids to text (for decoders that look at text, e.g. punctuation).
    tokenizer: Any = None


@dataclass
class SeqInputs:
    """Tokens one sequence feeds this step.

    Example (a root token and a two-branch draft tree, prefix of 10 cached tokens):
        token_ids = [r, a, b, c]   parents = [-1, 0, 0, 1]   positions = [10, 11, 11, 12]
        a and b are both children of r; c is a child of a. -1 means "attaches to the cache".
    """

    token_ids: list[int]
    positions: list[int]
    # parents[i] = index (among these tokens) of token i's parent, -1 = attaches to the cached
    # prefix only. None = a causal chain (token i sees tokens 0..i).
    parents: list[int] | None = None
    # Local indices of the tokens whose logits are needed, in the order they come back.
    logits_indices: list[int] = field(default_factory=list)
    # Optional precomputed [n, n] bool ancestor mask for `parents` (a decoder with a static
    # tree template builds it once instead of the runner rebuilding it every step).
    tree_mask: torch.Tensor | None = None


@dataclass
class StepInputs:
    """Inputs for the whole batch, aligned with batch.items."""

    seqs: list[SeqInputs]

    @property
    def num_tokens(self) -> int:
        """Tokens fed through the model, all sequences together."""
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass
class StepLogits:
    """Logits of the rows StepInputs asked for, all sequences concatenated."""

    # [num_logit_rows, vocab_size] float32
    values: torch.Tensor
    # offsets[i]:offsets[i+1] are batch item i's rows.
    offsets: list[int]

    def for_item(self, i: int) -> torch.Tensor:
        """Item i's rows: [len(logits_indices of item i), vocab_size]."""
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def take(self, rows: list[int]) -> torch.Tensor:
        """values[rows] ([len(rows), vocab_size]): a view when the rows are consecutive (a
        batch-1 step's one row), else one index_select. Indexing with the Python list took
        35 us for one row of 49k logits and 90 us for three (2 cores), per sampling call."""
        if (
            rows
            and rows[-1] - rows[0] == len(rows) - 1
            and rows == list(range(rows[0], rows[-1] + 1))
        ):
            return self.values[rows[0] : rows[-1] + 1]
        index = torch.tensor(rows, dtype=torch.long, device=self.values.device)
        return self.values.index_select(0, index)


@dataclass
class SeqResult:
    """What one sequence accepted this step."""

    # Tokens to append to the sequence (empty for a prefill chunk that does not sample).
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    # Local indices of fed tokens whose KV is kept, in order; None = keep all fed tokens.
    # The engine moves kept KV into consecutive slots (compaction) and frees the rest.
    kv_keep: list[int] | None = None


@dataclass
class SpecStats:
    """vLLM-style speculative decoding counters for one step."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # accepted_per_pos[k] = drafts whose (k+1)-th drafted token was accepted.
    accepted_per_pos: list[int] = field(default_factory=list)

    def add(self, num_draft_tokens: int, num_accepted: int) -> None:
        """Record one draft of `num_draft_tokens` of which the first `num_accepted` held."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_accepted:
            self.accepted_per_pos.extend([0] * (num_accepted - len(self.accepted_per_pos)))
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1


@dataclass
class StepResult:
    """The decoder's decision for one step, aligned with batch.items."""

    seqs: list[SeqResult]
    # seq_id -> number of children to fork from it after this step (they share its KV).
    forks: dict[int, int] = field(default_factory=dict)
    # seq_ids to remove silently (trials that lost), freeing their KV.
    drops: list[int] = field(default_factory=list)
    # parent seq_id -> child seq_id: the parent takes the child's tokens and KV; child removed.
    adopt: dict[int, int] = field(default_factory=dict)
    spec: SpecStats | None = None
    stats: dict[str, float] = field(default_factory=dict)


class Decoder:
    """A decoding strategy. Subclasses override only the hooks they change."""

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions
    # Engine features this decoder uses: "tree_mask", "kv_compaction", "fork",
    # "attention_backend". The vLLM backend rejects decoders that need any of them.
    required_features: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: Any, ctx: DecoderContext) -> None:
        self.options = options
        self.ctx = ctx
        # The other parts of a composite decoder (set by CompositeDecoder): a drafting part
        # asks them how deep its drafts may reach (draft_depth_limit).
        self.peers: list[Decoder] = []

    def draft_depth_limit(self, seq: Sequence) -> int | None:
        """Deepest draft node another part may feed for `seq` this step (0: no draft), or
        None for no limit. A part that changes attention limits the drafts of a speculative
        part it is combined with, so that every node attends as decoding it alone would."""
        return None

    def peer_depth_limit(self, seq: Sequence) -> int | None:
        """The tightest draft_depth_limit of the peers (None: no limit)."""
        limits = [d for p in self.peers if (d := p.draft_depth_limit(seq)) is not None]
        return min(limits, default=None)

    def num_lookahead_slots(self, seq: Sequence, num_running: int) -> int:
        """KV slots to reserve beyond the scheduled tokens (room for drafts)."""
        return 0

    def prefill_tail(self) -> int:
        """Last tokens of a prefill that its final chunk must compute, neither split off into
        an earlier chunk nor served from the prefix cache (0: no need): for a decoder that
        reads those tokens' queries when the prefill ends (sparse attention's prompt pins).
        Otherwise what it sees would follow the load and the cache's history."""
        return 0

    def attention_backend(self, layer_idx: int, default: AttentionBackend) -> AttentionBackend:
        """The attention implementation for one layer. Called once per layer at start-up."""
        return default

    def build_inputs(self, batch: Batch) -> StepInputs:
        """Tokens and positions to feed this step."""
        return StepInputs(seqs=[default_seq_inputs(item) for item in batch.items])

    def select(self, batch: Batch, inputs: StepInputs, logits: StepLogits) -> StepResult:
        """Turn logits into accepted tokens per sequence."""
        return StepResult(
            seqs=sample_last_tokens(self.ctx.sampler, batch, logits), stats=self.step_stats()
        )

    def step_stats(self) -> dict[str, float]:
        """This step's stats gathered outside select (e.g. by an attention backend).

        The default select reports them; a composite decoder merges every part's.
        """
        return {}

    def on_fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Children were forked from parent (after a StepResult asked for it)."""

    def on_finish(self, seq: Sequence) -> None:
        """Drop any state kept for this sequence."""

    def stats(self) -> dict[str, float]:
        """Cumulative decoder statistics for the offline API (LLM.get_stats())."""
        return {}


def default_seq_inputs(item: ScheduledSeq) -> SeqInputs:
    """Feed the next `num_new_tokens` uncomputed tokens as a causal chain."""
    seq = item.seq
    start = seq.num_computed_tokens
    end = start + item.num_new_tokens
    return SeqInputs(
        token_ids=seq.token_ids[start:end],
        positions=list(range(start, end)),
        logits_indices=[item.num_new_tokens - 1] if item.samples else [],
    )


def sample_last_tokens(sampler: Sampler, batch: Batch, logits: StepLogits) -> list[SeqResult]:
    """Sample one token for every item whose chunk reaches its end, in one sampler call."""
    from slipstream.engine.sampler import SamplingContext

    rows: list[int] = []
    contexts: list[SamplingContext] = []
    for i, item in enumerate(batch.items):
        if item.samples:
            rows.append(logits.offsets[i + 1] - 1)
            contexts.append(SamplingContext.of(item.seq))
    results = [SeqResult() for _ in batch.items]
    if not rows:
        return results
    out = sampler.sample(logits.take(rows), contexts)
    k = 0
    for i, item in enumerate(batch.items):
        if item.samples:
            results[i].new_token_ids = [out.token_ids[k]]
            lp = out.logprobs[k]
            results[i].logprobs = [lp] if lp is not None else None
            k += 1
    return results
