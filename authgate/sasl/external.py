"""EXTERNAL (RFC 4422 appendix A): the identity comes from below SASL, here
a verified TLS client certificate mapped to a user (authgate.client_certs).

    message = [authzid]      (UTF-8; empty: "act as the certificate's user")

The server has nothing to check but that the connection carries such an
identity (`ServerContext.external_identity`) and that an authzid, when
the client sends one, names that same user: acting as anyone else is
refused (`check_authzid`).
"""

from __future__ import annotations

from authgate.sasl.base import (
    Call,
    ClientContext,
    ClientCredentials,
    Failure,
    FailureReason,
    InitialResponse,
    LookupAnswer,
    OneMessageClient,
    ServerContext,
    ServerOutcome,
    Stage,
    Success,
    malformed,
    start_with_message,
)

__all__ = ["ExternalClient", "ExternalServer"]

MAX_AUTHZID = 1024


class ExternalServer:
    name = "EXTERNAL"

    def __init__(self, ctx: ServerContext) -> None:
        self._identity = ctx.external_identity
        self._stage = Stage("EXTERNAL server")

    def start(self, initial: InitialResponse) -> ServerOutcome:
        return start_with_message(
            self._stage, initial, self.step, what="the authorization identity"
        )

    def step(self, response: bytes) -> ServerOutcome:
        self._stage.check(Call.STEP)
        self._stage.end()
        if len(response) > MAX_AUTHZID or b"\x00" in response:
            return malformed("EXTERNAL authorization identity is not valid")
        try:
            authzid = response.decode("utf-8")
        except UnicodeDecodeError:
            return malformed("EXTERNAL authorization identity is not UTF-8")
        if self._identity is None:
            # Policy offers EXTERNAL only with a mapped certificate; a client
            # that asks anyway has no credential to show.
            return Failure(FailureReason.INVALID_CREDENTIALS, "no verified client certificate")
        return Success(self._identity, authzid or None)

    def resume(self, answer: LookupAnswer) -> ServerOutcome:
        self._stage.check(Call.RESUME)  # EXTERNAL never asks the store
        raise AssertionError("unreachable")


class ExternalClient(OneMessageClient):
    """Sends `creds.authzid` (or nothing): the certificate does the rest."""

    name = "EXTERNAL"

    def __init__(self, creds: ClientCredentials, ctx: ClientContext) -> None:
        self._message = creds.authzid.encode("utf-8")
        super().__init__()
