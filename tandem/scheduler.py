"""DSpark's hardware-aware draft scheduler: verify only the draft nodes that pay for their cost.

A verification pass costs what the hardware makes it cost for its batch size and tree width
(padded to the widest tree: measured once by :mod:`tandem.profile`). Every draft node carries
the drafter's predicted survival (:attr:`TokenTree.survival`), the expected number of tokens it
adds. The scheduler picks the width that maximises expected tokens per second of round time,

    (Σ_seqs 1 + Σ_kept survival) / (draft seconds + pass seconds(batch, width)),

and keeps, in each tree, the width − 1 nodes ranked first.

Before that, it decides which sequences to draft at all (:func:`choose_drafted`): the drafter's
own cost is measured online (:class:`DraftCost`), each sequence's last calibrated offer predicts
what drafting it would add, and where no set of sequences pays for its drafting plus its wider
pass (a large batch on a compute-bound machine, or a drafter that guesses badly here), the
drafter is not called and the round is plain decoding. A sequence left out is drafted again when
its turn to probe comes (so its offer stays current), at a rate whose cost stays within
:data:`PROBE_BUDGET` of a plain pass, and less (down to 1/:data:`MAX_PROBE_BACKOFF` of it) while
probes keep finding nothing that pays. It decides before the target sees the tokens, and stays
lossless:

- whether a sequence is drafted reads earlier rounds only (offers, acceptance counts, timings);
- a greedy target's output never depends on which nodes are verified, so its nodes are ranked by
  survival (ancestors first: survival never rises down a path) and the best width is taken;
- under sampling, whether a node is verified must not depend on its own token or on anything
  drawn after it, so nodes are ranked in draw order (node ids: a prefix in it is a subtree), their
  survival is known before their draw (:mod:`tandem.tree_search`), and the width grows only while
  the objective rises: the decision to keep node k reads nothing after node k.

Trees without survival (the n-gram drafter) are verified whole. Survival is calibrated online
before the cut (:mod:`tandem.calibration`): drafters' own predictions are far off.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace

import torch

from tandem.calibration import SurvivalCalibration
from tandem.drafters.base import Drafter, DraftRequest
from tandem.tree import TokenTree, chain

PROBE_BUDGET = 0.02  # what probing left-out sequences may cost, as a share of a plain pass
MAX_PROBE_INTERVAL = 256  # rounds a sequence goes undrafted at most
# Probes that keep finding nothing that pays are spaced out, doubling up to this factor, and no
# further than their drafting costs eighths of a plain pass: EAGLE-3 (a pass a round at batch 1 on
# this CPU, never paying) lost 4 % to probes within the budget, which prices the drafting but not
# the prompt a first probe takes in; hybrid's cheap probes catch the short stretches where text
# repeats, and spaced 8 times further apart they lost it 6 % at batch 1.
MAX_PROBE_BACKOFF = 8
PRIOR_WEIGHT = 0.1  # of each new offer in the running mean that new sequences are judged by
# What drafting must promise over plain decoding, in tokens per second, before a round is drafted:
# the profile prices a pass within about 8 %, and a drafted round costs work neither it nor the
# drafter's timing sees (the tree's mask, acceptance), so a round predicted to break even loses.
DRAFT_MARGIN = 0.05
# Draft nodes a round asks for at least, and how many times what the last drafted round kept: a
# drafter's work grows with its tree (DSpark's LM head runs a row per depth, EAGLE-3 a pass), and
# the scheduler cuts what does not pay, so asking for far more than it keeps is waste; asking for
# twice as much lets the width the scheduler keeps double from one round to the next.
MIN_ASK = 4
ASK_GROWTH = 2


@dataclass(frozen=True)
class PassCost:
    """Seconds of one verification pass at ``batches[i]`` sequences of ``widths[j]`` tokens each
    (anchor included): ``seconds[i][j]``, measured by ``tandem profile`` after a prefix of
    ``base_context`` tokens; a longer prefix adds ``per_key`` seconds per query token and cached
    key (attention's share, fitted from passes at a long context)."""

    batches: tuple[int, ...]
    widths: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]
    base_context: int = 0
    per_key: float = 0.0

    def __post_init__(self) -> None:
        if len(self.seconds) != len(self.batches) or any(len(row) != len(self.widths) for row in self.seconds):
            raise ValueError("a pass cost needs one row of seconds per batch size and one value per width")
        if list(self.batches) != sorted(set(self.batches)) or list(self.widths) != sorted(set(self.widths)):
            raise ValueError("batch sizes and widths must be increasing")
        if self.widths[0] != 1:
            raise ValueError("the profile must include width 1 (plain decoding)")

    def __call__(self, batch: int, width: int, context: int = 0) -> float:
        """Interpolated linearly in width, then in batch size (extrapolated past the last), plus
        attention over a ``context`` (the longest cached prefix in the pass) past the base one.

        Measured values are taken as they are, dips included: on CPUs a wider pass can be
        cheaper (float32 passes of 2-3 tokens measured slower than of 5 on this machine)."""
        attention = self.per_key * batch * width * max(0, context - self.base_context)
        return max(_interpolate(self.batches, self._at_width(width), batch), 1e-9) + attention

    @functools.lru_cache(maxsize=256)  # noqa: B019 (a few profiles live as long as their servers)
    def _at_width(self, width: float) -> tuple[float, ...]:
        """Each profiled batch size's seconds at ``width``: the gate prices every width each
        round, and interpolating every row each time took 3-4 % of a batch-1 round."""
        return tuple(_interpolate(self.widths, row, width) for row in self.seconds)

    def to_json(self) -> dict:
        return {
            "batches": list(self.batches),
            "widths": list(self.widths),
            "seconds": [list(r) for r in self.seconds],
            "base_context": self.base_context,
            "per_key": self.per_key,
        }

    @classmethod
    def from_json(cls, data: dict) -> PassCost:
        return cls(
            tuple(data["batches"]),
            tuple(data["widths"]),
            tuple(tuple(r) for r in data["seconds"]),
            int(data.get("base_context", 0)),
            float(data.get("per_key", 0.0)),
        )


