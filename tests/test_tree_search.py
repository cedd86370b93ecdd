"""Dynamic draft trees on synthetic Markov drafters: shape rules (budget, depth, top-k, closed
under ancestors), the best path always kept, and, with recursive rejection sampling, output
that follows the target's law exactly (chi-square on the first two tokens)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from tandem.tree import ancestor_mask, path_to
from tandem.tree_search import Growth, TreeShape, greedy_tree, greedy_trees, sampled_tree, sampled_trees
from tandem.verify import verify_sampling

V = 5


def _markov(seed: int, sharp: float = 2.0) -> torch.Tensor:
    """A random transition matrix ``[V, V]``: row ``a`` is the law of the token after ``a``."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(V, V, generator=g), -1)


def _greedy_expand(law: torch.Tensor, topk: int):
    def expand(growth: Growth, frontier: list[int]) -> tuple[torch.Tensor, torch.Tensor, None]:
        logp, tokens = torch.log(law[[growth.tokens[i] for i in frontier]]).topk(topk, -1)
        return logp, tokens, None

    return expand


@pytest.mark.parametrize("shape", [TreeShape(1, 6, 6), TreeShape(2, 4, 7), TreeShape(4, 6, 16), TreeShape(3, 2, 30)])
def test_greedy_tree_shape(shape):
    law = _markov(0)
    tree = greedy_tree(1, _greedy_expand(law, shape.topk), shape, max_nodes=50)
    assert len(tree) - 1 == min(shape.budget, _grown(shape))
    assert max(tree.depths) <= shape.depth
    assert all(len(tree.children(i)) <= shape.topk for i in range(len(tree)))
    for node in range(1, len(tree)):  # siblings distinct: at most one can match the target
        siblings = [tree.tokens[c] for c in tree.children(tree.parents[node])]
        assert len(set(siblings)) == len(siblings)
    assert ancestor_mask(tree.parents, "cpu")[:, 0].all()
    # The drafter's own greedy chain is the best path: always kept.
    node, token = 0, 1
    for _ in range(min(shape.depth, shape.budget)):
        token = int(law[token].argmax())
        node = next(c for c in tree.children(node) if int(tree.tokens[c]) == token)


def _grown(shape: TreeShape) -> int:
    """Nodes the search creates before the budget cut: topk at depth 1, then topk² per depth."""
    return shape.topk + (min(shape.depth, shape.budget) - 1) * shape.topk * shape.topk


def test_max_nodes_caps_the_budget():
    tree = greedy_tree(0, _greedy_expand(_markov(1), 3), TreeShape(3, 5, 20), max_nodes=4)
    assert len(tree) == 5


def test_trees_grown_together_are_the_trees_grown_alone():
    """One expansion a depth for several trees (frontiers' rows one after another, a tree past its
    budget's depth expanding nothing) grows each tree as it grows alone."""
    law, shape = _markov(3), TreeShape(3, 5, 12)
    alone = _greedy_expand(law, shape.topk)

    def together(growths: list[Growth], frontiers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, None]:
        parts = [alone(g, f)[:2] for g, f in zip(growths, frontiers) if f]
        return torch.cat([logp for logp, _ in parts]), torch.cat([tokens for _, tokens in parts]), None

    roots, max_nodes = [0, 1, 4, 2], [12, 2, 7, 0]
    grown = greedy_trees(roots, together, shape, max_nodes)
    for tree, root, cap in zip(grown, roots, max_nodes):
        single = greedy_tree(root, alone, shape, cap)
        assert (tree.tokens, tree.parents, tree.survival) == (single.tokens, single.parents, single.survival)
    assert [len(tree) - 1 for tree in grown] == [12, 2, 7, 0]


