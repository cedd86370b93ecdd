"""What the two public APIs (gRPC in router.py, OpenAI HTTP in openai_api.py) share: prompt to token
ids, request to :class:`~cluster.session.Session`, session to a stream of text chunks, the live
sessions by owner and request id, the limits (``limits:``: prompt, values, stop lists, streams
per client) and the request-level metrics. One code path, so the same request gives the same
tokens, and the same refusals, through either API; bad input never reaches a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from cluster.config import ClusterConfig
from cluster.metrics import Metrics
from cluster.security import Caller, Tokens
from cluster.session import Pools, Session
from tandem.errors import InvalidRequest
from tandem.models.catalog import resolve_model_path
from tandem.models.config import ModelConfig
from tandem.models.loading import resolve_model_dir
from tandem.sampling import SamplingParams
from tandem.sequence import with_seed
from tandem.tokenizer import Detokenizer, Messages, Tokenizer

log = logging.getLogger(__name__)
# gRPC sends a refusal's message in a trailer (16 KiB at most): one that echoes a huge input is cut.
MAX_MESSAGE = 1000


class Refused(Exception):
    """A request that cannot run or went wrong, with the gRPC status saying why (HTTP maps it)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "..."
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Chunk:
    """The tokens one target pass added, their text, and the finish reason on the last chunk."""

    token_ids: list[int]
    text: str
    finish_reason: str | None


