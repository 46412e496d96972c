"""Token Recycling: lossless, train-free speculative decoding from recycled candidate tokens.

Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models with
Token Recycling", arXiv 2408.08696 (ACL 2025). Every forward computes a next-token
distribution at every fed position; the top-k of each is stored in an adjacency matrix
M [vocab, k] (row t = likely successors of token t). Each step drafts a static tree from M
(draft_tree.py), verifies it in one forward with a tree mask (tree_verify.py), keeps the
accepted path's KV and writes the top-k of every node's logits back into M.

Faithful to the official code: k = 8, the "2.2.2" template (80 nodes), greedy longest-path
acceptance, all nodes' rows updated (last writer wins), M shared by all requests and never
reset (hot start). Where we differ on purpose:
- temperature > 0 runs lossless tree rejection sampling (the official code is greedy only),
  except for requests with a `seed` (tree_verify.py): drafted from M, which every request
  rewrites, their random draws and output would change from run to run;
- `adaptive` (default on) cuts the tree to the size that maximises measured tokens/s at the
  current batch size (calibration.py);
- `prompt_seed_rows` (default 128): prefill logits at prompt positions also seed M (the
  official code discards them; the smpanaro reimplementation seeds);
- `prompt_lookup_tokens` (default 16): a prompt-lookup match (ngram's rule, the longest
  matching suffix, the chain no longer than the match; looked up in an index each sequence
  keeps, suffix_index.py) is drafted under the root as one more branch, merged with the
  tree where both drafted the same tokens. A small tree (what a 2-core CPU can afford)
  accepts ~1.4 tokens per step; in loops and copied passages the lookup chain accepts ~4;
- `dynamic_tree` (default on): M also keeps each candidate's probability when stored, and a
  step drafts the nodes with the highest path probability instead of the template's first
  nodes (dynamic_tree.py); same node count, more accepted tokens. Rows never written are
  not expanded, so a cold matrix drafts fewer nodes rather than token 0;
- `pair_rows` (default 256k, dynamic trees only): candidates are also kept per (previous
  token, token) and answer before M's one-token rows (pair_rows.py);
- dynamic trees re-rank a row's candidates by the request's repetition / frequency /
  presence penalties before drafting from it (penalty_drafts.py), from the raw logits M
  keeps beside the probabilities;
- M is int32 (half the official int64) and can be saved to and loaded from `matrix_path`.
The official algorithm is
{"adaptive": false, "prompt_seed_rows": 0, "prompt_lookup_tokens": 0, "dynamic_tree": false}.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from slipstream.decoding.base import DecoderContext, StepInputs
from slipstream.decoding.calibration import (
    AcceptanceStats,
    ChainStats,
    PickOrderStats,
    TreeSizer,
)
from slipstream.decoding.draft_tree import (
    GraftedTemplate,
    TreeTemplate,
    fill_tree,
    graft_chain,
    subtree,
    template,
)
from slipstream.decoding.dynamic_tree import MAX_DEPTH, DynamicTrees, best_first_draft
from slipstream.decoding.ngram import check_lookup_bounds
from slipstream.decoding.pair_rows import PairRows
from slipstream.decoding.penalty_drafts import PenalisedRows
from slipstream.decoding.registry import DECODERS
from slipstream.decoding.suffix_index import SuffixIndex
from slipstream.decoding.tree_verify import Draft, TreeSpecDecoder, matching_nodes
from slipstream.engine.batch import Batch, ScheduledSeq
from slipstream.engine.sequence import Sequence
from slipstream.engine.vocab_topk import vocab_topk, vocab_topk_and_argmax

logger = logging.getLogger(__name__)


# Candidates per token at most: the matrix and its probabilities and logits take 12 bytes
# per entry, [vocab, k] each (49152 x 64: 38 MB); the official code keeps 8.
MAX_TOP_K = 64
# Pair rows at most: each keeps k candidates, their probabilities and logits (12 bytes each)
# plus its key, so 2^23 pairs at k = 8 hold ~0.8 GB (1e11 asked for 2.9 TiB at start-up).
MAX_PAIR_ROWS = 1 << 23


@dataclass(frozen=True)
class TokenRecyclingOptions:
    """--decoder-config keys of token_recycling."""

    top_k: int = 8  # candidates stored per token (the official --output-id-topk)
    template: str = "2.2.2"  # the official static tree: 80 nodes, levels 8/21/25/15/8/3
    matrix_path: str | None = None  # load M from here at start-up; save it here periodically
    save_interval_s: float = 60.0  # autosave period (and once at exit) when matrix_path is set
    adaptive: bool = True  # size the tree from measured cost and acceptance; False = faithful
    tree_size: int | None = None  # fixed draft nodes per step (overrides adaptive)
    calibration_rounds: int = 2  # start-up passes over the calibration sizes
    explore_every: int = 16  # steps between exploratory sizes (0 = never)
    # Draft a tree only where the sizer predicts at least this much more tokens per second
    # than not drafting (lookup chains are sized without it: see choose_chain_length). Its
    # cost curve is learnt from noisy step times (the same step moves 5-40% on this 2-core
    # VM), so a predicted gain of a few percent is within the noise of its inputs. At batch
    # 1 the best tree predicts ~1.3x here and this changes nothing.
    min_predicted_gain: float = 0.05
    sampling: bool = True  # temperature > 0 via tree rejection sampling; False = standard path
    # Prompt positions per step whose logits also seed M (the last ones of each prefill
    # chunk, shared by the batch's chunks). The official code discards prefill logits (0);
    # the smpanaro reimplementation seeds M from them. Each row costs one lm_head row
    # (576 x 49152 on the default model) plus a top-k; 128 rows keep the step's logits
    # at 128 x 49152 fp32 = 25 MB. With `adaptive`, no rows while the calibrated tree at the
    # current batch size is empty (a full batch on a CPU): nothing would draft from them.
    prompt_seed_rows: int = 128
    # Prompt lookup grafted onto the tree: when the last prompt_lookup_min..max tokens
    # occurred earlier in the prompt or output, the (up to) this many tokens that followed
    # them hang under the root as one more branch (0 = the recycled tree alone). The tree
    # misses what the model copies from its context; a loop or a quoted passage is exactly
    # what prompt lookup finds.
    # The longest suffix in [min, max] is matched and the chain is at most factor x its
    # length (SuffixIndex.draft): offline on 48 builtin prompts, 3..32 with 16 tokens and
    # factor 1 gave 2.05 tokens per step against 1.98 with 5..5 and 8 tokens (vLLM's ngram
    # bounds); the sizer still cuts the chain to what its measured acceptance pays for.
    prompt_lookup_tokens: int = 16
    prompt_lookup_min: int = 3
    prompt_lookup_max: int = 32
    prompt_lookup_factor: float = 1.0
    # Shape each step's tree by the stored candidates' probabilities (best first) rather than
    # the static template. 12 builtin prompts, 2 cores, float32 (outputs identical to
    # standard's, so the drafters see the same text): 1.78 vs 1.46 tokens per step, 1.22x vs
    # 1.15x standard's speed (see dynamic_tree.py).
    dynamic_tree: bool = True
    # Dynamic trees also keep candidates keyed by the last two tokens (pair_rows.py), this
    # many pairs in a ring (256k = 24 MB); 0 = one-token rows only.
    pair_rows: int = 262144

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in [1, {MAX_TOP_K}], got {self.top_k}")
        if self.tree_size is not None and self.tree_size < 0:
            raise ValueError(f"tree_size must be >= 0, got {self.tree_size}")
        if self.prompt_lookup_tokens < 0:
            raise ValueError(f"prompt_lookup_tokens must be >= 0, got {self.prompt_lookup_tokens}")
        check_lookup_bounds(self.prompt_lookup_min, self.prompt_lookup_max)
        if self.prompt_seed_rows < 0:
            raise ValueError(f"prompt_seed_rows must be >= 0, got {self.prompt_seed_rows}")
        if self.prompt_lookup_factor <= 0:
            raise ValueError(f"prompt_lookup_factor must be > 0, got {self.prompt_lookup_factor}")
        if not 0 <= self.pair_rows <= MAX_PAIR_ROWS:
            raise ValueError(f"pair_rows must be in [0, {MAX_PAIR_ROWS}], got {self.pair_rows}")
        if self.save_interval_s <= 0:
            raise ValueError(f"save_interval_s must be > 0, got {self.save_interval_s}")
        if self.min_predicted_gain < 0:
            raise ValueError(f"min_predicted_gain must be >= 0, got {self.min_predicted_gain}")
        for name in ("calibration_rounds", "explore_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _check_matrix_path(path: str) -> None:
    """ValueError at start-up where the matrix could never be saved: a folder that does not
    exist or cannot be written (the first autosave would fail a minute into serving)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"matrix_path {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"matrix_path {path!r}: folder {folder!r} is not writable")
    if os.path.isdir(path):
        raise ValueError(f"matrix_path {path!r} is a folder; give a file path")


