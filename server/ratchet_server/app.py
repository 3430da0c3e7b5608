"""Assembles a coordinator: store, engine, gRPC services, HTTP health."""

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
from ratchet_server.api.auth import AuthInterceptor
from ratchet_server.api.services import RunService, SystemService, WorkerService
from ratchet_server.engine.engine import Engine, EngineConfig
from ratchet_server.store import Store
from ratchet_server.web import start_http

log = logging.getLogger("ratchet.server")

SERVICE_NAMES = (
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    run_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
    system_pb2.DESCRIPTOR.services_by_name["SystemService"].full_name,
)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    listen: str = "127.0.0.1:7420"
    http_listen: str | None = "127.0.0.1:7421"
    auth: bool = True
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)


class Coordinator:
    """One coordinator process. `start()`, then `wait()` or `stop()`."""

    def __init__(self, store: Store, options: ServerOptions) -> None:
        self.store = store
        self.options = options
        self.engine = Engine(store, options.engine)
        self._server: grpc.aio.Server | None = None
        self._http: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        await self.engine.start()
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.store if self.options.auth else None)],
            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024),
                     ("grpc.so_reuseport", 0)])
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerService(self.engine), server)
        run_pb2_grpc.add_RunServiceServicer_to_server(RunService(self.engine), server)
        system_pb2_grpc.add_SystemServiceServicer_to_server(SystemService(), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(self.options.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.options.listen}")
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        if self.options.http_listen:
            host, _, port = self.options.http_listen.rpartition(":")
            self._http = await start_http(host or "127.0.0.1", int(port))

    async def stop(self, grace: float = 2.0) -> None:
        if self._http is not None:
            self._http.close()
        if self._server is not None:
            await self._server.stop(grace)
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