class DraftCost:
    """Seconds a drafter takes to draft ``k`` sequences, ``a + b k``, fitted online to decaying
    sums of the rounds it drafted (this machine, this drafter, these contexts and shapes); 0
    until it has drafted twice, so an unknown drafter gets tried. Its first round is not a
    sample: it pays the drafter's one-time set-up (lazy packing, first calls into the kernels:
    DSpark's took 18 ms against 3-5 ms rounds, and priced at that the gate, probing rarely,
    stopped drafting it at all)."""

    def __init__(self, decay: float = 0.97) -> None:
        self.decay = decay
        self._sums = [0.0] * 5  # weight, Σk, Σk², Σt, Σkt
        self._warm = False

    def observe(self, k: int, seconds: float) -> None:
        if not self._warm:
            self._warm = True
            return
        self._sums = [self.decay * s + x for s, x in zip(self._sums, (1.0, k, k * k, seconds, k * seconds))]

    def __call__(self, k: int) -> float:
        n, sk, skk, st, skt = self._sums
        if k <= 0 or n == 0:
            return 0.0
        mean_k, mean_t = sk / n, st / n
        spread = skk / n - mean_k**2
        if spread < 0.25:  # (nearly) one batch size seen: proportional to it
            return mean_t * k / mean_k
        slope = max(0.0, (skt / n - mean_k * mean_t) / spread)
        return max(0.0, mean_t - slope * mean_k) + slope * k


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    if len(xs) == 1:
        return ys[0] * (x / xs[0] if x > xs[0] else 1.0)
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return max(min(ys), ys[i] + slope * (x - xs[i]))


def ranked_gains(tree: TokenTree, greedy: bool) -> tuple[list[int], list[float]]:
    """The tree's draft nodes in the order the scheduler admits them, and their survival."""
    assert tree.survival is not None
    survival = list(tree.survival)
    for i, parent in enumerate(tree.parents):  # a node survives no more than its parent does
        if parent >= 0:
            survival[i] = min(survival[i], survival[parent])
    nodes = list(range(1, len(tree)))
    if greedy:
        depths = tree.depths
        nodes.sort(key=lambda i: (-survival[i], depths[i], i))
    return nodes, [survival[i] for i in nodes]


def _at_context(cost: PassCost, context: int, batch: int, width: int) -> float:
    return cost(batch, width, context)


