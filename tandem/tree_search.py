"""Dynamic draft trees (EAGLE-2 style): grow a tree depth by depth from the drafter's child
distributions, expanding the most promising nodes, within a node budget.

Pure functions over an ``expand`` callback, so one search serves every drafter: the callback
gives the children's distributions of a set of frontier nodes at the same depth (DSpark: base
logits of that depth plus the Markov bias of each parent's token; EAGLE-3: one layer pass over
the frontier; DFlash: the same row for every parent).

- :func:`greedy_tree` (greedy targets): every frontier node proposes its ``topk`` children;
  the ``topk`` best by cumulative log-probability form the next frontier; at the end the
  ``budget`` best nodes are kept. A child's score never exceeds its parent's, so the kept set
  is closed under ancestors.
- :func:`sampled_tree` (sampling targets): children are *drawn* from ``q`` without replacement,
  each with the renormalised remainder as its own ``q``, as recursive rejection sampling needs.
  For the output to keep the target's law, whether a node exists may depend on anything drawn
  before it but never on its own token: so every drawn child is kept, the frontier (which nodes
  get children) is chosen by score, and drawing stops when the budget is spent.

Every node also gets a predicted survival (the probability that verification accepts it, for the
draft scheduler): its parent's times a factor known *before* the node's own token is drawn, so
that cutting a sampled tree by it stays lossless. The factor is the drafter's confidence that the
parent's best child survives when it has a confidence head (DSpark), else the highest draft
probability among the children; a greedy tree's lesser children scale it by their probability
relative to the best one (greedy output depends on no draft probability at all).

Distributions stay on the drafter's device; each depth brings back to the host, in one transfer
(:func:`tandem.devices.to_host`), only the few numbers the search decides on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tandem.devices import to_host
from tandem.tree import TokenTree


@dataclass(frozen=True)
class TreeShape:
    """``topk`` children per expanded node and nodes expanded per depth, ``depth`` levels below
    the root, ``budget`` draft nodes in all (the root excluded)."""

    topk: int = 4
    depth: int = 6
    budget: int = 16

    def __post_init__(self) -> None:
        if min(self.topk, self.depth, self.budget) < 1:
            raise ValueError(f"a tree shape needs topk, depth and budget >= 1, got {self}")

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """``"TOPK,DEPTH,BUDGET"`` (the ``--tree`` flag)."""
        try:
            topk, depth, budget = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"--tree takes TOPK,DEPTH,BUDGET (three integers), got {text!r}") from None
        return cls(topk, depth, budget)


@dataclass
class Growth:
    """The tree while it grows: node ``i`` holds ``tokens[i]`` under ``parents[i]`` at
    ``depths[i]`` with cumulative draft log-probability ``scores[i]``; node 0 is the root."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    scores: list[float] = field(default_factory=lambda: [0.0])
    probs: list[torch.Tensor | None] = field(default_factory=lambda: [None])
    survival: list[float] = field(default_factory=lambda: [1.0])

    def add(self, token: int, parent: int, score: float, factor: float, q: torch.Tensor | None = None) -> int:
        """A child of ``parent``; its survival is the parent's times ``factor``."""
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.scores.append(score)
        self.probs.append(q)
        self.survival.append(self.survival[parent] * min(1.0, factor))
        return len(self.tokens) - 1

    def best(self, nodes: Sequence[int], k: int) -> list[int]:
        """The ``k`` highest-scoring of ``nodes`` (ties: lower id), in id order."""
        return sorted(sorted(nodes, key=lambda i: (-self.scores[i], i))[:k])

    def tree(self, keep: Sequence[int] | None = None) -> TokenTree:
        """The :class:`TokenTree` of ``keep`` (default all; must be closed under ancestors)."""
        probs = None
        if len(self.tokens) > 1 and self.probs[1] is not None:
            probs = torch.stack([torch.zeros_like(self.probs[1]), *self.probs[1:]])
        whole = TokenTree(tuple(self.tokens), tuple(self.parents), probs, tuple(self.survival))
        return whole if keep is None else whole.subtree(keep)


