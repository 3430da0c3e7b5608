"""The coordinator side of the `ratchet` command: dev, server, migrate, keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import errno
import json
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ratchet import Worker
from ratchet_server import model
from ratchet_server.api import auth
from ratchet_server.app import Coordinator, ServerOptions
from ratchet_server.engine.engine import EngineConfig
from ratchet_server.store import Store, StoreUnavailable, StoreURLError, open_store

log = logging.getLogger("ratchet.server")

SWITCH_INTERVAL = 0.0005
# --no-notify's default dispatcher poll: each idle pass is one bounded look-up
# per (environment, task set) on each replica.
NO_NOTIFY_POLL_INTERVAL = 0.25


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
        return await _keys(args)
    except (StoreURLError, StoreUnavailable) as exc:
        raise ServerCLIError(str(exc)) from None


class ServerCLIError(ValueError):
    """Reported by the CLI as one line (a ValueError, which the CLI prints)."""


class ServerUsageError(ServerCLIError):
    """A bad option value found after parsing: the CLI exits 2, as for
    argparse's own usage errors."""


async def _keys(args: argparse.Namespace) -> int:
    """`keys create`, `keys list`, `keys revoke`: straight on the store, so an
    operator can manage keys while no coordinator runs."""
    store = await open_store(args.database_url)
    try:
        await store.migrate()
        if args.keys_command == "create":
            key = await auth.create_key(store, args.env, model.Role(args.role), args.name)
            created = await store.find_api_key(auth.hash_key(key))
            print(key)
            if created is not None:
                print(f"created {created.id} (environment {created.env}, role "
                      f"{created.role.value}); the key is shown only once", file=sys.stderr)
            return 0
        if args.keys_command == "list":
            keys = await auth.list_keys(store)
            if args.env:
                keys = [k for k in keys if k.env == args.env]
            if args.json:
                print(json.dumps([_key_json(k) for k in keys], indent=2))
            else:
                _print_keys(keys)
            return 0
        try:
            info, changed = await auth.revoke_key(store, args.key_id)
        except KeyError:
            raise ServerCLIError(f"no API key with id {args.key_id!r} "
                                 "(`ratchet keys list` shows the ids)") from None
    finally:
        await store.close()
    assert info.revoked_at is not None
    if changed:
        print(f"revoked {info.id} (environment {info.env}, role {info.role.value}); "
              "coordinators refuse it and end the sessions it opened within their "
              f"--key-cache (default {auth.KEY_CACHE_SECONDS:g}s)")
    else:
        print(f"{info.id} was already revoked at {_when(info.revoked_at)}; nothing changed")
    return 0


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _key_json(k: model.ApiKeyInfo) -> dict[str, Any]:
    return {"id": k.id, "env": k.env, "role": k.role.value, "name": k.name,
            "created_at": _when(k.created_at),
            "revoked_at": None if k.revoked_at is None else _when(k.revoked_at)}


def _print_keys(keys: Sequence[model.ApiKeyInfo]) -> None:
    if not keys:
        print("no API keys")
        return
    rows = [("ID", "ENV", "ROLE", "NAME", "CREATED", "REVOKED")]
    rows += [(k.id, k.env, k.role.value, k.name or "-", _when(k.created_at),
              _when(k.revoked_at)) for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _config(args: argparse.Namespace) -> EngineConfig:
    if args.heartbeat_interval >= args.lease_ttl:
        raise ServerCLIError("--heartbeat-interval must be shorter than --lease-ttl")
    return EngineConfig(lease_ttl=args.lease_ttl, heartbeat_interval=args.heartbeat_interval,
                        session_grace=args.session_grace,
                        retention=args.retention or None,
                        reconcile_interval=args.reconcile_interval,
                        reconcile_settle=min(5.0, args.reconcile_interval),
                        poll_interval=_poll_interval(args))


def _poll_interval(args: argparse.Namespace) -> float:
    """Without NOTIFY the poll is the only way to hear of other replicas' runs."""
    given: float | None = getattr(args, "poll_interval", None)
    if given is not None:
        if given <= 0:
            raise ServerCLIError("--poll-interval must be more than 0")
        return given
    return NO_NOTIFY_POLL_INTERVAL if getattr(args, "no_notify", False) else 1.0


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


def check_listen(address: str, flag: str) -> None:
    """Refuse, in one line naming `flag`, an address this process cannot
    listen on (most often a port in use), before anything is created: gRPC
    would report it only after the store was opened and migrated, with a log
    line of its own. A race with another process remains (Coordinator.start
    reports that one too)."""
    host_text, _, port_text = address.rpartition(":")
    host = host_text.strip("[]") or None
    try:
        port = int(port_text)
    except ValueError:
        raise ServerUsageError(f"{flag} {address!r} is not HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise ServerUsageError(f"{flag}: port {port} is out of range: use 0-65535 "
                               "(0 = any free port)")
    if port == 0:
        return  # any free port
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ServerCLIError(f"cannot listen on {address}: {exc}; correct {flag}") from None
    with socket.socket(family, kind, proto) as probe:
        # As gRPC and the HTTP server bind: a port left in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServerCLIError(
                    f"port {port} is already in use ({address}): stop what listens there "
                    f"or choose another port with {flag}") from None
            raise ServerCLIError(f"cannot listen on {address}: {exc.strerror}; "
                                 f"correct {flag}") from None


async def _dev(args: argparse.Namespace, load_tasks: Callable[[Sequence[str]], list[Any]]) -> int:
    tasks = load_tasks(args.worker) if args.worker else []
    engine = _config(args)  # bad options are refused before the store is touched
    check_listen(f"127.0.0.1:{args.port}", "--port")
    check_listen(f"127.0.0.1:{args.http_port}", "--http-port")
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    store = await open_store(f"sqlite:///{args.db}")
    listen = f"127.0.0.1:{args.port}"
    options = ServerOptions(listen=listen, http_listen=f"127.0.0.1:{args.http_port}",
                            public_url=args.public_url or None,
                            auth=False, engine=engine)
    print(f"ratchet dev: coordinator on {listen}, store {args.db}; auth is OFF "
          "(development mode, loopback only)", file=sys.stderr)
    workers = [Worker(tasks, listen, slots=args.slots, api_key="")] if tasks else []
    return await _serve(store, options, workers)


async def _server(args: argparse.Namespace) -> int:
    engine = _config(args)  # bad options are refused before the store is touched
    check_listen(args.listen, "--listen")
    check_listen(args.http_listen, "--http-listen")
    store = await open_store(args.database_url, notify=not args.no_notify)
    if args.no_notify:
        log.info("--no-notify: no LISTEN/NOTIFY; runs made ready on other coordinators are "
                 "found by polling")
    options = ServerOptions(listen=args.listen, http_listen=args.http_listen, auth=True,
                            public_url=args.public_url or None,
                            engine=engine, key_cache=args.key_cache)
    return await _serve(store, options)
