"""LOGIN (draft-murchison-sasl-login-00): user name and password in two
prompts, "Username:" then "Password:".

Obsolete but still what many clients (Outlook, old phones, scripts) send.
If the client gives an initial response, it is the user name and the first
prompt is skipped (draft section 2). LOGIN has no authorization identity.
"""

from __future__ import annotations

from authgate.sasl.base import (
    MAX_PASSWORD_OCTETS,
    NO_RESPONSE,
    Call,
    Challenge,
    ClientAuthError,
    ClientContext,
    ClientCredentials,
    InitialResponse,
    Lookup,
    LookupAnswer,
    PasswordCheck,
    ServerContext,
    ServerOutcome,
    Stage,
    Success,
    invalid,
    malformed,
    password_answer,
    too_long,
)

__all__ = ["PASSWORD_PROMPT", "USERNAME_PROMPT", "LoginClient", "LoginServer"]

USERNAME_PROMPT = b"Username:"
PASSWORD_PROMPT = b"Password:"


def _decode(raw: bytes) -> str | None:
    """Non-empty UTF-8 text without NUL, or None (the caller's failure
    detail then names the field and never echoes the client's bytes)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # NUL has no business in a name or password and would corrupt a PLAIN
    # message if we relay these credentials to a backend.
    if not text or "\x00" in text:
        return None
    return text


# What LoginServer.step expects, in turn.
_USERNAME = "the user name"
_PASSWORD = "the password"  # noqa: S105 - names a message, holds none


class LoginServer:
    name = "LOGIN"

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._stage = Stage("LOGIN server")
        self._authcid = ""

    def start(self, initial: InitialResponse) -> ServerOutcome:
        self._stage.check(Call.START)
        self._stage.expect(Call.STEP, what=_USERNAME)
        if initial is NO_RESPONSE:
            return Challenge(USERNAME_PROMPT)
        # An initial response is the user name; an empty one is an empty user
        # name, which is malformed (not a request to be prompted).
        return self.step(initial)

    def step(self, response: bytes) -> ServerOutcome:
        self._stage.check(Call.STEP)
        if self._stage.awaits(_USERNAME):
            authcid = _decode(response)
            if authcid is None:
                self._stage.end()
                return malformed("LOGIN user name is empty, not UTF-8 or contains NUL")
            self._authcid = authcid
            self._stage.expect(Call.STEP, what=_PASSWORD)
            return Challenge(PASSWORD_PROMPT)
        if len(response) > MAX_PASSWORD_OCTETS:
            self._stage.end()
            return too_long("LOGIN")
        password = _decode(response)
        if password is None:
            self._stage.end()
            return malformed("LOGIN password is empty, not UTF-8 or contains NUL")
        self._stage.expect(Call.RESUME, what="the password check")
        return Lookup(PasswordCheck(self._authcid, password))

    def resume(self, answer: LookupAnswer) -> ServerOutcome:
        self._stage.check(Call.RESUME)
        self._stage.end()
        valid, canonical = password_answer(answer)
        if not valid:
            return invalid()
        return Success(canonical or self._authcid)


class LoginClient:
    name = "LOGIN"

    def __init__(self, creds: ClientCredentials, ctx: ClientContext) -> None:
        if creds.authzid and creds.authzid != creds.username:
            # LOGIN cannot say "act as X": dropping the authzid silently would
            # log in as the authcid (e.g. a master user) instead.
            raise ValueError("LOGIN cannot carry an authorization identity")
        for value in (creds.username, creds.password):
            if not value or "\x00" in value:
                raise ValueError("LOGIN needs a non-empty user name and password without NUL")
        self._answers = (creds.username.encode("utf-8"), creds.password.encode("utf-8"))
        self._stage = Stage("LOGIN client")
        self._sent = 0

    def start(self) -> bytes | None:
        self._stage.check(Call.START)
        self._stage.expect(Call.STEP, Call.FINISH, what="a prompt or the success")
        return None

    def step(self, challenge: bytes) -> bytes:
        self._stage.check(Call.STEP)
        # Servers word the prompts differently ("User Name", localised text,
        # even empty), so answer by position rather than by prompt text.
        if self._sent >= len(self._answers):
            raise ClientAuthError("LOGIN server sent more than two challenges")
        answer = self._answers[self._sent]
        self._sent += 1
        return answer

    def finish(self, additional: bytes | None) -> None:
        self._stage.check(Call.FINISH)
        self._stage.end()
        if additional:
            raise ClientAuthError("LOGIN server sent unexpected data with success")