# (the growing tree, frontier node ids at one depth) -> what their children are drawn from, and
# per frontier node the confidence that its best child survives (None: use draft probabilities)
Confidence = torch.Tensor | None  # [F]
GreedyExpand = Callable[[Growth, list[int]], tuple[torch.Tensor, torch.Tensor, Confidence]]  # log-probs, tokens [F, k]
# the same for several trees: their frontiers' rows one after another
GreedyExpandMany = Callable[[list[Growth], list[list[int]]], tuple[torch.Tensor, torch.Tensor, Confidence]]
SampledExpand = Callable[[Growth, list[int]], tuple[torch.Tensor, Confidence]]  # q over the target vocabulary [F, V]
SampledExpandMany = Callable[[list[Growth], list[list[int]]], tuple[torch.Tensor, Confidence]]


def greedy_tree(root: int, expand: GreedyExpand, shape: TreeShape, max_nodes: int) -> TokenTree:
    """Best-first tree for a greedy target. ``expand`` returns, for each frontier node, its
    ``shape.topk`` best children: their log-probabilities (descending) and token ids.
    ``max_nodes`` caps the budget (cache room, tokens left)."""
    return greedy_trees([root], lambda growths, frontiers: expand(growths[0], frontiers[0]), shape, [max_nodes])[0]


def greedy_trees(
    roots: Sequence[int], expand: GreedyExpandMany, shape: TreeShape, max_nodes: Sequence[int]
) -> list[TokenTree]:
    """:func:`greedy_tree` for several sequences at once: each depth expands the frontiers of
    all the trees in one call (their nodes' rows in tree order; a tree done growing has an empty
    frontier) and brings its numbers back in one transfer. Each tree is the one
    :func:`greedy_tree` grows alone, given an ``expand`` whose rows do not depend on each other."""
    growths = [Growth([root]) for root in roots]
    budgets = [min(shape.budget, m) for m in max_nodes]
    frontiers = [[0] for _ in roots]
    for depth in range(min(shape.depth, max(budgets))):
        frontiers = [f if depth < min(shape.depth, b) else [] for f, b in zip(frontiers, budgets)]
        logp, tokens, confidence = expand(growths, frontiers)
        logp, tokens, *conf = to_host(logp[:, : shape.topk], tokens[:, : shape.topk], *_present(confidence))
        row, grown = 0, []
        for growth, frontier in zip(growths, frontiers):
            children = []
            for parent in frontier:
                row_logp = logp[row].tolist()
                for lp, token in zip(row_logp, tokens[row].tolist()):
                    factor = math.exp(lp) if not conf else float(conf[0][row]) * math.exp(lp - row_logp[0])
                    children.append(growth.add(token, parent, growth.scores[parent] + lp, factor))
                row += 1
            grown.append(growth.best(children, shape.topk))
        frontiers = grown
    return [growth.tree(growth.best(range(1, len(growth.tokens)), b)) for growth, b in zip(growths, budgets)]


def sampled_tree(
    root: int, expand: SampledExpand, shape: TreeShape, max_nodes: int, generator: torch.Generator
) -> TokenTree:
    """Tree for a sampling target: up to ``shape.topk`` children drawn without replacement from
    each of the ``shape.topk`` best frontier nodes per depth, every draw kept with the
    distribution it was drawn from, until ``max_nodes`` / ``shape.budget`` nodes exist.

    The draws of a depth happen at once on the device (:func:`draw_without_replacement`); how
    many each frontier node gets depends only on the budget left, never on a token."""
    return sampled_trees(
        [root], lambda growths, frontiers: expand(growths[0], frontiers[0]), shape, [max_nodes], [generator]
    )[0]


