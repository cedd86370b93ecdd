"""One sequence's decoding state: what it has emitted, when it stops, what its drafter sees next.

The in-process engine and the cluster's router both drive sequences through it, so they take the
same draft budget and stop at the very same token.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from tandem.drafters.base import DraftRequest
from tandem.sampling import SamplingParams
from tandem.tokenizer import IncrementalDecoder
from tandem.verifier import Step


@dataclass
class Stats:
    """Counters of one request; τ = (accepted drafts + rounds) / rounds, as in the DSpark paper."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache served (OpenAI's usage.prompt_tokens_details)

    @property
    def tau(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def with_seed(params: SamplingParams) -> SamplingParams:
    """``params`` with a random seed where none was given, so every pass of a sequence shares one."""
    return params if params.seed is not None else replace(params, seed=random.getrandbits(63))


def draft_budget(max_nodes: int, room: int, max_tokens: int, generated: int) -> int:
    """Draft nodes a round may take: the anchor plus every node must fit in the cache (``room``),
    and drafting past max_tokens is wasted work (the bonus token always comes on top)."""
    return max(0, min(max_nodes, room, max_tokens - generated - 1))


@dataclass
class SequenceState:
    seq_id: int  # unique among live sequences of one drafter: it keys the drafter's state
    params: SamplingParams  # with the seed resolved
    stop_ids: frozenset[int]
    token_ids: list[int]  # prompt + output; the last one is the anchor
    prompt_len: int
    capacity: int  # tokens the target's cache row holds: reaching it ends the sequence
    decode: Callable[[list[int]], str] | None = None  # needed for stop strings
    features: torch.Tensor | None = None  # target features the drafter has not seen yet
    stats: Stats = field(default_factory=Stats)
    finish_reason: str | None = None
    text: IncrementalDecoder | None = None  # the output's text, kept where stop strings need it

    def __post_init__(self) -> None:
        if self.params.stop and self.decode is not None:
            self.text = IncrementalDecoder(self.decode)

    @classmethod
    def start(
        cls,
        seq_id: int,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos_token_ids: Sequence[int],
        capacity: int,
        decode: Callable[[list[int]], str] | None = None,
        output: Sequence[int] = (),
    ) -> SequenceState:
        """``output``: tokens already emitted (a stream continued after its router was lost); they
        count toward max_tokens, and a stop string may begin in them."""
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        token_ids = [*prompt_ids, *output]
        state = cls(seq_id, with_seed(params), frozenset(stop_ids), token_ids, len(prompt_ids), capacity, decode)
        if state.text is not None:
            state.text.push(list(output))
        return state

    @property
    def output(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    def draft_request(self, max_nodes: int, room: int) -> DraftRequest:
        """The next round's request; it hands over (and forgets) the features gathered so far."""
        budget = draft_budget(max_nodes, room, self.params.max_tokens, len(self.output))
        request = DraftRequest(self.seq_id, self.token_ids, budget, self.params, self.features)
        self.features = None
        return request

    def record_round(self, drafted: int, accepted: int) -> None:
        self.stats.rounds += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted

    def advance(self, step: Step) -> list[int]:
        """Take a target step's tokens up to the first stop condition; returns the tokens kept."""
        self.features = _append(self.features, step.features)
        self.stats.cached_tokens += step.cached_tokens
        taken: list[int] = []
        for token in step.tokens:
            taken.append(token)
            self.token_ids.append(token)
            if token in self.stop_ids:
                self.finish_reason = "stop"
            elif len(self.output) >= self.params.max_tokens or len(self.token_ids) >= self.capacity:
                self.finish_reason = "length"
            if self.finish_reason:
                break
        if self.text is not None and self.finish_reason != "stop":
            cut = self._stop_string_cut(taken)
            if cut is not None:
                del taken[len(taken) - (len(self.output) - cut) :]
                del self.token_ids[self.prompt_len + cut :]
                self.finish_reason = "stop"
        return taken

    def _stop_string_cut(self, new_ids: list[int]) -> int | None:
        """Length of the shortest output prefix whose text contains a stop string, if any; only
        the new ids are decoded, and only text a stop could newly end in is searched."""
        assert self.text is not None
        longest = max(len(s) for s in self.params.stop)
        start = max(0, len(self.text.text) - longest + 1)
        self.text.push(new_ids)
        found = [i + len(s) for s in self.params.stop if (i := self.text.text.find(s, start)) >= 0]
        if not found:
            return None
        return bisect.bisect_left(self.text.ends, min(found))


def _append(pending: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    if pending is None or new is None:
        return new if pending is None else pending
    return torch.cat([pending, new])
