"""Benchmark prompts: the DeepSpec evaluation sets shipped in ``tandem/data/prompts`` (first turn of
each record), or any jsonl of ``{"turns": [...]}``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tandem.train.prompts import EVAL_PROMPTS_DIR, DataError

BENCHMARKS = ("mt-bench", "gsm8k", "humaneval", "math500", "mbpp")


@dataclass
class BenchPrompt:
    benchmark: str
    text: str


def read_turns_file(path: Path, name: str, limit: int | None = None) -> list[BenchPrompt]:
    """First turns of a jsonl of ``{"turns": [...]}`` records."""
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["turns"][0]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise DataError(f'{str(path)!r} line {n}: expected {{"turns": ["..."]}} ({exc})') from exc
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{str(path)!r} line {n}: the first turn is not a non-empty string")
        prompts.append(BenchPrompt(name, text))
        if limit is not None and len(prompts) == limit:
            break
    return prompts


def load_benchmarks(names: list[str], limit: int | None = None) -> list[BenchPrompt]:
    """The first ``limit`` prompts of each named benchmark."""
    prompts = []
    for name in names:
        path = EVAL_PROMPTS_DIR / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        prompts += read_turns_file(path, name, limit)
    return prompts
