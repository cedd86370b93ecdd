"""The drafter training loop: AdamW, linear warmup then cosine decay, periodic checkpoints that a
rerun resumes, and a seed that fixes the data order and the sampled anchors.

With ``minutes`` the run stops at a wall-clock budget and the cosine decay follows the share of
the budget spent rather than of the steps, so drafters of different cost get the same time rather
than the same number of steps. (Fixing a step horizon from the warmup's speed went wrong when the
first steps were slow, e.g. reading a feature cache that was not in memory yet.)

With an ``evaluate`` callback the run measures the drafter every ``eval_every`` steps (and at the
start and the end) against the response tokens it has seen: the learning curve. Evaluation time
is not counted against the budget.

Data parallel when ``torch.distributed`` is initialised (``tandem train --workers N`` starts the
ranks through Ray Train): every rank draws the same global batch, scores its share of it (the
examples at positions ``rank, rank + N, ...``), and one all-reduce per step sums the gradients with
the step's counts. The gradient is then divided by the number of examples scored in the whole
batch, so N ranks take the very step one process takes on the same batch, up to float rounding.
An example's anchors are drawn from a generator seeded by (seed, step, position in the batch), not
by which rank scores it. Rank 0 alone evaluates, shows progress and keeps the clock that the
budget reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from tandem.devices import HOST, to_host
from tandem.drafters.dspark import DSparkModel
from tandem.drafters.neural import DraftModel
from tandem.models.decoder import Transformer
from tandem.sampling import round_seed
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


class Checkpointer(Protocol):
    """Where a run's state goes every ``checkpoint_every`` steps and comes back from on resume.
    ``save`` is called on every rank at the same steps (Ray Train reports are collective)."""

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


CHECKPOINT_FILE = "checkpoint.pt"  # in the drafter folder: what a rerun resumes from


class FileCheckpoint:
    """The state in one file (``<out>/checkpoint.pt``), written by rank 0, atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=False) if self.path.exists() else None

    def save(self, state: dict) -> None:
        if rank_and_world()[0] != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.rename(self.path)


def train(
    model: DraftModel,
    target: Transformer,
    store: Store,
    settings: TrainSettings,
    checkpoint: Path | Checkpointer | None = None,
    progress: bool = True,
    evaluate: Callable[[DraftModel], dict[str, Any]] | None = None,
) -> TrainResult:
    rank, world = rank_and_world()
    lead = rank == 0
    train_ids, held_ids = split(store, settings.holdout, settings.records)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))
    device = model.fc.weight.device
    generator = torch.Generator(device=HOST).manual_seed(settings.seed)  # draws each global batch
    budget = settings.minutes * 60 if settings.minutes is not None else None
    step, horizon, seconds = 0, (1 << 62) if budget else settings.steps, 0.0
    result = TrainResult(0, 0.0)
    saver = FileCheckpoint(checkpoint) if isinstance(checkpoint, Path) else checkpoint
    saved = saver.load() if saver is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        step, horizon, seconds = saved["step"], saved["horizon"], saved["seconds"]
        result.history, result.tokens, result.evals = saved["history"], saved["tokens"], saved["evals"]
    elif world > 1:
        for p in model.parameters():  # every rank starts from rank 0's weights, as DDP does
            dist.broadcast(p.data, 0)

    def measure() -> float:
        """Run ``evaluate`` (if due and not done yet for this step); returns the seconds it took."""
        if evaluate is None or not lead or (result.evals and result.evals[-1]["step"] == step):
            return 0.0
        begin = time.perf_counter()
        figures = evaluate(model)
        model.train()
        result.evals.append({"step": step, "tokens": result.tokens, "seconds": round(seconds, 1), **figures})
        bar.write(f"step {step}, {result.tokens} tokens: {figures}")
        return time.perf_counter() - begin

    total = None if budget else horizon  # with a budget the bar shows the steps done and their rate
    bar = tqdm(
        total=total, initial=step, desc=f"train {model.config.algo}", unit="step", disable=not progress or not lead
    )
    started = time.perf_counter() - seconds - measure()
    while step < min(horizon, settings.stop_at or horizon):
        for group in optimizer.param_groups:
            done = seconds / budget if budget else (step - settings.warmup) / max(1, horizon - settings.warmup)
            group["lr"] = settings.lr * _schedule(step, settings.warmup, done)
        batch = torch.randint(len(train_ids), (settings.batch_size,), generator=generator, device=HOST).tolist()
        losses, correct, counted, tokens = [], [], 0, 0
        for j in range(rank, len(batch), world):  # this rank's share of the global batch
            ex = store[train_ids[batch[j]]].to(device)
            tokens += ex.tokens.numel() - ex.prompt_len
            draws = torch.Generator(device=HOST).manual_seed(round_seed(round_seed(settings.seed, step), j))
            out = example_loss(model, ex, target, settings.samples, draws, settings.ce_weight)
            if out is not None:
                losses.append(out.loss)
                correct.append(out.correct)
                counted += out.counted
        optimizer.zero_grad(set_to_none=True)
        zero = torch.zeros((), device=device)
        loss_sum = torch.stack(losses).sum() if losses else zero
        if losses:
            loss_sum.backward()
        clock = time.perf_counter() - started if lead else 0.0  # the budget reads rank 0's clock
        counts = [len(losses), loss_sum.detach(), sum(correct, zero), counted, tokens, clock]
        scored, loss_total, right, counted, tokens, clock = _sum_over_ranks(params, counts, device, world)
        result.tokens += int(tokens)
        if not scored:
            continue
        for p in params:  # the mean over the examples scored in the whole batch
            if p.grad is not None:
                p.grad.div_(scored)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        seconds = clock
        record = {"step": step, "loss": loss_total / scored, "accuracy": right / max(counted, 1), "seconds": seconds}
        result.history.append(record)
        bar.update()
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
        if budget is not None and seconds >= budget:  # a hard limit
            horizon = step
        if (settings.eval_every and step % settings.eval_every == 0) or step == horizon:
            started += measure()
        if saver is not None and (step % settings.checkpoint_every == 0 or step in (horizon, settings.stop_at)):
            saver.save(_state(model, optimizer, generator, step, horizon, seconds, result))
    bar.close()
    model.eval()
    if isinstance(model, DSparkModel) and model.confidence is not None and held_ids and step == horizon and lead:
        calibrate_confidence(model, target, store, held_ids, settings.samples, settings.seed)
    result.steps, result.seconds = step, seconds
    return result


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the data-parallel world's size (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(params: list[torch.Tensor], counts: list, device: torch.device, world: int) -> list[float]:
    """Sum every rank's gradients (in place) and ``counts`` with one all-reduce; the summed counts
    come back as numbers, after the step's one host synchronisation. A parameter that no rank
    gave a gradient keeps none, so the optimizer skips it as a single process would. (float32
    holds the counts exactly: they stay far below 2**24.)"""
    stats = torch.stack([torch.as_tensor(c, dtype=torch.float32, device=device) for c in counts])
    if world > 1:
        touched = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params]
        flat = torch.cat([*grads, touched, stats])
        dist.all_reduce(flat)
        stats = flat[-len(counts) :]
        offset = 0
        for p, was in zip(params, flat[-len(counts) - len(params) : -len(counts)].tolist()):
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype) if was else None
            offset += p.numel()
    return [float(v) for v in to_host(stats)[0].tolist()]


def _schedule(step: int, warmup: int, done: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 5 % as ``done`` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, done))))


def _state(model, optimizer, generator, step, horizon, seconds, result: TrainResult) -> dict:
    return {
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
