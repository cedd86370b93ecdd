"""The drafter training loop: AdamW, linear warmup then cosine decay, periodic checkpoints that a
rerun resumes, and a seed that fixes the data order and the sampled anchors.

With ``minutes`` the run stops at a wall-clock budget and the cosine decay follows the share of
the budget spent rather than of the steps, so drafters of different cost get the same time rather
than the same number of steps. (Fixing a step horizon from the warmup's speed went wrong when the
first steps were slow, e.g. reading a feature cache that was not in memory yet.)

With an ``evaluate`` callback the run measures the drafter every ``eval_every`` steps (and at the
start and the end) against the response tokens it has seen: the learning curve. Evaluation time
is not counted against the budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tandem.devices import HOST, to_host
from tandem.drafters.dspark import DSparkModel
from tandem.drafters.neural import DraftModel
from tandem.models.decoder import Transformer
from tandem.train.features import Store
from tandem.train.losses import block_outputs, choose, example_loss


@dataclass
class TrainSettings:
    steps: int = 1000
    minutes: float | None = None  # wall-clock budget (overrides ``steps`` as the horizon)
    batch_size: int = 8  # sequences per step
    samples: int = 16  # blocks (dflash/dspark) or positions per step (eagle3) per sequence
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 50
    holdout: float = 0.02  # share of examples kept for validation and calibration
    stop_at: int | None = None  # end this run after this step; a rerun resumes from the checkpoint
    ce_weight: float = 0.1  # dspark: weight of cross-entropy against (1 - it) total variation
    eval_every: int = 0  # steps between calls of ``evaluate`` (0: only at the start and the end)
    records: int | None = None  # train on the first ``records`` training examples only (data ablations)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int = 0  # response tokens of the sequences drawn so far
    history: list[dict[str, float]] = field(default_factory=list)  # per step: loss, accuracy
    evals: list[dict] = field(default_factory=list)  # step, tokens, seconds and what evaluate returned


def split(store: Store, holdout: float, records: int | None = None) -> tuple[list[int], list[int]]:
    """Training and held-out example indices: the last ``holdout`` share is held out, and at most
    the first ``records`` of the rest are trained on."""
    held = max(1, int(len(store) * holdout)) if len(store) > 1 else 0
    return list(range(len(store) - held))[:records], list(range(len(store) - held, len(store)))


def train(
    model: DraftModel,
    target: Transformer,
    store: Store,
    settings: TrainSettings,
    checkpoint: Path | None = None,
    progress: bool = True,
    evaluate: Callable[[DraftModel], dict[str, Any]] | None = None,
) -> TrainResult:
    train_ids, held_ids = split(store, settings.holdout, settings.records)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))
    device = model.fc.weight.device
    generator = torch.Generator(device=HOST).manual_seed(settings.seed)  # draws what to train on
    budget = settings.minutes * 60 if settings.minutes is not None else None
    step, horizon, seconds = 0, (1 << 62) if budget else settings.steps, 0.0
    result = TrainResult(0, 0.0)
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        step, horizon, seconds = saved["step"], saved["horizon"], saved["seconds"]
        result.history, result.tokens, result.evals = saved["history"], saved["tokens"], saved["evals"]

    def measure() -> float:
        """Run ``evaluate`` (if due and not done yet for this step); returns the seconds it took."""
        if evaluate is None or (result.evals and result.evals[-1]["step"] == step):
            return 0.0
        begin = time.perf_counter()
        figures = evaluate(model)
        model.train()
        result.evals.append({"step": step, "tokens": result.tokens, "seconds": round(seconds, 1), **figures})
        bar.write(f"step {step}, {result.tokens} tokens: {figures}")
        return time.perf_counter() - begin

    total = None if budget else horizon  # with a budget the bar shows the steps done and their rate
    bar = tqdm(total=total, initial=step, desc=f"train {model.config.algo}", unit="step", disable=not progress)
    started = time.perf_counter() - seconds - measure()
    while step < min(horizon, settings.stop_at or horizon):
        for group in optimizer.param_groups:
            done = seconds / budget if budget else (step - settings.warmup) / max(1, horizon - settings.warmup)
            group["lr"] = settings.lr * _schedule(step, settings.warmup, done)
        batch = torch.randint(len(train_ids), (settings.batch_size,), generator=generator, device=HOST).tolist()
        losses, correct, counted = [], [], 0
        for i in batch:
            ex = store[train_ids[i]].to(device)
            result.tokens += ex.tokens.numel() - ex.prompt_len
            out = example_loss(model, ex, target, settings.samples, generator, settings.ce_weight)
            if out is not None:
                losses.append(out.loss)
                correct.append(out.correct)
                counted += out.counted
        if not losses:
            continue
        loss = torch.stack(losses).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        seconds = time.perf_counter() - started
        loss_value, right = to_host(loss.detach(), torch.stack(correct).sum())  # the step's one sync
        record = {"step": step, "loss": float(loss_value), "accuracy": int(right) / max(counted, 1), "seconds": seconds}
        result.history.append(record)
        bar.update()
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
        if budget is not None and seconds >= budget:  # a hard limit
            horizon = step
        if (settings.eval_every and step % settings.eval_every == 0) or step == horizon:
            started += measure()
        if checkpoint is not None and (step % settings.checkpoint_every == 0 or step in (horizon, settings.stop_at)):
            _save(checkpoint, model, optimizer, generator, step, horizon, seconds, result)
    bar.close()
    model.eval()
    if isinstance(model, DSparkModel) and model.confidence is not None and held_ids and step == horizon:
        calibrate_confidence(model, target, store, held_ids, settings.samples, settings.seed)
    result.steps, result.seconds = step, seconds
    return result


def _schedule(step: int, warmup: int, done: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 5 % as ``done`` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, done))))


def _save(path: Path, model, optimizer, generator, step, horizon, seconds, result: TrainResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "step": step,
        "horizon": horizon,
        "seconds": seconds,
        "history": result.history,
        "tokens": result.tokens,
        "evals": result.evals,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.rename(path)


@torch.no_grad()
def calibrate_confidence(
    model: DSparkModel, target: Transformer, store: Store, ids: list[int], samples: int, seed: int
) -> list[float]:
    """Temperature scaling per block position: the temperature that minimises the confidence
    head's cross-entropy against ``1 - TV`` on held-out examples; stored in the config."""
    generator = torch.Generator(device=HOST).manual_seed(seed)
    gamma, device = model.config.drafts, model.fc.weight.device
    logits: list[list[torch.Tensor]] = [[] for _ in range(gamma)]
    goals: list[list[torch.Tensor]] = [[] for _ in range(gamma)]
    for i in ids:
        ex = store[i].to(device)
        anchors = choose(max(ex.prompt_len, 1), ex.tokens.numel() - gamma - 1, samples, generator, device)
        if anchors is None:  # short: none
            continue
        out = block_outputs(model, ex, target, anchors)
        for k in range(gamma):
            logits[k].append(out.confidence[:, k])
            goals[k].append(1 - out.tv[:, k])
    grid = torch.logspace(-1, 1, 41, device=device)
    temps = []
    for k in range(gamma):
        if not logits[k]:
            temps.append(1.0)
            continue
        z, y = torch.cat(logits[k]), torch.cat(goals[k])
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        errors = bce(z[None] / grid[:, None], y.expand(len(grid), -1), reduction="none").mean(-1)
        (best,) = to_host(grid[errors.argmin()])
        temps.append(round(float(best), 4))
    model.config.confidence_temperature = temps
    return temps