def best_width(
    gains: Sequence[Sequence[float]],
    batch: int,
    fixed_width: int,
    cost: Callable[[int, int], float],
    draft_seconds: float,
    greedy: bool,
) -> int:
    """The verification width (tokens per sequence) with the most expected tokens per second.

    ``gains[s]`` lists scored sequence ``s``'s ranked survival values; the pass holds ``batch``
    sequences, and trees verified whole make it at least ``fixed_width`` wide. Greedy batches take
    the best width; others grow it while the objective rises (see the module docstring)."""
    widest = max([fixed_width, *(len(g) + 1 for g in gains)])
    cumulative = [[0.0, *itertools.accumulate(g)] for g in gains]
    best, best_value = fixed_width, -1.0
    for width in range(fixed_width, widest + 1):
        # one token per sequence for sure (the bonus); unscored trees add what we cannot predict
        expected = batch + sum(c[min(width - 1, len(c) - 1)] for c in cumulative)
        value = expected / (draft_seconds + cost(batch, width))
        if value > best_value:
            best, best_value = width, value
        elif not greedy:
            break
    return best


def schedule(
    trees: Sequence[TokenTree],
    greedy: Sequence[bool],
    cost: PassCost,
    draft_seconds: float = 0.0,
    context: int = 0,
) -> list[TokenTree]:
    """The trees cut to the width that pays best on this hardware (see the module docstring);
    ``context``: the longest cached prefix among them."""
    scored = [i for i, t in enumerate(trees) if t.survival is not None and len(t) > 1]
    if not scored:
        return list(trees)
    fixed = max([1, *(len(t) for i, t in enumerate(trees) if i not in scored)])
    ranked = {i: ranked_gains(trees[i], greedy[i]) for i in scored}
    greedy_only = all(greedy[i] for i in scored)
    priced = functools.partial(_at_context, cost, context)
    width = best_width([ranked[i][1] for i in scored], len(trees), fixed, priced, draft_seconds, greedy_only)
    out = list(trees)
    for i in scored:
        if len(trees[i]) > width:
            out[i] = trees[i].subtree(ranked[i][0][: width - 1])
    return out


def choose_drafted(
    offers: Sequence[Sequence[float]], pass_seconds: Sequence[float], draft_seconds: Sequence[float]
) -> list[int]:
    """Which sequences of a batch to draft this round, on merit: ``offers[s]`` lists the expected
    tokens that sequence ``s``'s last calibrated tree added with its first 0, 1, 2 ... nodes (in
    the order the scheduler admits them), ``pass_seconds[w - 1]`` what a pass of the whole batch
    at width ``w`` costs, ``draft_seconds[k]`` what drafting ``k`` sequences costs. Returns the
    set of best offers at some width whose tokens per second, drafting included, beat plain
    decoding's the most, by :data:`DRAFT_MARGIN` at least; empty when none does."""
    batch = len(offers)
    best: list[int] = []
    best_value = (1 + DRAFT_MARGIN) * batch / pass_seconds[0]
    for width in range(2, len(pass_seconds) + 1):
        gains = sorted(((c[min(width - 1, len(c) - 1)], s) for s, c in enumerate(offers)), reverse=True)
        total = 0.0
        for k, (gain, _) in enumerate(gains, 1):
            if gain <= 0:
                break
            total += gain
            value = (batch + total) / (draft_seconds[k] + pass_seconds[width - 1])
            if value > best_value:
                best, best_value = [s for _, s in gains[:k]], value
    return sorted(best)