def test_sampled_trees_grown_together_are_the_trees_grown_alone():
    """One expansion a depth for several sampled trees, each drawing from its own generator, grows
    each tree as it grows alone: the same draws, the same q on every node."""
    law, shape = _markov(5, sharp=1.0), TreeShape(2, 4, 9)
    alone = _sampled_expand(law, confidence=0.5)

    def together(growths: list[Growth], frontiers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [alone(g, f) for g, f in zip(growths, frontiers) if f]
        return torch.cat([q for q, _ in parts]), torch.cat([sure for _, sure in parts])

    roots, max_nodes, seeds = [0, 1, 4, 2], [9, 2, 5, 0], [11, 12, 13, 14]
    grown = sampled_trees(roots, together, shape, max_nodes, [torch.Generator().manual_seed(s) for s in seeds])
    for tree, root, cap, seed in zip(grown, roots, max_nodes, seeds):
        single = sampled_tree(root, alone, shape, cap, torch.Generator().manual_seed(seed))
        assert (tree.tokens, tree.parents, tree.survival) == (single.tokens, single.parents, single.survival)
        assert (tree.draft_probs is None and single.draft_probs is None) or torch.equal(
            tree.draft_probs, single.draft_probs
        )
    assert [len(tree) - 1 for tree in grown] == [9, 2, 5, 0]


def test_kept_nodes_are_the_best_by_cumulative_log_probability():
    law = _markov(2)
    shape = TreeShape(3, 3, 5)
    tree = greedy_tree(2, _greedy_expand(law, 3), shape, max_nodes=99)
    full = greedy_tree(2, _greedy_expand(law, 3), TreeShape(3, 3, 99), max_nodes=99)

    def scores(t):
        out = []
        for i in range(1, len(t)):
            parent, s = int(t.parents[i]), 0.0
            node = i
            while node > 0:
                parent = int(t.parents[node])
                s += float(torch.log(law[int(t.tokens[parent]), int(t.tokens[node])]))
                node = parent
            out.append(s)
        return sorted(out, reverse=True)

    assert scores(tree) == pytest.approx(scores(full)[: shape.budget])


@pytest.mark.parametrize("text,error", [("4,6", "three integers"), ("4,0,16", "topk, depth and budget >= 1")])
def test_shape_flag_errors(text, error):
    with pytest.raises(ValueError, match=error):
        TreeShape.parse(text)
    assert TreeShape.parse("2,3,9") == TreeShape(2, 3, 9)


def _sampled_expand(law: torch.Tensor, confidence: float | None = None):
    def expand(growth: Growth, frontier: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        sure = None if confidence is None else torch.full((len(frontier),), confidence)
        return law[[growth.tokens[i] for i in frontier]], sure

    return expand


@pytest.mark.parametrize("shape", [TreeShape(1, 3, 3), TreeShape(3, 3, 8), TreeShape(2, 4, 12)])
def test_sampled_tree_keeps_every_draw_with_its_own_q(shape):
    law = _markov(3)
    tree = sampled_tree(0, _sampled_expand(law), shape, 99, torch.Generator().manual_seed(0))
    assert 1 <= len(tree) - 1 <= shape.budget and max(tree.depths) <= shape.depth
    for node in range(1, len(tree)):
        siblings = tree.children(int(tree.parents[node]))
        q = tree.draft_probs[node]
        assert float(q.sum()) == pytest.approx(1.0) and float(q[tree.tokens[node]]) > 0
        earlier = [s for s in siblings if s < node]
        assert all(float(q[tree.tokens[s]]) == 0 for s in earlier)  # drawn without replacement


@pytest.mark.parametrize("shape", [TreeShape(1, 3, 3), TreeShape(3, 3, 8), TreeShape(4, 2, 6)])
def test_sampled_trees_keep_the_targets_law(shape):
    """Rounds of (draw a tree from q, verify it against p) emit pairs of tokens with exactly the
    law of sampling p twice."""
    p, q = _markov(4, sharp=1.5), _markov(5, sharp=1.0)
    n, start = 2500, 2
    g = torch.Generator().manual_seed(11)
    pairs = Counter()
    for _ in range(n):
        out: list[int] = []
        while len(out) < 2:
            root = out[-1] if out else start
            tree = sampled_tree(root, _sampled_expand(q), shape, 99, g)
            verdict = verify_sampling(tree, p[list(tree.tokens)], g)
            out += verdict.emitted(tree)
        pairs[tuple(out[:2])] += 1
    expected = {(a, b): float(p[start, a] * p[a, b]) for a in range(V) for b in range(V)}
    keys = [k for k, e in expected.items() if e * n >= 5]
    observed = [pairs[k] for k in keys]
    exp = [expected[k] * n for k in keys]
    scale = sum(observed) / sum(exp)
    assert chisquare(observed, [e * scale for e in exp]).pvalue > 1e-3


def _assert_survival_is_monotone(tree) -> None:
    assert tree.survival is not None and float(tree.survival[0]) == 1.0
    for node in range(1, len(tree)):
        assert 0.0 < float(tree.survival[node]) <= float(tree.survival[tree.parents[node]])


def test_greedy_survival_is_the_path_probability():
    """Without a confidence head a greedy node survives with its path's draft probability."""
    law = _markov(6)
    tree = greedy_tree(1, _greedy_expand(law, 3), TreeShape(3, 4, 12), max_nodes=99)
    _assert_survival_is_monotone(tree)
    for node in range(1, len(tree)):
        path = path_to(tree.parents, node)
        expected = math.prod(float(law[tree.tokens[a], tree.tokens[b]]) for a, b in zip(path, path[1:]))
        assert float(tree.survival[node]) == pytest.approx(expected, rel=1e-5)


def test_greedy_survival_with_a_confidence_head():
    """The best child takes the parent's confidence; a lesser one that, scaled by its probability
    relative to the best."""
    law = _markov(7)

    def expand(growth, frontier):
        logp, tokens, _ = _greedy_expand(law, 2)(growth, frontier)
        return logp, tokens, torch.full((len(frontier),), 0.6)

    tree = greedy_tree(0, expand, TreeShape(2, 1, 2), max_nodes=9)
    best, second = law[0].topk(2).values.tolist()
    assert tree.survival == pytest.approx([1.0, 0.6, 0.6 * second / best])


@pytest.mark.parametrize("confidence", [None, 0.7])
def test_sampled_survival_is_known_before_each_draw(confidence):
    """A sampled node's survival depends only on what was drawn before it: rebuilding each node's
    factor from its parent's distribution and its earlier siblings' tokens gives it back."""
    law = _markov(8)
    tree = sampled_tree(0, _sampled_expand(law, confidence), TreeShape(3, 3, 10), 99, torch.Generator().manual_seed(1))
    _assert_survival_is_monotone(tree)
    for node in range(1, len(tree)):
        parent = int(tree.parents[node])
        law_of_parent = law[int(tree.tokens[parent])]
        q = law_of_parent.clone()
        for sibling in (s for s in tree.children(parent) if s < node):
            q[tree.tokens[sibling]] = 0
        factor = float(q.max()) if confidence is None else confidence * float(q.max()) / float(law_of_parent.max())
        assert float(tree.survival[node]) == pytest.approx(float(tree.survival[parent]) * min(1.0, factor), rel=1e-5)
