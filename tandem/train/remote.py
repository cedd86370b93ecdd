"""Responses regenerated through any OpenAI-compatible server (``tandem data --server URL``): a
``tandem serve`` HTTP API, vLLM or SGLang, as fast as the best server the user has (DeepSpec
regenerates this way). The records are :func:`~tandem.train.regenerate.regenerate`'s, appended
to the same JSONL file and resumed the same way.

Each prompt goes out as its token ids (the chat template applied here, so the ids are the same
whatever the server's template) to ``/v1/completions``, with the prompt's own seed. The response's
ids come back with ``return_token_ids`` (Tandem and vLLM); a server without it gets its text
re-tokenized, which must decode back to the same text (else the record is refused), with the stop
token appended when it stopped, as the target's own responses end.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tandem.sampling import SamplingParams
from tandem.train.prompts import DataError, Prompt
from tandem.train.regenerate import RunStats, done_ids, encode_fitting, seeded, write_record

RETRIES = 4  # a 429, 5xx or dropped connection is tried again this many times, backing off
RETRY_WAIT_S = 0.5  # doubled each time: 7.5 s in all before giving up
TIMEOUT_S = 600.0  # per request: a long response on a busy server


@dataclass(frozen=True)
class Server:
    """An OpenAI-compatible endpoint: ``url`` (``http://host:port``, with or without ``/v1``),
    the model name it serves, and an API key if it wants one."""

    url: str
    model: str
    api_key: str | None = None

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``/v1/completions``; retried on 429, 5xx and dropped connections."""
        base = self.url.rstrip("/").removesuffix("/v1")
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        data = json.dumps({"model": self.model, **body}).encode()
        attempt = 0
        while True:
            request = urllib.request.Request(f"{base}/v1/completions", data, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if (exc.code != 429 and exc.code < 500) or attempt == RETRIES:
                    raise DataError(f"{base}: HTTP {exc.code}: {_error_message(exc)}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if attempt == RETRIES:
                    raise DataError(f"cannot reach {base}: {getattr(exc, 'reason', exc)}") from None
            time.sleep(RETRY_WAIT_S * 2**attempt)
            attempt += 1


def regenerate_remote(
    server: Server,
    prompts: Sequence[Prompt],
    encode: Callable[[str], list[int]],
    reencode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    stop_ids: Sequence[int],
    out: Path,
    params: SamplingParams,
    concurrency: int = 16,
    max_prompt_tokens: int = 512,
    progress: bool = False,
) -> RunStats:
    """Append one record per prompt not yet in ``out``, ``concurrency`` requests in flight; a
    record is written as its response arrives, so an interrupted run loses only those in flight."""
    done = done_ids(out)
    todo = [p for p in prompts if p.id not in done]
    stats = RunStats(selected=len(prompts), already_done=len(prompts) - len(todo))
    fitting = list(encode_fitting(todo, encode, max_prompt_tokens, stats))
    start = time.perf_counter()

    def ask(prompt: Prompt, ids: list[int]) -> tuple[list[int], str]:
        own = seeded(params, prompt.id)
        body = {
            "prompt": ids,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": own.seed,
            "return_token_ids": True,
        }
        [choice] = server.complete(body)["choices"]
        return _response_ids(choice, reencode, decode, stop_ids), choice["finish_reason"]

    bar = tqdm(total=len(fitting), desc="regenerating", unit="prompt", disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(concurrency)
    try:
        with out.open("a", encoding="utf-8") as f:
            futures = {pool.submit(ask, prompt, ids): (prompt, ids) for prompt, ids in fitting}
            for future in as_completed(futures):
                prompt, ids = futures[future]
                response, finish = future.result()
                write_record(f, prompt, ids, response, decode, finish)
                f.flush()
                stats.written += 1
                stats.generated_tokens += len(response)
                stats.seconds = time.perf_counter() - start
                bar.set_postfix_str(f"{stats.generated_tokens / stats.seconds:.1f} tok/s", refresh=False)
                bar.update()
    except OSError as exc:
        raise DataError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from exc
    finally:
        pool.shutdown(cancel_futures=True)  # a failure stops the run: the requests not sent yet never go
        bar.close()
    stats.seconds = round(time.perf_counter() - start, 3)
    return stats


def _response_ids(
    choice: dict[str, Any],
    reencode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    stop_ids: Sequence[int],
) -> list[int]:
    """The response's token ids: as the server sent them, or its text re-tokenized and checked."""
    if choice.get("token_ids") is not None:
        return list(choice["token_ids"])
    text = choice["text"]
    ids = reencode(text)
    if decode(ids) != text:
        raise DataError(f"the server sent no token ids, and its text does not re-tokenize to itself: {text[:80]!r}")
    return ids + [stop_ids[0]] if choice["finish_reason"] == "stop" and stop_ids else ids


def _error_message(exc: urllib.error.HTTPError) -> str:
    body = exc.read().decode(errors="replace")
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:300] or exc.reason
