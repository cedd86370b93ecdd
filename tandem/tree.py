"""Token trees: what a drafter proposes and the target verifies in one forward pass.

Node 0 is the root: the anchor ``x0``, the last verified token, whose KV is not yet cached.
Nodes are in topological order (``parents[i] < i``), so a parent always precedes its children
and a chain is simply a tree of width one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenTree:
    """``tokens[i]`` drafted under ``parents[i]``; ``draft_probs[i]`` is the distribution ``q``
    node ``i`` was drawn from (given its earlier siblings). ``None`` means every node is a
    deterministic proposal, i.e. ``q`` is a point mass on its token.

    ``survival[i]`` is the drafter's prediction that node ``i`` gets accepted (its whole path
    survives verification; root 1, never above the parent's). The draft scheduler ranks nodes by
    it (:mod:`tandem.scheduler`); ``None``: the drafter makes no prediction.

    The shape (tokens, parents, survival) is host metadata, plain Python; ``draft_probs`` is a
    tensor on the drafter's device (:mod:`tandem.devices`)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]  # parents[0] == -1
    draft_probs: torch.Tensor | None = None  # [N, V] float32, row 0 unused
    survival: tuple[float, ...] | None = None  # survival[0] == 1

    def __post_init__(self) -> None:
        self.tokens = tuple(int(t) for t in self.tokens)
        self.parents = tuple(int(p) for p in self.parents)
        if self.survival is not None:
            self.survival = tuple(float(s) for s in self.survival)
        n = len(self.tokens)
        if len(self.parents) != n or n == 0:
            raise ValueError("a tree needs a root and one parent per node")
        if self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        if any(not 0 <= p < i for i, p in enumerate(self.parents[1:], 1)):
            raise ValueError("nodes must be in topological order (parents[i] < i) and only the root may lack a parent")
        if self.draft_probs is not None and self.draft_probs.shape[0] != n:
            raise ValueError("draft_probs needs one row per node")
        if self.survival is not None and len(self.survival) != n:
            raise ValueError("survival needs one value per node")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> list[int]:
        return tree_depths(self.parents)

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def path_tokens(self, nodes: Sequence[int]) -> list[int]:
        return [self.tokens[i] for i in nodes]

    def subtree(self, keep: Sequence[int]) -> TokenTree:
        """The tree of the root and ``keep`` (closed under ancestors), ids renumbered in order."""
        nodes = sorted({0, *(int(i) for i in keep)})
        index = {node: i for i, node in enumerate(nodes)}
        try:
            parents = [-1] + [index[self.parents[n]] for n in nodes[1:]]
        except KeyError:
            raise ValueError("a subtree must keep every ancestor of its nodes") from None
        probs = None
        if self.draft_probs is not None:
            probs = self.draft_probs[torch.tensor(nodes, device=self.draft_probs.device)]
        return TokenTree(
            tuple(self.tokens[n] for n in nodes),
            tuple(parents),
            probs,
            None if self.survival is None else tuple(self.survival[n] for n in nodes),
        )


def chain(
    root: int,
    draft: Sequence[int],
    draft_probs: torch.Tensor | None = None,
    survival: Sequence[float] | None = None,
) -> TokenTree:
    """A chain ``root -> draft[0] -> draft[1] ...``; ``survival`` (one per draft token) is
    the predicted probability that the chain survives up to that token."""
    n = len(draft) + 1
    return TokenTree(
        tokens=(root, *draft),
        parents=tuple(range(-1, n - 1)),
        draft_probs=draft_probs,
        survival=None if survival is None else (1.0, *survival),
    )


def from_paths(root: int, paths: Sequence[Sequence[int]], max_nodes: int | None = None) -> TokenTree:
    """Merge token sequences that all continue ``root`` into a trie (shared prefixes once).

    Earlier paths get the lower node ids, so a path's own nodes keep their order; nodes past
    ``max_nodes`` (excluding the root) are dropped.
    """
    tokens, parents = [root], [-1]
    index: dict[tuple[int, int], int] = {}
    for path in paths:
        node = 0
        for tok in path:
            key = (node, int(tok))
            if key not in index:
                if max_nodes is not None and len(tokens) - 1 >= max_nodes:
                    break
                index[key] = len(tokens)
                tokens.append(int(tok))
                parents.append(node)
            node = index[key]
    return TokenTree(tuple(tokens), tuple(parents))


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node (root 0); linear in N because parents precede children."""
    depths = [0] * len(parents)
    for i in range(1, len(parents)):
        depths[i] = depths[parents[i]] + 1
    return depths


def ancestor_rows(parents: Sequence[int], width: int | None = None) -> list[list[bool]]:
    """``rows[i][j]`` is True iff node ``j`` is ``i`` or one of its ancestors: what ``i`` attends
    to among the tree nodes (host metadata; :func:`ancestor_mask` is the tensor). Padded to
    ``width`` when given: padding positions see only themselves."""
    width = len(parents) if width is None else width
    rows: list[list[bool]] = []
    for i in range(width):
        parent = parents[i] if i < len(parents) else -1
        row = list(rows[parent]) if parent >= 0 else [False] * width
        row[i] = True
        rows.append(row)
    return rows


def ancestor_mask(parents: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """:func:`ancestor_rows` as a bool tensor ``[N, N]`` on ``device``."""
    return torch.tensor(ancestor_rows(parents), dtype=torch.bool, device=device)


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """Node ids from the root down to ``node``."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def matched_path(tree: TokenTree, tokens: Sequence[int]) -> list[int]:
    """Node ids (root excluded) of the deepest path that spells the start of ``tokens``: what
    greedy verification accepts of a known continuation, or what a round accepted, read from the
    tokens it emitted (accepted drafts, then the bonus token)."""
    node, path = 0, []
    for token in tokens:
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
        if nxt is None:
            break
        node = nxt
        path.append(node)
    return path
