"""The in-process speculative decoding engine: prefill, then rounds of draft -> verify -> accept.

It is the embedded default and the reference every other path must match token for token.
Without a drafter every round's tree is just the anchor, which is plain decoding through the
very same forward, sampling and stop logic.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tandem.drafters.base import Drafter, DraftRequest
from tandem.errors import InvalidRequest
from tandem.models.decoder import Transformer
from tandem.models.kv_cache import KVCache
from tandem.sampling import SamplingParams, sample, target_probs
from tandem.tree import TokenTree, ancestor_mask, tree_depths
from tandem.verify import verify_batch


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
    row: int
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator
    token_ids: list[int]  # prompt + output; the last one is the anchor
    prompt_len: int
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
        self._validate(requests)
        if self.decode is None and any(r.params.stop for r in requests):
            raise InvalidRequest("stop strings need a tokenizer")
        room = self.max_draft_nodes + 1 if self.drafter else 1
        capacity = min(self.context_length, max(len(r.prompt_ids) + r.params.max_tokens + room for r in requests))
        cache = self.model.new_cache(len(requests), capacity)
        seqs = [self._new_sequence(i, r) for i, r in enumerate(requests)]
        try:
            yield from self._prefill(seqs, cache)
            live = [s for s in seqs if s.finish_reason is None]
            while live:
                trees = self._draft(live, cache)
                logits = self._forward_trees(live, trees, cache)
                verdicts = verify_batch(trees, logits, [s.params for s in live], [s.generator for s in live])
                for seq, tree, verdict in zip(live, trees, verdicts):
                    cache.commit(seq.row, verdict.accepted_nodes)
                    seq.stats.rounds += 1
                    seq.stats.drafted += len(tree) - 1
                    seq.stats.accepted += verdict.accepted_drafts
                    yield self._emit(seq, verdict.emitted(tree), cache)
                live = [s for s in live if s.finish_reason is None]
        finally:  # a consumer that stops early (abort, disconnect) must not leak drafter state
            if self.drafter is not None:
                for seq in seqs:
                    if seq.finish_reason is None:
                        self.drafter.release(seq.seq_id)

    def _validate(self, requests: Sequence[Request]) -> None:
        if not requests:
            raise InvalidRequest("no requests")
        vocab = self.model.config.vocab_size
        for r in requests:
            if not r.prompt_ids:
                raise InvalidRequest("prompt is empty")
            if len(r.prompt_ids) >= self.context_length:
                raise InvalidRequest(
                    f"prompt has {len(r.prompt_ids)} tokens; the model's context is {self.context_length}"
                )
            if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= vocab:
                raise InvalidRequest(f"prompt token ids must lie in [0, {vocab})")

    def _new_sequence(self, index: int, request: Request) -> _Sequence:
        params = request.params
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        return _Sequence(
            seq_id=next(self._seq_ids),
            index=index,
            row=index,
            params=params,
            stop_ids=frozenset(stop_ids),
            generator=torch.Generator().manual_seed(seed),
            token_ids=list(request.prompt_ids),
            prompt_len=len(request.prompt_ids),
        )

    def _prefill(self, seqs: list[_Sequence], cache: KVCache) -> Iterator[Delta]:
        """One pass over all prompts (padded); the last prompt position gives the first token."""
        lengths = [s.prompt_len for s in seqs]
        longest = max(lengths)
        tokens = torch.zeros(len(seqs), longest, dtype=torch.long)
        for b, s in enumerate(seqs):
            tokens[b, : s.prompt_len] = torch.tensor(s.token_ids)
        depths = torch.arange(longest).expand(len(seqs), -1)
        causal = torch.ones(longest, longest, dtype=torch.bool).tril().expand(len(seqs), -1, -1)
        rows = torch.tensor([s.row for s in seqs])
        last = torch.tensor(lengths)[:, None] - 1
        logits = self.model(tokens, depths, causal, cache, rows, last)
        self.target_passes += 1
        for b, s in enumerate(seqs):
            cache.commit(s.row, range(s.prompt_len))
            first = sample(target_probs(logits[b, 0], s.params), s.generator)
            yield self._emit(s, [first], cache)

    def _draft(self, live: list[_Sequence], cache: KVCache) -> list[TokenTree]:
        if self.drafter is None:
            return [TokenTree(torch.tensor([s.token_ids[-1]]), torch.tensor([-1])) for s in live]
        requests = []
        for s in live:
            # The anchor plus every draft node must fit in the cache, and drafting past
            # max_tokens is wasted work (the bonus token always comes on top).
            room = cache.capacity - int(cache.lengths[s.row]) - 1
            left = s.params.max_tokens - len(s.output) - 1
            requests.append(DraftRequest(s.seq_id, s.token_ids, max(0, min(self.max_draft_nodes, room, left))))
        return self.drafter.propose(requests)

    def _forward_trees(self, live: list[_Sequence], trees: list[TokenTree], cache: KVCache) -> torch.Tensor:
        width = max(len(t) for t in trees)
        batch = len(trees)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        depths = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.eye(width, dtype=torch.bool).repeat(batch, 1, 1)  # padding sees itself only
        for b, tree in enumerate(trees):
            n = len(tree)
            tokens[b, :n] = tree.tokens
            depths[b, :n] = tree_depths(tree.parents)
            mask[b, :n, :n] = ancestor_mask(tree.parents)
        rows = torch.tensor([s.row for s in live])
        self.target_passes += 1
        return self.model(tokens, depths, mask, cache, rows)

    def _emit(self, seq: _Sequence, new_ids: list[int], cache: KVCache) -> Delta:
        """Append accepted tokens up to the first stop condition and report them."""
        taken: list[int] = []
        for token in new_ids:
            taken.append(token)
            seq.token_ids.append(token)
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
            elif len(seq.output) >= seq.params.max_tokens or len(seq.token_ids) >= cache.capacity:
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
