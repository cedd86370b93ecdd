"""RoPE frequencies for the scaling schemes current checkpoints ship: ``linear`` (position
interpolation), ``dynamic`` (NTK), ``yarn`` (Qwen, DeepSeek) and ``llama3`` (Llama 3.1+).

Each scheme only changes the inverse frequencies (and, for YaRN, scales cos and sin by an
attention factor), so the tables are computed once and every position reads the same ones.
The numbers follow transformers' ``ROPE_INIT_FUNCTIONS``, which checkpoints were trained with.

``dynamic`` is the one scheme whose frequencies depend on the sequence: transformers recomputes
them when a pass reaches past ``max_position_embeddings`` (keyed by the pass's largest position).
Within that context its frequencies are the unscaled ones, and that context is all Tandem
serves (``ModelConfig.max_position``). Past it, a frequency set chosen by the pass's length
would differ between a speculative pass (tree nodes reach further) and plain decoding, which
would break exactness; so Tandem does not extend dynamic models beyond their declared context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tandem.errors import ModelLoadError

KINDS = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeParams:
    """One attention type's RoPE: base ``theta`` and the scaling scheme with its settings."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None  # the pretraining context (llama3, yarn)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None: from factor (and mscale)
    mscale: float | None = None  # yarn (DeepSeek)
    mscale_all_dim: float | None = None  # yarn (DeepSeek)
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    @classmethod
    def from_hf(cls, group: dict[str, Any], theta: float, max_position: int) -> RopeParams:
        """From one transformers rope dict (v5 ``rope_parameters`` or v4 ``rope_scaling``,
        where the scheme is ``rope_type`` or ``type``); ``theta`` when it names none."""
        kind = group.get("rope_type", group.get("type", "default"))
        if kind not in KINDS:
            raise ModelLoadError(f"RoPE scaling {kind!r} is not supported; supported: {list(KINDS)}")
        theta = float(group.get("rope_theta", theta))
        if kind == "default":
            return cls(theta)
        original = group.get("original_max_position_embeddings")
        if kind == "llama3" and original is None:
            raise ModelLoadError("llama3 RoPE scaling needs original_max_position_embeddings")
        original = int(original or max_position)
        factor = group.get("factor")
        if factor is None and kind == "yarn":  # DeepSeek: the context's growth is the factor
            factor = max_position / original
        if factor is None or float(factor) <= 0:
            raise ModelLoadError(f"{kind} RoPE scaling needs a positive factor, got {factor!r}")

        def number(key: str, default: float | None) -> float | None:
            value = group.get(key)
            return default if value is None else float(value)

        return cls(
            theta=theta,
            kind=kind,
            factor=float(factor),
            original_max_position=original,
            low_freq_factor=number("low_freq_factor", 1.0),
            high_freq_factor=number("high_freq_factor", 4.0),
            beta_fast=number("beta_fast", 32.0) or 32.0,
            beta_slow=number("beta_slow", 1.0) or 1.0,
            attention_factor=number("attention_factor", None),
            mscale=number("mscale", None),
            mscale_all_dim=number("mscale_all_dim", None),
            truncate=bool(group.get("truncate", True)),
        )


def inverse_frequencies(rope: RopeParams, head_dim: int) -> tuple[torch.Tensor, float]:
    """``[head_dim / 2]`` float32 inverse frequencies, and the factor cos and sin are scaled by."""
    powers = rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    inv_freq = 1.0 / powers  # also dynamic's, within the context served (see the module docstring)
    if rope.kind == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if rope.kind == "yarn":
        return _yarn(powers, rope, head_dim), _yarn_attention_factor(rope)
    return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, rope: RopeParams) -> torch.Tensor:
    """Long wavelengths (beyond the pretraining context / low_freq_factor) are stretched by
    ``factor``, short ones (below context / high_freq_factor) kept, and those between blended."""
    context = rope.original_max_position
    assert context is not None
    wavelength = 2 * math.pi / inv_freq
    stretched = torch.where(wavelength > context / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
    smooth = (context / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * stretched / rope.factor + smooth * stretched
    between = (wavelength >= context / rope.high_freq_factor) & (wavelength <= context / rope.low_freq_factor)
    return torch.where(between, blended, stretched)


def _yarn(powers: torch.Tensor, rope: RopeParams, head_dim: int) -> torch.Tensor:
    """Dimensions that turn fewer than ``beta_slow`` times over the pretraining context are
    interpolated (divided by ``factor``), more than ``beta_fast`` times kept, a linear ramp between."""
    context = rope.original_max_position
    assert context is not None

    def dimension(turns: float) -> float:  # the dimension whose wavelength fits `turns` times in the context
        return head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dimension(rope.beta_fast), dimension(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # the share of each dimension's frequency left as it was (extrapolated)
    return 1.0 / (rope.factor * powers) * (1 - kept) + 1.0 / powers * kept


def _yarn_attention_factor(rope: RopeParams) -> float:
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)
