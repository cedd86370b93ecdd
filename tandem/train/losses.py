"""Training objectives of the three drafters, each on one :class:`Example` (DeepSpec recipes).

- DFlash: cross-entropy of every block position, weighted ``exp(-k/γ)`` (``γ``: the config's
  ``decay``, the block size by default; DeepSpec uses 4).
- DSpark: ``c·CE + (1-c)·TV + BCE(confidence, 1 - TV)`` (``c`` = 0.1 by default; DeepSpec's L1
  distance with ``distance: l1``), each weighted ``exp(-k/γ)``; TV is the
  total-variation distance between the draft and target distributions (tokens outside the draft
  vocabulary count as draft mass 0), and ``1 - TV`` is the chance a sampled draft token survives.
- EAGLE-3: cross-entropy at every step of training-time test, weighted ``exp(-j/γ)``: the layer
  runs only the sampled chains, on its own outputs, as it drafts (:meth:`Eagle3Model.chains`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.devices import HOST
from tandem.drafters.dflash import DFlashModel
from tandem.drafters.dspark import DSparkModel
from tandem.drafters.eagle3 import Eagle3Model
from tandem.drafters.neural import DraftModel
from tandem.models.decoder import Transformer
from tandem.train.features import Example


@dataclass
class LossOut:
    loss: torch.Tensor
    correct: torch.Tensor  # first-position draft argmax equal to the label (a count, on the device)
    counted: int  # first positions scored


def example_loss(
    model: DraftModel,
    ex: Example,
    target: Transformer,
    samples: int,
    generator: torch.Generator,
    ce_weight: float = 0.1,
) -> LossOut | None:
    """The model's objective on ``samples`` random anchors (blocks) or positions (EAGLE-3) of
    ``ex``'s response; ``None`` when the response is too short to score."""
    if isinstance(model, Eagle3Model):
        return eagle3_loss(model, ex, samples, generator)
    return block_loss(model, ex, target, samples, generator, ce_weight)


def choose(first: int, end: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
    """``k`` distinct positions of ``[first, end)``, increasing, drawn with the host ``generator``
    and put on ``device``; ``None`` when the range is empty."""
    if end <= first:
        return None
    picked = torch.randperm(end - first, generator=generator, device=HOST)[:k].sort().values + first
    return picked.to(device, non_blocking=True)


@dataclass
class BlockOutputs:
    """A block drafter's outputs on chosen anchors of one example, ``[A, γ]`` per position."""

    logits: torch.Tensor  # [A, γ, V_draft] (DSpark: with the Markov bias, teacher-forced)
    labels: torch.Tensor  # draft ids; ``draft_vocab`` = outside the draft vocabulary
    weights: torch.Tensor  # exp(-k/γ), 0 past the end of the sequence
    tv: torch.Tensor | None = None  # DSpark: total variation to the target at each position
    distance: torch.Tensor | None = None  # DSpark: the trained distance term (TV, or L1 = 2 TV)
    confidence: torch.Tensor | None = None  # DSpark: confidence logits


def block_outputs(model: DFlashModel, ex: Example, target: Transformer, anchors: torch.Tensor) -> BlockOutputs:
    n, gamma = ex.tokens.numel(), model.config.drafts
    hidden, _ = model.blocks(ex.tokens, ex.features, anchors)
    slots = torch.arange(gamma, device=anchors.device)
    positions = anchors[:, None] + slots  # block slot k predicts the token after position
    valid = positions + 1 < n
    positions = positions.clamp(max=n - 2)
    out = BlockOutputs(
        logits=model.draft_logits(hidden),
        labels=model.to_draft[ex.labels[positions]],
        weights=torch.exp(-slots / model.config.decay) * valid,
    )
    if isinstance(model, DSparkModel):
        code, bias = model.transition(ex.tokens[positions])  # teacher forcing: the true previous token
        out.logits = out.logits + bias
        with torch.no_grad():  # the target's probabilities of the draft vocabulary only
            final = ex.final[positions].to(target.dtype)
            p = torch.exp(target.logits(final, model.target_lm_head) - ex.lse[positions, None])
        q = torch.softmax(out.logits, -1)
        out.tv = 0.5 * ((p - q).abs().sum(-1) + (1 - p.sum(-1)).clamp(min=0))
        out.distance = out.tv * (2 if model.config.distance == "l1" else 1)
        out.confidence = model.confidence_logits(hidden, code)
    return out


def block_loss(
    model: DFlashModel,
    ex: Example,
    target: Transformer,
    samples: int,
    generator: torch.Generator,
    ce_weight: float = 0.1,
) -> LossOut | None:
    # The anchor is the last verified token; its own features are not known yet (causal context).
    anchors = choose(max(ex.prompt_len, 1), ex.tokens.numel() - 1, samples, generator, ex.tokens.device)
    if anchors is None:
        return None
    out = block_outputs(model, ex, target, anchors)
    ignore = model.config.draft_vocab
    ce = F.cross_entropy(out.logits.flatten(0, 1), out.labels.flatten(), ignore_index=ignore, reduction="none")
    per_position = ce.view_as(out.weights)
    if out.distance is not None:
        per_position = ce_weight * per_position + (1 - ce_weight) * out.distance
    if out.confidence is not None:
        per_position = per_position + F.binary_cross_entropy_with_logits(
            out.confidence, (1 - out.tv).detach(), reduction="none"
        )
    loss = (per_position * out.weights).sum() / out.weights.sum()
    correct = (out.logits[:, 0].argmax(-1) == out.labels[:, 0]).sum()
    return LossOut(loss, correct, len(anchors))


def eagle3_loss(model: Eagle3Model, ex: Example, samples: int, generator: torch.Generator) -> LossOut | None:
    """Cross-entropy along each sampled draft chain; step ``j`` predicts ``x_{a+j+2}``."""
    n, gamma = ex.tokens.numel(), model.config.block_size
    # Anchor a: the last position whose features are known (the prompt's last token after prefill).
    anchors = choose(max(ex.prompt_len, 1) - 1, n - 2, samples, generator, ex.tokens.device)
    if anchors is None:
        return None
    steps = torch.arange(gamma, device=anchors.device)  # the whole chain it drafts: cheap now that only chains run
    outputs = torch.stack(model.chains(ex.tokens, ex.features, anchors, len(steps)), 1)  # [A, steps, d]
    targets = anchors[:, None] + steps + 2
    labels = model.to_draft[ex.labels[targets.clamp(max=n - 1) - 1]]
    weights = torch.exp(-steps / model.config.decay) * (targets < n) * (labels != model.config.draft_vocab)
    logits = model.draft_logits(outputs)
    ignore = model.config.draft_vocab
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore, reduction="none")
    # every label outside the draft vocabulary: weight 0, loss 0 (no host round trip to find out)
    loss = (ce.view_as(weights) * weights).sum() / weights.sum().clamp_min(1e-9)
    correct = (logits[:, 0].argmax(-1) == labels[:, 0]).sum()
    return LossOut(loss, correct, len(anchors))