@DECODERS.register("token_recycling")
class TokenRecyclingDecoder(TreeSpecDecoder):
    """Adjacency matrix + static draft tree + one-forward tree verification."""

    name = "token_recycling"
    Options = TokenRecyclingOptions
    required_features = frozenset({"tree_mask", "kv_compaction"})

    def __init__(self, options: TokenRecyclingOptions, ctx: DecoderContext) -> None:
        super().__init__(options, ctx)
        if options.top_k > ctx.vocab_size:
            raise ValueError(
                f"top_k must be <= the vocabulary ({ctx.vocab_size}), got {options.top_k}"
            )
        self.opts = options
        self.full = template(options.template, options.top_k)
        # [vocab, k] int32 on the model's device, zero-filled (token 0 until first seen).
        self.matrix = torch.zeros(
            ctx.vocab_size, options.top_k, dtype=torch.int32, device=ctx.device
        )
        # [vocab, k] float32: P(candidate) under the logits row it came from (softmax over
        # that row's top-k), for dynamic trees. Kept on the host (numpy views on a CPU) since
        # the best-first walk runs in Python.
        self.probs = torch.zeros(ctx.vocab_size, options.top_k, dtype=torch.float32)
        # [vocab, k] float32: each candidate's raw logit, so that a request's penalties can
        # re-rank a row when it drafts (penalty_drafts.py). Host, beside the probabilities.
        self.logits = torch.zeros(ctx.vocab_size, options.top_k, dtype=torch.float32)
        on_cpu = self.matrix.device.type == "cpu"
        self.host_matrix = self.matrix if on_cpu else torch.zeros_like(self.matrix, device="cpu")
        self.dynamic = DynamicTrees(options.top_k) if options.dynamic_tree else None
        self.pairs = (
            PairRows(options.pair_rows, options.top_k)
            if options.dynamic_tree and options.pair_rows
            else None
        )
        if options.matrix_path:
            _check_matrix_path(options.matrix_path)
        if options.matrix_path and os.path.exists(options.matrix_path):
            self.load_matrix(options.matrix_path)
        self.acceptance: AcceptanceStats | PickOrderStats = (
            PickOrderStats(self.full.num_draft)
            if options.dynamic_tree
            else AcceptanceStats(self.full)
        )
        self.chains = ChainStats(options.prompt_lookup_tokens)
        self.sizer = TreeSizer(
            self.acceptance,
            self.full.num_draft,
            options.calibration_rounds,
            options.explore_every,
            options.min_predicted_gain,
        )
        self._trees: dict[int, TreeTemplate] = {self.full.num_draft: self.full}
        self._grafts: dict[tuple[int, int], GraftedTemplate] = {}
        self.totals["prompt_lookup_drafts"] = 0  # drafts that carried a grafted chain
        # ([R, k] values, [R, k] token ids): this step's candidates per logits row
        self._topk: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_size = 0
        self._last_save = time.monotonic()
        if options.matrix_path:
            atexit.register(self._save_at_exit)

    # ---------------------------------------------------------------- drafting
    def drafts_allowed(self, seq: Sequence) -> bool:
        """Greedy always; sampling unless turned off or seeded (then the standard path,
        counted)."""
        return super().drafts_allowed(seq) and (seq.params.is_greedy or self.opts.sampling)

    def plan_draft(self, seq: Sequence, num_running: int) -> int:
        """Draft nodes for the next step: the tree's (fixed, faithful 80 or calibrated) plus
        a grafted prompt-lookup chain when the sequence's latest tokens occurred before."""
        if self.opts.tree_size is not None:
            size = min(self.opts.tree_size, self.full.num_draft)
        elif not self.opts.adaptive:
            size = self.full.num_draft
        else:
            size = self.sizer.size_for(num_running)
        self._last_size = size
        chain: list[int] = []
        if self.opts.prompt_lookup_tokens:
            o = self.opts
            index = SuffixIndex.of(seq, "tr_lookup", o.prompt_lookup_min, o.prompt_lookup_max)
            chain = index.draft(seq.token_ids, o.prompt_lookup_tokens, o.prompt_lookup_factor)
            self.chains.record_lookup(bool(chain))
            if chain and self.opts.adaptive and self.opts.tree_size is None:
                # As the batch fills, verified tokens cost nearly as much as decoded ones:
                # keep the chain only as deep as its measured acceptance pays for.
                chain = chain[: self.sizer.chain_length_for(num_running, size, self.chains)]
        seq.decoder_state["tr_plan"] = (size, chain)
        return size + len(chain)

    def tree(self, size: int) -> TreeTemplate:
        """The `size` most-often-accepted nodes of the template (a subtree: parents first)."""
        size = min(size, self.full.num_draft)
        if size not in self._trees:
            assert isinstance(self.acceptance, AcceptanceStats), "static trees only"
            self._trees[size] = subtree(self.full, self.acceptance.order()[:size])
        return self._trees[size]

    def grafted(self, size: int, length: int) -> GraftedTemplate:
        """tree(size) with a chain of `length` prompt-lookup tokens under the root."""
        key = (min(size, self.full.num_draft), length)
        if key not in self._grafts:
            self._grafts[key] = graft_chain(self.tree(size), length)
        return self._grafts[key]

    def propose(self, items: list[ScheduledSeq]) -> list[Draft | None]:
        """Fill each sequence's tree from M (one gather per level for each tree size), and
        graft its prompt-lookup chain, if any."""
        plans: list[tuple[int, list[int]]] = []
        for item in items:
            size, chain = item.seq.decoder_state.pop("tr_plan", (item.num_lookahead_slots, []))
            # Slots can be fewer than planned (room left before max_model_len): the chain,
            # usually the likelier branch, keeps its tokens first.
            chain = chain[: item.num_lookahead_slots]
            plans.append((min(size, item.num_lookahead_slots - len(chain)), chain))
        if self.dynamic is not None:
            return [
                self._dynamic_draft(item.seq, *plan)
                for item, plan in zip(items, plans, strict=True)
            ]
        by_size: dict[int, list[int]] = {}
        for j, (size, _) in enumerate(plans):
            by_size.setdefault(size, []).append(j)
        drafts: list[Draft | None] = [None] * len(items)
        for size, members in by_size.items():
            tmpl = self.tree(size)
            roots = torch.tensor(
                [items[j].seq.token_ids[-1] for j in members], device=self.matrix.device
            )
            tokens: list[list[int]] = fill_tree(tmpl, self.matrix, roots).tolist()  # [B, T]
            for j, toks in zip(members, tokens, strict=True):
                chain = plans[j][1]
                if chain:
                    self.totals["prompt_lookup_drafts"] += 1
                    graft = self.grafted(size, len(chain))
                    drafts[j] = Draft(graft.tmpl, graft.tokens(toks, chain), tuple(chain))
                else:
                    drafts[j] = Draft(tmpl, toks)
        return drafts

    def _dynamic_draft(self, seq: Sequence, size: int, chain: list[int]) -> Draft | None:
        """A best-first tree of at most `size` nodes from the recycled rows, with the chain
        merged in; None where neither has a token (rows never written, no lookup match)."""
        assert self.dynamic is not None
        ids = seq.token_ids
        root, prev = ids[-1], (ids[-2] if len(ids) > 1 else -1)
        matrix, probs = self.host_matrix.numpy(), self.probs.numpy()
        # A composite part's depth limit (sparse attention's next page choice): the nodes
        # go into breadth within it rather than being cut off after the draft.
        limit = self.peer_depth_limit(seq) if self.peers else None
        if limit is not None:
            if limit <= 0:
                return None
            chain = chain[:limit]
        paths, toks = best_first_draft(
            matrix,
            probs,
            root,
            size,
            max_depth=MAX_DEPTH if limit is None else min(MAX_DEPTH, limit),
            pairs=self.pairs,
            prev=prev,
            logits=self.logits.numpy(),
            rerank=PenalisedRows.of(seq),  # None without penalties
        )
        if not chain:
            if not paths:
                return None
            tmpl = self.dynamic.tree(paths)
            return Draft(tmpl, DynamicTrees.node_tokens(tmpl, root, paths, toks))
        self.totals["prompt_lookup_drafts"] += 1
        tmpl, tokens = self.dynamic.with_chain(root, paths, toks, chain)
        return Draft(tmpl, tokens, tuple(chain))

    def build_inputs(self, batch: Batch) -> StepInputs:
        """The tree step's inputs, plus logits rows at prompt positions that seed M."""
        inputs = super().build_inputs(batch)
        budget = self.opts.prompt_seed_rows
        # Seeding costs ~0.2 ms a row (LM head, float copy, two top-k over the vocab): 16 ms
        # for an 87-token prompt on 2 cores, against 91 ms for the prefill. Where the batch
        # is so full that the calibrated tree is empty (90% of sequence-steps at 12-16
        # running, 2 cores), the rows would feed a matrix nobody drafts from.
        if (
            budget
            and self.opts.adaptive
            and self.opts.tree_size is None
            and self.sizer.best_size(max(1, len(batch.items))) == 0
        ):
            budget = 0
        for si in inputs.seqs:
            if budget <= 0:
                break
            if si.parents is not None or len(si.token_ids) < 2:
                continue  # a draft tree or a one-token step: no prompt positions
            # A prefill chunk: add logits rows at its last positions. The sampled row (if the
            # chunk samples) stays last, so "the item's last row" still means the sampled one.
            sampled = list(si.logits_indices)  # [n - 1] if the chunk samples, else []
            end = len(si.token_ids) - len(sampled)
            rows = min(end, budget)
            si.logits_indices = [*range(end - rows, end), *sampled]
            budget -= rows
        return inputs

    # ---------------------------------------------------------------- verification
    def greedy_targets(self, values: torch.Tensor) -> torch.Tensor:
        """Argmax per row from one top-k pass (the top-k also feeds the matrix update).

        NOTE: topk's order among equal values is unspecified, so vocab_topk_and_argmax
        gives rows whose top two tie values.argmax (lowest index), the rule the standard
        sampler uses.
        """
        k = min(self.opts.top_k, values.shape[1])
        self._topk, targets = vocab_topk_and_argmax(values, k)  # ([R, k] x 2), [R]
        return targets

    def accepted(self, draft: Draft, emitted: list[int]) -> None:
        """Acceptance statistics of tree nodes (they size and, for static trees, order the
        tree) and of prompt-lookup chains (they size the chain), counted by token match: a
        chain counts as deep as it agrees with what was emitted, whether its tokens were fed
        as its own nodes or shared with the tree's."""
        matched = matching_nodes(draft.tmpl, draft.tokens, emitted)
        self.acceptance.record(draft.tmpl, matched)
        if draft.chain:
            depth = 0
            while depth < min(len(draft.chain), len(emitted)):
                if draft.chain[depth] != emitted[depth]:
                    break
                depth += 1
            self.chains.record_chain(len(draft.chain), depth)

    def observe(
        self,
        fed_tokens: list[int],
        prev_tokens: list[int],
        values: torch.Tensor,
        num_tokens: int,
        seconds: float,
        decode_only: bool = True,
    ) -> None:
        """M[fed token] = top-k of its logits, for every row (rejected branches included);
        with pair rows also P[(previous token, fed token)]."""
        if fed_tokens:
            top_vals, top = (
                self._topk if self._topk is not None else vocab_topk(values, self.opts.top_k)
            )
            if self.matrix.device.type == "cpu" and top_vals.device.type == "cpu":
                self._record_on_host(fed_tokens, prev_tokens, top_vals, top)
            else:
                self._record_on_device(fed_tokens, prev_tokens, top_vals, top)
        self._topk = None
        self.sizer.end_step(num_tokens, seconds, decode_only)
        if self.sizer.step % 64 == 0:
            self._trees = {self.full.num_draft: self.full}  # re-cut subtrees by new rates
            self._grafts = {}
        if self.opts.matrix_path and time.monotonic() - self._last_save > self.opts.save_interval_s:
            self._save_quietly(self.opts.matrix_path)

    def _record_on_host(
        self,
        fed_tokens: list[int],
        prev_tokens: list[int],
        top_vals: torch.Tensor,  # [R, k'] float, best first
        top: torch.Tensor,  # [R, k'] int64
    ) -> None:
        """observe's writes through NumPy views (a CPU matrix): in the engine, right after a
        forward that streamed the weights, the torch form (index tensors, a scatter, a
        softmax, copies) took ~0.16 ms a step on 2 cores."""
        rows = np.asarray(fed_tokens, dtype=np.int64)
        ids = top.numpy().astype(np.int32)
        width = ids.shape[1]
        self.host_matrix.numpy()[rows, :width] = ids
        if self.dynamic is None:
            return
        # Softmax over the row's top-k only: as good an ordering signal as the full softmax
        # here (1.48 vs 1.47 tokens per step, 12 prompts, 6 nodes) without a logsumexp over
        # the vocabulary (~0.3 ms for 9 rows on 2 cores). Rows come largest first.
        vals = top_vals.float().numpy()
        with np.errstate(invalid="ignore"):  # a row of -inf only: NaN, as torch gives
            weights = np.exp(vals - vals[:, :1])
            probs = weights / weights.sum(axis=1, keepdims=True)
        self.probs.numpy()[rows, :width] = probs
        self.logits.numpy()[rows, :width] = vals
        if self.pairs is not None:
            self.pairs.write(prev_tokens, fed_tokens, ids, probs, vals)

    def _record_on_device(
        self,
        fed_tokens: list[int],
        prev_tokens: list[int],
        top_vals: torch.Tensor,  # [R, k'] float, best first
        top: torch.Tensor,  # [R, k'] int64
    ) -> None:
        """observe's writes for a matrix on an accelerator: the matrix there, then, for
        dynamic trees (they draft on the host), the host copies as _record_on_host writes
        them."""
        rows = torch.tensor(fed_tokens, dtype=torch.long, device=self.matrix.device)
        width = top.shape[1]
        self.matrix[rows, :width] = top.to(device=self.matrix.device, dtype=torch.int32)
        if self.dynamic is not None:
            self._record_on_host(fed_tokens, prev_tokens, top_vals.cpu(), top.cpu())

    def step_stats(self) -> dict[str, float]:
        """The tree size planned for this step, and the base class's numbers."""
        return {**super().step_stats(), "tree_size": float(self._last_size)}

    def reset_matrix(self) -> None:
        """Forget every recycled candidate (a cold start; benchmarks use it between prompts)."""
        self.matrix.zero_()
        self.host_matrix.zero_()
        self.probs.zero_()
        self.logits.zero_()
        if self.pairs is not None:
            self.pairs.clear()

    # ---------------------------------------------------------------- persistence
    def save_matrix(self, path: str) -> None:
        """Write M atomically (a temp file, then rename)."""
        tmp = f"{path}.tmp{os.getpid()}"
        payload = {
            "matrix": self.matrix.cpu(),
            "probs": self.probs,
            "logits": self.logits,
            "vocab_size": self.ctx.vocab_size,
        }
        torch.save(payload, tmp)
        os.replace(tmp, path)
        self._last_save = time.monotonic()

    def load_matrix(self, path: str) -> None:
        """Read M written by save_matrix; the vocabulary and k must match."""
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
        matrix = payload["matrix"]
        if tuple(matrix.shape) != tuple(self.matrix.shape):
            raise ValueError(
                f"matrix at {path} has shape {tuple(matrix.shape)}, expected "
                f"{tuple(self.matrix.shape)} (vocab_size, top_k)"
            )
        self.matrix.copy_(matrix.to(self.matrix.device, torch.int32))
        if self.host_matrix is not self.matrix:
            self.host_matrix.copy_(matrix.to(torch.int32))
        logits = payload.get("logits")
        if logits is not None and tuple(logits.shape) == tuple(self.logits.shape):
            self.logits.copy_(logits.float())
        else:  # saved without raw logits: rows keep their stored order under penalties
            self.logits.zero_()
        probs = payload.get("probs")
        if probs is not None and tuple(probs.shape) == tuple(self.probs.shape):
            self.probs.copy_(probs.float())
        else:  # saved without probabilities: dynamic trees rank a written row's candidates
            # alike (1/k each); rows never written stay 0, so the walk leaves them alone.
            written = (matrix != 0).any(dim=1, keepdim=True).float()  # [vocab, 1]
            self.probs.copy_(written.expand_as(self.probs) / self.probs.shape[1])
        logger.info("token_recycling: loaded matrix %s", path)

    def _save_quietly(self, path: str) -> None:
        """save_matrix, a failure logged: decoding goes on (the folder may have gone, or the
        disk filled, since start-up; a failed save must not fail the step's requests)."""
        try:
            self.save_matrix(path)
        except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError for paths
            self._last_save = time.monotonic()  # retried after another interval, not each step
            logger.warning("token_recycling: could not save matrix to %s: %s", path, exc)

    def _save_at_exit(self) -> None:
        if self.opts.matrix_path:
            self._save_quietly(self.opts.matrix_path)

    def stats(self) -> dict[str, float]:
        """Cumulative counters plus the current calibration state."""
        out = super().stats()
        out["tree_size"] = float(self._last_size)
        out["calibrating"] = float(self.sizer.step < self.sizer.calibration_steps)
        out["matrix_rows_filled"] = float((self.matrix != 0).any(dim=1).sum())
        if self.pairs is not None:
            out["pair_rows_filled"] = float(len(self.pairs))
        return out
