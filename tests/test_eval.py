"""The eval counters: τ and acceptance by draft position from per-round depths and accepts."""

from __future__ import annotations

from tandem.eval.run import Tally, _merge


def test_acceptance_by_position_counts_every_reached_position():
    tally = Tally(rounds=3, accepted=3)
    for depth, accepted in [(4, 2), (4, 1), (2, 0)]:
        tally.add_round(depth, accepted)
    summary = tally.summary(plain_tps=None)
    # position 1 reached 3 times, accepted twice; 2: 3 and 1; 3 and 4: reached twice, never accepted
    assert summary["acceptance_by_position"] == [0.667, 0.333, 0.0, 0.0]
    assert summary["tau"] == 2.0


def test_merged_tallies_add_up():
    a, b = Tally(rounds=1, accepted=1), Tally(rounds=1, accepted=0)
    a.add_round(2, 1)
    b.add_round(5, 0)
    merged = _merge([a, b]).summary(plain_tps=None)
    assert merged["acceptance_by_position"] == [0.5, 0.0, 0.0, 0.0, 0.0]
    assert merged["tau"] == 1.5
