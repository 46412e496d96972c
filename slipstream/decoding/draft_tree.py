"""Static draft-tree templates and their level-by-level (BFS) filling from a candidate matrix.

Token Recycling (Luo et al., "Turning Trash into Treasure", arXiv 2408.08696) drafts a fixed
tree shape every step. A template is a list of root-relative paths: [i, j] means "the i-th
candidate of the root, then the j-th candidate of that token". Everything that depends only
on the shape (parents, depths, the ancestor mask, the per-level gather indices, the
root-to-leaf paths) is built once here, so a step costs one gather per level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# The official "2.2.2" template (research-decoders.md 1.1): 80 nodes below the root in 6
# levels of 8 / 21 / 25 / 15 / 8 / 3. Earlier (likelier) candidates get more children.
TEMPLATE_2_2_2: tuple[tuple[int, ...], ...] = (
    # level 1 (8)
    (0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,),
    # level 2 (21)
    (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7),
    (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1),
    (4, 0), (5, 0), (6, 0), (7, 0),
    # level 3 (25)
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4), (0, 0, 5), (0, 0, 6), (0, 0, 7),
    (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 4, 0), (0, 5, 0),
    (0, 6, 0), (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0),
    (5, 0, 0),
    # level 4 (15)
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 3), (0, 0, 0, 4), (0, 0, 1, 0),
    (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0), (0, 1, 0, 0), (0, 2, 0, 0),
    (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    # level 5 (8)
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0),
    (0, 0, 1, 0, 0), (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    # level 6 (3)
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
)  # fmt: skip

TEMPLATES: dict[str, tuple[tuple[int, ...], ...]] = {"2.2.2": TEMPLATE_2_2_2}


@dataclass(frozen=True)
class TreeTemplate:
    """A draft-tree shape with everything a step needs precomputed. Node 0 is the root.

    Nodes are in BFS order (by depth, then template order), so a node's parent comes first.
    """

    paths: tuple[tuple[int, ...], ...]  # [T] root-relative paths; the root's is ()
    parents: list[int]  # [T] parent node index, -1 for the root
    depths: list[int]  # [T] 0 for the root; position offset after the cached prefix
    ranks: list[int]  # [T] which candidate of its parent's token a node takes (root: 0)
    children: list[list[int]]  # [T] child node indices, in rank order
    mask: torch.Tensor  # [T, T] bool: node i sees node j iff j is i or an ancestor of i
    # One entry per level >= 1: (start, end, parent node indices [n_l], ranks [n_l]).
    levels: list[tuple[int, int, torch.Tensor, torch.Tensor]]
    # [T] index of each node in the template it was cut from (itself for a full template).
    source_index: list[int]

    @property
    def num_tokens(self) -> int:
        """Tokens fed per step: root + draft nodes."""
        return len(self.paths)

    @property
    def num_draft(self) -> int:
        """Draft nodes below the root."""
        return len(self.paths) - 1

    @property
    def max_depth(self) -> int:
        """Most draft tokens one step can accept."""
        return max(self.depths)

    def level_sizes(self) -> list[int]:
        """Nodes per level below the root."""
        return [end - start for start, end, _, _ in self.levels]


def build_template(
    paths: Sequence[Sequence[int]], k: int = 8, source_index: Sequence[int] | None = None
) -> TreeTemplate:
    """Precompute a template from root-relative paths (the root itself is implied).

    Every path's parent path must be present; ranks must be < k (the matrix width).

    Built in Python lists with one tensor per field: dynamic trees build one on ~40% of
    batch-1 steps (a new shape), and a row-by-row torch mask and two tensors per level took
    ~100 us for 8 nodes on 2 cores (see tests/decoding/test_draft_tree.py for the fields).
    """
    order = {tuple(p): i for i, p in enumerate(paths)}  # first position of each path
    if len(order) != len(paths):
        raise ValueError("duplicate paths in the tree template")
    nodes = sorted(order, key=lambda p: (len(p), order[p]))
    src = list(source_index) if source_index is not None else list(range(1, len(nodes) + 1))
    by_path = {p: i + 1 for i, p in enumerate(nodes)}
    src_by_path = dict(zip(order, src, strict=True))
    all_paths: list[tuple[int, ...]] = [(), *nodes]
    parents, depths, ranks = [-1], [0], [0]
    for p in nodes:
        if not p or any(r < 0 or r >= k for r in p):
            raise ValueError(f"path {list(p)} needs ranks in [0, {k})")
        if len(p) > 1 and p[:-1] not in by_path:
            raise ValueError(f"path {list(p)} has no parent path {list(p[:-1])}")
        parents.append(by_path[p[:-1]] if len(p) > 1 else 0)
        depths.append(len(p))
        ranks.append(p[-1])
    n = len(all_paths)
    children: list[list[int]] = [[] for _ in range(n)]
    rows: list[list[bool]] = []  # node i sees itself and its ancestors (parents come first)
    for i in range(n):
        if i:
            children[parents[i]].append(i)
        row = list(rows[parents[i]]) if i else [False] * n
        row[i] = True
        rows.append(row)
    # BFS order puts each level's nodes in one run [start, end): views of one tensor each.
    parent_t = torch.tensor(parents, dtype=torch.long)
    rank_t = torch.tensor(ranks, dtype=torch.long)
    levels = []
    start = 1
    while start < n:
        end = start
        while end < n and depths[end] == depths[start]:
            end += 1
        levels.append((start, end, parent_t[start:end], rank_t[start:end]))
        start = end
    return TreeTemplate(
        paths=tuple(all_paths),
        parents=parents,
        depths=depths,
        ranks=ranks,
        children=children,
        mask=torch.tensor(rows, dtype=torch.bool),
        levels=levels,
        source_index=[0, *[src_by_path[p] for p in nodes]],
    )


def template(name: str, k: int = 8) -> TreeTemplate:
    """A named template ("2.2.2" is the official one)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown tree template {name!r}; valid: {', '.join(TEMPLATES)}")
    return build_template(TEMPLATES[name], k)


