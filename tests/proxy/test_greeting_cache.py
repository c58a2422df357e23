"""GreetingCache: the backend's capabilities for a greeting that repeats
them (ManageSieve), asked once per TTL, a failure not kept."""

from __future__ import annotations

import asyncio

import pytest

from authgate.proxy.runtime import GreetingCache

pytestmark = pytest.mark.asyncio


async def test_asked_once_while_fresh_and_by_one_client_at_a_time() -> None:
    asked = 0

    async def ask() -> tuple[str, ...] | None:
        nonlocal asked
        asked += 1
        await asyncio.sleep(0)
        return ("SIEVE fileinto",)

    cache = GreetingCache(ttl=60)
    results = await asyncio.gather(*(cache.get(ask) for _ in range(5)))
    assert results == [("SIEVE fileinto",)] * 5
    assert asked == 1


async def test_a_failed_ask_is_not_kept_and_an_old_answer_expires() -> None:
    answers: list[tuple[str, ...] | None] = [None, ("SIEVE a",), ("SIEVE b",)]

    async def ask() -> tuple[str, ...] | None:
        return answers.pop(0)

    cache = GreetingCache(ttl=0)
    assert await cache.get(ask) is None
    assert await cache.get(ask) == ("SIEVE a",)
    assert await cache.get(ask) == ("SIEVE b",)  # ttl 0: asked again
