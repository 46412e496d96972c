"""LLMEngine: requests in, tokens out. step(): schedule, inputs, forward, select, update."""

from __future__ import annotations

import itertools
import logging
import numbers
import random
import time
from typing import Any

import torch

from slipstream.config import EngineConfig
from slipstream.decoding import create_decoder
from slipstream.decoding.base import DecoderContext, StepResult
from slipstream.engine.batch import Batch
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.model_runner import ModelRunner
from slipstream.engine.output_processor import OutputProcessor, RequestState
from slipstream.engine.outputs import RequestOutput, StepStats
from slipstream.engine.prompt_logprobs import add_prompt_rows, take_prompt_logprobs
from slipstream.engine.sampler import Sampler
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.scheduler import Scheduler
from slipstream.engine.sequence import Sequence
from slipstream.engine.setup import LoadedModel, load_engine_model

logger = logging.getLogger(__name__)


class LLMEngine:
    """The native engine. Not thread-safe: one thread drives add/abort/step."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded or load_engine_model(config.model)
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = self.loaded.max_model_len
        self.runner = ModelRunner(
            self.loaded.model,
            self.loaded.arch,
            config.cache,
            self.loaded.dtype,
            self.loaded.device,
        )
        self.max_model_len = self._fit_to_cache(self.max_model_len)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.sampler = Sampler(self.loaded.eos_token_ids)
        self.decoder = create_decoder(config.decoder, self._decoder_context())
        default_backend = self.loaded.model.attn_backends[0]
        for layer in range(self.loaded.arch.num_hidden_layers):
            backend = self.decoder.attention_backend(layer, default_backend)
            if backend is not default_backend:
                self.loaded.model.set_attention_backend(layer, backend)
        self.scheduler = Scheduler(
            config.scheduler,
            self.block_manager,
            self.decoder.num_lookahead_slots,
            self.decoder.prefill_tail(),
        )
        self.outputs = OutputProcessor(
            self.tokenizer, self.loaded.eos_token_ids, self.max_model_len
        )
        self.requests: dict[str, RequestState] = {}
        self.seqs: dict[int, Sequence] = {}
        self._seq_ids = itertools.count()
        self._seed_rng = random.Random(config.model.seed)
        self.totals = StepStats()
        self.num_steps = 0
        self.last_stats = StepStats()

    def _fit_to_cache(self, max_model_len: int) -> int:
        """The context window the KV cache can hold for one sequence. A prompt longer than the
        cache but within the window would wait for room forever, and hold up every request
        behind it. As vLLM does, a window set by the user that does not fit is an error; one
        taken from the model's config shrinks to the cache, with a warning."""
        capacity = self.runner.num_blocks * self.config.cache.block_size
        if max_model_len <= capacity:
            return max_model_len
        fix = "give the KV cache more room (--kv-cache-memory, --num-kv-blocks)"
        if self.config.model.max_model_len is not None:
            raise ValueError(
                f"max_model_len {max_model_len} does not fit the KV cache, which holds "
                f"{capacity} tokens ({self.runner.num_blocks} blocks of "
                f"{self.config.cache.block_size}); lower --max-model-len or {fix}"
            )
        logger.warning(
            "the KV cache holds %d tokens, fewer than the model's context window of %d: "
            "max_model_len is %d (to keep the whole window, %s)",
            capacity,
            max_model_len,
            capacity,
            fix,
        )
        return capacity

    def _decoder_context(self) -> DecoderContext:
        arch = self.loaded.arch
        return DecoderContext(
            vocab_size=arch.vocab_size,
            eos_token_ids=self.loaded.eos_token_ids,
            device=self.loaded.device,
            dtype=self.loaded.dtype,
            num_layers=arch.num_hidden_layers,
            max_model_len=self.max_model_len,
            num_kv_blocks=self.runner.num_blocks,
            block_size=self.config.cache.block_size,
            num_kv_heads=arch.num_key_value_heads,
            head_dim=arch.head_dim,
            sampler=self.sampler,
            tokenizer=self.tokenizer,
        )

    # ----------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request; it produces params.n completions."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        prompt_token_ids = self._checked_ids(prompt_token_ids)
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; the context window is "
                f"{self.max_model_len} and at least one must remain for the output"
            )
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs = [
            self._new_seq(request_id, prompt_token_ids, params, arrival, index)
            for index in range(params.n)
        ]
        self.requests[request_id] = self.outputs.new_state(
            request_id, prompt, list(prompt_token_ids), params, seqs, arrival
        )
        for seq in seqs:
            self.scheduler.add(seq)

    def _checked_ids(self, token_ids: list[int]) -> list[int]:
        """The prompt's ids as ints, each in the vocabulary. Checked here, not in the step: a
        bad id failed the step of every request in it, and stayed queued to fail the next."""
        vocab = self.loaded.arch.vocab_size
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab:
                raise ValueError(
                    f"prompt token id {t!r} is not in the vocabulary (ids 0..{vocab - 1})"
                )
        return [int(t) for t in token_ids]

    def _new_seq(
        self, request_id: str, prompt: list[int], params: SamplingParams, arrival: float, index: int
    ) -> Sequence:
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=request_id,
            prompt_token_ids=list(prompt),
            params=params,
            arrival_time=arrival,
            index=index,
        )
        if not params.is_greedy:
            # One generator per sequence: the same seed gives the same tokens whatever
            # else is in the batch. n > 1 completions differ by their index.
            seed = (
                (params.seed + index) % 2**64  # torch reads seeds mod 2^64 (negative ones too)
                if params.seed is not None
                else self._seed_rng.getrandbits(63)
            )
            seq.generator = torch.Generator(device=self.loaded.device).manual_seed(seed)
        self.seqs[seq.seq_id] = seq
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request at any point and free everything it holds."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
            self._release(seq)
        return self.outputs.make_output(state)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a slot."""
        return len(self.scheduler.waiting)

    # ---------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one forward pass for the scheduled batch and return changed requests."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        stats = StepStats(num_preemptions=len(batch.preempted))
        stats.prefix_cache_queries = batch.prefix_cache_queries
        stats.prefix_cache_hits = batch.prefix_cache_hits
        self._swap(batch)
        changed: set[str] = set()
        scheduled_at = time.monotonic()  # before the forward: it is prefill time, not queue
        for item in batch.items:
            state = self.requests.get(item.seq.request_id)
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = scheduled_at
        if not batch.is_empty:
            inputs = self.decoder.build_inputs(batch)
            prompt_rows = add_prompt_rows(batch, inputs)
            logits = self.runner.forward(batch, inputs)
            logits = take_prompt_logprobs(prompt_rows, inputs, logits)
            result = self.decoder.select(batch, inputs, logits)
            stats.num_forward_tokens = inputs.num_tokens
            self._apply(batch, result, stats, changed)
        outputs = self._collect(changed, stats)
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.block_manager.usage
        stats.step_time_s = time.perf_counter() - start
        self._accumulate(stats)
        self.last_stats = stats
        return outputs

    def _swap(self, batch: Batch) -> None:
        """Copy preempted sequences' KV out of their freed blocks (nothing has written them
        since: this step's forward has not run), and resumed ones' KV into their new
        blocks. Host memory: 23 KB a token for the default model in bf16 (30 layers)."""
        kv = self.runner.kv_all  # [layers, 2, blocks, block size, KV heads, head size]
        for seq, blocks, num_tokens in batch.swap_out:
            index = torch.tensor(blocks, dtype=torch.long, device=kv.device)
            seq.swapped_kv = kv.index_select(2, index).to("cpu")
            seq.num_swapped_tokens = num_tokens
        for seq in batch.swap_in:
            saved = seq.swapped_kv
            assert saved is not None, f"seq {seq.seq_id} resumed without its KV"
            index = torch.tensor(
                seq.block_table[: saved.shape[2]], dtype=torch.long, device=kv.device
            )
            kv.index_copy_(2, index, saved.to(kv.device))
            seq.swapped_kv = None

    def _apply(self, batch: Batch, result: StepResult, stats: StepStats, changed: set[str]) -> None:
        for item, seq_result in zip(batch.items, result.seqs, strict=True):
            seq = item.seq
            base = seq.num_computed_tokens
            stats.num_prompt_tokens += max(
                0, min(base + item.num_new_tokens, seq.num_prompt_tokens) - base
            )
            if seq_result.kv_keep is None:
                seq.num_computed_tokens = base + item.num_new_tokens
            else:
                moves = self.block_manager.compaction_moves(seq, base, seq_result.kv_keep)
                self.runner.copy_slots(moves)
                seq.num_computed_tokens = base + len(seq_result.kv_keep)
            seq.token_ids.extend(seq_result.new_token_ids)
            if seq_result.logprobs:
                seq.output_logprobs.extend(seq_result.logprobs)
            self.block_manager.commit_computed(seq)
            self.block_manager.trim(seq)
            changed.add(seq.request_id)
        if result.spec is not None:
            stats.spec_num_drafts = result.spec.num_drafts
            stats.spec_num_draft_tokens = result.spec.num_draft_tokens
            stats.spec_num_accepted_tokens = result.spec.num_accepted_tokens
            stats.spec_accepted_per_pos = list(result.spec.accepted_per_pos)
        stats.decoder = dict(result.stats)
        self._apply_tree_ops(result, changed)

    def _apply_tree_ops(self, result: StepResult, changed: set[str]) -> None:
        """Forks, adoptions and drops the decoder asked for (e.g. cautious-sampling trials)."""
        for parent_id, count in result.forks.items():
            parent = self.seqs[parent_id]
            children = [self._fork(parent) for _ in range(count)]
            self.decoder.on_fork(parent, children)
        for parent_id, child_id in result.adopt.items():
            parent, child = self.seqs[parent_id], self.seqs[child_id]
            self.block_manager.adopt(parent, child)
            parent.token_ids = child.token_ids
            child.token_ids = list(child.prompt_token_ids)
            parent.output_logprobs = child.output_logprobs
            self._release(child)
            changed.add(parent.request_id)
        for seq_id in result.drops:
            if seq_id in self.seqs:
                self._release(self.seqs[seq_id])

    def _fork(self, parent: Sequence) -> Sequence:
        child = Sequence(
            seq_id=next(self._seq_ids),
            request_id=parent.request_id,
            prompt_token_ids=parent.prompt_token_ids,
            params=parent.params,
            arrival_time=parent.arrival_time,
            index=parent.index,
            token_ids=list(parent.token_ids),
            parent_seq_id=parent.seq_id,
            hold_output=True,
            output_logprobs=list(parent.output_logprobs),
        )
        if parent.generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=parent.generator).item())
            child.generator = torch.Generator(device=self.loaded.device).manual_seed(seed)
        self.runner.copy_blocks(self.block_manager.fork(parent, child))
        self.seqs[child.seq_id] = child
        self.scheduler.add_running(child)
        return child

    def _release(self, seq: Sequence) -> None:
        """Finish a sequence and its trial children, freeing their KV."""
        for other in [s for s in self.seqs.values() if s.parent_seq_id == seq.seq_id]:
            self._release(other)
        self.scheduler.finish(seq)
        self.decoder.on_finish(seq)
        self.seqs.pop(seq.seq_id, None)

    def _collect(self, changed: set[str], stats: StepStats) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for request_id in changed:
            state = self.requests.get(request_id)
            if state is None:
                continue
            for index, seq in enumerate(state.seqs):
                before = state.num_processed[index]
                finished = self.outputs.process(state, index)
                # The tokens the outputs keep: not drafts accepted past a stop or max_tokens,
                # nor cautious sampling's trial tokens (they counted 39 where 12 came out).
                stats.num_generation_tokens += state.num_processed[index] - before
                if finished:
                    self._release(seq)
            if state.finished:
                del self.requests[request_id]
            state.metrics.num_preemptions = sum(s.num_preemptions for s in state.seqs)
            outputs.append(self.outputs.make_output(state))
        return outputs

    def idle_stats(self) -> StepStats:
        """Gauges only (no step ran): what listeners need after aborts empty the engine."""
        return StepStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage,
        )

    def _accumulate(self, stats: StepStats) -> None:
        self.num_steps += 1
        t = self.totals
        t.num_prompt_tokens += stats.num_prompt_tokens
        t.num_generation_tokens += stats.num_generation_tokens
        t.num_forward_tokens += stats.num_forward_tokens
        t.num_preemptions += stats.num_preemptions
        t.prefix_cache_queries += stats.prefix_cache_queries
        t.prefix_cache_hits += stats.prefix_cache_hits
        t.spec_num_drafts += stats.spec_num_drafts
        t.spec_num_draft_tokens += stats.spec_num_draft_tokens
        t.spec_num_accepted_tokens += stats.spec_num_accepted_tokens
        for pos, count in enumerate(stats.spec_accepted_per_pos):
            if pos >= len(t.spec_accepted_per_pos):
                t.spec_accepted_per_pos.append(0)
            t.spec_accepted_per_pos[pos] += count
        t.step_time_s += stats.step_time_s

    def get_stats(self) -> dict[str, Any]:
        """Cumulative engine and decoder statistics."""
        t = self.totals
        stats: dict[str, Any] = {
            "num_steps": self.num_steps,
            "prompt_tokens": t.num_prompt_tokens,
            "generation_tokens": t.num_generation_tokens,
            "forward_tokens": t.num_forward_tokens,
            "preemptions": t.num_preemptions,
            "prefix_cache_queries": t.prefix_cache_queries,
            "prefix_cache_hits": t.prefix_cache_hits,
            "spec_num_drafts": t.spec_num_drafts,
            "spec_num_draft_tokens": t.spec_num_draft_tokens,
            "spec_num_accepted_tokens": t.spec_num_accepted_tokens,
            "spec_accepted_per_pos": list(t.spec_accepted_per_pos),
            "step_time_s": t.step_time_s,
        }
        if t.spec_num_drafts:
            # vLLM's "mean acceptance length": accepted drafts + the bonus token per step.
            stats["mean_accepted_tokens_per_step"] = (
                1 + t.spec_num_accepted_tokens / t.spec_num_drafts
            )
        stats["decoder"] = self.decoder.stats()
        return stats
