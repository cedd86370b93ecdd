"""The suffix drafter's trie counts every substring; its trees follow what occurred, with the
frequencies as estimates and the adaptive size; through the engine the suffix and hybrid
drafters leave greedy output unchanged and samples in law."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from tandem.drafters import (
    ADAPTERS,
    DraftConfig,
    DraftRequest,
    HybridDrafter,
    SuffixDrafter,
    check_drafter_name,
    make_drafter,
    new_draft_model,
)
from tandem.drafters.suffix import Cursor, SuffixTrie
from tandem.engine import Engine, Request
from tandem.errors import InvalidRequest
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams
from tandem.scheduler import PassCost, ScheduledDrafter
from tandem.tree import TokenTree, path_to
from tandem.tree_search import TreeShape
from tests.test_engine import assert_follows_the_target
from tests.tiny_models import build_tiny

VOCAB = 64


def _substrings(trie: SuffixTrie) -> dict[tuple[int, ...], int]:
    """Every string the trie holds with its count, leaves read on from their text."""
    out: dict[tuple[int, ...], int] = {}
    stack: list[tuple[int, tuple[int, ...]]] = [(0, ())]
    while stack:
        node, string = stack.pop()
        if node:
            out[string] = trie.count[node]
        kids = trie.children[node]
        if kids is not None:
            stack += [(child, (*string, token)) for token, child in kids.items()]
            continue
        src, at = trie.src[node], trie.start[node] + trie.level[node]
        while len(string) < trie.depth and at < len(src):
            string, at = (*string, src[at]), at + 1
            out[string] = 1
    return out


def _brute(texts: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    return dict(
        Counter(tuple(t[i:j]) for t in texts for i in range(len(t)) for j in range(i + 1, min(len(t), i + depth) + 1))
    )


def _occurrences(text: list[int], string: list[int]) -> int:
    return sum(text[i : i + len(string)] == string for i in range(len(text) - len(string) + 1))


def _longest_match(text: list[int], max_match: int) -> int:
    """Longest suffix (at most ``max_match``) that also occurs earlier, by brute force."""
    return max(
        (m for m in range(1, min(max_match, len(text) - 1) + 1) if _occurrences(text[:-1], text[-m:])), default=0
    )


def test_trie_counts_every_substring_whatever_the_chunks():
    """Texts added a few tokens at a time (as rounds add them) hold exactly the substrings of up to
    ``depth`` tokens with their occurrence counts: several texts, tiny vocabularies (long repeats,
    overlapping occurrences, leaves split while their own occurrence is still growing)."""
    rng = random.Random(0)
    for _ in range(300):
        depth = rng.randint(1, 7)
        vocab = rng.choice([1, 2, 3, 5])
        texts = [[rng.randrange(vocab) for _ in range(rng.randint(0, 30))] for _ in range(rng.randint(1, 3))]
        trie = SuffixTrie(depth)
        for text in texts:
            cursor, k = Cursor(), 0
            while k < len(text):
                step = rng.randint(1, 4)
                trie.extend(cursor, text[k : k + step])
                k += step
        assert _substrings(trie) == _brute(texts, depth)


def test_hand_made_continuations_and_counts():
    """``1 2`` occurred twice before the end, followed by 3 and by 4: two branches of estimate 1/3
    (the end's own occurrence counts, its next token unknown), each read on from the text, best
    first, at most alpha × 2 nodes."""
    drafter = SuffixDrafter(alpha=4.0, history=0)
    tree = drafter.propose([DraftRequest(0, [1, 2, 3, 1, 2, 4, 1, 2], 16)])[0]
    assert tree.tokens == (2, 3, 4, 1, 1, 2, 2, 4, 1)
    assert tree.parents == (-1, 0, 0, 1, 2, 3, 4, 5, 7)
    assert tree.survival == pytest.approx([1.0] + [1 / 3] * 8)
    trie = drafter._states[0].trie
    assert trie.find([1, 2]) is not None and trie.count[trie.find([1, 2])[0]] == 3
    assert trie.find([2, 4, 1, 2]) == (trie.find([2, 4])[0], 2)  # read on from a leaf's text
    assert trie.find([2, 4, 2]) is None
    lone = SuffixDrafter(history=0).propose([DraftRequest(0, [1, 2, 3, 4], 16)])[0]
    assert len(lone) == 1 and lone.survival == (1.0,)  # nothing repeats: no guess


def _check_tree(tree: TokenTree, text: list[int], drafter: SuffixDrafter, max_nodes: int) -> None:
    """Valid, in budget, and every node's estimate is what its path's counts say: the product of
    count(child) / count(parent) telescopes to count(match + path) / count(match)."""
    m = _longest_match(text, drafter.max_match)
    n = len(tree) - 1
    assert tree.survival is not None and tree.draft_probs is None and tree.survival[0] == 1.0
    assert n <= max_nodes and n <= int(drafter.alpha * m)
    if n == 0:
        return
    assert max(tree.depths) <= drafter.max_depth - m
    surv, parents = tree.survival, tree.parents
    assert all(s >= drafter.min_prob - 1e-6 for s in surv[1:]) and all(s <= 1.0 for s in surv)
    assert all(surv[i] <= surv[parents[i]] + 1e-6 for i in range(1, n + 1)), "estimates must not grow along a path"
    match = text[-m:]
    for node in range(1, len(tree)):
        path = tree.path_tokens(path_to(parents, node)[1:])
        seen = _occurrences(text, match + path)
        assert seen > 0, "a drafted path that never occurred"
        assert abs(float(surv[node]) - seen / _occurrences(text, match)) < 1e-5


def test_trees_follow_counts_and_budgets_across_rounds():
    """Rounds over repetitive random texts: each tree checked against brute-force counts; the
    incrementally kept trie and trees equal a drafter built from scratch on the same tokens."""
    rng = random.Random(1)
    for trial in range(40):
        motifs = [[rng.randrange(6) for _ in range(rng.randint(2, 5))] for _ in range(3)]
        text = [t for _ in range(12) for t in rng.choice(motifs) + [rng.randrange(6)] * rng.randint(0, 1)]
        drafter = SuffixDrafter(max_depth=12, max_match=5, alpha=rng.choice([1.0, 2.5, 4.0]), history=0)
        k = rng.randint(2, 6)
        while k <= len(text):
            budget = rng.choice([0, 3, 8, 16])
            tree = drafter.propose([DraftRequest(trial, text[:k], budget)])[0]
            _check_tree(tree, text[:k], drafter, budget)
            fresh = _fresh_like(drafter).propose([DraftRequest(trial, text[:k], budget)])[0]
            assert (tree.tokens, tree.parents) == (fresh.tokens, fresh.parents)
            assert tree.survival == fresh.survival
            k += rng.randint(1, 5)
        state = drafter._states[trial]
        assert _substrings(state.trie) == _brute([state.cursor.text], 12)


def _fresh_like(drafter: SuffixDrafter) -> SuffixDrafter:
    """A new drafter with the same settings and nothing kept."""
    return SuffixDrafter(drafter.max_depth, drafter.max_match, drafter.alpha, drafter.min_prob, history=0)


def test_release_forgets_and_feeds_recent_outputs():
    """A released sequence leaves nothing behind but its output (prompt excluded), which a later
    sequence matches at the rule-of-succession estimate 1/2; the shared trie stays bounded."""
    drafter = SuffixDrafter(history=2)
    prompt, output = [50, 51, 52], [7, 8, 9, 10, 11, 12]
    for k in (4, 6, 8, 9):  # rounds
        drafter.propose([DraftRequest(0, (prompt + output)[:k], 16)])
    drafter.release(0)
    drafter.release(0)  # twice: nothing left to forget
    assert drafter._states == {}
    tree = drafter.propose([DraftRequest(1, [3, 8, 9], 16)])[0]
    assert tree.tokens == (9, 10, 11, 12) and tree.survival[1:] == pytest.approx([0.5] * 3)
    assert len(drafter.propose([DraftRequest(2, [3, 51, 52], 16)])[0]) == 1  # prompts are not shared
    for seq in range(3, 12):
        drafter.propose([DraftRequest(seq, [seq, 1, 2, 3], 4)])
        drafter.release(seq)
    assert drafter._shared_texts <= 4 and len(drafter._history) == 2
    assert len(SuffixDrafter(history=0).propose([DraftRequest(1, [3, 8, 9], 16)])[0]) == 1


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("suffix-target")
    build_tiny("llama", folder, vocab=VOCAB)
    return load_model(folder, torch.float32)[0]


def _prompts(n: int, seed: int) -> list[list[int]]:
    """Half of them a motif repeated (the drafter matches from the first round), half random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        motif = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 6))]
        out.append(motif * 3 if i % 2 == 0 else [rng.randrange(VOCAB) for _ in range(rng.randint(3, 12))])
    return out


