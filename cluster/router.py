"""The ingress: Tandem's public gRPC API (Generate, Abort, health, reflection), served by the
router's Serve replica on the configured address.

It turns a request into token ids and sampling params (INVALID_ARGUMENT with a message when it
cannot), runs a :class:`~cluster.session.Session` and streams its tokens and text. Client cancel,
deadline or disconnect cancels the handler, and with it the session's worker streams.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.config import ClusterConfig
from cluster.session import Pools, Session
from tandem.errors import InvalidRequest
from tandem.models.catalog import resolve_model_path
from tandem.models.config import ModelConfig
from tandem.models.loading import resolve_model_dir
from tandem.sequence import with_seed
from tandem.tokenizer import Detokenizer, Tokenizer
from tandem_proto.v1 import api_pb2, api_pb2_grpc
from workers.wire import CHANNEL_OPTIONS, params_from_proto

log = logging.getLogger(__name__)
SERVICE = api_pb2.DESCRIPTOR.services_by_name["Tandem"].full_name


class Router(api_pb2_grpc.TandemServicer):
    async def __init__(self, config: ClusterConfig, draft: object | None, target: object) -> None:
        folder = resolve_model_dir(resolve_model_path(config.model))
        model = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        has_tokenizer = any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
        self.tokenizer = Tokenizer(folder) if has_tokenizer else None
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
        self.drafter = config.draft.drafter
        self.pools = Pools(
            target=target,
            draft=draft,
            channel=self._channel,
            eos_token_ids=tuple(dict.fromkeys(tokenizer_eos + model.eos_token_ids)),
            decode=self.tokenizer.decode if self.tokenizer else None,
            max_draft_nodes=config.draft.max_draft_nodes,
            draft_timeout_s=config.router.draft_timeout_s,
        )
        self.sessions: dict[str, Session] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._server = grpc.aio.server()
        api_pb2_grpc.add_TandemServicer_to_server(self, self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        if not self._server.add_insecure_port(config.address):
            raise RuntimeError(f"cannot listen on {config.address}")
        await self._server.start()
        for service in ("", SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("Tandem gRPC API on %s", config.address)

    async def live_sessions(self) -> int:
        return len(self.sessions)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return self._channels[address]

    async def Generate(  # noqa: N802 - the gRPC method name
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.sessions:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running")
        try:
            params = with_seed(params_from_proto(request.params))
            session = Session(self.pools, request_id, self._prompt_ids(request), params, self._use_drafter(request))
            if params.stop and self.tokenizer is None:
                raise InvalidRequest("stop strings need a tokenizer; this model has none")
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        detokenizer = Detokenizer(self.tokenizer, params.stop) if self.tokenizer else None
        self.sessions[request_id] = session
        # Cancel, deadline or disconnect: free the workers now, not when the generators are collected.
        context.add_done_callback(lambda _: session.close())
        try:
            async with contextlib.aclosing(session.run()) as steps:
                async for token_ids, finish_reason in steps:
                    text = detokenizer.push(token_ids, final=finish_reason is not None) if detokenizer else ""
                    delta = api_pb2.Delta(token_ids=token_ids, text=text)
                    yield api_pb2.GenerateResponse(request_id=request_id, delta=delta)
            yield api_pb2.GenerateResponse(request_id=request_id, finished=_finished(session))
        except grpc.aio.AioRpcError as exc:  # a worker refused (bad prompt, full) or failed
            await context.abort(exc.code(), exc.details())
        except Exception as exc:  # Serve could not place the session, or a worker went away
            await context.abort(*_failure_status(exc))
        finally:
            self.sessions.pop(request_id, None)

    async def Abort(  # noqa: N802 - the gRPC method name
        self, request: api_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.AbortResponse:
        session = self.sessions.get(request.request_id)
        if session is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no running request {request.request_id!r}")
        session.abort()
        return api_pb2.AbortResponse()

    def _prompt_ids(self, request: api_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind is None:
            raise InvalidRequest("prompt is empty")
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: send token_ids")
        if kind == "text":
            return self.tokenizer.encode(request.text, chat=False)
        return self.tokenizer.encode([{"role": m.role, "content": m.content} for m in request.chat.messages], chat=True)

    def _use_drafter(self, request: api_pb2.GenerateRequest) -> bool:
        served = ["none"] + ([self.drafter] if self.pools.draft is not None else [])
        name = request.drafter or served[-1]
        if name not in served:
            raise InvalidRequest(f"unknown drafter {name!r}; this cluster serves {', '.join(served)}")
        return name != "none"


def _finished(session: Session) -> api_pb2.Finished:
    state = session.state
    stats = state.stats
    usage = api_pb2.Usage(
        prompt_tokens=state.prompt_len,
        completion_tokens=len(state.output),
        rounds=stats.rounds,
        drafted_tokens=stats.drafted,
        accepted_tokens=stats.accepted,
        tau=stats.tau,
        drafter_lost=session.drafter_lost,
    )
    return api_pb2.Finished(finish_reason=state.finish_reason, usage=usage)


def _failure_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the cluster is full: {exc}"
    log.exception("session failed")
    return grpc.StatusCode.UNAVAILABLE, f"the cluster could not serve the request: {exc}"
