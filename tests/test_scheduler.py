"""The draft scheduler alone: the pass-cost profile, which nodes it keeps and why that stays
lossless (greedy: ranked by survival; sampling: a prefix in draw order, grown only while it
pays), the profile measured on a real (tiny) model and cached, and, in the engine, calibration
that stops verifying what never survives (the calibration itself: tests/test_calibration.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tandem import profile
from tandem.drafters.base import Drafter, DraftRequest
from tandem.engine import Engine, Request
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams
from tandem.scheduler import (
    MAX_PROBE_INTERVAL,
    DraftCost,
    DraftGate,
    PassCost,
    ScheduledDrafter,
    best_width,
    choose_drafted,
    schedule,
)
from tandem.tree import TokenTree, chain
from tandem.verifier import Verifier
from tests.tiny_models import build_tiny


def _linear(overhead: float, per_token: float, batches=(1, 4), widths=(1, 2, 4, 8, 16)) -> PassCost:
    """A pass costs ``overhead + per_token * batch * width`` seconds."""
    return PassCost(batches, widths, tuple(tuple(overhead + per_token * b * w for w in widths) for b in batches))


def _tree(survival: list[float], parents: list[int]) -> TokenTree:
    n = len(parents)
    return TokenTree(torch.arange(n), torch.tensor(parents), survival=torch.tensor(survival))


def test_pass_cost_interpolates_the_measured_values():
    cost = PassCost((1, 4), (1, 3, 5), ((1.0, 3.0, 2.0), (4.0, 6.0, 8.0)))
    assert cost(1, 2) == pytest.approx(2.0)
    assert cost(1, 4) == pytest.approx(2.5)  # a measured dip is kept: wider can be cheaper
    assert cost(2, 1) == pytest.approx(2.0)  # between batch 1 and 4
    assert cost(8, 5) > cost(4, 5)  # extrapolated past the largest batch measured
    assert PassCost.from_json(json.loads(json.dumps(cost.to_json()))) == cost
    with pytest.raises(ValueError, match="width 1"):
        PassCost((1,), (2, 4), ((1.0, 2.0),))
    with pytest.raises(ValueError, match="one row"):
        PassCost((1, 2), (1, 2), ((1.0, 2.0),))


def test_pass_cost_prices_attention_past_its_base_context():
    cost = PassCost((1, 4), (1, 5), ((1.0, 2.0), (2.0, 4.0)), base_context=64, per_key=1e-3)
    assert cost(4, 5, context=10) == cost(4, 5) == 4.0
    assert cost(4, 5, context=164) == pytest.approx(4.0 + 1e-3 * 4 * 5 * 100)
    assert PassCost.from_json(json.loads(json.dumps(cost.to_json()))) == cost
    old = {k: v for k, v in cost.to_json().items() if k in ("batches", "widths", "seconds")}
    assert PassCost.from_json(old).per_key == 0.0  # a profile written before the context term


def _priced(gate: DraftGate, seconds: float) -> None:
    """The gate's drafter warmed up (its first round is no sample), then seen drafting one
    sequence in ``seconds``."""
    gate.draft_cost.observe(1, 1.0)
    gate.draft_cost.observe(1, seconds)


def test_draft_cost_is_fitted_to_what_drafting_took():
    cost = DraftCost()
    assert cost(3) == 0.0  # never drafted: unknown, so it gets tried
    cost.observe(2, 5.0)  # the first round pays the drafter's set-up: not a sample
    assert cost(3) == 0.0
    for _ in range(3):
        cost.observe(2, 0.02)
    assert cost(4) == pytest.approx(0.04)  # one batch size seen: proportional to it
    for k in (1, 4, 8, 2, 6) * 20:
        cost.observe(k, 0.003 + 0.01 * k)
    assert cost(0) == 0.0
    assert cost(16) == pytest.approx(0.003 + 0.16, rel=0.05)
    assert cost(1) == pytest.approx(0.013, rel=0.1)


def test_the_gate_drafts_the_sequences_that_pay_and_none_when_none_does():
    passes = [1.0, 1.2, 1.4, 1.6, 1.8]  # batch of 3 at widths 1 .. 5
    good, poor = [0.0, 0.9, 1.7, 2.4, 3.0], [0.0, 0.05, 0.08, 0.1, 0.1]
    cheap = [0.0, 0.05, 0.1, 0.15]  # drafting k sequences
    assert choose_drafted([poor, good, poor], passes, cheap) == [1]
    assert choose_drafted([good, good, poor], passes, cheap) == [0, 1]
    # once drafting is free, even a poor offer adds something to a width paid for anyway
    assert choose_drafted([poor, good, poor], passes, [0.0] * 4) == [0, 1, 2]
    # drafting a sequence costs as much as a plain pass: no offer pays for it
    assert choose_drafted([good, good, poor], passes, [0.0, 1.0, 2.0, 3.0]) == []
    # verification as dear per token as plain decoding: nothing pays either
    assert choose_drafted([good] * 3, [1.0, 2.0, 3.0, 4.0, 5.0], cheap) == []
    # a round predicted to beat plain by less than the margin is not drafted: it would lose
    assert choose_drafted([[0.0, 0.52]], [1.0, 1.5], [0.0, 0.0]) == []  # 1.3 % better
    assert choose_drafted([[0.0, 0.60]], [1.0, 1.5], [0.0, 0.0]) == [0]  # 6.7 % better


def test_the_gate_learns_from_one_sequence_then_judges_new_ones_by_the_mean_offer():
    """Before any offer is known the gate drafts one sequence, not the batch (a drafter that
    costs a plain pass per sequence would otherwise double a large batch's first round); then
    sequences without an offer of their own are judged by the running mean of offers."""
    gate = DraftGate(_linear(1.0, 0.0))  # verification is free: any offer pays
    keys = list(range(16))
    assert gate.choose(keys, [8] * 16, context=10) == {0}
    assert gate.choose(keys, [0] + [8] * 15, context=10) == {1}  # no room: not drafted
    gate.offered(1, chain(5, [1, 2], survival=[0.9, 0.8]), greedy=True)
    assert gate.choose(keys, [8] * 16, context=10) == set(keys)
    gate = DraftGate(_linear(0.0, 1.0))  # every token costs a pass: the mean offer pays nothing
    gate.choose(keys, [8] * 16, context=10)
    gate.offered(0, chain(5, [1, 2], survival=[0.9, 0.8]), greedy=True)
    _priced(gate, 0.5)  # probes, at 2 % of a plain pass, are then far apart
    assert gate.choose(keys, [8] * 16, context=10) == set()
    gate = DraftGate(_linear(0.0, 1.0))  # trees without survival (n-gram) give nothing to judge by
    assert gate.first_round(0, keys, [8] * 16, context=10)  # nothing known yet: draft to learn
    gate.choose(keys, [8] * 16, context=10)
    gate.offered(0, chain(5, [1, 2]), greedy=True)
    assert gate.choose(keys, [8] * 16, context=10) == set(keys)


def test_a_probe_in_a_batch_is_priced_with_the_pass_it_widens():
    """A drafter that costs nothing (the suffix tries) is still probed within the budget in a
    batch: a probe in a round that drafts nothing else widens every row's pass, so with a pass of
    1.4 and a widened one of 1.8 (batch 4) each sequence is probed about every 57 rounds, not
    every round (as when only drafting counted). Alone (batch 1) the widened pass is the probe's
    own, and it is probed every round."""
    keys = list(range(4))
    probes = {}
    for batch in (1, 4):
        gate = DraftGate(_linear(1.0, 0.1, batches=(1, 4)))
        gate.choose(keys[:batch], [8] * batch, context=10)
        gate.offered(0, chain(5, [1], survival=[0.01]), greedy=True)  # an offer that never pays
        _priced(gate, 0.0)
        probes[batch] = sum(len(gate.choose(keys[:batch], [8] * batch, context=10)) for _ in range(60))
    assert 1 <= probes[4] <= 8 and probes[1] == 60, probes


def test_dear_probes_that_find_nothing_paying_back_off_until_one_does():
    """A drafter whose probes keep showing offers that do not pay is probed ever further apart,
    by up to as many times as its drafting costs eighths of a plain pass (EAGLE-3, a pass a round
    at batch 1, lost 4 % to probes within the budget), and never when drafting is free (hybrid's
    cheap probes catch the short stretches where text repeats); the first probe whose new offer
    pays brings back the budget's spacing."""
    gaps = {}
    for draft in (0.0, 0.55, 1.1):  # free, half a plain pass (1.1 at batch 1), a whole one
        gate = DraftGate(_linear(1.0, 0.1, batches=(1, 4)))
        gate.choose([0], [8], context=10)
        gate.offered(0, chain(5, [1], survival=[0.01]), greedy=True)  # an offer that never pays
        _priced(gate, draft)
        probed = [r for r in range(1200) if gate.choose([0], [8], context=10)]
        gaps[draft] = [b - a for a, b in zip(probed, probed[1:])]
    assert set(gaps[0.0]) == {1}, gaps
    assert gaps[0.55][:4] == [50, 100, 100, 100], gaps  # every 25 rounds by the budget, then 4 times that
    assert gaps[1.1][:4] == [100, 200, MAX_PROBE_INTERVAL, MAX_PROBE_INTERVAL], gaps  # 50, then 8 times
    while not gate.choose([0], [8], context=10):  # up to the next probe
        pass
    gate.offered(0, chain(5, [1, 2], survival=[0.99, 0.98]), greedy=True)  # it finds that drafting pays
    assert gate.choose([0], [8], context=10) == {0}
    gate.offered(0, chain(5, [1], survival=[0.01]), greedy=True)  # and then no longer
    probed = [r for r in range(200) if gate.choose([0], [8], context=10)]
    assert probed == [49, 149], probed  # the budget's 50 rounds again, then backing off


def test_a_new_sequences_first_round_is_gated_like_any_round():
    """A sequence just prefilled joins the batch without an offer of its own: it drafts its
    first round only if the running mean of offers pays at the batch's size, and it asks
    nothing of the gate's probe counts."""
    keys = list(range(4))
    free = DraftGate(_linear(1.0, 0.0))  # verification is free: the mean offer pays
    dear = DraftGate(_linear(0.0, 1.0))  # every token costs a pass: it pays nothing
    for gate in (free, dear):
        gate.choose(keys[:3], [8] * 3, context=10)
        gate.offered(0, chain(5, [1, 2], survival=[0.9, 0.8]), greedy=True)
    assert free.first_round(3, keys, [8] * 4, context=10)
    assert not dear.first_round(3, keys, [8] * 4, context=10)
    assert not free.first_round(3, keys, [8, 8, 8, 0], context=10)  # no room for drafts
    assert 3 not in dear._idle  # noqa: SLF001 - its probe turn counts from its first choose


def test_the_gate_prices_no_width_past_the_profile():
    """A target worker's rows have their whole free context as room (thousands of nodes): the
    gate prices widths up to the profile's widest only, and chooses as it would with that room."""

    class Counted(PassCost):
        def __call__(self, batch: int, width: int, context: int = 0) -> float:
            asked.append(width)
            return super().__call__(batch, width, context)

    base = _linear(0.5, 0.1)
    keys, asked = [0, 1], []
    choices = []
    for room in ([16, 16], [4000, 4000]):
        gate = DraftGate(Counted(base.batches, base.widths, base.seconds))
        gate.choose(keys, room, context=10)
        gate.offered(0, chain(5, [1, 2, 3], survival=[0.9, 0.8, 0.7]), greedy=True)
        choices.append(gate.choose(keys, room, context=10))
    assert choices[0] == choices[1] == {0, 1} and max(asked) == base.widths[-1]


def test_free_verification_keeps_everything_and_token_priced_keeps_nothing():
    tree = chain(5, [1, 2, 3, 4], survival=[0.9, 0.8, 0.5, 0.1])
    assert len(schedule([tree], [True], _linear(1.0, 0.0))[0]) == 5
    # Every token costs a whole pass: nothing beats plain decoding.
    assert len(schedule([tree], [True], _linear(0.0, 1.0))[0]) == 1


def test_expensive_verification_admits_fewer_nodes():
    trees = [chain(5, [1, 2, 3, 4, 6, 7], survival=[0.95, 0.9, 0.8, 0.6, 0.4, 0.2])] * 4
    kept = [
        sum(len(t) - 1 for t in schedule(trees, [True] * 4, _linear(1.0, per_token)))
        for per_token in (0.0, 0.005, 0.02, 0.08, 5.0)
    ]
    assert kept == sorted(kept, reverse=True) and kept[0] == 24 and kept[-1] == 0
    assert len(set(kept)) >= 3, kept


def test_greedy_keeps_the_best_nodes_closed_under_ancestors():
    # root -> 1 (0.9) -> 3 (0.7); root -> 2 (0.3) -> 4 (0.25); 1 -> 5 (0.2)
    tree = _tree([1.0, 0.9, 0.3, 0.7, 0.25, 0.2], [-1, 0, 0, 1, 2, 1])
    cost = PassCost((1,), (1, 2, 3, 4, 5, 6), ((1.0, 1.0, 1.0, 2.0, 2.0, 2.0),))
    out = schedule([tree], [True], cost)[0]
    assert out.tokens == (0, 1, 3) and out.parents == (-1, 0, 1)
    assert out.survival == pytest.approx([1.0, 0.9, 0.7])


def test_a_child_rated_above_its_parent_never_leaves_the_parent_out():
    """A drafter's estimate may rise along a path by a rounding (the suffix drafter's
    ``prob * count / total`` did, crashing the benchmark); the cut must still keep ancestors."""
    tree = _tree([1.0, 0.3, 0.31, 0.2], [-1, 0, 1, 0])
    cost = PassCost((1,), (1, 2, 3, 4), ((1.0, 1.0, 9.0, 9.0),))
    out = schedule([tree], [True], cost)[0]  # room for one draft node: the parent, not its child
    assert out.tokens == (0, 1) and out.parents == (-1, 0)


def test_sampling_keeps_a_prefix_in_draw_order():
    """The same tree under sampling: nodes kept in id order (node 2 before the better node 3),
    since a node's fate may not depend on anything drawn after it."""
    tree = _tree([1.0, 0.9, 0.3, 0.7, 0.25, 0.2], [-1, 0, 0, 1, 2, 1])
    tree.draft_probs = torch.softmax(torch.randn(6, 7), -1)
    cost = PassCost((1,), (1, 2, 3, 4, 5, 6), ((1.0, 1.0, 1.0, 2.0, 2.0, 2.0),))
    out = schedule([tree], [False], cost)[0]
    assert out.tokens == (0, 1, 2)
    assert torch.equal(out.draft_probs, tree.draft_probs[:3])


def test_sampling_stops_at_the_first_width_that_does_not_pay():
    """Greedy takes the best width overall; sampling stops growing where the value first falls."""
    gains = [[0.1, 0.9, 0.9, 0.9]]
    cost = _linear(1.0, 0.3, batches=(1,), widths=(1, 2, 3, 4, 5))
    assert best_width(gains, 1, 1, cost, 0.0, greedy=True) == 5
    assert best_width(gains, 1, 1, cost, 0.0, greedy=False) == 1


def test_trees_without_survival_are_verified_whole_and_set_the_width():
    scored = chain(5, [1, 2, 3], survival=[0.99, 0.98, 0.97])
    bare = chain(5, [9, 8])
    out = schedule([scored, bare], [True, True], _linear(0.0, 1.0))
    assert len(out[1]) == 3 and len(out[0]) == 3  # width 3 is paid for anyway: fill it
    assert schedule([bare], [True], _linear(0.0, 1.0))[0] is bare


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny("llama", folder)
    return load_model(folder, torch.float32)[0]


def test_profile_is_measured_once_and_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    cost = profile.measure(tiny, batches=(1, 2), widths=(1, 3, 9), repeats=1)
    assert cost.batches == (1, 2) and cost.widths == (1, 3, 9)
    assert all(s > 0 for row in cost.seconds for s in row)
    first = profile.load_or_measure(tiny, "tiny-llama")
    path = profile.profile_path("tiny-llama", tiny.dtype)
    assert path.is_file() and str(tmp_path) in str(path)

    def no_measuring(*args, **kwargs):
        raise AssertionError("a cached profile must not be measured again")

    monkeypatch.setattr(profile, "measure", no_measuring)
    assert profile.load_or_measure(tiny, "tiny-llama") == first
    assert json.loads(path.read_text())["machine"] == profile.machine_id()


def test_a_slow_spell_falls_on_every_cell_of_the_profile_alike(tiny, monkeypatch):
    """A shared machine slows down for a while: passes in the spell take 3x. The profile's cells
    are measured in sweeps, a pass of each per sweep, so a spell no longer than a sweep slows at
    most two of a cell's five passes, and the medians keep the true ratios between widths (here a
    pass costs batch x width ms). Measured cell by cell, it would triple one or two cells."""
    clock, passes = [0.0], [0]
    verify = Verifier.verify

    def timed_verify(self, rows, trees):
        passes[0] += 1
        spell = 3.0 if 9 <= passes[0] < 15 else 1.0  # 6 passes in a row, one sweep's worth
        clock[0] += spell * len(rows) * max(len(t) for t in trees) * 1e-3
        return verify(self, rows, trees)

    monkeypatch.setattr(Verifier, "verify", timed_verify)
    monkeypatch.setattr(profile, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    cost = profile.measure(tiny, batches=(1, 2), widths=(1, 3, 9), repeats=5, long_cells=())
    assert passes[0] == 6 * (1 + 5)  # a warm-up pass and five measured ones per cell
    assert [list(row) for row in cost.seconds] == [
        pytest.approx([1e-3, 3e-3, 9e-3]),
        pytest.approx([2e-3, 6e-3, 18e-3]),
    ]


class _Overconfident(Drafter):
    """Always proposes 3 tokens that are almost never right, each predicted to survive 0.9."""

    name = "overconfident"

    def propose(self, requests: list[DraftRequest]) -> list[TokenTree]:
        return [chain(r.token_ids[-1], [1, 1, 1], survival=[0.9, 0.81, 0.73]) for r in requests]


def test_the_scheduler_stops_verifying_what_never_survives(tiny):
    cost = PassCost((1, 8), (1, 4), ((1.0, 1.3), (1.0, 1.3)))  # 3 drafts cost 30 % of a pass
    params = SamplingParams(max_tokens=40)
    prompts = [[3, 7, 11, 5], [2, 9, 4]]
    plain = Engine(tiny).generate([Request(p, params) for p in prompts])
    runs = {}
    for calibrate in (False, True):
        engine = Engine(tiny, ScheduledDrafter(_Overconfident(), cost, calibrate=calibrate), max_draft_nodes=3)
        runs[calibrate] = engine.generate([Request(p, params) for p in prompts])
        assert [r.token_ids for r in runs[calibrate]] == [r.token_ids for r in plain]
    drafted = {c: sum(r.stats.drafted for r in out) for c, out in runs.items()}
    # trusted: every node verified (but in a sequence's last round, which has no room for one,
    # and in the first round, where the gate, knowing no offer yet, drafts one sequence)
    assert drafted[False] >= 3 * (sum(r.stats.rounds for r in runs[False]) - 2 * len(prompts) + 1)
    assert drafted[True] < drafted[False] / 3  # calibrated: the scheduler soon stops


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Absorbing(Drafter):
    """Takes a second of the fake clock per target feature row it is given; records its calls as
    (sequence, tokens, nodes asked, feature rows)."""

    name, feature_layers = "absorbing", (0,)

    def __init__(self, clock: _Clock) -> None:
        self.clock, self.calls = clock, []

    def propose(self, requests):
        rows = [0 if r.features is None else len(r.features) for r in requests]
        self.calls.append([(r.seq_id, len(r.token_ids), r.max_nodes, n) for r, n in zip(requests, rows)])
        self.clock.now += sum(rows)
        return [chain(r.token_ids[-1], []) for r in requests]


class _Chosen(ScheduledDrafter):
    """Drafts the sequences the test names for each round (gate kept: its draft cost is read)."""

    def __init__(self, inner: Drafter, rounds: list[set[int]]) -> None:
        super().__init__(inner, _linear(1.0, 0.0), calibrate=False)
        self.plan = rounds

    def _choose(self, requests):
        return {i for i, r in enumerate(requests) if r.seq_id in self.plan[self.rounds]}


def test_a_prompt_and_the_rows_of_rounds_sat_out_are_taken_in_apart_and_not_priced_as_a_round(monkeypatch):
    """A sequence's prompt features (its first request's), and the rows of the rounds it sat out,
    go to the drafter before its next drafted round, in a call asking for no nodes; the round's
    call brings the round's own features, and only that call is a round's draft cost. Priced with
    the prompt, a drafter's first round (DSpark's: about ten rounds' work) made the gate find it
    too dear to draft at all; priced with the rows a probe catches up on, probes grew dearer the
    rarer they were, until DSpark was not drafted at all. The drafter is asked for twice the
    nodes the last round kept, 4 at least (DraftGate.ask)."""
    clock = _Clock()
    monkeypatch.setattr("tandem.scheduler.time", clock)
    inner = _Absorbing(clock)
    drafter = _Chosen(inner, [{0}, {1}, {0, 1}, {0, 1}])
    prompts = {0: list(range(50)), 1: list(range(30))}
    tokens = {s: [*p, 7] for s, p in prompts.items()}
    rows = {s: len(p) for s, p in prompts.items()}  # the first request's features: the prompt's
    for _ in range(4):
        drafter.propose([DraftRequest(s, list(t), 9, features=torch.zeros(rows[s], 4)) for s, t in tokens.items()])
        for s in tokens:  # each round verifies two tokens
            tokens[s] += [8, 9]
            rows[s] = 2
    assert inner.calls == [
        [(0, 51, 0, 50)], [(0, 51, 9, 0)],  # round 1: seq 0's prompt, then its round; seq 1 waits
        [(1, 31, 0, 30)], [(1, 33, 4, 2)],  # round 2: seq 1's prompt, then its round (round 1 kept no node)
        [(0, 53, 0, 2)], [(0, 55, 4, 2), (1, 35, 4, 2)],  # round 3: seq 0's rows of round 2 (it sat out)
        [(0, 57, 4, 2), (1, 37, 4, 2)],  # round 4
    ]  # fmt: skip
    # rounds of 0 s (the first: no sample), 2 s for one sequence, 4 s and 4 s for two
    assert drafter.gate.draft_cost(1) == pytest.approx(2.0, rel=0.05)
    for s in tokens:
        drafter.release(s)
    assert drafter.held() == 0


def test_the_gate_asks_for_twice_the_nodes_the_last_drafted_round_kept():
    """Before any round is drafted a sequence's whole room is asked for; then twice what the
    scheduler kept of the last drafted round's widest tree, 4 nodes at least, never past the room:
    the width it keeps can double each round, and a drafter whose work grows with its tree (DSpark's
    LM head rows, EAGLE-3's passes) is not asked for nodes that would be cut."""
    gate = DraftGate(_linear(1.0, 0.1))
    assert gate.ask(40) == 40
    gate.kept([chain(5, [1, 2, 3]), chain(5, [1])])
    assert (gate.ask(40), gate.ask(5)) == (6, 5)
    gate.kept([])  # a round that drafted nothing says nothing
    assert gate.ask(40) == 6
    gate.kept([chain(5, [])])
    assert gate.ask(40) == 4
