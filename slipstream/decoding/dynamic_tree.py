"""Draft trees shaped per step by the recycled candidates' stored confidence.

The official Token Recycling tree is static: its first nodes are the root's best candidates,
whatever the matrix holds. Here each matrix entry also keeps the probability the model gave
that candidate when the row was written (softmax over the row's top-k logits), and a step
takes the `size` nodes with the highest path probability (the product along the path),
best first, as EAGLE-2 (arXiv 2406.16858) does with its draft model's confidence. Where the
model is sure of a continuation (a word's next sub-word, a loop) the tree grows a deep chain;
where it is not, it spreads over the root's alternatives.

Measured on 12 builtin prompts (2 cores, bf16, batch 1, 128 tokens, hot matrix): at 4 draft
nodes the tree alone emits 1.40 tokens per step against the static subtree's 1.32, at 16
nodes 1.76 against 1.62; the node count, hence the step cost, is the same.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from slipstream.decoding.draft_tree import (
    GraftedTemplate,
    TreeTemplate,
    build_template,
    graft_chain,
)

# Deepest draft node. The static template stops at 6; a deeper chain only forms where every
# step on it was near-certain, and prompt lookup already drafts long copies.
MAX_DEPTH = 8
# Templates are cached by shape; a long-running server sees a few thousand shapes at most
# (batch-1 trees of <= 8 nodes), so the cache is simply dropped when it grows past this.
_CACHE_LIMIT = 4096


def best_first_draft(
    matrix: np.ndarray,  # [vocab, k] candidate tokens
    probs: np.ndarray,  # [vocab, k] the model's probability of each candidate when stored
    root: int,
    size: int,
    max_depth: int = MAX_DEPTH,
) -> tuple[list[tuple[int, ...]], list[int]]:
    """The `size` most probable draft paths below `root`, in the order they were picked, and
    each path's token.

    A path's score is the product of its candidates' stored probabilities, so a child never
    outscores its parent and the picks are always a subtree. Ties go to the entry found
    first; an all-zero `probs` (a cold matrix) spreads over ranks and depths alike.

    Example (k = 2): M[5] = [7, 9] with p [0.9, 0.1], M[7] = [3, 4] with p [0.8, 0.2]:
        size 2 -> paths [(0,), (0, 0)], tokens [7, 3]   (0.9, then 0.9 * 0.8 = 0.72)
    """
    k = matrix.shape[1]
    # Entries: (-score, insertion order, path, token, parent token, parent score). A row's
    # probabilities are non-increasing in rank (a softmax of sorted top-k logits), so a
    # node's next sibling is never likelier than the node: popping rank r pushes rank r + 1
    # and the node's own rank-0 child, two pushes per pick instead of k.
    heap: list[tuple[float, int, tuple[int, ...], int, int, float]] = [
        (-float(probs[root, 0]), 0, (0,), int(matrix[root, 0]), root, 1.0)
    ]
    order = 1  # tie-breaker: insertion order
    paths: list[tuple[int, ...]] = []
    tokens: list[int] = []
    while heap and len(paths) < size:
        neg_score, _, path, token, parent, parent_score = heapq.heappop(heap)
        paths.append(path)
        tokens.append(token)
        rank = path[-1]
        if rank + 1 < k:
            sibling = (*path[:-1], rank + 1)
            score = parent_score * float(probs[parent, rank + 1])
            heapq.heappush(
                heap, (-score, order, sibling, int(matrix[parent, rank + 1]), parent, parent_score)
            )
            order += 1
        if len(path) < max_depth:
            score = -neg_score * float(probs[token, 0])
            child = (-score, order, (*path, 0), int(matrix[token, 0]), token, -neg_score)
            heapq.heappush(heap, child)
            order += 1
    return paths, tokens


class DynamicTrees:
    """Templates for best-first drafts, cached by shape (building one costs ~0.1 ms)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._trees: dict[tuple[tuple[int, ...], ...], TreeTemplate] = {}
        self._grafts: dict[tuple[tuple[tuple[int, ...], ...], int], GraftedTemplate] = {}

    def tree(self, paths: Sequence[tuple[int, ...]]) -> TreeTemplate:
        """The template of these paths (pick order); source_index = each node's pick order
        (1 = picked first), which is what the pick-order acceptance statistics count."""
        key = tuple(paths)
        tmpl = self._trees.get(key)
        if tmpl is None:
            if len(self._trees) >= _CACHE_LIMIT:
                self._trees.clear()
            tmpl = build_template(key, self.k, source_index=range(1, len(key) + 1))
            self._trees[key] = tmpl
        return tmpl

    def grafted(self, paths: Sequence[tuple[int, ...]], length: int) -> GraftedTemplate:
        """tree(paths) with a prompt-lookup chain of `length` tokens under the root."""
        key = (tuple(paths), length)
        graft = self._grafts.get(key)
        if graft is None:
            if len(self._grafts) >= _CACHE_LIMIT:
                self._grafts.clear()
            graft = graft_chain(self.tree(paths), length)
            self._grafts[key] = graft
        return graft

    @staticmethod
    def node_tokens(
        tmpl: TreeTemplate, root: int, paths: Sequence[tuple[int, ...]], tokens: Sequence[int]
    ) -> list[int]:
        """Tokens in the template's node order (BFS), root first, from best_first_draft's
        pick-ordered paths and tokens."""
        by_path = dict(zip(paths, tokens, strict=True))
        return [root, *(by_path[p] for p in tmpl.paths[1:])]
