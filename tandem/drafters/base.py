"""The one interface every drafter implements (vLLM style: one proposer per file)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.tree import TokenTree


@dataclass(frozen=True)
class DraftRequest:
    """What a drafter knows about one sequence at the start of a round."""

    seq_id: int
    token_ids: Sequence[int]  # prompt + output so far; the last one is the anchor x0
    max_nodes: int  # draft nodes allowed below the root (cache room and tokens left)


class Drafter(ABC):
    """Turns each sequence's state into a token tree rooted at its anchor."""

    name: str

    @abstractmethod
    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        """One tree per request, in order; a root-only tree means "no guess"."""

    def release(self, seq_id: int) -> None:  # noqa: B027 - stateless drafters keep nothing
        """Forget what is kept for ``seq_id`` (its sequence finished or was aborted)."""
