"""Drafters: one file each, one interface (:class:`tandem.drafters.base.Drafter`)."""

from __future__ import annotations

from tandem.drafters.base import Drafter, DraftRequest
from tandem.drafters.ngram import NgramDrafter
from tandem.errors import InvalidRequest

DRAFTERS = ("none", "ngram", "ngram-tree")


def make_drafter(name: str) -> Drafter | None:
    """A drafter by name; ``none`` means plain decoding."""
    if name == "none":
        return None
    if name == "ngram":
        return NgramDrafter(depth=8, branches=1)
    if name == "ngram-tree":
        return NgramDrafter(depth=6, branches=3)
    raise InvalidRequest(f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)}")


__all__ = ["DRAFTERS", "DraftRequest", "Drafter", "NgramDrafter", "make_drafter"]
