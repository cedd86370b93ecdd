"""Sampling parameters and the one logits -> probabilities transform.

Plain decoding and speculative verification both call :func:`target_probs`, so the
distribution speculation reproduces is, by construction, the one plain sampling draws from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tandem.errors import InvalidRequest

# Below this temperature decoding is greedy, as it is in the limit (vLLM does the same): dividing
# float32 logits by a smaller one overflows them to inf and the probabilities to NaN.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; ``temperature`` 0 (below ``MIN_TEMPERATURE``) means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # NaN fails too
            raise InvalidRequest(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be > 0, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (HF's order), over the last dim, in float32.

    Greedy requests get a one-hot on the argmax, so the same verification code covers them.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - params.top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


_MASK64 = (1 << 64) - 1


def round_seed(seed: int, position: int) -> int:
    """The seed of the target's draws in the round whose anchor sits at ``position``.

    A function of (seed, position) alone, not of a generator's history: a session resumed on
    another replica (after prefilling what it already emitted) draws exactly what it would have
    drawn. splitmix64's finaliser decorrelates neighbouring positions."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1  # 63 bits: any torch generator takes it


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from a 1-D distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))
