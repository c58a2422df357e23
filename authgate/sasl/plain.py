"""PLAIN (RFC 4616): the password itself, in one message.

    message = [authzid] NUL authcid NUL passwd      (UTF-8)

The server cannot verify anything by itself: it hands the password to the
store as a `PasswordCheck`, which may run a slow hash off the event loop.
Policy decides elsewhere whether PLAIN may be offered without TLS.
"""

from __future__ import annotations

from authgate.sasl.base import (
    MAX_PASSWORD_OCTETS,
    Call,
    ClientContext,
    ClientCredentials,
    Failure,
    InitialResponse,
    Lookup,
    LookupAnswer,
    OneMessageClient,
    PasswordCheck,
    ServerContext,
    ServerOutcome,
    Stage,
    Success,
    check_authzid,
    invalid,
    malformed,
    password_answer,
    start_with_message,
    too_long,
)

__all__ = ["PlainClient", "PlainServer"]


def _parse(message: bytes) -> tuple[str, str, str] | Failure:
    """Split a PLAIN message into (authzid, authcid, passwd) or a Failure
    whose detail never repeats the message (it holds the password)."""
    # RFC 4616 section 2: UTF8SAFE excludes NUL, so exactly two NULs separate
    # exactly three fields; anything else is not a PLAIN message.
    fields = message.split(b"\x00")
    if len(fields) != 3:
        return malformed("PLAIN message must have three NUL-separated fields")
    if len(fields[2]) > MAX_PASSWORD_OCTETS:
        return too_long("PLAIN")
    try:
        authzid, authcid, passwd = (f.decode("utf-8") for f in fields)
    except UnicodeDecodeError:
        return malformed("PLAIN message is not valid UTF-8")
    # authcid and passwd are 1*SAFE; only the authzid may be empty.
    if not authcid:
        return malformed("PLAIN authentication identity is empty")
    if not passwd:
        return malformed("PLAIN password is empty")
    return authzid, authcid, passwd


class PlainServer:
    name = "PLAIN"

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._stage = Stage("PLAIN server")
        self._authcid = ""
        self._authzid: str | None = None

    def start(self, initial: InitialResponse) -> ServerOutcome:
        # RFC 4422 section 5: no initial response, so send an empty challenge
        # and the message comes back as the reply. An *empty* initial
        # response (b"") is different: it is a malformed message.
        return start_with_message(self._stage, initial, self.step, what="the PLAIN message")

    def step(self, response: bytes) -> ServerOutcome:
        self._stage.check(Call.STEP)
        parsed = _parse(response)
        if isinstance(parsed, Failure):
            self._stage.end()
            return parsed
        authzid, authcid, passwd = parsed
        self._authcid = authcid
        self._authzid = authzid or None
        self._stage.expect(Call.RESUME, what="the password check")
        return Lookup(PasswordCheck(authcid, passwd))

    def resume(self, answer: LookupAnswer) -> ServerOutcome:
        self._stage.check(Call.RESUME)
        self._stage.end()
        valid, canonical = password_answer(answer)
        if not valid:
            return invalid()
        authzid = self._authzid
        if canonical is not None and authzid == self._authcid:
            authzid = canonical  # "ALICE" acting as "ALICE" is alice acting as herself
        return check_authzid(Success(canonical or self._authcid, authzid))


class PlainClient(OneMessageClient):
    name = "PLAIN"

    def __init__(self, creds: ClientCredentials, ctx: ClientContext) -> None:
        # Our own configuration, not the peer's data: fail loudly at set-up
        # rather than send a message the server must reject.
        for value in (creds.authzid, creds.username, creds.password):
            if "\x00" in value:
                raise ValueError("PLAIN credentials must not contain NUL")
        if not creds.username or not creds.password:
            raise ValueError("PLAIN needs a non-empty user name and password")
        self._message = b"\x00".join(
            v.encode("utf-8") for v in (creds.authzid, creds.username, creds.password)
        )
        super().__init__()