def subtree(full: TreeTemplate, nodes: Sequence[int]) -> TreeTemplate:
    """The template restricted to `nodes` (indices into `full`, closed under parents)."""
    keep = set(nodes) - {0}
    for i in keep:
        if full.parents[i] not in keep and full.parents[i] != 0:
            raise ValueError(f"node {i}'s parent {full.parents[i]} is not kept")
    chosen = sorted(keep)
    return build_template(
        [full.paths[i] for i in chosen],
        k=max(full.ranks) + 1,
        source_index=[full.source_index[i] for i in chosen],
    )


@dataclass(frozen=True)
class GraftedTemplate:
    """A template with a chain of given tokens hung under the root beside its own branches.

    Token recycling drafts its tree from the matrix; a prompt-lookup match adds the tokens
    that followed the same suffix earlier as one more branch, verified in the same forward.
    """

    tmpl: TreeTemplate  # base nodes + chain nodes (BFS order); chain nodes have source -1
    # [T] where each node's token comes from: i >= 0 = the base's node i, -d = chain token d
    take: list[int]

    def tokens(self, base_tokens: Sequence[int], chain: Sequence[int]) -> list[int]:
        """Tokens of every node, root first, from the base tree's tokens and the chain."""
        return [base_tokens[t] if t >= 0 else chain[-t - 1] for t in self.take]


def graft_chain(base: TreeTemplate, length: int) -> GraftedTemplate:
    """`base` plus a chain of `length` nodes under the root, on a rank no base node uses.

    Example: base [[0], [1], [0, 0]], length 2 -> the chain's paths are [2] and [2, 0];
    take = [0, 1, 2, -1, 3, -2] (root, base (0), base (1), chain 1, base (0, 0), chain 2).
    """
    if length < 1:
        raise ValueError(f"a grafted chain needs >= 1 token, got {length}")
    rank = max(base.ranks) + 1  # the root's children use ranks below this
    chain = [(rank,) + (0,) * d for d in range(length)]
    tmpl = build_template(
        [*base.paths[1:], *chain],
        k=rank + 1,
        source_index=[*base.source_index[1:], *([-1] * length)],
    )
    base_index = {p: i for i, p in enumerate(base.paths)}
    take = [-len(p) if p and p[0] == rank else base_index[p] for p in tmpl.paths]
    return GraftedTemplate(tmpl, take)


def chain_template(length: int) -> TreeTemplate:
    """A chain of `length` draft tokens (ngram drafts): root -> d1 -> d2 -> ..."""
    return build_template([(0,) * d for d in range(1, length + 1)], k=1)


def fill_tree(
    tmpl: TreeTemplate,
    matrix: torch.Tensor,  # [vocab, k] candidate tokens (any integer dtype)
    roots: torch.Tensor,  # [B] long root tokens
) -> torch.Tensor:  # [B, T] long
    """Fill the template level by level: child = matrix[parent token, child rank].

    Example (k = 2, template [[0], [1], [0, 0]], matrix rows 5 -> [7, 9], 7 -> [3, 4]):
        roots [5]  ->  level 1: [M[5, 0], M[5, 1]] = [7, 9]  ->  level 2: [M[7, 0]] = [3]
        result [[5, 7, 9, 3]]
    """
    k = matrix.shape[1]
    flat = matrix.reshape(-1)
    out = torch.empty(roots.shape[0], tmpl.num_tokens, dtype=torch.long, device=matrix.device)
    out[:, 0] = roots
    for start, end, parent_idx, rank in tmpl.levels:
        parent_tok = out[:, parent_idx.to(matrix.device)]  # [B, n_l]
        out[:, start:end] = flat[parent_tok * k + rank.to(matrix.device)].long()
    return out
