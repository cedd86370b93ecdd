"""Verification: greedy walks, and the sampling rule reproducing the target distribution."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import tandem.verify as verify_module
from tandem.sampling import SamplingParams, target_probs
from tandem.tree import TokenTree, chain
from tandem.verify import verify_batch, verify_greedy, verify_sampling

V = 6


def test_greedy_accepts_the_matching_prefix_of_a_chain():
    tree = chain(0, [1, 2, 3, 4])
    verdict = verify_greedy(tree, [1, 2, 5, 0, 0])
    assert verdict.accepted_nodes == (0, 1, 2)
    assert verdict.bonus_token == 5
    assert verdict.emitted(tree) == [1, 2, 5]


def test_greedy_full_acceptance_takes_the_bonus_from_the_last_node():
    tree = chain(0, [1, 2])
    verdict = verify_greedy(tree, [1, 2, 3])
    assert verdict.emitted(tree) == [1, 2, 3]


def test_greedy_follows_the_branch_that_matches_deepest():
    # root 0 -> {1 -> 2, 3 -> 4 -> 5}; the target wants 3, 4, then 1.
    tree = TokenTree(torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([-1, 0, 1, 0, 3, 4]))
    verdict = verify_greedy(tree, [3, 0, 0, 4, 1, 0])
    assert verdict.accepted_nodes == (0, 3, 4)
    assert verdict.emitted(tree) == [3, 4, 1]


def test_root_only_tree_is_plain_decoding():
    tree = chain(2, [])
    assert verify_greedy(tree, [4]).emitted(tree) == [4]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9),
    ],
)
def test_target_probs_match_hugging_face_warpers(params):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    warped = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        warped = TopKLogitsWarper(params.top_k)(None, warped)
    if params.top_p < 1:
        warped = TopPLogitsWarper(params.top_p)(None, warped)
    torch.testing.assert_close(target_probs(logits, params), warped.softmax(-1))


def test_greedy_params_give_a_point_mass_on_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert target_probs(logits, SamplingParams()).tolist() == [[0.0, 1.0, 0.0]]


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(max_tokens=0)])
def test_bad_sampling_params_are_refused(bad):
    from tandem.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        SamplingParams(**bad)


# --- Sampling: the emitted tokens must follow the target exactly -----------------------------
#
# A toy "target" and "draft" over V tokens, each a fixed table of next-token distributions
# conditioned on the previous token. We generate the first two tokens after token 0 with
# speculative rounds (trees of two children per node, two levels deep) and compare the joint
# histogram of (t1, t2) with P[0, t1] * P[t1, t2] by a chi-square test.

TRIALS = 12000


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(V, V, generator=g) ** 3
    target[:, 0] = 0  # a token the target never emits but the draft proposes
    draft = torch.rand(V, V, generator=g) ** 2
    return target / target.sum(-1, keepdim=True), draft / draft.sum(-1, keepdim=True)


def _draft_tree(
    root: int, draft: torch.Tensor, g: torch.Generator, replacement: bool, point_mass: bool, stale_q: bool = False
) -> TokenTree:
    """Two children per node, two levels, each child drawn from its own q (recorded per node;
    ``stale_q`` records the parent's original q instead, a deliberate bug)."""
    tokens, parents, qs = [root], [-1], [torch.zeros(V)]
    frontier = [0]
    for _ in range(2):
        next_frontier = []
        for node in frontier:
            original = draft[tokens[node]]
            q = original.clone()
            for _ in range(2):
                tok = int(torch.multinomial(q, 1, generator=g))
                tokens.append(tok)
                parents.append(node)
                qs.append(original if stale_q else q.clone())
                next_frontier.append(len(tokens) - 1)
                if not replacement:  # the next sibling is drawn without this token
                    q[tok] = 0
                    q = q / q.sum()
        frontier = next_frontier
    return TokenTree(torch.tensor(tokens), torch.tensor(parents), None if point_mass else torch.stack(qs))


def _joint_counts(
    target, draft, replacement: bool, point_mass_verify: bool = False, stale_q: bool = False
) -> torch.Tensor:
    return _rounds_until_two_tokens(
        target, lambda anchor, g: _draft_tree(anchor, draft, g, replacement, point_mass_verify, stale_q)
    )


def _draft_chain(anchor: int, draft: torch.Tensor, g: torch.Generator) -> TokenTree:
    """Two tokens drawn one after the other from ``draft``, each with its q recorded."""
    q1 = draft[anchor]
    t1 = int(torch.multinomial(q1, 1, generator=g))
    q2 = draft[t1]
    t2 = int(torch.multinomial(q2, 1, generator=g))
    return chain(anchor, [t1, t2], torch.stack([torch.zeros(V), q1, q2]))


def _rounds_until_two_tokens(target, make_tree, seed: int = 1234) -> torch.Tensor:
    """Histogram of the first two emitted tokens after token 0, over TRIALS runs of rounds."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    for _ in range(TRIALS):
        out: list[int] = []
        while len(out) < 2:
            tree = make_tree(out[-1] if out else 0, g)
            out += verify_sampling(tree, target[list(tree.tokens)], g).emitted(tree)
        counts[out[0], out[1]] += 1
    return counts


def _p_value(counts: torch.Tensor, target: torch.Tensor) -> float:
    expected = (target[0][:, None] * target) * counts.sum()
    keep = expected.flatten() > 0
    assert counts.flatten()[~keep].sum() == 0, "emitted a pair the target can never produce"
    return float(chisquare(counts.flatten()[keep], expected.flatten()[keep]).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize("replacement", [True, False], ids=["iid-children", "without-replacement"])
def test_tree_sampling_reproduces_the_target(replacement):
    target, draft = _tables(0)
    assert _p_value(_joint_counts(target, draft, replacement), target) > 1e-3


@pytest.mark.slow
def test_chain_sampling_reproduces_the_target():
    target, draft = _tables(1)
    counts = _rounds_until_two_tokens(target, lambda anchor, g: _draft_chain(anchor, draft, g), seed=7)
    assert _p_value(counts, target) > 1e-3


@pytest.mark.slow
def test_a_rule_without_the_residual_is_caught(monkeypatch):
    """After a rejection the bonus must come from norm(max(0, p - q)); sampling from p is biased."""
    target, draft = _tables(0)
    monkeypatch.setattr(verify_module, "_residual", lambda p, token, q: p)
    assert _p_value(_joint_counts(target, draft, replacement=True), target) < 1e-6


@pytest.mark.slow
def test_a_rule_with_the_wrong_q_is_caught():
    """Siblings drawn without replacement must be verified with the q they were drawn from;
    verifying them with their parent's original q (a stale q) is biased."""
    target, draft = _tables(0)
    assert _p_value(_joint_counts(target, draft, replacement=False, stale_q=True), target) < 1e-6


@pytest.mark.slow
def test_point_mass_q_is_exact_for_any_proposal():
    """Verifying sampled drafts as fixed proposals only costs acceptance, never exactness."""
    target, draft = _tables(0)
    assert _p_value(_joint_counts(target, draft, replacement=True, point_mass_verify=True), target) > 1e-3


def test_deterministic_proposals_are_exact_with_point_mass_q():
    """Greedy-style drafts (q = point mass) under sampling: first-token law is the target's."""
    target, _ = _tables(2)
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(V)
    tree = TokenTree(torch.tensor([0, 2, 3, 4]), torch.tensor([-1, 0, 0, 0]))
    p = target[list(tree.tokens)]
    for _ in range(6000):
        counts[verify_sampling(tree, p, g).emitted(tree)[0]] += 1
    keep = target[0] > 0
    assert counts[~keep].sum() == 0
    assert chisquare(counts[keep], target[0][keep] * counts.sum()).pvalue > 1e-3


def test_verify_batch_handles_mixed_greedy_and_sampling_rows():
    trees = [chain(0, [1, 2]), chain(0, [3])]
    logits = torch.full((2, 3, V), -9.0)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 4] = 9.0
    logits[1, 0, 5] = 9.0
    params = [SamplingParams(), SamplingParams(temperature=1.0)]
    verdicts = verify_batch(trees, logits, params, [None, torch.Generator().manual_seed(0)])
    assert verdicts[0].emitted(trees[0]) == [1, 2, 4]
    assert verdicts[1].emitted(trees[1]) == [5]
