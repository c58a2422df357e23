"""What the proxy needs from any credential store (a users file, a
directory), so the two are interchangeable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from authgate.sasl.base import LookupAnswer, LookupRequest

if TYPE_CHECKING:
    from authgate.credentials.store import StoreOffer, User


class CredentialsUnavailable(Exception):
    """The store could not answer (a directory down or timing out): the
    client gets a temporary failure, never "wrong password"."""


class CredentialStore(Protocol):
    @property
    def realm(self) -> str | None: ...

    def __len__(self) -> int: ...

    def user(self, name: str) -> User | None:
        """The user's record (password dates for expiry), None if unknown here."""
        ...

    def resolve(self, request: LookupRequest) -> LookupAnswer: ...

    async def aresolve(self, request: LookupRequest) -> LookupAnswer: ...

    def offerable(self, order: Sequence[str], *, realm: str | None = None) -> StoreOffer: ...