def _generate(engine: Engine, prompts: list[list[int]], params: SamplingParams, batch: int) -> list:
    out = []
    for i in range(0, len(prompts), batch):
        out += engine.generate([Request(p, params) for p in prompts[i : i + batch]])
    return out


@pytest.mark.parametrize("batch", [1, 4])
def test_suffix_greedy_output_equals_plain_decoding(target, batch):
    prompts, params = _prompts(8, seed=3), SamplingParams(max_tokens=40)
    plain = Engine(target).generate([Request(p, params) for p in prompts])
    spec = _generate(Engine(target, make_drafter("suffix"), max_draft_nodes=8), prompts, params, batch)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    drafted, accepted = sum(r.stats.drafted for r in spec), sum(r.stats.accepted for r in spec)
    assert 0 < accepted < drafted, "accepted and rejected drafts must both occur"


def test_suffix_sampled_output_follows_the_target(target):
    """First three tokens of 2,000 seeded requests against the exact law of the target."""
    engine = Engine(target, SuffixDrafter(), max_draft_nodes=6)
    assert_follows_the_target(engine, [5, 17, 33, 2, 5, 17, 33, 2, 5, 17], top_k=3)


def _untrained(target):
    """An untrained DSpark model: wrong most of the time, which is all exactness needs."""
    torch.manual_seed(0)
    return new_draft_model(DraftConfig.for_target("dspark", target, "tiny", draft_vocab=48, block_size=4), target)