class DraftGate:
    """Which sequences of a batch to draft this round (see the module docstring), for sequences
    keyed by any id (the engine's sequence ids, a target worker's cache rows): their offers,
    the rounds since each was last drafted, and what drafting costs (:class:`DraftCost`)."""

    def __init__(self, cost: PassCost) -> None:
        self.cost = cost
        self.draft_cost = DraftCost()
        self._offers: dict[Hashable, list[float]] = {}  # its last tree's cumulative expected tokens
        self._idle: dict[Hashable, int] = {}  # rounds since it was last drafted
        self._prior: list[float] | None = None  # the offers' running mean: a new sequence's offer
        self._unscored = False  # the drafter's trees carry no survival (n-gram): nothing to judge by
        self._probed: set[Hashable] = set()  # the last round's probes, judged by their new offers
        self._backoff = 1  # how many times further apart than the budget allows probes are spaced
        self._kept: int | None = None  # draft nodes the last drafted round's widest cut tree kept

    def choose(self, keys: Sequence[Hashable], room: Sequence[int], context: int) -> set[int]:
        """Indices into ``keys`` (the batch: every sequence in the pass) to draft this round;
        ``room[i]``: draft nodes sequence ``i`` may take. Never one without room; those whose
        offer (their own, else the running mean of all offers) pays; while no offer is known at
        all, one sequence (drafting it is how to learn what drafting costs and offers, and one
        costs a large batch little), or every one if the drafter's trees carry no survival to
        judge by; and, spread over rounds, those whose turn to probe has come. Counts the round
        for those left out."""
        open_ = [i for i, nodes in enumerate(room) if nodes > 0]
        if self._prior is None:
            chosen = set(open_) if self._unscored else set(open_[:1])
        else:
            batch = len(keys)
            chosen = self._paying(keys, room, context)
            self._judge_probes(keys, chosen)
            # Probes cost at most PROBE_BUDGET of a plain pass per round: each sequence is probed
            # every `interval` rounds, a share of the batch at a time (longest idle first). A probe
            # costs its drafting and, in a batch whose round drafts nothing else, the pass it widens
            # for every row (to two tokens at least; at batch 1 the row is the probe's own, whose
            # tokens pay for it): without it, probes at batch 16 drafted one sequence in 12 % of
            # the rounds and cost 3-5 %.
            plain = self.cost(batch, 1, context)
            widening = 0.0 if chosen or batch == 1 else self.cost(batch, 2, context) - plain
            draft = self.draft_cost(1)
            interval = (draft + widening) * batch / (PROBE_BUDGET * plain)
            backoff = min(self._backoff, max(1, round(MAX_PROBE_BACKOFF * draft / plain)))
            interval = min(MAX_PROBE_INTERVAL, max(1, math.ceil(interval)) * backoff)
            due = sorted((-self._idle.get(keys[i], 0), i) for i in open_ if i not in chosen)
            due = [i for idle, i in due if 1 - idle >= interval][: math.ceil(len(open_) / interval)]
            self._probed = {keys[i] for i in due}
            chosen.update(due)
        for i, key in enumerate(keys):
            self._idle[key] = 0 if i in chosen else self._idle.get(key, 0) + 1
        return chosen

    def _judge_probes(self, keys: Sequence[Hashable], paying: set[int]) -> None:
        """Space probes out twice as far (see :data:`MAX_PROBE_BACKOFF`) when none of the last
        round's probes that are still in the batch now pays on its new offer; back to the budget's
        spacing as soon as one does."""
        judged = [i in paying for i, key in enumerate(keys) if key in self._probed]
        if any(judged):
            self._backoff = 1
        elif judged:
            self._backoff = min(MAX_PROBE_BACKOFF, 2 * self._backoff)

    def first_round(self, key: Hashable, keys: Sequence[Hashable], room: Sequence[int], context: int) -> bool:
        """Whether a sequence just prefilled (``key``, one of the batch ``keys`` it joins) is worth
        drafting in its first round: judged by the running mean of all offers, as :meth:`choose`
        judges every sequence without an offer of its own; yes while no offer is known (drafting
        is how to learn). A sequence left out waits for its turn to probe, as in :meth:`choose`."""
        if self._prior is None:
            return True
        return keys.index(key) in self._paying(keys, room, context)

    def _paying(self, keys: Sequence[Hashable], room: Sequence[int], context: int) -> set[int]:
        """The indices of the sequences whose offers (their own, else the running mean) pay."""
        open_ = [i for i, nodes in enumerate(room) if nodes > 0]
        batch = len(keys)
        # No wider than the profile: a target worker's room is its rows' whole free context
        # (thousands of nodes), and pricing every width up to it took longer than the pass.
        widest = min(1 + max((room[i] for i in open_), default=0), self.cost.widths[-1])
        pass_seconds = [self.cost(batch, w, context) for w in range(1, widest + 1)]
        draft_seconds = [self.draft_cost(k) for k in range(batch + 1)]
        offers = [self._offers.get(keys[i], self._prior) for i in open_]
        return {open_[m] for m in choose_drafted(offers, pass_seconds, draft_seconds)}

    def offered(self, key: Hashable, tree: TokenTree, greedy: bool) -> None:
        """Record a drafted sequence's (calibrated, uncut) tree as its offer for later rounds."""
        if tree.survival is None:
            self._unscored |= len(tree) > 1  # a bare anchor says nothing either way
            return
        offer = self._offers[key] = [0.0, *itertools.accumulate(ranked_gains(tree, greedy)[1])]
        prior = self._prior or offer
        n = max(len(prior), len(offer))
        prior, offer = (c + c[-1:] * (n - len(c)) for c in (prior, offer))  # a tree gains no more past its end
        self._prior = [(1 - PRIOR_WEIGHT) * a + PRIOR_WEIGHT * b for a, b in zip(prior, offer)]

    def ask(self, room: int) -> int:
        """Draft nodes to ask the drafter for, of the ``room`` a sequence has: :data:`ASK_GROWTH`
        times what the last drafted round kept (:meth:`kept`), :data:`MIN_ASK` at least; all of
        it before any round was drafted. Reads earlier rounds only, so it stays lossless."""
        return room if self._kept is None else min(room, max(MIN_ASK, ASK_GROWTH * self._kept))

    def kept(self, trees: Sequence[TokenTree]) -> None:
        """Record the drafted trees of a round as the scheduler cut them (:meth:`ask`)."""
        if trees:
            self._kept = max(len(tree) - 1 for tree in trees)

    def forget(self, key: Hashable) -> None:
        self._offers.pop(key, None)
        self._idle.pop(key, None)

    def held(self) -> int:
        return len(self._offers.keys() | self._idle.keys())


