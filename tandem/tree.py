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
    it (:mod:`tandem.scheduler`); ``None``: the drafter makes no prediction."""

    tokens: torch.Tensor  # [N] int64
    parents: torch.Tensor  # [N] int64, parents[0] == -1
    draft_probs: torch.Tensor | None = None  # [N, V] float32, row 0 unused
    survival: torch.Tensor | None = None  # [N] float32, survival[0] == 1

    def __post_init__(self) -> None:
        n = self.tokens.numel()
        if self.parents.numel() != n or n == 0:
            raise ValueError("a tree needs a root and one parent per node")
        if self.parents[0].item() != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        if n > 1 and not bool((self.parents[1:] < torch.arange(1, n)).all()):
            raise ValueError("nodes must be in topological order: parents[i] < i")
        if n > 1 and not bool((self.parents[1:] >= 0).all()):
            raise ValueError("only the root may lack a parent")
        if self.draft_probs is not None and self.draft_probs.shape[0] != n:
            raise ValueError("draft_probs needs one row per node")
        if self.survival is not None and self.survival.shape != (n,):
            raise ValueError("survival needs one value per node")

    def __len__(self) -> int:
        return self.tokens.numel()

    @property
    def depths(self) -> torch.Tensor:
        return tree_depths(self.parents)

    def children(self, node: int) -> list[int]:
        return (self.parents == node).nonzero().flatten().tolist()

    def path_tokens(self, nodes: Sequence[int]) -> list[int]:
        return [int(self.tokens[i]) for i in nodes]

    def subtree(self, keep: Sequence[int]) -> TokenTree:
        """The tree of the root and ``keep`` (closed under ancestors), ids renumbered in order."""
        nodes = sorted({0, *(int(i) for i in keep)})
        index = {node: i for i, node in enumerate(nodes)}
        try:
            parents = [-1] + [index[int(self.parents[n])] for n in nodes[1:]]
        except KeyError:
            raise ValueError("a subtree must keep every ancestor of its nodes") from None
        rows = torch.tensor(nodes)
        return TokenTree(
            self.tokens[rows],
            torch.tensor(parents, dtype=torch.long),
            None if self.draft_probs is None else self.draft_probs[rows],
            None if self.survival is None else self.survival[rows],
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
        tokens=torch.tensor([root, *draft], dtype=torch.long),
        parents=torch.arange(-1, n - 1, dtype=torch.long),
        draft_probs=draft_probs,
        survival=None if survival is None else torch.tensor([1.0, *survival], dtype=torch.float32),
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
    return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node (root 0); linear in N because parents precede children."""
    depths = torch.zeros(parents.numel(), dtype=torch.long)
    for i in range(1, parents.numel()):
        depths[i] = depths[parents[i]] + 1
    return depths


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """``mask[i, j]`` is True iff node ``j`` is ``i`` or one of its ancestors: what ``i`` attends to
    among the tree nodes."""
    n = parents.numel()
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        mask[i] |= mask[parents[i]]
    return mask


def path_to(parents: torch.Tensor, node: int) -> list[int]:
    """Node ids from the root down to ``node``."""
    path = []
    while node >= 0:
        path.append(node)
        node = int(parents[node])
    return path[::-1]
