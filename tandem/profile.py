"""``tandem profile``: what one verification pass costs on this machine, by batch size and tree
width, for the draft scheduler (:mod:`tandem.scheduler`).

Measured once per model, dtype and machine through the real :class:`Verifier` (masks, sampling
and cache commits included) and kept in the cache folder; ``tandem generate`` and ``tandem serve``
measure on first use. Batches go up to what a replica holds (32 sequences by default), and a few
passes after a long prefix give attention's cost per cached key. The prefixes are not prefilled:
a row's cached length is set, since what a pass costs does not depend on the values it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from tandem.cache import cache_root
from tandem.devices import HOST
from tandem.drafters.base import Drafter
from tandem.models.decoder import Transformer
from tandem.sampling import SamplingParams
from tandem.scheduler import PassCost, ScheduledDrafter
from tandem.tree import chain
from tandem.verifier import Verifier

BATCHES = (1, 2, 4, 8, 16, 32)
WIDTHS = (1, 2, 3, 5, 9, 17)  # anchor + 0, 1, 2, 4, 8, 16 draft tokens
PROMPT_TOKENS = 64  # the prefix of the table's passes
LONG_CONTEXT = 1024  # the prefix of the passes that price attention per cached key
LONG_CELLS = ((1, 1), (1, 9), (4, 5), (16, 1))  # (batch, width) measured at both prefixes
LAYOUT = 3  # bumped when what a profile holds changes: older ones are measured again


def machine_id(device: torch.device = HOST) -> str:
    """What the timings depend on besides the model: processor, the device it runs on, threads."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{cpu}|{accelerator}|threads={torch.get_num_threads()}"


def profile_path(model_name: str, dtype: torch.dtype, device: torch.device = HOST, kernels: str = "stock") -> Path:
    """Where the profile of one model, dtype, machine and set of kernels (``Transformer.kernels``:
    each costs differently by width) is stored."""
    key = f"{model_name}|{dtype}|{machine_id(device)}|{kernels}|layout{LAYOUT}"
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(model_name)).name)
    return cache_root() / "profiles" / f"{safe}-{str(dtype).removeprefix('torch.')}-{key}.json"


def measure(
    model: Transformer,
    batches: Sequence[int] = BATCHES,
    widths: Sequence[int] = WIDTHS,
    repeats: int = 11,
    progress: Callable[[str], None] | None = None,
    long_cells: Sequence[tuple[int, int]] = LONG_CELLS,
) -> PassCost:
    """Median seconds of :meth:`Verifier.verify` for every batch size and width after a
    :data:`PROMPT_TOKENS` prefix (chains of random draft tokens under greedy verification, after
    one warm-up pass each), and attention's seconds per query token and cached key, fitted to
    ``long_cells`` measured again after a :data:`LONG_CONTEXT` prefix.

    The cells are measured in ``repeats`` sweeps, one pass of each per sweep, in an order that
    changes every sweep: a slow spell of a shared machine then falls on every cell alike, not on
    the few measured during it, and the gate decides by the cells' ratios (a wide pass against
    a plain one). Between three profiles of one machine those ratios moved by 13 % (median; 46 %
    at most) measured cell by cell, 5 passes each; in 11 sweeps, by 3.0 % (6.5 % at most:
    ``bench/profile_spread.py``)."""
    g = torch.Generator(device=HOST).manual_seed(0)
    vocab = model.config.vocab_size
    long = min(LONG_CONTEXT, model.config.max_position - max(widths) - 1)
    long_cells = long_cells if long > 2 * PROMPT_TOKENS else ()
    cells = [(b, w, PROMPT_TOKENS) for b in batches for w in widths] + [(b, w, long) for b, w in long_cells]
    rows_of: dict[tuple[int, int], tuple[Verifier, list[int], list[int]]] = {}
    for batch, context in dict.fromkeys((b, c) for b, _, c in cells):  # a verifier per batch and prefix
        verifier = Verifier(model, batch, context + max(widths) + 1)
        rows = [verifier.open([int(t)], SamplingParams(), seed=0) for t in torch.randint(vocab, (batch,), generator=g)]
        rows_of[batch, context] = verifier, rows, [step.tokens[-1] for step in verifier.prefill(rows)]

    def timed(batch: int, width: int, context: int) -> float:
        verifier, rows, anchors = rows_of[batch, context]
        for row in rows:  # every pass after the same prefix
            verifier.cache.lengths[row] = context
        drafts = torch.randint(vocab, (batch, width - 1), generator=g, device=HOST).tolist()
        start = time.perf_counter()
        verifier.verify(rows, [chain(a, d) for a, d in zip(anchors, drafts)])
        return time.perf_counter() - start

    for cell in cells:  # warm-up
        timed(*cell)
    times: dict[tuple[int, int, int], list[float]] = {cell: [] for cell in cells}
    order = torch.Generator(device=HOST).manual_seed(1)
    for sweep in range(repeats):
        for i in torch.randperm(len(cells), generator=order).tolist():
            times[cells[i]].append(timed(*cells[i]))
        if progress:
            progress(f"sweep {sweep + 1}/{repeats} over {len(cells)} passes")
    median = {cell: statistics.median(t) for cell, t in times.items()}
    seconds = tuple(tuple(median[b, w, PROMPT_TOKENS] for w in widths) for b in batches)
    table = PassCost(tuple(batches), tuple(widths), seconds, PROMPT_TOKENS)
    # least squares through 0 of the extra seconds against query tokens x extra keys
    keys = [(b * w * (long - PROMPT_TOKENS), median[b, w, long] - table(b, w)) for b, w in long_cells]
    per_key = max(0.0, sum(x * t for x, t in keys) / sum(x * x for x, _ in keys)) if keys else 0.0
    return replace(table, per_key=per_key)


def load_or_measure(
    model: Transformer, model_name: str, force: bool = False, progress: Callable[[str], None] | None = None
) -> PassCost:
    """The cached profile of ``model`` on this machine, measured and stored when missing."""
    path = profile_path(model_name, model.dtype, model.device, model.kernels)
    if path.is_file() and not force:
        try:
            return PassCost.from_json(json.loads(path.read_text(encoding="utf-8"))["pass_seconds"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or from an older layout: measure again
    if progress:
        progress(f"profiling verification on this machine (once, stored in {path})")
    with torch.inference_mode():
        cost = measure(model, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": str(model_name),
        "dtype": str(model.dtype).removeprefix("torch."),
        "exact": model.exact,
        "kernels": model.kernels,
        "machine": machine_id(model.device),
        "pass_seconds": cost.to_json(),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return cost


def scheduled_drafter(
    drafter: Drafter | None,
    model: Transformer,
    model_name: str,
    progress: Callable[[str], None] | None = None,
    calibrate: bool = True,
) -> Drafter | None:
    """``drafter`` behind the draft scheduler with this machine's profile (measured on first use),
    its survival predictions calibrated online unless ``calibrate`` is off; ``None`` (plain
    decoding) stays ``None``."""
    if drafter is None:
        return None
    return ScheduledDrafter(drafter, load_or_measure(model, model_name, progress=progress), calibrate)