class ScheduledDrafter(Drafter):
    """A drafter behind the draft scheduler for the whole batch it is asked for: the in-process
    engine's. Each round it drafts only the sequences that pay (:func:`choose_drafted`, or with
    ``max_batch`` the fixed rule "draft while the batch is smaller", vLLM's
    ``disable_by_batch_size``; ``gate=False`` drafts every sequence), then cuts their trees
    (:func:`schedule`) counting its own drafting time. With ``calibrate`` the drafter's survival
    predictions are first calibrated online (:mod:`tandem.calibration`) from what the tokens of
    each sequence's next request show was accepted.

    A sequence left out keeps its new target features here; before its next drafted round they
    go to the drafter in a call of their own, which catches its state up in one step (the suffix
    drafter reads the tokens it missed from the request), so leaving a sequence out costs the
    drafter nothing. Its prompt's features wait here too and go with that call, outside the
    round's timing (:meth:`_catch_up`). The drafter is asked for no more nodes than the gate
    expects the scheduler to keep (:meth:`DraftGate.ask`)."""

    def __init__(
        self,
        inner: Drafter,
        cost: PassCost,
        calibrate: bool = True,
        gate: bool = True,
        max_batch: int | None = None,
    ) -> None:
        self.inner, self.cost = inner, cost
        self.name = inner.name
        self.feature_layers = inner.feature_layers
        self.calibration = SurvivalCalibration() if calibrate else None
        self.gate = DraftGate(cost) if gate and max_batch is None else None
        self.max_batch = max_batch
        self.rounds = self.drafted_rounds = 0  # rounds asked for, and rounds the drafter was called
        self._sent: dict[int, tuple[TokenTree, int]] = {}  # seq_id -> (tree verified, tokens known then)
        self._held: dict[int, list[torch.Tensor]] = {}  # seq_id -> target features the drafter has not seen
        self._prompts: dict[int, tuple[int, torch.Tensor]] = {}  # seq_id -> its first request's tokens, features
        self._seen: set[int] = set()  # sequences asked for before

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        greedy = [r.params.greedy for r in requests]
        if self.calibration is not None:
            for r in requests:
                sent = self._sent.pop(r.seq_id, None)
                if sent is not None:
                    self.calibration.observe(r.seq_id, sent[0], r.token_ids[sent[1] :])
        requests = [self._set_prompt_aside(r) for r in requests]
        chosen = self._choose(requests)
        trees = [chain(r.token_ids[-1], []) for r in requests]
        for i, r in enumerate(requests):
            if i not in chosen:
                self._hold(r.seq_id, r.features)
        self.rounds += 1
        if not chosen:
            return trees
        asked = [self._asking(requests[i]) for i in chosen]
        self._catch_up(asked)
        self.drafted_rounds += 1
        start = time.perf_counter()
        for i, r, tree in zip(chosen, asked, self.inner.propose(asked)):
            if self.calibration is not None:
                tree = self.calibration.apply(r.seq_id, tree, greedy[i])
            trees[i] = tree
            if self.gate is not None:
                self.gate.offered(r.seq_id, tree, greedy[i])
        seconds = time.perf_counter() - start
        if self.gate is not None:
            self.gate.draft_cost.observe(len(chosen), seconds)
        context = max(len(r.token_ids) for r in requests)
        trees = schedule(trees, greedy, self.cost, seconds, context)
        if self.gate is not None:
            self.gate.kept([trees[i] for i in chosen])
        if self.calibration is not None:
            self._sent.update((requests[i].seq_id, (trees[i], len(requests[i].token_ids))) for i in chosen)
        return trees

    def _choose(self, requests: Sequence[DraftRequest]) -> set[int]:
        """The batch's indices to draft this round: the gate's choice (:meth:`DraftGate.choose`),
        or by the fixed threshold, or every one with room."""
        room = [r.max_nodes for r in requests]
        if self.gate is not None:
            context = max(len(r.token_ids) for r in requests)
            return self.gate.choose([r.seq_id for r in requests], room, context)
        if self.max_batch is not None and len(requests) >= self.max_batch:
            return set()
        return {i for i, nodes in enumerate(room) if nodes > 0}

    def _asking(self, request: DraftRequest) -> DraftRequest:
        """``request`` with no more draft nodes than the gate asks for (:meth:`DraftGate.ask`)."""
        if self.gate is None:
            return request
        return replace(request, max_nodes=self.gate.ask(request.max_nodes))

    def _hold(self, seq_id: int, features: torch.Tensor | None) -> None:
        if features is not None:
            self._held.setdefault(seq_id, []).append(features)

    def _set_prompt_aside(self, request: DraftRequest) -> DraftRequest:
        """A sequence's first request without its features (the prompt's), which wait for its first
        drafted round (:meth:`_catch_up`); later requests as they are."""
        if request.seq_id in self._seen:
            return request
        self._seen.add(request.seq_id)
        if request.features is not None and len(request.features):
            self._prompts[request.seq_id] = (len(request.token_ids), request.features)
        return replace(request, features=None)

    def _catch_up(self, requests: list[DraftRequest]) -> None:
        """Give the drafter, in one call that drafts nothing (no nodes asked), the features each
        sequence's round does not bring itself: its prompt's (those of its first request) and
        those held since it was last drafted. Outside the round's timing: the gate prices a
        round as what drafting a sequence round after round costs. Timed with its round,
        DSpark's prompt cost about ten of its rounds, and the rows a probe catches up on (one a
        round sat out, some 40 us each here, a fraction of a percent of the plain steps they
        came with) priced every probe at several rounds: the gate, finding drafting dearer,
        probed less often, so each probe caught up on more, until it stopped drafting at all."""
        behind = []
        for r in requests:
            prompt = self._prompts.pop(r.seq_id, None)
            rows = [prompt[1]] if prompt is not None else []
            rows += self._held.pop(r.seq_id, [])
            if rows:  # the rows of token_ids[: -1 - present], present: the rows the request brings
                present = len(r.features) if r.features is not None else 0
                ids = r.token_ids[: len(r.token_ids) - present]
                behind.append(replace(r, token_ids=ids, features=torch.cat(rows), max_nodes=0))
        if behind:
            self.inner.propose(behind)

    def release(self, seq_id: int) -> None:
        self.inner.release(seq_id)
        for kept in (self._sent, self._held):
            kept.pop(seq_id, None)
        self._prompts.pop(seq_id, None)
        self._seen.discard(seq_id)
        if self.gate is not None:
            self.gate.forget(seq_id)
        if self.calibration is not None:
            self.calibration.forget(seq_id)

    def held(self) -> int:
        mine = max(len(self._sent), len(self._held), len(self._seen), self.gate.held() if self.gate else 0)
        return max(self.inner.held(), mine, self.calibration.held() if self.calibration else 0)
