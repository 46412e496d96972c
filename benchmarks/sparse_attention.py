"""Sparse attention (HiP, block top-k) vs dense on the default model, plus GPU kernel timing.

Papers: HiP (Lee et al., arXiv 2406.09827), Kinetics block top-k (Sadhukhan et al., arXiv
2506.05333). Measures, side by side in one invocation:
  speed      decode tok/s at 2k/4k/8k tokens of context, and the fraction of KV read
  needles    retrieval of "The secret number is NNNN." planted at varying depths of a
             haystack of English sentences (1k-4k tokens), asked for via the chat template;
             --haystack real: of the licence texts below, from a random sentence on
  ppl        perplexity of long real text (the GPL/GFDL/Apache licence texts shipped in
             /usr/share/common-licenses), the last tokens teacher-forced one decode step
             at a time so that sparse attention applies
  kernel     (CUDA only) sparse paged decode attention + selection vs dense SDPA (flash) at
             32k and 128k on random data
Configs: standard (dense), `default` (`--decoder sparse_attention` with no config: block
top-k at 0.21 of the context with prompt pins), each method with its own defaults, each
method at a quarter of the context ("q": sink + window + top_k = context / 4), and more
(see configs(); --config adds your own). `short_dense` (speed only) decodes the same text cut
to its first 256 tokens: the speed a sparse method would reach if attention cost nothing.
`budget_dense` (speed only) decodes it cut to as many tokens as the default configuration
reads per layer on average (layer 0 dense; measured over the default's first 16 decode
steps when `default` is listed before it, else its nominal budget): a sparse method reading
that many keys with selection for free would decode at its speed.

8k speed against that ceiling, interleaved:
  python benchmarks/sparse_attention.py --parts speed --contexts 8192 --decode-tokens 192 \
      --configs dense,default,budget_dense,short_dense

Short validation run (busy CPU):
  python benchmarks/sparse_attention.py --contexts 2048 --decode-tokens 8 \\
      --needle-lengths 1024 --needles 3 --ppl-prefix 1024 --ppl-tokens 16
Full run (quiet machine): python benchmarks/sparse_attention.py --out sparse.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

SUBJECTS = [
    "The old lighthouse keeper",
    "A young botanist from the valley",
    "The committee on public transport",
    "Our neighbour's grey cat",
    "The river ferry",
    "A travelling string quartet",
    "The village baker",
    "An engineer at the water plant",
    "The museum's night guard",
    "A group of students",
    "The regional newspaper",
    "The morning train to the coast",
]
VERBS = [
    "walked slowly past",
    "wrote a long letter about",
    "argued for an hour over",
    "took a photograph of",
    "forgot all about",
    "quietly repaired",
    "spent the afternoon near",
    "read a short report on",
    "painted a picture of",
    "asked several questions about",
]
OBJECTS = [
    "the stone bridge over the canal",
    "the new library on the hill",
    "the orchard behind the school",
    "a broken clock in the market square",
    "the harbour at low tide",
    "the winter timetable",
    "an abandoned windmill",
    "the garden of the town hall",
    "a map of the northern islands",
    "the price of fresh bread",
]
TAILS = [
    "before the rain started.",
    "while the bells rang at noon.",
    "and nobody seemed to mind.",
    "because it had been a quiet week.",
    "although the wind was cold.",
    "as the fog lifted from the fields.",
    "and then went home for supper.",
    "just as the shops were closing.",
]
LICENCES = ("GPL-3", "GFDL-1.3", "Apache-2.0", "GPL-2", "LGPL-3", "MPL-2.0")
MODEL_WINDOW = 8192  # SmolLM2's max_position_embeddings
# The "short_dense" config's prompt: the same text's first 256 tokens.
SHORT_CONTEXT = 256
# Decode steps of the default configuration that measure its KV read for budget_dense (two
# refresh cycles at refresh_interval 8).
BUDGET_MEASURE_STEPS = 16
QUESTION = "What is the secret number in the text above? Answer with the number only."
# --question-first: the question before the text, so the prompt's closing tokens do not ask
# for the number (what block top-k's prompt_pages look at).
QUESTION_FIRST = "What is the secret number in the text below? Answer with the number only."


def haystack(rng: random.Random, num_sentences: int) -> list[str]:
    """English sentences from templates (varied enough that no sentence stands out)."""
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
        for _ in range(num_sentences)
    ]


def real_sentences() -> list[str]:
    """real_text() as sentences, whitespace collapsed (a haystack of real text)."""
    flat = re.sub(r"\s+", " ", real_text()).strip()
    return [s for s in re.split(r"(?<=[.;:!?])\s+", flat) if s]


def needle_prompt(
    tokenizer: Any,
    rng: random.Random,
    length: int,
    depth: float,
    question_first: bool = False,
    source: list[str] | None = None,
) -> tuple[list[int], str]:
    """Chat prompt of ~length tokens with the needle at `depth` (0..1); returns (ids, answer).
    The question follows the text, or (question_first) precedes it. The haystack is
    template sentences, or (source) consecutive sentences of that text from a random one on,
    wrapping around at its end."""
    from slipstream.engine.tokenizer import apply_chat_template

    answer = str(rng.randrange(1000, 10000))
    if source is None:
        sentences = haystack(rng, length // 10 + 50)
    else:
        first = rng.randrange(len(source))
        sentences = [source[(first + i) % len(source)] for i in range(len(source))]
    ids: list[int] = []
    text: list[str] = []
    for s in sentences:  # trim to the token budget
        text.append(s)
        ids = tokenizer.encode(" ".join(text), add_special_tokens=False)
        if len(ids) >= length - 60:
            break
    text.insert(int(depth * len(text)), f"The secret number is {answer}.")
    body = " ".join(text)
    content = QUESTION_FIRST + "\n\n" + body if question_first else body + "\n\n" + QUESTION
    messages = [{"role": "user", "content": content}]
    return apply_chat_template(tokenizer, messages), answer


def real_text() -> str:
    """Long real English text: licence texts if the OS ships them, else the haystack."""
    root = Path("/usr/share/common-licenses")
    parts = [(root / n).read_text() for n in LICENCES if (root / n).exists()]
    if parts:
        return "\n\n".join(parts)
    return " ".join(haystack(random.Random(1), 3000))


# --dtype: bfloat16 (the numbers in BENCHMARKS.md), or float32 / auto where the CPU lacks
# native bf16 (AVX2-only CPUs emulate it, several times slower).
DTYPE = "bfloat16"


def make_llm(
    config: tuple[str, dict[str, Any]], max_len: int, num_kv_blocks: int | None = None
) -> Any:
    """An LLM in DTYPE with the decoder config (prefix caching off: every run prefills)."""
    from slipstream import LLM

    name, options = config
    return LLM(
        dtype=DTYPE,
        decoder=name,
        decoder_config=options,
        max_model_len=max_len,
        max_num_batched_tokens=2048,
        num_kv_blocks=num_kv_blocks,
        enable_prefix_caching=False,
    )


def configs(
    context: int, names: list[str], extra: dict[str, dict[str, Any]] | None = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Named decoder configs; 'q' variants keep sink + window + top_k = context / 4.
    `extra`: more sparse_attention configs by name (--config NAME=JSON)."""
    quarter = context // 4
    out: dict[str, tuple[str, dict[str, Any]]] = {
        "dense": ("standard", {}),
        # Dense decoding of the same text cut to SHORT_CONTEXT tokens: what an 8k step costs
        # when attention costs next to nothing, so no sparse method can beat its speed.
        "short_dense": ("standard", {}),
        # Dense decoding cut to the default configuration's keys read per layer (mean over
        # layers, see default_keys_read): the default's speed with selection for free.
        "budget_dense": ("standard", {}),
        "default": ("sparse_attention", {}),  # `--decoder sparse_attention`, no config
        # The default configuration under a drafting decoder (its greedy tokens are the
        # default's: the drafts stop short of each new page choice).
        "tr_default": ("token_recycling+sparse_attention", {}),
        "ngram_default": ("ngram+sparse_attention", {}),
        "tr_dense": ("token_recycling", {}),
        "hip": ("sparse_attention", {"method": "hip"}),
        "block_topk": ("sparse_attention", {"method": "block_topk"}),
        "hip_q": (
            "sparse_attention",
            {
                "method": "hip",
                "sink": 16,
                "window": quarter // 4,
                "top_k": quarter - 16 - quarter // 4,
            },
        ),
        "block_topk_q": (
            "sparse_attention",
            {
                "method": "block_topk",
                "sink": 4,
                "window": quarter // 4,
                "top_k_pages": max(1, (quarter - 16 - quarter // 4 - 16) // 16),
            },
        ),
    }
    # Variants: block top-k scored by the best query head of each GQA group ("max").
    out["block_topk_max"] = ("sparse_attention", {"method": "block_topk", "group_pooling": "max"})
    out["block_topk_q_max"] = (
        "sparse_attention",
        {**out["block_topk_q"][1], "group_pooling": "max"},
    )
    # Block top-k with Quest's page scores (per-channel min/max keys bound each page's best
    # logit) and each query head voting: the defaults' budget and a quarter of the context.
    quest = {"group_pooling": "max", "page_scoring": "bounds"}
    out["block_topk_bounds"] = ("sparse_attention", {"method": "block_topk", **quest})
    out["block_topk_q_bounds"] = ("sparse_attention", {**out["block_topk_q"][1], **quest})
    # Block top-k whose Quest bounds shortlist 4x the budget, reranked by each page's best
    # exact key logit (any query head of the group); "_e": an eighth of the context.
    rerank = {**quest, "rerank_factor": 4}
    out["block_topk_rerank"] = ("sparse_attention", {"method": "block_topk", **rerank})
    out["block_topk_q_rerank"] = ("sparse_attention", {**out["block_topk_q"][1], **rerank})
    eighth = context // 8
    out["block_topk_e_rerank"] = (
        "sparse_attention",
        {
            "method": "block_topk",
            "sink": 4,
            "window": eighth // 4,
            "top_k_pages": max(1, (eighth - 16 - eighth // 4 - 16) // 16),
            **rerank,
        },
    )
    # One config for every length: a quarter of the context, the selected pages capped at
    # 48 (768 tokens), so 8k contexts read an eighth.
    out["block_topk_f_rerank"] = (
        "sparse_attention",
        {"method": "block_topk", "budget_fraction": 0.25, "top_k_pages": 48, **rerank},
    )
    # HiP with its mask searched every 1, 2 or 4 decode steps instead of every 8th.
    for every in (1, 2, 4):
        out[f"hip_q_r{every}"] = (
            "sparse_attention",
            {**out["hip_q"][1], "refresh_interval": every},
        )
    for name, options in (extra or {}).items():
        out[name] = ("sparse_attention", options)
    unknown = [n for n in names if n not in out]
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(out)}")
    return {n: out[n] for n in names}


def parse_extra_configs(items: list[str]) -> dict[str, dict[str, Any]]:
    """--config NAME=JSON items as {name: sparse_attention options}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--config expects NAME=JSON, got {item!r}")
        try:
            options = json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--config {name}: invalid JSON ({err})") from err
        if not isinstance(options, dict):
            raise SystemExit(f"--config {name}: expected a JSON object")
        out[name] = options
    return out


def measured_keys_read(default_engine: Any, steps: int = BUDGET_MEASURE_STEPS) -> float:
    """Fraction of the KV the default configuration's engine reads: it decodes `steps` steps
    (two refresh cycles) first, before any timed round."""
    for _ in range(steps):
        default_engine.step()
    return float(default_engine.get_stats()["decoder"]["sparse_kv_read_fraction"])


def default_keys_read(engine: Any, context: int) -> int:
    """Mean KV tokens a decode step of the default sparse configuration reads per layer at
    `context` cached tokens: dense layers all of them; the others the sink pages, the
    selected pages (pins included) and the window from its first page to the last key."""
    from slipstream.decoding.sparse_attention import (
        _DEFAULTS,
        SparseAttentionOptions,
        make_selector,
    )

    options = SparseAttentionOptions()
    ctx = engine._decoder_context()
    g = make_selector(options, ctx).geometry
    if not g.prunes(context):
        return context
    window = context - g.window_start(context) * g.chunk
    sparse = (g.sink_chunks + g.top_k_at(context)) * g.chunk + window
    dense = min(_DEFAULTS[options.resolved_method][3], ctx.num_layers)
    return round((dense * context + (ctx.num_layers - dense) * sparse) / ctx.num_layers)


def interleaved_decode_speed(
    cfgs: dict[str, tuple[str, dict[str, Any]]],
    prompts: list[list[int]],
    num_tokens: int,
    rounds: int,
    max_len: int,
) -> dict[str, dict[str, Any]]:
    """Decode tok/s of every config on a batch of prompts, timed in interleaved rounds.

    Each config gets its own engine holding one request per prompt (all prefilled first, so
    every timed step decodes the whole batch); then, `rounds` times, every engine decodes
    num_tokens / rounds steps in turn (order rotated per round). tok/s counts every
    sequence's tokens. On this 2-core machine the same dense 8k decode has run 20-30% apart
    between runs minutes apart, and in early sessions at ~57 or ~110 ms/step, a mode that
    changed within a run (memory bandwidth on the host, likely), so configs timed in
    separate runs are not comparable; interleaving puts them under the same conditions,
    round by round, and the paired per-round ratio to the first config shows the spread.
    """
    from slipstream.config import CacheConfig
    from slipstream.engine.sampling_params import SamplingParams

    per_round = max(1, num_tokens // rounds)
    # A KV pool just large enough for the requests: every engine stays resident at once.
    blocks = len(prompts) * (-(-max_len // CacheConfig.block_size) + 8)
    engines = {}
    prompt_tokens: dict[str, int] = {}  # each config's (last) prompt, after any cut
    read_fraction: float | None = None  # the default configuration's, for budget_dense
    for name, cfg in cfgs.items():
        eng = make_llm(cfg, max_len, num_kv_blocks=blocks).engine
        for i, prompt in enumerate(prompts):
            if name == "short_dense":
                prompt = prompt[:SHORT_CONTEXT]
            elif name == "budget_dense":
                if "default" in engines and read_fraction is None:
                    read_fraction = measured_keys_read(engines["default"])
                keys = (
                    default_keys_read(eng, len(prompt))
                    if read_fraction is None
                    else round(read_fraction * len(prompt))
                )
                prompt = prompt[:keys]
            prompt_tokens[name] = len(prompt)
            # Sequences prefilled early decode while the later ones prefill: room for that.
            room = max_len - len(prompt)
            params = SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True)
            eng.add_request(f"speed-{i}", prompt, params)
        while any(s.num_output_tokens == 0 for s in eng.seqs.values()):
            eng.step()  # prefill (dense in every config)
        engines[name] = eng
    names = list(engines)
    times: dict[str, list[float]] = {n: [] for n in names}
    made: dict[str, list[int]] = {n: [] for n in names}  # tokens decoded per round
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            eng = engines[name]
            # Steps until the round's tokens are out: one a step per sequence, or several
            # for a drafting decoder (token_recycling+sparse_attention, ...).
            first = eng.totals.num_generation_tokens
            start = time.perf_counter()
            while eng.totals.num_generation_tokens - first < len(prompts) * per_round:
                if not eng.has_unfinished_requests():
                    break
                eng.step()
            times[name].append(time.perf_counter() - start)
            made[name].append(eng.totals.num_generation_tokens - first)
    base = [n / t for n, t in zip(made[names[0]], times[names[0]], strict=True)]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        speeds = [n / t for n, t in zip(made[name], times[name], strict=True)]
        ratios = sorted(s / b for s, b in zip(speeds, base, strict=True))
        out[name] = {
            "batch": len(prompts),
            "decoded_after_tokens": prompt_tokens[name],  # the prompt after any cut
            "decode_tok_s": sum(made[name]) / sum(times[name]),
            "round_tok_s": [round(x, 2) for x in speeds],
            f"speedup_vs_{names[0]}_rounds": [round(x, 3) for x in ratios],
            **dict(engines[name].get_stats().get("decoder", {})),
        }
    return out


def retrieval(
    llm: Any, prompts: list[tuple[list[int], str]], max_tokens: int = 12
) -> tuple[int, list[str]]:
    """Needles found (the answer's digits appear in the reply) and the replies."""
    from slipstream.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate([p for p, _ in prompts], params)
    replies = [o.outputs[0].text for o in outs]
    found = sum(ans in re.sub(r"\D", "", r) for r, (_, ans) in zip(replies, prompts, strict=True))
    return found, replies


def teacher_forced_nll(llm: Any, tokens: list[int], prefix: int, count: int) -> float:
    """Mean NLL of tokens[prefix:prefix+count], each predicted by a one-token decode step."""
    from slipstream.decoding.base import SeqInputs, StepInputs
    from slipstream.engine.batch import Batch, ScheduledSeq
    from slipstream.engine.sampling_params import SamplingParams
    from slipstream.engine.sequence import Sequence

    eng = llm.engine
    seq = Sequence(10**9, "ppl", tokens[:prefix], SamplingParams(max_tokens=1), 0.0)
    assert eng.block_manager.allocate_slots(seq, prefix)
    logits = eng.runner.forward(
        Batch([ScheduledSeq(seq, prefix)]),
        StepInputs([SeqInputs(tokens[:prefix], list(range(prefix)), logits_indices=[prefix - 1])]),
    ).values
    seq.num_computed_tokens = prefix
    nll = 0.0
    for pos in range(prefix, prefix + count):
        target = tokens[pos]
        nll -= torch.log_softmax(logits[-1].float(), -1)[target].item()
        seq.token_ids.append(target)
        assert eng.block_manager.allocate_slots(seq, 1)
        logits = eng.runner.forward(
            Batch([ScheduledSeq(seq, 1)]),
            StepInputs([SeqInputs([target], [pos], logits_indices=[0])]),
        ).values
        seq.num_computed_tokens += 1
    eng.block_manager.free(seq)
    eng.decoder.on_finish(seq)
    return nll / count


def kernel_times(contexts: list[int], batch: int) -> list[dict[str, Any]]:
    """CUDA: dense SDPA (flash) vs selection + sparse paged decode attention, random data."""
    rows = []
    for ctx in contexts:
        rows.append(_kernel_row(ctx, batch))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def _kernel_row(ctx: int, batch: int) -> dict[str, Any]:
    """One context length: Llama-3-8B attention shapes (32 heads, 8 KV heads, dim 128)."""
    import torch.nn.functional as F
    import triton.testing

    from slipstream.kernels.cpu.page_topk import select_top_pages
    from slipstream.kernels.hip_mask import hip_mask
    from slipstream.kernels.paged_attention import paged_attention_triton
    from slipstream.kernels.sparse_paged_attention import (
        sparse_paged_attention,
        sparse_paged_attention_triton,
    )

    dev, dt = torch.device("cuda"), torch.bfloat16
    heads, kv_heads, dim, page = 32, 8, 128, 16
    pages = ctx // page
    k_cache = torch.randn(batch * pages, page, kv_heads, dim, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    tables = torch.arange(batch * pages, device=dev, dtype=torch.int32).view(batch, pages)
    q = torch.randn(batch, heads, dim, device=dev, dtype=dt)
    qsl = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    # Contiguous [B, kv_heads, ctx, dim] copies for SDPA (flash reads GQA heads directly).
    kd = k_cache.view(batch, ctx, kv_heads, dim).transpose(1, 2).contiguous()
    vd = v_cache.view(batch, ctx, kv_heads, dim).transpose(1, 2).contiguous()
    qd = q.unsqueeze(2)  # [B, heads, 1, dim]
    dense = triton.testing.do_bench(
        lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)
    )
    dense_paged = triton.testing.do_bench(
        lambda: paged_attention_triton(q, k_cache, v_cache, tables, qsl, lens, dim**-0.5)
    )
    # Block top-k: 64 pages (Kinetics' benchmark budget) + sink page + 4 window pages,
    # chosen as the engine does (select_top_pages: one Triton launch for the page scores on
    # CUDA, then torch.topk) from head-major mean keys and the group-mean query.
    summary = k_cache.float().mean(1).transpose(0, 1).contiguous()  # [H, blocks, D]
    fixed = torch.tensor([0, *range(pages - 4, pages)], device=dev).expand(batch, kv_heads, 5)
    ends, ks = [pages - 4] * batch, [64] * batch

    def topk_chunks() -> torch.Tensor:
        pooled = q.view(batch, kv_heads, -1, dim).float().mean(2, keepdim=True)  # [B, H, 1, D]
        top = select_top_pages(pooled, summary, tables, ends, 1, ks)
        return torch.cat([top, fixed], -1)

    def topk_step() -> torch.Tensor:
        return sparse_paged_attention(
            q, k_cache, v_cache, tables, qsl, lens, topk_chunks(), page, dim**-0.5
        )

    block_topk = triton.testing.do_bench(topk_step)
    block_topk_select = triton.testing.do_bench(topk_chunks)
    chosen = topk_chunks()

    def topk_attend(splits: int | None) -> float:
        return triton.testing.do_bench(
            lambda: sparse_paged_attention_triton(
                q, k_cache, v_cache, tables, qsl, lens, chosen, page, dim**-0.5, None, splits
            )
        )

    # HiP (k=512 in b_k=2 blocks, 256-token window), mask reused 8 steps: attention + 1/8
    # of a search.
    blocks = (torch.arange(256, device=dev) * 3).expand(batch, kv_heads, 256)
    window = torch.arange(ctx // 2 - 128, ctx // 2, device=dev).expand(batch, kv_heads, 128)
    hip_chunks = torch.cat([blocks, window], -1)
    hip_attn = triton.testing.do_bench(
        lambda: sparse_paged_attention(
            q, k_cache, v_cache, tables, qsl, lens, hip_chunks, 2, dim**-0.5
        )
    )
    start = torch.full((batch,), 8, device=dev)
    end = torch.full((batch,), ctx // 2 - 128, device=dev)
    search = triton.testing.do_bench(lambda: hip_mask(q, k_cache, tables, qsl, start, end, 256, 2))
    hip = hip_attn + search / 8
    # GPU time alone: each op replayed from a CUDA graph, so the host's launch overhead
    # (the selection's ~0.3 ms in session 15) drops out of both sides.
    graphed = {
        "dense_sdpa": lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True),
        "block_topk": topk_step,
        "hip_attention": lambda: sparse_paged_attention(
            q, k_cache, v_cache, tables, qsl, lens, hip_chunks, 2, dim**-0.5
        ),
    }
    graph_ms: dict[str, float | None] = {}
    for name, fn in graphed.items():
        try:
            graph_ms[name] = triton.testing.do_bench_cudagraph(fn)
        except Exception as exc:  # a capture failure is reported, not fatal
            print(f"{name}: no CUDA graph ({type(exc).__name__}: {exc})", flush=True)
            graph_ms[name] = None
    g_dense, g_topk, g_hip = (
        graph_ms["dense_sdpa"],
        graph_ms["block_topk"],
        graph_ms["hip_attention"],
    )
    return {
        "context": ctx,
        "batch": batch,
        "dense_sdpa_ms": dense,
        "dense_paged_triton_ms": dense_paged,
        "block_topk_ms": block_topk,
        "block_topk_select_only_ms": block_topk_select,
        "block_topk_attention_only_ms": topk_attend(None),
        "block_topk_attention_only_one_split_ms": topk_attend(1),
        "hip_attention_ms": hip_attn,
        "hip_search_ms": search,
        "hip_ms_refresh8": hip,
        "speedup_block_topk_vs_sdpa": dense / block_topk,
        "speedup_hip_vs_sdpa": dense / hip,
        "cudagraph_ms": graph_ms,
        "cudagraph_speedup_block_topk_vs_sdpa": g_dense / g_topk if g_dense and g_topk else None,
        "cudagraph_speedup_hip_attention_vs_sdpa": g_dense / g_hip if g_dense and g_hip else None,
    }


def main() -> None:
    """Run the selected parts and print/save one JSON report."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--contexts", default="2048,4096,8192", help="speed: context lengths")
    ap.add_argument("--decode-tokens", type=int, default=32, help="speed: decode steps per config")
    ap.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="speed: the decode steps are timed in this many interleaved rounds (see "
        "interleaved_decode_speed); list dense first to get paired ratios",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=1,
        help="speed: sequences decoded together, each with its own prompt of the context's "
        "length (batch 1 = single-stream latency; more = throughput, where the weights "
        "are read once per step for all of them and the KV once per sequence)",
    )
    ap.add_argument("--needle-lengths", default="1024,2048,4096")
    ap.add_argument("--needles", type=int, default=5, help="needles per length (depths spread)")
    ap.add_argument(
        "--question-first",
        action="store_true",
        help="needles: ask before the text instead of after it",
    )
    ap.add_argument(
        "--haystack",
        choices=("sentences", "real"),
        default="sentences",
        help="needles: the text around the needle: template sentences (sessions 3-25), or "
        "real text (the licence texts the ppl part reads), from a random sentence on",
    )
    ap.add_argument(
        "--reply-tokens",
        type=int,
        default=12,
        help="needles: tokens each reply may take (12 in sessions 3-25; real text's replies "
        'often open with "The secret number in the text above is", 16 leaves room for '
        "its four digits)",
    )
    ap.add_argument("--ppl-prefix", type=int, default=4096)
    ap.add_argument("--ppl-tokens", type=int, default=128)
    ap.add_argument("--configs", default="dense,default,hip,block_topk")
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an extra sparse_attention config to measure (name it in --configs too), e.g. "
        'f2=\'{"method": "block_topk", "rerank_factor": 2}\'; repeatable',
    )
    ap.add_argument("--parts", default="speed,needles,ppl,kernel")
    ap.add_argument("--kernel-contexts", default="32768,131072")
    ap.add_argument("--kernel-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--dtype", default="bfloat16", help="engine dtype: bfloat16, float32 or auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    global DTYPE
    DTYPE = args.dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    names = args.configs.split(",")
    extra = parse_extra_configs(args.config)
    configs(8192, names, extra)  # fail on an unknown name before loading any model
    report: dict[str, Any] = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "dtype": DTYPE,
        "batch": args.batch,
    }

    if "speed" in parts:
        rows: list[dict[str, Any]] = []
        text_ids: list[int] | None = None  # the same tokenizer for every config: encode once
        for ctx in map(int, args.contexts.split(",")):
            # The default model's window is 8192 positions: "8k" prompts leave room for the
            # decoded tokens, and in a batch for the steps the first sequences decode while
            # the others prefill (2048-token chunks).
            prefill_steps = (args.batch - 1) * -(-ctx // 2048)
            max_len = min(ctx + args.decode_tokens + prefill_steps + 64, MODEL_WINDOW)
            # (and the steps the default configuration decodes to measure budget_dense's cut)
            reserve = args.decode_tokens + prefill_steps + 2 + BUDGET_MEASURE_STEPS
            prompt_len = min(ctx, max_len - reserve)
            if text_ids is None:
                from slipstream.engine.models.default_model import resolve_model_path
                from slipstream.engine.tokenizer import load_tokenizer

                tok = load_tokenizer(resolve_model_path(None))
                text_ids = tok.encode(real_text() * 3, add_special_tokens=False)
            cfgs = configs(ctx, names, extra)
            # Batch members start 997 tokens apart in the text: distinct prompts, no
            # shared prefix.
            prompts = [text_ids[997 * i : 997 * i + prompt_len] for i in range(args.batch)]
            if any(len(p) < prompt_len for p in prompts):
                raise SystemExit(f"--batch {args.batch}: the text is too short for {ctx}")
            speeds = interleaved_decode_speed(
                cfgs, prompts, args.decode_tokens, args.rounds, max_len
            )
            dense = speeds[names[0]]["decode_tok_s"] if names[0] == "dense" else None
            for name, speed in speeds.items():
                row = {"context": ctx, "prompt_tokens": prompt_len, "config": name, **speed}
                if dense:
                    row["speedup_vs_dense"] = float(speed["decode_tok_s"]) / float(dense)
                rows.append(row)
                print(json.dumps(row), flush=True)
        report["speed"] = rows

    if "needles" in parts:
        rows = []
        lengths = list(map(int, args.needle_lengths.split(",")))
        source = real_sentences() if args.haystack == "real" else None
        for name in names:
            llm = None
            for length in lengths:
                cfg = configs(length, names, extra)[name]
                llm = make_llm(cfg, MODEL_WINDOW)
                rng = random.Random(length)
                depths = [(i + 0.5) / args.needles for i in range(args.needles)]
                prompts = [
                    needle_prompt(llm.tokenizer, rng, length, d, args.question_first, source)
                    for d in depths
                ]
                found, replies = retrieval(llm, prompts, args.reply_tokens)
                stats = llm.engine.get_stats().get("decoder", {})
                rows.append(
                    {
                        "config": name,
                        "length": length,
                        "question_first": args.question_first,
                        "haystack": args.haystack,
                        "found": found,
                        "total": len(prompts),
                        "kv_read": stats.get("sparse_kv_read_fraction", 1.0),
                        "rerank_k_read": stats.get("sparse_rerank_k_fraction", 0.0),
                        "replies": replies,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        report["needles"] = rows

    if "ppl" in parts:
        rows = []
        for name, cfg in configs(args.ppl_prefix, names, extra).items():
            llm = make_llm(cfg, MODEL_WINDOW)
            tokens = llm.tokenizer.encode(real_text(), add_special_tokens=False)
            nll = teacher_forced_nll(llm, tokens, args.ppl_prefix, args.ppl_tokens)
            rows.append(
                {
                    "config": name,
                    "prefix": args.ppl_prefix,
                    "tokens": args.ppl_tokens,
                    "ppl": float(torch.tensor(nll).exp()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        report["ppl"] = rows

    if "kernel" in parts and torch.cuda.is_available():
        report["kernel"] = kernel_times(
            list(map(int, args.kernel_contexts.split(","))), args.kernel_batch
        )

    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