@pytest.mark.parametrize("batch", [1, 4])
def test_hybrid_greedy_output_equals_plain_decoding_and_uses_both(target, batch):
    """Both branches run; the neural drafter's cache keeps up with every sequence even in rounds
    the suffix tree answers (it absorbs the features), so it can draft the next round at once."""
    neural = ADAPTERS["dspark"](_untrained(target))
    hybrid = HybridDrafter(SuffixDrafter(), neural)
    assert hybrid.feature_layers == neural.feature_layers and hybrid.feature_layers
    calls = Counter()
    absorb, propose = neural.absorb, neural.propose

    def counted_absorb(request):
        calls["suffix"] += 1
        return absorb(request)

    def counted_propose(requests):
        calls["neural"] += len(requests)
        return propose(requests)

    def checked(requests, _propose=hybrid.propose):
        trees = _propose(requests)
        for r in requests:
            assert neural._states[r.seq_id].length == len(r.token_ids) - 1
        return trees

    neural.absorb, neural.propose, hybrid.propose = counted_absorb, counted_propose, checked
    prompts, params = _prompts(8, seed=5), SamplingParams(max_tokens=40)
    plain = Engine(target).generate([Request(p, params) for p in prompts])
    spec = _generate(Engine(target, hybrid, max_draft_nodes=8), prompts, params, batch)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert calls["suffix"] > 0 and calls["neural"] > 0, calls
    assert sum(r.stats.accepted for r in spec) > 0
    assert neural._states == {} and hybrid.suffix._states == {}  # released with the sequences


def test_hybrid_sampled_output_follows_the_target_behind_the_calibrated_scheduler(target):
    """Sampled DSpark trees where the suffix trie has nothing, its point masses where it has, cut
    by the scheduler on calibrated survival: first three tokens of 2,000 seeded requests against
    the exact law of the target."""
    neural = ADAPTERS["dspark"](_untrained(target), tree=TreeShape(2, 3, 6))
    cost = PassCost((1, 8), (1, 17), ((1.0, 1.5), (1.0, 1.5)))  # a token of width costs 1/32 of a pass
    # gate off: 2,000 sequences' real drafting time against a synthetic 1 s pass would stop it
    drafter = ScheduledDrafter(HybridDrafter(SuffixDrafter(), neural), cost, gate=False)
    engine = Engine(target, drafter, max_draft_nodes=6)
    assert_follows_the_target(engine, [5, 17, 33, 2, 5, 17, 33, 2, 5, 17], top_k=3)


def test_drafter_names(target, tmp_path):
    assert isinstance(make_drafter("suffix"), SuffixDrafter)  # no target needed
    with pytest.raises(InvalidRequest, match="takes no tree shape"):
        check_drafter_name("suffix:2,3,4")
    check_drafter_name("hybrid")
    check_drafter_name("hybrid:4,6,16")
    check_drafter_name("hybrid:eagle3:2,3,6")
    with pytest.raises(InvalidRequest, match="second part"):
        check_drafter_name("hybrid:ngram")
    with pytest.raises(InvalidRequest, match="no dspark drafter is shipped"):
        make_drafter("hybrid", target, "tiny")
    _untrained(target).save(tmp_path / "dspark")
    hybrid = make_drafter(f"hybrid:{tmp_path / 'dspark'}:2,3,6", target, "tiny")
    assert isinstance(hybrid, HybridDrafter) and hybrid.neural.tree == TreeShape(2, 3, 6)
    assert isinstance(hybrid.suffix, SuffixDrafter)
