"""Online calibration of predicted survival (tandem.calibration): overconfident predictions fall,
trustworthy ones rise, sequences learn apart, and nodes whose parent failed teach nothing. Behind
the scheduler in the engine: tests/test_scheduler.py."""

from __future__ import annotations

import pytest

from tandem.calibration import SurvivalCalibration, step_factors
from tandem.tree import TokenTree, chain, matched_path


def _rounds(cal: SurvivalCalibration, key, tree: TokenTree, emitted: list[int], n: int, greedy: bool = True) -> None:
    for _ in range(n):
        cal.observe(key, cal.apply(key, tree, greedy), emitted)


def test_step_factors_and_the_accepted_path():
    tree = TokenTree((9, 1, 2, 3), (-1, 0, 1, 0), survival=(1.0, 0.5, 0.25, 0.2))
    assert step_factors(tree) == pytest.approx([1.0, 0.5, 0.5, 0.2])
    assert matched_path(tree, [1, 2, 7]) == [1, 2]
    assert matched_path(tree, [3, 5]) == [3]
    assert matched_path(tree, [4]) == []


def test_predictions_move_toward_what_verification_accepts():
    cal = SurvivalCalibration()
    tree = chain(0, [5], survival=[0.5])
    assert cal.apply("fresh", tree, True).survival[1] == pytest.approx(0.5)  # no evidence: the drafter's own
    _rounds(cal, "liar", tree, [6], 100)  # predicted 1/2, never accepted
    assert cal.apply("liar", tree, True).survival[1] < 0.05
    assert cal.apply("someone else", tree, True).survival[1] < 0.15  # the all-sequence counts learned too
    assert cal.apply("someone else", tree, False).survival[1] == pytest.approx(0.5)  # sampling is apart


def test_sequences_learn_apart():
    cal = SurvivalCalibration()
    tree = chain(0, [5], survival=[0.5])
    for _ in range(40):  # interleaved, as in a batch
        _rounds(cal, "code", tree, [5, 1], 1)
        _rounds(cal, "prose", tree, [6], 1)
    code, prose = (cal.apply(k, tree, True).survival[1] for k in ("code", "prose"))
    assert code > 0.75 and prose < 0.25


def test_a_node_whose_parent_failed_teaches_nothing():
    cal = SurvivalCalibration()
    tree = chain(0, [5, 6], survival=[0.95, 0.95 * 0.35])  # factors 0.95 and 0.35: different bins
    _rounds(cal, "s", tree, [7], 50)  # the first node always fails
    out = cal.apply("s", tree, True)
    assert out.survival[1] < 0.2
    assert out.survival[2] / out.survival[1] == pytest.approx(0.35)  # the child's factor kept its prior


def test_survival_never_rises_down_a_path_and_forget_frees_the_sequence():
    cal = SurvivalCalibration()
    tree = TokenTree((0, 1, 2, 3, 4), (-1, 0, 1, 2, 0), survival=(1.0, 0.9, 0.9, 0.9, 0.3))
    _rounds(cal, "s", tree, [1, 2, 3, 8], 30)
    out = cal.apply("s", tree, True)
    assert all(out.survival[i] <= out.survival[p] + 1e-12 for i, p in enumerate(out.parents[1:], 1))
    assert cal.held() == 1
    cal.forget("s")
    assert cal.held() == 0
