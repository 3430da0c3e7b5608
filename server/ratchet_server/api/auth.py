"""API keys and the one interceptor every RPC goes through.

`authorization: Bearer <key>` maps to an environment and a role. Keys are
stored only as SHA-256 hashes. The interceptor checks the role a method needs
and hands the caller's `Principal` to the servicer through a context variable.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ratchet_server import clock, model
from ratchet_server.store import Store, StoreUnavailable

DEV_ENV = "default"
# How long a revoked key may keep working on a coordinator: lookups are cached
# this long, and each coordinator checks its open sessions' keys this often
# (engine/keys.py), so new calls and open sessions stop within the same bound.
KEY_CACHE_SECONDS = 10.0

_WORKER = frozenset({model.Role.WORKER, model.Role.ADMIN})
_CLIENT = frozenset({model.Role.CLIENT, model.Role.ADMIN})
_ANY = frozenset(model.Role)

# Methods not listed here (health checking, reflection) need no key.
METHOD_ROLES: dict[str, frozenset[model.Role]] = {
    "/ratchet.v1.WorkerService/Session": _WORKER,
    "/ratchet.v1.RunService/Trigger": _CLIENT,
    "/ratchet.v1.RunService/BatchTrigger": _CLIENT,
    "/ratchet.v1.RunService/GetRun": _CLIENT,
    "/ratchet.v1.RunService/ListRuns": _CLIENT,
    "/ratchet.v1.RunService/CancelRun": _CLIENT,
    "/ratchet.v1.RunService/CompleteToken": _CLIENT,
    "/ratchet.v1.RunService/CreateToken": _CLIENT,
    "/ratchet.v1.RunService/GetToken": _CLIENT,
    "/ratchet.v1.RunService/ListTokens": _CLIENT,
    "/ratchet.v1.RunService/ListTasks": _CLIENT,
    "/ratchet.v1.RunService/ListWorkers": _CLIENT,
    "/ratchet.v1.RunService/GetRunHistory": _CLIENT,
    "/ratchet.v1.RunService/ReplayRun": _CLIENT,
    "/ratchet.v1.RunService/RetryRun": _CLIENT,
    "/ratchet.v1.RunService/DiscardRun": _CLIENT,
    "/ratchet.v1.RunService/ListStuckRuns": frozenset({model.Role.ADMIN}),
    "/ratchet.v1.SystemService/GetVersion": _ANY,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    env: str
    role: model.Role
    key_id: str


_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("ratchet_principal")


def principal() -> Principal:
    """The caller of the RPC being served (set by the interceptor)."""
    return _current.get()


def new_key() -> str:
    return "rk_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


async def create_key(store: Store, env: str, role: model.Role, name: str = "") -> str:
    """Create an API key and return it; only its hash is stored."""
    if not env or not env.replace("-", "").replace("_", "").isalnum():
        raise ValueError("environment must be letters, digits, '-' or '_'")
    key = new_key()
    await store.create_api_key(key_id="key_" + secrets.token_hex(8), env=env, role=role,
                               name=name, key_hash=hash_key(key))
    return key


async def list_keys(store: Store) -> list[model.ApiKeyInfo]:
    """Every key, oldest first: ids, environments, roles and dates, never a secret."""
    return await store.list_api_keys()


async def revoke_key(store: Store, key_id: str) -> tuple[model.ApiKeyInfo, bool]:
    """Revoke a key; the key as it is now, and whether this call revoked it
    (False when it was revoked already). Raises KeyError for an unknown id."""
    changed = await store.revoke_api_key(key_id, clock.now())
    for info in await store.list_api_keys():
        if info.id == key_id:
            return info, changed
    raise KeyError(key_id)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates and authorises every RPC; `store=None` turns auth off (dev)."""

    def __init__(self, store: Store | None, cache_seconds: float = KEY_CACHE_SECONDS) -> None:
        self._store = store
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal]] = {}

    def forget(self, key_ids: set[str]) -> None:
        """Drop cached lookups of these keys (found revoked): a session they
        opened that is ended now cannot reopen on the cached answer."""
        for digest, (_, who) in list(self._cache.items()):
            if who.key_id in key_ids:
                del self._cache[digest]

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        details: Any,
    ) -> Any:
        handler = await continuation(details)
        roles = METHOD_ROLES.get(details.method)
        if handler is None or roles is None:
            return handler
        try:
            who = await self._authenticate(details.invocation_metadata)
        except _Denied as denied:
            return _abort_handler(handler, denied.code, denied.message)
        except StoreUnavailable as exc:  # looking the key up failed: worth retrying
            return _abort_handler(handler, grpc.StatusCode.UNAVAILABLE, str(exc))
        if who.role not in roles:
            return _abort_handler(handler, grpc.StatusCode.PERMISSION_DENIED,
                                  f"role {who.role.value!r} may not call {details.method}")
        return _with_principal(handler, who)

    async def _authenticate(self, metadata: Any) -> Principal:
        if self._store is None:
            return Principal(env=DEV_ENV, role=model.Role.ADMIN, key_id="dev")
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED,
                          "missing API key: send 'authorization: Bearer <key>'")
        digest = hash_key(key.strip())
        cached = self._cache.get(digest)
        if cached is not None and time.monotonic() - cached[0] < self._cache_seconds:
            return cached[1]
        found = await self._store.find_api_key(digest)
        if found is None:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked API key")
        who = Principal(env=found.env, role=found.role, key_id=found.id)
        self._cache[digest] = (time.monotonic(), who)
        return who


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message


def _rebuild(handler: Any, behavior: Any) -> Any:
    if handler.unary_unary:
        factory = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        factory = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        factory = grpc.stream_unary_rpc_method_handler
    else:
        factory = grpc.stream_stream_rpc_method_handler
    return factory(behavior, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _original(handler: Any) -> Any:
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)


def _with_principal(handler: Any, who: Principal) -> Any:
    inner = _original(handler)
    if handler.unary_unary or handler.stream_unary:
        async def call(request: Any, context: Any) -> Any:
            _current.set(who)
            return await inner(request, context)
        return _rebuild(handler, call)

    async def stream(request: Any, context: Any) -> Any:
        _current.set(who)
        async for item in inner(request, context):
            yield item
    return _rebuild(handler, stream)


def _abort_handler(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    if handler.unary_unary or handler.stream_unary:
        async def call(request: Any, context: Any) -> Any:
            await context.abort(code, message)
        return _rebuild(handler, call)

    async def stream(request: Any, context: Any) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator
    return _rebuild(handler, stream)
