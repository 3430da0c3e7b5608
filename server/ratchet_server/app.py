"""Assembles a coordinator: store, engine, gRPC services, the HTTP port."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ratchet.v1 import (
    run_pb2,
    run_pb2_grpc,
    system_pb2,
    system_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from ratchet_server.api.auth import KEY_CACHE_SECONDS, AuthInterceptor
from ratchet_server.api.services import RunService, SystemService, WorkerService
from ratchet_server.engine.engine import Engine, EngineConfig
from ratchet_server.engine.keys import RevokedKeySweep
from ratchet_server.store import Store
from ratchet_server.web import HttpServer

log = logging.getLogger("ratchet.server")

SERVICE_NAMES = (
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    run_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
    system_pb2.DESCRIPTOR.services_by_name["SystemService"].full_name,
)

# On shutdown, open sessions are served this long more (their writes are
# acknowledged), then their streams end UNAVAILABLE; END_GRACE is what the
# streams get to finish after that.
SHUTDOWN_DRAIN = 2.0
END_GRACE = 1.0
SHUTDOWN_MESSAGE = ("the coordinator is shutting down: reconnect (to another replica, or "
                    "here once it is back) and adopt your leases; they stay yours until "
                    "the lease TTL")


# The SDK's channels ping every 10 s, idle or not, to notice a dead
# connection (ratchet._session.CHANNEL_OPTIONS). gRPC servers by default take
# pings without calls, or more often than every 5 minutes, as abuse and end
# the connection (GOAWAY too_many_pings): accept one every this many ms.
KEEPALIVE_MIN_PING_MS = 5_000


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    listen: str = "127.0.0.1:7420"
    http_listen: str | None = "127.0.0.1:7421"
    # The base of token completion URLs: where clients reach the HTTP port
    # (a proxy, a public name). None: http://<http_listen>.
    public_url: str | None = None
    auth: bool = True
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    # How long a revoked key may keep working: the key cache's TTL and how
    # often open sessions' keys are checked (engine/keys.py).
    key_cache: float = KEY_CACHE_SECONDS


class Coordinator:
    """One coordinator process. `start()`, then `wait()` or `stop()`."""

    def __init__(self, store: Store, options: ServerOptions) -> None:
        self.store = store
        self.options = options
        self.engine = Engine(store, options.engine)
        self._server: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._health: health.aio.HealthServicer | None = None
        self._revoked_keys: RevokedKeySweep | None = None
        self.port = 0

    async def start(self) -> None:
        await self.engine.start()
        interceptor = AuthInterceptor(self.store if self.options.auth else None,
                                      cache_seconds=self.options.key_cache)
        if self.options.auth:
            self._revoked_keys = RevokedKeySweep(self.engine, self.options.key_cache,
                                                 on_revoked=interceptor.forget)
            self._revoked_keys.start()
        server = grpc.aio.server(
            interceptors=[interceptor],
            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024),
                     ("grpc.so_reuseport", 0),
                     ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.min_ping_interval_without_data_ms",
                      KEEPALIVE_MIN_PING_MS)])
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerService(self.engine), server)
        public_url = self.options.public_url or f"http://{self.options.http_listen}"
        run_pb2_grpc.add_RunServiceServicer_to_server(RunService(self.engine, public_url),
                                                      server)
        system_pb2_grpc.add_SystemServiceServicer_to_server(SystemService(), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            self.port = server.add_insecure_port(self.options.listen)
        except RuntimeError:  # gRPC's "Failed to bind to address ..."
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {self.options.listen} (gRPC): the port is in use "
                          "or the address is not this host's")
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._health = health_servicer
        self._server = server
        if self.options.http_listen:
            host, _, port = self.options.http_listen.rpartition(":")
            http = HttpServer(self.engine, host or "127.0.0.1", int(port))
            try:
                await http.start()
            except OSError as exc:
                raise OSError(f"cannot listen on {self.options.http_listen} (HTTP): "
                              f"{exc.strerror or exc}") from None
            self._http = http

    async def stop(self, drain: float = SHUTDOWN_DRAIN) -> None:
        """Shut down, in this order: refuse new calls (new sessions too) and
        lease nothing more; serve the open sessions for up to `drain` seconds,
        acknowledging their writes (sooner if they all close); end the streams
        still open UNAVAILABLE; stop. Leases are not released: each worker
        reconnects (to another replica, or here after a restart) and adopts
        its leases; one nobody adopts is lost after the lease TTL."""
        if self._http is not None:
            await self._http.stop()
        if self._revoked_keys is not None:
            await self._revoked_keys.stop()
        if self._server is not None:
            self.engine.begin_shutdown()
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            stopping = asyncio.create_task(self._server.stop(drain + END_GRACE))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain
            if self.engine.open_sessions():
                log.info("shutting down: new calls are refused; serving %d open session(s) "
                         "for up to %.1fs more", len(self.engine.open_sessions()), drain)
            # Polled: closing sessions signal nothing, and this runs once, briefly.
            while self.engine.open_sessions() and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            ended = self.engine.end_sessions(SHUTDOWN_MESSAGE)
            if ended:
                log.info("shutting down: ending %d session(s) UNAVAILABLE; their leases are "
                         "not released (the workers adopt them when they reconnect)", ended)
            await stopping
        await self.engine.stop()
        await self.store.close()

    async def serve_until_signal(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await self.stop()
