"""Prefix-aware placement of target sessions (SGLang's cache-aware routing, approximated): a session
goes to the target replica most likely to hold its prompt's blocks in its prefix cache, unless that
replica is busier than the least busy by more than ``balance`` sessions; otherwise, and for a
prompt no replica has seen, Serve's power-of-two choices.

Each router process keeps, per target replica, the chained hashes of the full prompt blocks it
placed there (most recent last, a bounded number). What a replica actually caches is not asked:
blocks age out of its pool under load, and another router places sessions too, so this is a
guess that costs one lookup per placement; a wrong guess costs only the prefill that any other
replica would have done.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RunningReplica

PREFIX_BLOCKS = 64  # leading blocks of a prompt a placement looks at
BLOCKS_REMEMBERED = 1 << 16  # per replica


def prefix_hashes(token_ids: Sequence[int], block_size: int, limit: int = PREFIX_BLOCKS) -> list[int]:
    """Chained hashes of the prompt's leading full blocks (the last token excluded, as the prefix
    cache never serves it): block ``i``'s names it and every block before it, as the replica's
    index does. Python's hash of a tuple of ints is the same in every process."""
    hashes, chained = [], 0
    for start in range(0, min(len(token_ids) - block_size, limit * block_size), block_size):
        chained = hash((chained, tuple(token_ids[start : start + block_size])))
        hashes.append(chained)
    return hashes


class PrefixAwareRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's request router for the target deployment; placements pass ``prefix`` (from
    :func:`prefix_hashes`) as a keyword argument."""

    def initialize_state(self, balance: int = 8, **kwargs: Any) -> None:
        self.balance = balance
        self._seen: dict[ReplicaID, OrderedDict[int, None]] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        fallback = await super().choose_replicas(candidate_replicas, pending_request)
        hashes = _prefix(pending_request)
        best, matched = None, 0
        for replica in candidate_replicas if hashes else ():
            seen = self._seen.get(replica.replica_id, {})
            n = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
            if n > matched:
                best, matched = replica, n
        if best is None:
            return fallback
        loads = self.replica_queue_len_cache
        known = [q for r in candidate_replicas if (q := loads.get(r.replica_id)) is not None]
        if known and (loads.get(best.replica_id) or 0) - min(known) > self.balance:
            return fallback  # the replica with the prefix is too busy: balance the load instead
        return [[best], *fallback]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        hashes = _prefix(pending_request)
        if not hashes:
            return
        seen = self._seen.setdefault(replica_id, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > BLOCKS_REMEMBERED:
            seen.popitem(last=False)


def _prefix(pending_request: PendingRequest | None) -> list[int]:
    return list(pending_request.kwargs.get("prefix", ())) if pending_request is not None else []