class Frontend:
    def __init__(
        self, config: ClusterConfig, draft: object | None, target: object, channel: Callable[[str], grpc.aio.Channel]
    ) -> None:
        folder = resolve_model_dir(resolve_model_path(config.model))
        model = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        has_tokenizer = any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
        self.tokenizer = Tokenizer(folder) if has_tokenizer else None
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
        self.model_name = config.model
        self.max_model_len = config.max_model_len
        self.vocab_size = model.vocab_size
        self.limits = config.limits
        # the most a request may ask for: over the limit is refused, over the context stops there
        self.max_output = config.limits.max_tokens or config.max_model_len
        self.tokens = Tokens.load(config.auth)
        self.drafter = config.draft.drafter
        self.metrics = Metrics()
        self.pools = Pools(
            target=target,
            draft=draft,
            channel=channel,
            eos_token_ids=tuple(dict.fromkeys(tokenizer_eos + model.eos_token_ids)),
            decode=self.tokenizer.decode if self.tokenizer else None,
            max_draft_nodes=config.draft.max_draft_nodes,
            draft_timeout_s=config.router.draft_timeout_s,
            resume_timeout_s=config.router.resume_timeout_s,
            metrics=self.metrics,
            prefix_block_size=config.target.block_size if config.target.prefix_caching else None,
        )
        self.sessions: dict[tuple[str, str], Session] = {}  # by (caller's owner, request id)
        self._streams: Counter[str] = Counter()  # live sessions per client
        self._groups = itertools.cycle(range(config.router.pipeline_groups))  # new sessions take turns
        # One thread: a megabyte prompt's tokenizing (about 0.6 s) leaves the event loop, and the
        # streams it serves, running; the tokenizer is not safe to share between threads.
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.draining = False  # set once on shutdown: new requests are refused, live ones finish

    async def encode(self, prompt: str | list[int] | Messages, chat: bool = False) -> list[int]:
        """Token ids as given, or of raw text, or of chat messages through the chat template."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: send token ids")
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, self.tokenizer.encode, prompt, chat)

    def open(
        self, prompt_ids: list[int], params: SamplingParams, drafter: str = "", continued: list[int] | None = None
    ) -> Session:
        """A session for the request, not started yet; :class:`Refused` when it cannot run here.
        ``continued``: the output a broken stream of this request delivered; this one goes on after it."""
        if self.draining:
            raise self.refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        try:
            self._check(prompt_ids, params)
            if continued:
                self._check_continued(prompt_ids, params, continued)
            use_drafter = self._use(drafter)
            session_id, group = secrets.token_hex(16), next(self._groups)
            return Session(self.pools, session_id, prompt_ids, with_seed(params), use_drafter, continued, group)
        except InvalidRequest as exc:
            raise self.refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse what the model or the limits cannot take (InvalidRequest), before any worker sees it."""
        limits, vocab = self.limits, self.vocab_size
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len}")
        if limits.max_prompt_tokens and len(prompt_ids) > limits.max_prompt_tokens:
            raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens; the limit is {limits.max_prompt_tokens}")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must lie in [0, {vocab})")
        if params.max_tokens > self.max_output:
            raise InvalidRequest(f"max_tokens {params.max_tokens} is over the limit of {self.max_output}")
        if params.top_k > vocab:
            raise InvalidRequest(f"top_k must lie in [0, {vocab}] (0: no cut), got {params.top_k}")
        if params.stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer; this model has none")
        if len(params.stop) > limits.max_stop:
            raise InvalidRequest(f"{len(params.stop)} stop strings; the limit is {limits.max_stop}")
        if any(len(s) > limits.max_stop_length for s in params.stop):
            raise InvalidRequest(f"a stop string is longer than the limit of {limits.max_stop_length} characters")
        if len(params.stop_token_ids) > limits.max_stop_token_ids:
            raise InvalidRequest(
                f"{len(params.stop_token_ids)} stop token ids; the limit is {limits.max_stop_token_ids}"
            )
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise InvalidRequest(f"stop token ids must lie in [0, {vocab})")

    def _check_continued(self, prompt_ids: list[int], params: SamplingParams, continued: list[int]) -> None:
        """A continuation must be of a stream that could still be running."""
        if min(continued) < 0 or max(continued) >= self.vocab_size:
            raise InvalidRequest(f"continue_token_ids must lie in [0, {self.vocab_size})")
        if len(continued) >= params.max_tokens:
            raise InvalidRequest(f"{len(continued)} tokens to continue after, but max_tokens is {params.max_tokens}")
        if len(prompt_ids) + len(continued) >= self.max_model_len:
            raise InvalidRequest(f"prompt and continue_token_ids fill the context of {self.max_model_len} tokens")
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.pools.eos_token_ids))
        if stops.intersection(continued):
            raise InvalidRequest("continue_token_ids hold a stop token: that stream had finished")

    async def stream(self, session: Session, caller: Caller, request_id: str) -> AsyncIterator[Chunk]:
        """Run the session for ``caller``, who knows it as ``request_id``; its chunks, the last one
        with the finish reason. Raises :class:`Refused`."""
        key = (caller.owner, request_id)
        if key in self.sessions:
            raise self.refused(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running")
        if self._streams[caller.client] >= self.limits.max_streams_per_client:
            limit = self.limits.max_streams_per_client
            raise self.refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{limit} requests of this client are running")
        self.sessions[key] = session
        self._streams[caller.client] += 1
        tokenizer, metrics = self.tokenizer, self.metrics
        detokenizer = Detokenizer(tokenizer, session.params.stop) if tokenizer else None
        if detokenizer is not None:  # the text of a continued stream's tokens was sent already
            detokenizer.push(session.continued)
        started, first, emitted = time.perf_counter(), None, 0
        metrics.prompt_tokens.inc(len(session.prompt_ids))
        try:
            async with contextlib.aclosing(session.run()) as steps:
                async for token_ids, finish_reason in steps:
                    text = detokenizer.push(token_ids, final=finish_reason is not None) if detokenizer else ""
                    if token_ids and first is None:
                        first = time.perf_counter()
                        metrics.ttft.observe(first - started)
                    emitted += len(token_ids)
                    metrics.generation_tokens.inc(len(token_ids))
                    yield Chunk(token_ids, text, finish_reason)
        except grpc.aio.AioRpcError as exc:  # a worker refused (bad prompt, full) or failed
            raise self.refused(exc.code(), exc.details()) from None
        except Exception as exc:  # Serve could not place the session, or a worker went away
            raise self.refused(*_failure_status(exc)) from None
        finally:
            del self.sessions[key]
            self._streams[caller.client] -= 1
            if not self._streams[caller.client]:
                del self._streams[caller.client]
            session.close()
        stats = session.state.stats
        metrics.requests.labels(session.state.finish_reason).inc()
        metrics.prefix_queries.inc(len(session.prompt_ids))
        metrics.prefix_hits.inc(stats.cached_tokens)
        if stats.drafted:
            metrics.tau.observe(stats.tau)
        if emitted > 1:
            metrics.tpot.observe((time.perf_counter() - first) / (emitted - 1))

    async def drain(self, grace_s: float) -> int:
        """Refuse new sessions, wait up to ``grace_s`` for the live ones; returns those still live."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return len(self.sessions)

    def _use(self, drafter: str) -> bool:
        served = ["none"] + ([self.drafter] if self.pools.draft is not None else [])
        name = drafter or served[-1]
        if name not in served:
            raise InvalidRequest(f"unknown drafter {name!r}; this cluster serves {', '.join(served)}")
        return name != "none"

    def refused(self, code: grpc.StatusCode, message: str) -> Refused:
        """The refusal to raise, counted in the metrics."""
        self.metrics.failures.labels(code.name).inc()
        return Refused(code, message)


def _failure_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the cluster is full: {exc}"
    log.exception("session failed")
    return grpc.StatusCode.UNAVAILABLE, f"the cluster could not serve the request: {exc}"
