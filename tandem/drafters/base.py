"""The one interface every drafter implements (vLLM style: one proposer per file)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tandem.sampling import SamplingParams
from tandem.tree import TokenTree


@dataclass(frozen=True)
class DraftRequest:
    """What a drafter knows about one sequence at the start of a round."""

    seq_id: int
    token_ids: Sequence[int]  # prompt + output so far; the last one is the anchor x0
    max_nodes: int  # draft nodes allowed below the root (cache room and tokens left)
    params: SamplingParams = field(default_factory=SamplingParams)  # the target's; seed resolved
    # Target features (``Drafter.feature_layers``, concatenated) of the tokens verified since the
    # last request for this sequence: rows for ``token_ids[-1 - n : -1]``. The anchor's own
    # features come with the next round, after the target has seen it.
    features: torch.Tensor | None = None


class Drafter(ABC):
    """Turns each sequence's state into a token tree rooted at its anchor."""

    name: str
    feature_layers: tuple[int, ...] = ()  # target layers whose hidden states this drafter reads

    @abstractmethod
    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        """One tree per request, in order; a root-only tree means "no guess"."""

    def release(self, seq_id: int) -> None:  # noqa: B027 - stateless drafters keep nothing
        """Forget what is kept for ``seq_id`` (its sequence finished or was aborted)."""

    def held(self) -> int:
        """Sequences whose state this drafter keeps: back to 0 once every one is released (a
        serving replica reports it, so a leak shows)."""
        return 0
