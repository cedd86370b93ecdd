"""The ingress: the router's Serve replica serves Tandem's public gRPC API (Generate, Abort, health,
reflection) on the configured address itself, and the OpenAI-compatible HTTP API and ``/metrics``
(cluster/openai_api.py) through Serve's HTTP proxy. Both run requests through one
:class:`~cluster.frontend.Frontend`.

A gRPC request becomes token ids and sampling params (INVALID_ARGUMENT with a message when it
cannot), then a session whose tokens and text are streamed out. Client cancel, deadline or
disconnect cancels the handler, and with it the session's worker streams. Draining (shutdown,
rollout, scale-down) turns health to NOT_SERVING, refuses new requests and lets live ones finish.

With ``auth`` on, Tandem's own methods need a bearer token (cluster/security.py); a message over
``limits.max_request_bytes`` is refused by gRPC itself (RESOURCE_EXHAUSTED). A request id is the
caller's own: another caller can neither abort that request nor collide with its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.config import ClusterConfig
from cluster.frontend import Frontend, Refused
from cluster.metrics import Snapshot
from cluster.security import DecodeGuard, TokenGate, grpc_caller, server_credentials
from cluster.session import Session
from tandem.errors import InvalidRequest
from tandem_proto.v1 import api_pb2, api_pb2_grpc
from workers.wire import params_from_proto

log = logging.getLogger(__name__)
SERVICE = api_pb2.DESCRIPTOR.services_by_name["Tandem"].full_name
MAX_REQUEST_ID = 128  # characters; the id comes back in every response
ROUTER_HEADER = "tandem-router"  # initial metadata: the Serve replica serving the stream (for logs)
PEER_TIMEOUT_S = 2.0  # a router replica that does not give its metrics by then is left out of a scrape
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"  # Serve's replica actors are named this and their full id
_LOCAL: dict[str, Router] = {}  # the routers of this process, by replica id (one in a Serve replica)


class Router(api_pb2_grpc.TandemServicer):
    async def __init__(self, config: ClusterConfig, draft: object | None, target: object) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._internal_tls = config.internal_tls
        self.frontend = Frontend(config, draft, target, self._channel)
        self.grace_period_s = config.grace_period_s
        self.replica = _replica_id()
        self.frontend.metrics.peers = functools.partial(_peer_snapshots, self.replica)
        self._loop = asyncio.get_running_loop()
        _LOCAL[self.replica] = self
        tokens = self.frontend.tokens
        failures = self.frontend.metrics.failures
        unauthenticated = failures.labels(grpc.StatusCode.UNAUTHENTICATED.name).inc
        gate = [TokenGate(tokens, SERVICE, unauthenticated)] if tokens else []
        self._server = grpc.aio.server(
            interceptors=[*gate, DecodeGuard(failures.labels(grpc.StatusCode.INVALID_ARGUMENT.name).inc)],
            options=[("grpc.max_receive_message_length", config.limits.max_request_bytes)],
        )
        api_pb2_grpc.add_TandemServicer_to_server(self, self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        credentials = server_credentials(config.tls)
        port = (
            self._server.add_secure_port(config.address, credentials)
            if credentials
            else self._server.add_insecure_port(config.address)
        )
        if not port:
            raise RuntimeError(f"cannot listen on {config.address}")
        await self._server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("Tandem gRPC API on %s", config.address)

    def __serve_build_asgi_app__(self) -> object:
        """Serve's late-bound ingress hook: the HTTP app, built around this replica's frontend."""
        from cluster.openai_api import build_http_app

        return build_http_app(self.frontend)

    async def live_sessions(self) -> int:
        return len(self.frontend.sessions)

    async def drain(self, grace_s: float | None = None) -> int:
        """Stop taking requests (health NOT_SERVING) and give the live ones up to ``grace_s``
        (default: the config's grace period) to finish; returns how many are still running."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        return await self.frontend.drain(self.grace_period_s if grace_s is None else grace_s)

    async def __del__(self) -> None:
        """Serve stops this replica (rollout, scale-down, shutdown): drain first. In a rollout the
        new router already listens on the same port (gRPC binds with SO_REUSEPORT), so this one
        stops listening at once: the new one takes every new connection, and this one's clients
        reconnect there on their next call, while its live streams get the grace period."""
        stopping = asyncio.ensure_future(self._server.stop(grace=self.grace_period_s + 1.0))
        left = await self.drain()
        _LOCAL.pop(self.replica, None)
        if left:
            log.warning("stopping with %d live sessions after the %.0f s grace period", left, self.grace_period_s)
        await stopping

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = self._internal_tls.channel(address)
        return self._channels[address]

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", SERVICE):
            await self._health.set(service, status)

    async def Generate(  # noqa: N802 - the gRPC method name
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.GenerateResponse]:
        frontend = self.frontend
        try:
            try:
                if len(request.request_id) > MAX_REQUEST_ID:
                    raise InvalidRequest(f"request_id has more than {MAX_REQUEST_ID} characters")
                params = params_from_proto(request.params)
                if not request.params.HasField("max_tokens"):  # the default stays within a lower limit
                    params = dataclasses.replace(params, max_tokens=min(params.max_tokens, frontend.max_output))
                prompt_ids, continued = await self._prompt_ids(request), list(request.continue_token_ids)
                session = frontend.open(prompt_ids, params, request.drafter, continued)
            except InvalidRequest as exc:
                raise frontend.refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            # Cancel, deadline or disconnect: free the workers now, not when the generators are collected.
            context.add_done_callback(lambda _: session.close())
            request_id, seed = request.request_id or session.session_id, session.params.seed
            caller = grpc_caller(frontend.tokens, context)
            await context.send_initial_metadata(((ROUTER_HEADER, self.replica),))
            async with contextlib.aclosing(frontend.stream(session, caller, request_id)) as chunks:
                async for chunk in chunks:
                    delta = api_pb2.Delta(token_ids=chunk.token_ids, text=chunk.text)
                    yield api_pb2.GenerateResponse(request_id=request_id, seed=seed, delta=delta)
            yield api_pb2.GenerateResponse(request_id=request_id, seed=seed, finished=_finished(session))
        except Refused as exc:
            await context.abort(exc.code, exc.message)

    async def Abort(  # noqa: N802 - the gRPC method name
        self, request: api_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.AbortResponse:
        """Only the caller that started a request may abort it; to anyone else it does not exist."""
        owner = grpc_caller(self.frontend.tokens, context).owner
        session = self.frontend.sessions.get((owner, request.request_id))
        if session is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such request is running for this caller")
        session.abort()
        return api_pb2.AbortResponse()

    async def _prompt_ids(self, request: api_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise InvalidRequest("prompt is empty")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "text":
            return await self.frontend.encode(request.text)
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        return await self.frontend.encode(messages, chat=True)


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
        target_resumes=session.target_resumes,
        cached_tokens=stats.cached_tokens,
    )
    return api_pb2.Finished(finish_reason=state.finish_reason, usage=usage)


def _replica_id() -> str:
    """This Serve replica's full id (its actor's name), or the process id outside Serve."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.to_full_id_str()  # REPLICA_ACTOR_PREFIX + app#Router#id
    except RayServeException:
        return f"pid-{os.getpid()}"


def router_actors(app: str) -> dict[str, Any]:
    """The Ray actors of ``app``'s router replicas, by replica id (their actors' names)."""
    import ray

    prefix = f"{REPLICA_ACTOR_PREFIX}{app}#Router#"
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return {a["name"]: ray.get_actor(a["name"], namespace=a["namespace"]) for a in named}


def start_draining(_actor: object, replica: str, grace_s: float) -> None:
    """Run in a router replica's process through ``__ray_call__``: start its drain, return at once."""
    router = _LOCAL[replica]
    asyncio.run_coroutine_threadsafe(router.drain(grace_s), router._loop)


def live_sessions(_actor: object, replica: str) -> int:
    """Run in a router replica's process through ``__ray_call__``: its live sessions."""
    return len(_LOCAL[replica].frontend.sessions)


async def _peer_snapshots(replica: str) -> list[Snapshot]:
    """The metrics of the application's other router replicas; one that is gone or silent is left out."""
    if not replica.startswith(REPLICA_ACTOR_PREFIX):  # a router outside Serve has no peers
        return []
    app = replica.removeprefix(REPLICA_ACTOR_PREFIX).split("#")[0]

    def ask(name: str, actor: Any) -> Awaitable[Snapshot]:
        return asyncio.wait_for(actor.__ray_call__.remote(_local_snapshot, name), PEER_TIMEOUT_S)

    peers = await asyncio.to_thread(router_actors, app)
    waits = [ask(name, actor) for name, actor in peers.items() if name != replica]
    results = await asyncio.gather(*waits, return_exceptions=True)
    return [r for r in results if not isinstance(r, BaseException)]


def _local_snapshot(_actor: object, replica: str) -> Snapshot:
    """Run in a router replica's process through ``__ray_call__``: that router's samples."""
    return _LOCAL[replica].frontend.metrics.snapshot()
