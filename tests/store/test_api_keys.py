"""Listing and revoking API keys, on every store."""

from __future__ import annotations

import pytest

from ratchet_server import model
from ratchet_server.store import Store

pytestmark = pytest.mark.timeout(60)


async def test_keys_are_listed_and_revoked_once(store: Store) -> None:
    await store.create_api_key(key_id="k1", env="a", role=model.Role.WORKER, name="w",
                               key_hash="h1")
    await store.create_api_key(key_id="k2", env="b", role=model.Role.CLIENT, name="",
                               key_hash="h2")
    listed = await store.list_api_keys()
    assert [(k.id, k.env, k.role, k.name, k.revoked_at) for k in listed] == [
        ("k1", "a", model.Role.WORKER, "w", None), ("k2", "b", model.Role.CLIENT, "", None)]
    assert all(k.created_at > 0 for k in listed)

    assert await store.revoke_api_key("k1", 1234.5) is True
    assert await store.revoke_api_key("k1", 9999.0) is False  # already revoked: unchanged
    assert await store.revoke_api_key("nope", 1.0) is False
    assert await store.find_api_key("h1") is None
    assert await store.find_api_key("h2") is not None
    revoked = {k.id: k.revoked_at for k in await store.list_api_keys()}
    assert revoked == {"k1": 1234.5, "k2": None}
