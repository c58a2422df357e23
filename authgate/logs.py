"""authgate's own log: the format (`log_format = "text" | "json"`), the
level (`log_level`), and the one record written per login outcome.

Every login attempt ends in exactly one record on the `authgate.login`
logger, with the same fields every time (LOGIN_FIELDS), so a log shipper
or fail2ban can act on it without parsing prose::

    2026-12-02 15:00:00,000 WARNING authgate.login: login outcome=failed
    listener=imap client=203.0.113.5 client_port=40000 proxy=- user=alice
    mechanism=PLAIN tls=TLSv1.3 reason=invalid-credentials backend=-
    duration_ms=12 app_password=-

(one line). `client` is the address to act on: the real client, read from
a trusted balancer's PROXY header when there is one (`proxy` then names
the balancer). A field with no value is `-` in text and null in JSON.
Values are facts about the connection, never a secret; a user name with a
space, quote or control character in it is JSON-quoted, so it cannot fake
a field or a line.

A leaf module: the standard library only.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import operator
import sys
import time
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "LOGIN_FIELDS",
    "JsonFormatter",
    "LogFormat",
    "LogLevel",
    "LoginRecord",
    "Outcome",
    "TextFormatter",
    "log_login",
    "setup_logging",
]

login_log = logging.getLogger("authgate.login")

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


class LogLevel(enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def number(self) -> int:
        return int(getattr(logging, self.name))


class Outcome(enum.Enum):
    """How a login attempt ended."""

    OK = "ok"  # authenticated and logged in at the backend
    FAILED = "failed"  # wrong user or password (a guess)
    REFUSED = "refused"  # by policy before any password was checked
    BLOCKED = "blocked"  # the address is blocked by the defence
    CANCELLED = "cancelled"  # the client cancelled the exchange
    ERROR = "error"  # malformed input, store or backend trouble


# Failure reasons (AuthFailed.reason) that are a policy's refusal, not a guess.
# (authgate.policy.Refusal values and the sasl FailureReasons a policy decides.)
_REFUSALS: Final = frozenset(
    {
        "not-available",
        "tls-required",
        "mechanism-needs-tls",
        "channel-binding-unavailable",
        "too-weak",
        "encryption-required",
        "digest-uri-mismatch",
        "too-long",
        "expired",
        "backend-password-expired",
    }
)
_GUESSES: Final = frozenset({"invalid-credentials", "authz-denied"})


def failure_outcome(reason: str) -> Outcome:
    """The outcome of a failed attempt by its reason."""
    if reason in _GUESSES:
        return Outcome.FAILED
    if reason in _REFUSALS:
        return Outcome.REFUSED
    if reason == "cancelled":
        return Outcome.CANCELLED
    return Outcome.ERROR


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """The fixed fields of one login outcome (None: no value)."""

    outcome: str
    listener: str
    client: str
    client_port: int | None
    proxy: str | None  # the trusted balancer the client came through
    user: str | None
    mechanism: str | None
    tls: str | None  # "TLSv1.3", or None for a cleartext connection
    reason: str | None
    backend: str | None  # host:port of the backend, once one was involved
    duration_ms: int
    # The label of the app password that matched (never the secret).
    app_password: str | None = None


LOGIN_FIELDS: Final = tuple(LoginRecord.__dataclass_fields__)
# Every field's value in one call (not dataclasses.asdict, which deep-copies
# each field, nor a getattr per field: a login writes this record every time).
_login_values: Final = operator.attrgetter(*LOGIN_FIELDS)


def login_message(record: LoginRecord) -> str:
    """The record as text: each field as name=value, "-" for no value, and
    a value JSON-quoted unless it is one printable word (so no value can
    fake a field or a line)."""
    parts = ["login"]
    for name, value in zip(LOGIN_FIELDS, _login_values(record), strict=True):
        if value is None:
            parts.append(name + "=-")
            continue
        text = value if type(value) is str else str(value)
        if not text or text == "-" or not text.isprintable() or " " in text or '"' in text:
            text = json.dumps(text, ensure_ascii=True)
        parts.append(name + "=" + text)
    return " ".join(parts)


def log_login(record: LoginRecord) -> None:
    """Write the record: INFO for a login, WARNING for anything else."""
    level = logging.INFO if record.outcome == Outcome.OK.value else logging.WARNING
    if login_log.isEnabledFor(level):
        login_log.log(level, "%s", login_message(record), extra={"login": record})


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT: the very text `logging.Formatter(TEXT_FORMAT)` writes
    (tests hold the two equal), for fewer instructions, as every login
    writes two records: the line is put together directly, not by
    %-formatting the record's dictionary, and the date and time of a
    second are formatted once for all its records."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")  # one tuple: threads may log too

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)
        msec_format = self.default_msec_format
        return msec_format % (text, record.msecs) if msec_format else text

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.asctime} {record.levelname} {record.name}: {record.message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and for a
    login record its fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        login = getattr(record, "login", None)
        if isinstance(login, LoginRecord):
            out["event"] = "login"
            # getattr, not dataclasses.asdict (a deep copy; see login_message).
            out.update((name, getattr(login, name)) for name in LOGIN_FIELDS)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True, separators=(",", ":"))


def setup_logging(level: int = logging.INFO, fmt: LogFormat = LogFormat.TEXT) -> None:
    """Log to stderr in the given format (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    # Neither format shows where a record was made or by which process or
    # thread: skip finding out (a stack walk, a getpid() system call and
    # thread look-ups per record; the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiosmtpd (the embedded demo backend) logs every SMTP command at INFO.
    logging.getLogger("mail.log").setLevel(max(level, logging.WARNING))
