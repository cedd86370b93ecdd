"""The in-process speculative decoding engine: prefill, then rounds of draft -> verify -> accept.

It is the embedded default and the reference every other path must match token for token.
Without a drafter every round's tree is just the anchor, which is plain decoding through the
very same forward, sampling and stop logic.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from tandem.drafters.base import Drafter, DraftRequest
from tandem.errors import InvalidRequest
from tandem.models.decoder import Transformer
from tandem.sampling import SamplingParams
from tandem.tree import TokenTree
from tandem.verifier import Step, Verifier


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Stats:
    """Counters of one request; τ = (accepted drafts + rounds) / rounds, as in the DSpark paper."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def tau(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


@dataclass
class Delta:
    """New output of one request after a step; ``finish_reason`` is set on its last delta."""

    index: int
    token_ids: list[int]
    finish_reason: str | None
    stats: Stats


@dataclass
class Result:
    token_ids: list[int]
    finish_reason: str
    stats: Stats


@dataclass
class _Sequence:
    seq_id: int  # unique for the engine's lifetime: drafters key per-sequence state on it
    index: int  # position in the caller's request list
    row: int  # the verifier's row
    params: SamplingParams  # with the seed resolved
    stop_ids: frozenset[int]
    token_ids: list[int]  # prompt + output; the last one is the anchor
    prompt_len: int
    features: torch.Tensor | None = None  # target features the drafter has not seen yet
    stats: Stats = field(default_factory=Stats)
    finish_reason: str | None = None

    @property
    def output(self) -> list[int]:
        return self.token_ids[self.prompt_len :]


class Engine:
    """Generates for a batch of requests of different lengths on one target model."""

    def __init__(
        self,
        model: Transformer,
        drafter: Drafter | None = None,
        eos_token_ids: Sequence[int] = (),
        decode: Callable[[list[int]], str] | None = None,
        max_draft_nodes: int = 16,
    ) -> None:
        self.model = model
        self.drafter = drafter
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode = decode
        self.max_draft_nodes = max_draft_nodes
        self.target_passes = 0
        self._seq_ids = itertools.count()

    @property
    def context_length(self) -> int:
        return self.model.config.max_position

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Run to completion; the results are in request order."""
        outputs: list[list[int]] = [[] for _ in requests]
        results: list[Result] = [None] * len(requests)  # type: ignore[list-item]
        for delta in self.stream(requests):
            outputs[delta.index].extend(delta.token_ids)
            if delta.finish_reason:
                results[delta.index] = Result(outputs[delta.index], delta.finish_reason, delta.stats)
        return results

    def stream(self, requests: Sequence[Request]) -> Iterator[Delta]:
        """Yield each request's new tokens after every target pass."""
        if not requests:
            raise InvalidRequest("no requests")
        if self.decode is None and any(r.params.stop for r in requests):
            raise InvalidRequest("stop strings need a tokenizer")
        room = self.max_draft_nodes + 1 if self.drafter else 1
        capacity = min(self.context_length, max(len(r.prompt_ids) + r.params.max_tokens + room for r in requests))
        layers = self.drafter.feature_layers if self.drafter else ()
        verifier = Verifier(self.model, len(requests), capacity, layers)
        for r in requests:  # all or nothing: check every prompt before any work
            verifier.check_prompt(r.prompt_ids)
        seqs = [self._new_sequence(i, r, verifier) for i, r in enumerate(requests)]
        try:
            for seq, step in zip(seqs, verifier.prefill([s.row for s in seqs])):
                yield self._advance(seq, step, verifier)
            live = [s for s in seqs if s.finish_reason is None]
            while live:
                trees = self._draft(live, verifier)
                for seq, tree, step in zip(live, trees, verifier.verify([s.row for s in live], trees)):
                    seq.stats.rounds += 1
                    seq.stats.drafted += len(tree) - 1
                    seq.stats.accepted += step.accepted
                    yield self._advance(seq, step, verifier)
                live = [s for s in live if s.finish_reason is None]
        finally:  # a consumer that stops early (abort, disconnect) must not leak drafter state
            self.target_passes += verifier.passes
            if self.drafter is not None:
                for seq in seqs:
                    if seq.finish_reason is None:
                        self.drafter.release(seq.seq_id)

    def _new_sequence(self, index: int, request: Request, verifier: Verifier) -> _Sequence:
        params = request.params
        if params.seed is None:
            params = replace(params, seed=random.getrandbits(63))
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        return _Sequence(
            seq_id=next(self._seq_ids),
            index=index,
            row=verifier.open(request.prompt_ids, params, params.seed),
            params=params,
            stop_ids=frozenset(stop_ids),
            token_ids=list(request.prompt_ids),
            prompt_len=len(request.prompt_ids),
        )

    def _draft(self, live: list[_Sequence], verifier: Verifier) -> list[TokenTree]:
        if self.drafter is None:
            return [TokenTree(torch.tensor([s.token_ids[-1]]), torch.tensor([-1])) for s in live]
        requests = []
        for s in live:
            # The anchor plus every draft node must fit in the cache, and drafting past
            # max_tokens is wasted work (the bonus token always comes on top).
            left = s.params.max_tokens - len(s.output) - 1
            budget = max(0, min(self.max_draft_nodes, verifier.room(s.row), left))
            requests.append(DraftRequest(s.seq_id, s.token_ids, budget, s.params, s.features))
            s.features = None
        return self.drafter.propose(requests)

    def _advance(self, seq: _Sequence, step: Step, verifier: Verifier) -> Delta:
        """Take a verifier step's tokens and features; free the row when the sequence is done."""
        seq.features = _append(seq.features, step.features)
        delta = self._emit(seq, step.tokens, verifier.capacity)
        if seq.finish_reason:
            verifier.close(seq.row)
        return delta

    def _emit(self, seq: _Sequence, new_ids: list[int], capacity: int) -> Delta:
        """Append accepted tokens up to the first stop condition and report them."""
        taken: list[int] = []
        for token in new_ids:
            taken.append(token)
            seq.token_ids.append(token)
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
            elif len(seq.output) >= seq.params.max_tokens or len(seq.token_ids) >= capacity:
                seq.finish_reason = "length"
            if seq.finish_reason:
                break
        if seq.params.stop and seq.finish_reason != "stop":
            cut = self._stop_string_cut(seq)
            if cut is not None:
                del taken[len(taken) - (len(seq.output) - cut) :]
                del seq.token_ids[seq.prompt_len + cut :]
                seq.finish_reason = "stop"
        if seq.finish_reason and self.drafter is not None:
            self.drafter.release(seq.seq_id)
        return Delta(seq.index, taken, seq.finish_reason, seq.stats)

    def _stop_string_cut(self, seq: _Sequence) -> int | None:
        """Length of the shortest output prefix whose text contains a stop string, if any."""
        output = seq.output
        if not any(s in self.decode(output) for s in seq.params.stop):
            return None
        for n in range(1, len(output) + 1):
            if any(s in self.decode(output[:n]) for s in seq.params.stop):
                return n
        return None


def _append(pending: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    if pending is None or new is None:
        return new if pending is None else pending
    return torch.cat([pending, new])
