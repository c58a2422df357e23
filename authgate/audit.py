"""The audit log: append-only JSON-lines records with a hash chain.

One record per line, never rewritten by the proxy (the file is opened with
O_APPEND and each record is one write)::

    {"seq":0,"time":"2024-05-01T10:00:00.000Z","event":"auth","listener":"imap",
     "client":"203.0.113.5","user":"alice","mechanism":"PLAIN","outcome":"ok",
     "prev":"<64 hex>"}

`prev` links each record to the one before it: the MAC of the previous
record's JSON bytes (all zeros for the first), and `seq` counts from 0. A
record deleted, inserted, reordered or edited in the middle breaks the
chain at the next record, which `authgate log --verify` reports.

With a keyring (encryption at rest) each line is instead the base64 of one
sealed record (AES-256-GCM, see authgate.atrest.envelope) and the chain MAC
is an HMAC-SHA256 under a key derived from the data key: someone who can
write the file but has no password can neither read records nor forge a
consistent chain. Without a keyring the chain is plain SHA-256: it catches
damage and naive edits, but whoever can write the file can rewrite the
whole chain. Neither form can tell that the *newest* records were cut off
the end (nothing follows them); `log --verify` prints the count and last
seq so they can be compared with what was seen before.

Records never hold secrets: field names that look like one (password,
secret, token, response...) are refused, values are strings or integers
only, and long strings are cut.

Writers take an exclusive flock around each append, so several processes
(or `authgate encrypt` converting the file) never interleave half records
or fork the chain; a writer whose file was replaced (by encrypt/decrypt or
rotation) reopens the new one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import enum
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from authgate.atrest.envelope import RECORD_MAGIC, Keyring, fsync_dir
from authgate.errors import UserError

__all__ = [
    "GENESIS",
    "MAX_VALUE_CHARS",
    "AuditError",
    "AuditLog",
    "LogContents",
    "LogForm",
    "LogReader",
    "format_record",
    "log_form",
    "read_log",
    "reencode",
]

GENESIS: Final = bytes(32)
MAX_VALUE_CHARS: Final = 256
RESERVED: Final = frozenset({"seq", "time", "event", "prev"})
# A sealed line is base64 of RECORD_MAGIC + ...; 6 bytes encode to exactly
# these 8 characters, so the form of a line shows in its first bytes.
_SEALED_PREFIX: Final = base64.b64encode(RECORD_MAGIC)
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_EVENT = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
# A guard against a careless caller, not a filter: the fields are ours.
_SECRETISH = re.compile(r"pass|secret|token|credential|response|challenge|nonce|key|hash")


class AuditError(UserError):
    """The audit log cannot be read, verified or appended to."""


class LogForm(enum.Enum):
    PLAIN = "plain"
    SEALED = "sealed"


def _plain_mac(record: bytes) -> bytes:
    return hashlib.sha256(b"authgate audit chain v1\0" + record).digest()


def _mac(form: LogForm, keyring: Keyring | None, record: bytes) -> bytes:
    if form is LogForm.SEALED:
        assert keyring is not None
        return keyring.chain_mac(record)
    return _plain_mac(record)


def _dumps(record: dict[str, Any]) -> bytes:
    # ensure_ascii: a user name with a newline or a terminal escape in it
    # stays one inert line.
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _line_form(line: bytes) -> LogForm | None:
    if line.startswith(b"{"):
        return LogForm.PLAIN
    if line.startswith(_SEALED_PREFIX):
        return LogForm.SEALED
    return None


def log_form(data: bytes) -> LogForm | None:
    """The form of a log by its first line; None when it is empty or has
    no recognisable first line."""
    first = data.split(b"\n", 1)[0]
    return _line_form(first) if first else None


def _open_line(line: bytes, keyring: Keyring | None, source: str) -> tuple[bytes, LogForm]:
    """The record JSON bytes of one line and its form; ValueError (naming
    no secret) for a line that is not a valid record."""
    form = _line_form(line)
    if form is LogForm.PLAIN:
        return line, form
    if form is LogForm.SEALED:
        if keyring is None:
            raise AuditError(f"{source} is encrypted: give the admin password")
        try:
            blob = base64.b64decode(line, validate=True)
        except binascii.Error:
            raise ValueError("the encrypted record is damaged or was modified") from None
        try:
            return keyring.open_record(blob), form
        except ValueError:
            raise ValueError("the encrypted record is damaged or was modified") from None
    raise ValueError("is not an audit record")


def _parse_record(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("is not valid JSON") from None
    if not isinstance(record, dict):
        raise ValueError("is not an audit record")
    seq, prev = record.get("seq"), record.get("prev")
    if type(seq) is not int or seq < 0:
        raise ValueError("has no valid seq")
    if not isinstance(prev, str) or not re.fullmatch(r"[0-9a-f]{64}", prev):
        raise ValueError("has no valid prev")
    if not isinstance(record.get("event"), str) or not isinstance(record.get("time"), str):
        raise ValueError("has no event or time")
    return record


# ------------------------------------------------------------------ reading


class LogReader:
    """Reads and verifies a log incrementally (`feed` chunks, then `finish`):
    the records in order and a list of problems, each naming the line."""

    def __init__(self, keyring: Keyring | None, source: str) -> None:
        self._keyring = keyring
        self._source = source
        self._buffer = b""
        self.form: LogForm | None = None
        self.line_no = 0
        self.count = 0
        self.last_seq: int | None = None
        self.problems: list[str] = []
        self._expected_seq: int | None = 0
        self._prev: bytes | None = GENESIS
        self._previous_form: LogForm | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        records = []
        for line in lines:
            record = self._line(line)
            if record is not None:
                records.append(record)
        return records

    def finish(self) -> bool:
        """End of input; True when the last line was torn (no newline: a
        write cut short by a crash), which is reported as a problem."""
        if not self._buffer:
            return False
        self.line_no += 1
        self.problems.append(
            f"{self._source}: line {self.line_no}: incomplete last line (a write cut short?)"
        )
        self._buffer = b""
        return True

    def _problem(self, text: str) -> None:
        self.problems.append(f"{self._source}: line {self.line_no}: {text}")

    def _line(self, line: bytes) -> dict[str, Any] | None:
        self.line_no += 1
        try:
            data, form = _open_line(line, self._keyring, self._source)
            record = _parse_record(data)
        except ValueError as exc:
            self._problem(str(exc))
            # The chain cannot be followed across a record we cannot read.
            self._expected_seq, self._prev = None, None
            return None
        if form is LogForm.PLAIN and self._keyring is not None:
            # With encryption on, the proxy only ever writes sealed records
            # (AuditLog refuses to append to a plaintext log), so a plaintext
            # line is someone else's: a log planted beside the keyring, or
            # lines inserted by someone without the password (or an encrypt
            # that was interrupted before it reached the log). Its unkeyed
            # chain proves nothing. One problem per run of such lines.
            if self._previous_form is not LogForm.PLAIN:
                self._problem(
                    f"is not encrypted although {self._keyring.path} exists: a planted log, "
                    "lines inserted without the password, or an unfinished "
                    "`authgate encrypt` (run it again)"
                )
        elif self.form is not None and form is not self.form:
            state = "encrypted" if form is LogForm.SEALED else "not encrypted"
            self._problem(f"is {state}, unlike the lines before it (inserted?)")
        self._previous_form = form
        if self.form is None:
            self.form = form
        seq: int = record["seq"]
        if self._expected_seq is not None and seq != self._expected_seq:
            if self._expected_seq == 0:
                self._problem(
                    f"the log starts at record #{seq}, not #0: records were deleted from its start"
                )
            else:
                self._problem(
                    f"record #{seq} follows #{self._expected_seq - 1}: records were deleted, "
                    "inserted or reordered"
                )
        elif self._prev is not None and record["prev"] != self._prev.hex():
            self._problem(
                f"record #{seq}: the chain is broken: the record before it was modified or replaced"
            )
        self._prev = _mac(self.form, self._keyring, data)
        self._expected_seq = seq + 1
        self.last_seq = seq
        self.count += 1
        return record


@dataclass
class LogContents:
    records: list[dict[str, Any]]
    problems: list[str]
    form: LogForm | None
    torn_tail: bool = False
    last_seq: int | None = field(default=None)


def read_log(data: bytes, keyring: Keyring | None, source: str) -> LogContents:
    """Every record of a log and every problem found verifying it. AuditError
    only when it cannot be read at all (encrypted, no keyring)."""
    reader = LogReader(keyring, source)
    records = reader.feed(data)
    torn = reader.finish()
    return LogContents(records, reader.problems, reader.form, torn, reader.last_seq)


def reencode(data: bytes, source: str, old: Keyring | None, new: Keyring | None) -> bytes:
    """The same records in the other form (sealed under `new`, or plaintext
    when `new` is None), with the chain recomputed for that form.

    The old chain is verified first: converting a log whose chain is broken
    would launder the tampering, so that is an error (AuditError). A torn
    last line (a crash mid-append) is not a record and is dropped."""
    contents = read_log(data, old, source)
    problems = [p for p in contents.problems if "incomplete last line" not in p]
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise AuditError(f"{source} is damaged or was modified: {problems[0]}{more}")
    form = LogForm.SEALED if new is not None else LogForm.PLAIN
    out = []
    prev = GENESIS
    for record in contents.records:
        record = dict(record)
        record["prev"] = prev.hex()
        plain = _dumps(record)
        if new is not None:
            out.append(base64.b64encode(new.seal_record(plain)) + b"\n")
        else:
            out.append(plain + b"\n")
        prev = _mac(form, new, plain)
    return b"".join(out)


def format_record(record: dict[str, Any]) -> str:
    """One human-readable line: time, event, then key=value. Values with
    spaces or unprintable characters are JSON-quoted, so a hostile user
    name cannot inject terminal escapes or fake lines."""
    parts = [str(record.get("time", "?")), str(record.get("event", "?"))]
    for key, value in record.items():
        if key in RESERVED:
            continue
        text = str(value)
        if not text or not text.isprintable() or " " in text or '"' in text:
            text = json.dumps(text, ensure_ascii=True)
        parts.append(f"{key}={text}")
    return " ".join(parts)


# ------------------------------------------------------------------ writing


def _check_fields(event: str, fields: dict[str, str | int | None]) -> dict[str, str | int]:
    if not isinstance(event, str) or not _EVENT.fullmatch(event):
        raise ValueError(f"bad audit event name {event!r}")
    clean: dict[str, str | int] = {}
    for name, value in fields.items():
        if name in RESERVED or not _NAME.fullmatch(name):
            raise ValueError(f"bad audit field name {name!r}")
        if _SECRETISH.search(name):
            raise ValueError(
                f"audit field {name!r} looks like a secret; records never hold secrets"
            )
        if value is None:
            continue
        if not isinstance(value, str | int):
            raise TypeError(f"audit field {name!r} must be a str or int")
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            value = value[:MAX_VALUE_CHARS] + "...[cut]"
        clean[name] = value
    return clean


def _timestamp(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _last_line(fd: int, end: int) -> bytes:
    """The line ending at offset `end` (which holds its newline)."""
    chunk = 4096
    pos = end - 1  # the newline
    collected = b""
    while pos > 0:
        start = max(0, pos - chunk)
        block = os.pread(fd, pos - start, start)
        collected = block + collected
        cut = block.rfind(b"\n")
        if cut >= 0:
            return collected[cut + 1 :]
        pos = start
    return collected


def _end_of_last_full_line(fd: int, size: int) -> int:
    chunk = 4096
    pos = size
    while pos > 0:
        start = max(0, pos - chunk)
        cut = os.pread(fd, pos - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


class AuditLog:
    """An open audit log. `record` blocks (write + fsync): call it from a
    thread or a queue worker, not the event loop. Thread-safe."""

    def __init__(
        self,
        path: Path,
        keyring: Keyring | None,
        *,
        clock: Callable[[], float] = time.time,
        sync: bool = True,
    ) -> None:
        self.path = Path(path)
        self._keyring = keyring
        self._clock = clock
        self._sync = sync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._end = 0
        self._next_seq = 0
        self._prev = GENESIS
        self._form = LogForm.SEALED if keyring is not None else LogForm.PLAIN

    @classmethod
    def open(
        cls,
        path: Path,
        keyring: Keyring | None,
        *,
        clock: Callable[[], float] = time.time,
        sync: bool = True,
    ) -> AuditLog:
        """Open (or create, mode 0600) the log for appending. AuditError when
        its form does not match the keyring (encrypted but no password;
        plaintext although encryption is on) or its last record is damaged."""
        log = cls(path, keyring, clock=clock, sync=sync)
        log._fd = log._open_fd()
        return log

    def _open_fd(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        try:
            fsync_dir(self.path.parent)  # a newly created entry must survive a crash
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._load_tail(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _load_tail(self, fd: int) -> None:
        """Chain state from the last record on disk (called under the flock)."""
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A write cut short by a crash: never a complete record, and no
            # one was told it was logged. Cut it so the next record starts
            # on its own line.
            size = _end_of_last_full_line(fd, size)
            os.ftruncate(fd, size)
        self._end = size
        if size == 0:
            self._form = LogForm.SEALED if self._keyring is not None else LogForm.PLAIN
            self._next_seq, self._prev = 0, GENESIS
            return
        line = _last_line(fd, size)
        form = _line_form(line)
        if form is LogForm.SEALED and self._keyring is None:
            raise AuditError(f"{self.path} is encrypted: give the admin password")
        if form is LogForm.PLAIN and self._keyring is not None:
            raise AuditError(
                f"{self.path} is not encrypted although {self._keyring.path} exists: "
                "run `authgate encrypt` to finish encrypting"
            )
        try:
            data, form = _open_line(line, self._keyring, str(self.path))
            record = _parse_record(data)
        except ValueError as exc:
            raise AuditError(
                f"{self.path} is damaged or was modified: its last record {exc}"
            ) from None
        self._form = form
        self._next_seq = record["seq"] + 1
        self._prev = _mac(form, self._keyring, data)

    def _replaced(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino)

    def record(self, event: str, **fields: str | int | None) -> None:
        """Append one record. Fields are non-secret facts (listener, client,
        user, mechanism, outcome, ...); None values are left out."""
        clean = _check_fields(event, fields)
        with self._lock:
            while True:
                fd = self._fd
                if fd is None:
                    raise AuditError(f"{self.path}: the audit log is closed")
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if not self._replaced(fd):
                        if os.fstat(fd).st_size != self._end:
                            self._load_tail(fd)  # another writer appended
                        self._append(fd, event, clean)
                        return
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                # encrypt/decrypt or rotation replaced the file: follow it.
                self._fd = None
                os.close(fd)
                self._fd = self._open_fd()

    def _append(self, fd: int, event: str, fields: dict[str, str | int]) -> None:
        record: dict[str, Any] = {
            "seq": self._next_seq,
            "time": _timestamp(self._clock()),
            "event": event,
            **fields,
            "prev": self._prev.hex(),
        }
        plain = _dumps(record)
        if self._form is LogForm.SEALED:
            assert self._keyring is not None
            line = base64.b64encode(self._keyring.seal_record(plain)) + b"\n"
        else:
            line = plain + b"\n"
        try:
            _write_all(fd, line)
            if self._sync:
                os.fsync(fd)
        except OSError as exc:
            self._end = -1  # re-read the tail (and cut a torn line) next time
            raise AuditError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._end = os.fstat(fd).st_size
        self._next_seq += 1
        self._prev = _mac(self._form, self._keyring, plain)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
