"""`DirectoryStore`: SASL lookups answered from a `Directory`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor

from authgate.credentials.directory.client import Directory
from authgate.credentials.store import DIRECTORY_REASON, StoreOffer
from authgate.sasl.base import (
    LookupAnswer,
    LookupRequest,
    PasswordCheck,
    SecretLookup,
)


class DirectoryStore:
    """Answers SASL lookups from a Directory, with the surface the proxy
    uses on a UserStore: `resolve`, `aresolve`, `offerable`, `realm`.

    A PasswordCheck is a bind; a SecretLookup gets None (a directory reveals
    no secret), which is why `offerable` keeps only PLAIN and LOGIN.
    `resolve` raises DirectoryUnavailable when the directory cannot answer."""

    def __init__(self, directory: Directory, *, executor: Executor | None = None) -> None:
        self.directory = directory
        self._executor = executor

    @property
    def realm(self) -> str | None:
        return None

    def __len__(self) -> int:
        # The users live in the directory: there is no list to count.
        return 0

    def user(self, name: str) -> None:
        """No local record: a directory's own policy governs expiry."""
        return None

    def backend_host(self, name: str) -> str | None:
        """[directory] backend_attribute's value for `name`, read when they
        logged in (authgate.routing maps it through [routing] hosts)."""
        return self.directory.backend_host(name)

    def resolve(self, request: LookupRequest) -> LookupAnswer:
        if isinstance(request, PasswordCheck):
            return self.directory.authenticate(request.authcid, request.password)
        if isinstance(request, SecretLookup):
            return None
        raise TypeError(f"not a lookup request: {type(request).__name__}")

    async def aresolve(
        self, request: LookupRequest, *, executor: Executor | None = None
    ) -> LookupAnswer:
        """`resolve` in a worker thread: a bind is a network round trip."""
        chosen = executor or self._executor
        if chosen is None:
            return await asyncio.to_thread(self.resolve, request)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(chosen, self.resolve, request)

    def offerable(self, order: Sequence[str], *, realm: str | None = None) -> StoreOffer:
        return StoreOffer.password_only(order, DIRECTORY_REASON)

    def close(self) -> None:
        self.directory.close()
