"""Benchmark prompts: the DeepSpec evaluation sets shipped in ``tandem/data/prompts`` (first turn of
each record), or any jsonl of ``{"turns": [...]}``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tandem.train.prompts import EVAL_PROMPTS_DIR, DataError, read_jsonl

BENCHMARKS = ("mt-bench", "gsm8k", "humaneval", "math500", "mbpp")


@dataclass
class BenchPrompt:
    benchmark: str
    text: str


def read_turns_file(path: Path, name: str, limit: int | None = None) -> list[BenchPrompt]:
    """First turns of a jsonl of ``{"turns": [...]}`` records."""
    prompts = read_jsonl(path, '{"turns": ["..."]}', lambda r: BenchPrompt(name, _first_turn(r)))
    return prompts[:limit]


def _first_turn(record: dict) -> str:
    text = record["turns"][0]
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the first turn is not a non-empty string")
    return text


def load_benchmarks(names: list[str], limit: int | None = None) -> list[BenchPrompt]:
    """The first ``limit`` prompts of each named benchmark."""
    prompts = []
    for name in names:
        path = EVAL_PROMPTS_DIR / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        prompts += read_turns_file(path, name, limit)
    return prompts
