"""The in-process speculative decoding engine: prefill, then rounds of draft -> verify -> accept.

It is the embedded default and the reference every other path must match token for token.
Without a drafter every round's tree is just the anchor, which is plain decoding through the
very same forward, sampling and stop logic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from tandem.drafters.base import Drafter
from tandem.errors import InvalidRequest
from tandem.models.decoder import Transformer
from tandem.prefix_cache import PrefixCache
from tandem.sampling import SamplingParams
from tandem.sequence import SequenceState, Stats
from tandem.tree import TokenTree, chain
from tandem.verifier import Step, Verifier


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


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
    index: int  # position in the caller's request list
    row: int  # the verifier's row
    state: SequenceState


class Engine:
    """Generates for a batch of requests of different lengths on one target model."""

    def __init__(
        self,
        model: Transformer,
        drafter: Drafter | None = None,
        eos_token_ids: Sequence[int] = (),
        decode: Callable[[list[int]], str] | None = None,
        max_draft_nodes: int = 16,
        prefill_chunk: int | None = 512,
        prefix_cache_blocks: int = 0,
        block_size: int = 16,
    ) -> None:
        """``prefill_chunk``: prompt tokens per prefill pass (None: whole prompts), which bounds
        a pass's activations whatever the prompt's length. Each call's sequences take the KV-cache
        blocks they can fill. ``prefix_cache_blocks``: blocks of ``block_size`` tokens kept across
        calls beyond that, so a prompt that starts like an earlier one (or an earlier reply)
        skips that part of its prefill (0: no prefix caching)."""
        self.model = model
        self.drafter = drafter
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode = decode
        self.max_draft_nodes = max_draft_nodes
        self.prefill_chunk = prefill_chunk
        self.feature_layers = tuple(drafter.feature_layers) if drafter else ()
        self.prefix_cache_blocks = prefix_cache_blocks
        self.block_size = block_size
        self.prefix_cache: PrefixCache | None = None  # with its pool, made by the first call
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
        verifier = self._verifier(requests)
        for r in requests:  # all or nothing: check every prompt before any work
            verifier.check_prompt(r.prompt_ids)
        seqs = [self._new_sequence(i, r, verifier) for i, r in enumerate(requests)]
        try:
            for seq, step in zip(seqs, verifier.prefill([s.row for s in seqs], self.prefill_chunk)):
                yield self._advance(seq, step, verifier)
            live = [s for s in seqs if s.state.finish_reason is None]
            while live:
                trees = self._draft(live, verifier)
                for seq, tree, step in zip(live, trees, verifier.verify([s.row for s in live], trees)):
                    seq.state.record_round(len(tree) - 1, step.accepted)
                    yield self._advance(seq, step, verifier)
                live = [s for s in live if s.state.finish_reason is None]
        finally:  # a consumer that stops early (abort, disconnect) must not leak drafter state
            self.target_passes += verifier.passes
            if self.drafter is not None:
                for seq in seqs:
                    if seq.state.finish_reason is None:
                        self.drafter.release(seq.state.seq_id)

    def _verifier(self, requests: Sequence[Request]) -> Verifier:
        """A verifier whose cache has a row and, for every request, the blocks it can fill: its
        prompt, its output and a round's tree, or a prefill pass's padding to the longest part."""
        room = self.max_draft_nodes + 1 if self.drafter else 1
        wants = [len(r.prompt_ids) + r.params.max_tokens + room for r in requests]
        capacity = min(self.context_length, max(wants))
        padded = min(max(len(r.prompt_ids) for r in requests), self.prefill_chunk or capacity)
        size = self.block_size
        blocks = sum(-(-min(capacity, max(want, padded)) // size) for want in wants)
        if not self.prefix_cache_blocks:
            return Verifier(self.model, len(requests), capacity, self.feature_layers, kv_blocks=blocks, block_size=size)
        blocks += self.prefix_cache_blocks
        if self.prefix_cache is None:
            cache = self.model.new_cache(len(requests), capacity, blocks, size)
            self.prefix_cache = PrefixCache(cache, self.feature_layers)
        cache = self.prefix_cache.cache
        cache.grow(len(requests) + len(cache.taken), blocks + cache.blocks_in_use, capacity)
        return Verifier(self.model, len(requests), capacity, self.feature_layers, cache=cache)

    def _new_sequence(self, index: int, request: Request, verifier: Verifier) -> _Sequence:
        state = SequenceState.start(
            next(self._seq_ids), request.prompt_ids, request.params, self.eos_token_ids, verifier.capacity, self.decode
        )
        return _Sequence(index, verifier.open(request.prompt_ids, state.params, state.params.seed), state)

    def _draft(self, live: list[_Sequence], verifier: Verifier) -> list[TokenTree]:
        if self.drafter is None:
            return [chain(s.state.token_ids[-1], []) for s in live]
        return self.drafter.propose([s.state.draft_request(self.max_draft_nodes, verifier.room(s.row)) for s in live])

    def _advance(self, seq: _Sequence, step: Step, verifier: Verifier) -> Delta:
        """Take a verifier step; free the row and the drafter's state when the sequence is done."""
        state = seq.state
        taken = state.advance(step)
        if state.finish_reason:
            verifier.close(seq.row)
            if self.drafter is not None:
                self.drafter.release(state.seq_id)
        return Delta(seq.index, taken, state.finish_reason, state.stats)