def sampled_trees(
    roots: Sequence[int],
    expand: SampledExpandMany,
    shape: TreeShape,
    max_nodes: Sequence[int],
    generators: Sequence[torch.Generator],
) -> list[TokenTree]:
    """:func:`sampled_tree` for several sequences at once: each depth expands the frontiers of
    the trees still growing in one call and brings its numbers back in one transfer. Every tree
    draws its uniforms from its own generator, as many as it draws alone, so it is the tree
    :func:`sampled_tree` grows alone, given an ``expand`` whose rows do not depend on each other."""
    growths = [Growth([root]) for root in roots]
    budgets = [min(shape.budget, m) for m in max_nodes]
    frontiers = [[0] for _ in roots]
    while True:
        frontiers = [
            f if f and len(g.tokens) - 1 < b and g.depths[f[0]] < shape.depth else []
            for f, g, b in zip(frontiers, growths, budgets)
        ]
        if not any(frontiers):
            break
        q, confidence = expand(growths, frontiers)
        q = q.float()
        uniform = torch.cat(
            [
                torch.rand((len(f), q.shape[-1]), generator=g, device=q.device, dtype=torch.float64)
                for f, g in zip(frontiers, generators)
                if f
            ]
        )
        draws = draw_without_replacement(q, shape.topk, uniform)
        tokens, drawn_p, top, *conf = to_host(draws.tokens, draws.token_probs, draws.top, *_present(confidence))
        row = 0
        for b, (growth, frontier) in enumerate(zip(growths, frontiers)):
            left = budgets[b] - (len(growth.tokens) - 1)
            children = []
            for i, parent in enumerate(frontier):
                count = max(0, min(shape.topk, left - shape.topk * i))
                row_top = top[row].tolist()
                mass = 1.0
                for j, (token, p) in enumerate(zip(tokens[row].tolist()[:count], drawn_p[row].tolist())):
                    if p <= 0:  # fewer than topk tokens have mass: the rest were never drawable
                        break
                    # Known before the draw; not renormalised, so a later sibling never outranks an earlier one.
                    factor = row_top[j] if not conf else float(conf[0][row]) * row_top[j] / row_top[0]
                    score = growth.scores[parent] + math.log(p / mass)
                    children.append(growth.add(token, parent, score, factor, draws.drawn_from[row, j]))
                    mass -= p
                row += 1
            frontiers[b] = growth.best(children, shape.topk) if frontier else []
    return [growth.tree() for growth in growths]


@dataclass(frozen=True)
class Draws:
    """``k`` draws without replacement per row of ``q`` ``[F, V]``, all on ``q``'s device."""

    tokens: torch.Tensor  # [F, k] in draw order
    token_probs: torch.Tensor  # [F, k]: q of each drawn token (0: the row had no mass left)
    drawn_from: torch.Tensor  # [F, k, V]: the renormalised remainder each token was drawn from
    top: torch.Tensor  # [F, k]: the highest probability left before each draw (not renormalised)


def draw_without_replacement(q: torch.Tensor, k: int, uniform: torch.Tensor) -> Draws:
    """Gumbel-top-k: the ``k`` largest of ``log q + Gumbel noise`` are, in order, distributed as
    ``k`` sequential draws, each from what is left of ``q`` renormalised. ``uniform``: float64
    uniforms of ``q``'s shape (each row from its own sequence's generator)."""
    k = min(k, q.shape[-1])
    keys = q.double().log() - (-uniform.clamp_min(1e-300).log()).log()
    tokens = keys.topk(k, -1).indices
    token_probs = q.gather(-1, tokens)
    drawn = torch.nn.functional.one_hot(tokens, q.shape[-1]).to(q.dtype)  # [F, k, V]
    before = drawn.cumsum(1) - drawn  # the tokens drawn before draw j
    remaining = q[:, None, :] * (1 - before)
    mass = remaining.sum(-1, keepdim=True)
    drawn_from = remaining / mass.clamp_min(torch.finfo(q.dtype).tiny)
    return Draws(tokens, token_probs, drawn_from, remaining.amax(-1))


def _present(confidence: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return () if confidence is None else (confidence,)
