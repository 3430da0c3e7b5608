"""The coordinator side of the `ratchet` command: dev, server, migrate, keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ratchet import Worker
from ratchet_server import model
from ratchet_server.api.auth import create_key
from ratchet_server.app import Coordinator, ServerOptions
from ratchet_server.engine.engine import EngineConfig
from ratchet_server.store import Store, StoreUnavailable, StoreURLError, open_store

log = logging.getLogger("ratchet.server")

SWITCH_INTERVAL = 0.0005


async def run(args: argparse.Namespace, load_tasks: Callable[[Sequence[str]], list[Any]]) -> int:
    try:
        if args.command == "dev":
            return await _dev(args, load_tasks)
        if args.command == "server":
            return await _server(args)
        if args.command == "migrate":
            store = await open_store(args.database_url)
            try:
                applied = await store.migrate()
            finally:
                await store.close()
            print("applied: " + ", ".join(applied) if applied else "schema is up to date")
            return 0
        store = await open_store(args.database_url)
        try:
            await store.migrate()
            key = await create_key(store, args.env, model.Role(args.role), args.name)
        finally:
            await store.close()
        print(key)
        return 0
    except (StoreURLError, StoreUnavailable) as exc:
        raise ServerCLIError(str(exc)) from None


class ServerCLIError(ValueError):
    """Reported by the CLI as one line (a ValueError, which the CLI prints)."""


def _config(args: argparse.Namespace) -> EngineConfig:
    if args.heartbeat_interval >= args.lease_ttl:
        raise ServerCLIError("--heartbeat-interval must be shorter than --lease-ttl")
    return EngineConfig(lease_ttl=args.lease_ttl, heartbeat_interval=args.heartbeat_interval,
                        session_grace=args.session_grace,
                        retention=args.retention or None)


async def _serve(store: Store, options: ServerOptions, workers: Sequence[Worker] = ()) -> int:
    # Database calls run in threads. With the default 5 ms GIL switch interval
    # a busy event loop makes each of them wait several intervals (a convoy);
    # a shorter interval cut group-commit latency sharply (BENCHMARKS.md).
    sys.setswitchinterval(SWITCH_INTERVAL)
    await store.migrate()
    coordinator = Coordinator(store, options)
    try:
        await coordinator.start()
    except BaseException:
        await coordinator.stop()
        raise
    log.info("coordinator listening on %s (gRPC), %s (HTTP)", options.listen,
             options.http_listen)
    worker_tasks = [asyncio.create_task(w.run(handle_signals=False)) for w in workers]
    try:
        await coordinator.serve_until_signal()
    finally:
        for w in workers:
            w.stop()
        for t in worker_tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(t, 5.0)
    return 0


async def _dev(args: argparse.Namespace, load_tasks: Callable[[Sequence[str]], list[Any]]) -> int:
    tasks = load_tasks(args.worker) if args.worker else []
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    store = await open_store(f"sqlite:///{args.db}")
    listen = f"127.0.0.1:{args.port}"
    options = ServerOptions(listen=listen, http_listen=f"127.0.0.1:{args.http_port}",
                            auth=False, engine=_config(args))
    print(f"ratchet dev: coordinator on {listen}, store {args.db}; auth is OFF "
          "(development mode, loopback only)", file=sys.stderr)
    workers = [Worker(tasks, listen, slots=args.slots, api_key="")] if tasks else []
    return await _serve(store, options, workers)


async def _server(args: argparse.Namespace) -> int:
    store = await open_store(args.database_url)
    options = ServerOptions(listen=args.listen, http_listen=args.http_listen, auth=True,
                            engine=_config(args))
    return await _serve(store, options)
