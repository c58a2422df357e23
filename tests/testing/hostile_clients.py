"""Real mail clients against every hostile-server scenario of the plugin.

Each client is driven the way a careful program drives it: connect to the
STARTTLS port, require TLS (imaplib.starttls, poplib.stls, smtplib.starttls,
curl --ssl-reqd), trust only the stack's CA, log in, do one thing, leave.
What the client did is read from its result and from the connection's
transcript, and judged against the scenario's documented safe behaviour.

`python -m tests.testing.hostile_clients > docs/clients.md` measures
everything again and writes the table (test_hostile_clients.py runs the same
matrix and asserts the safe cells).
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import os
import poplib
import shutil
import smtplib
import sys
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from authgate.testing import scenarios
from authgate.testing.plugin import NO_DELAYS
from authgate.testing.stack import Stack, embedded_stack
from authgate.testing.transcripts import Transcript

TIMEOUT = 5.0  # each client's own timeout (slow-auth's delay is far below)
HOST = "localhost"  # the name on the stack's certificate (127.0.0.1 with curl -4)
USER = "alice"
PASSWORD = "Hostile-Test-pw1"
CURL_TIMEOUT = 10
SETTLE = 1.0  # seconds to wait for the server to see a client's connection end


@dataclass(frozen=True)
class Result:
    """What the client program reported."""

    logged_in: bool
    detail: str  # the error (class and message), or what it did
    believed: str = ""  # capabilities/output it acted on, for injection checks


@dataclass(frozen=True)
class Run:
    client: str
    scenario: str
    result: Result
    transcripts: list[Transcript]

    @property
    def transcript(self) -> Transcript | None:
        return self.transcripts[0] if self.transcripts else None


def _error(exc: BaseException) -> Result:
    text = str(exc).replace(PASSWORD, "<password>")
    if len(text) > 120:
        text = text[:120] + "..."
    return Result(False, f"{type(exc).__name__}: {text}")


# --------------------------------------------------------------- python


def run_imaplib(stack: Stack) -> Result:
    endpoint = stack["imap"]
    try:
        client = imaplib.IMAP4(HOST, endpoint.port, timeout=TIMEOUT)
    except Exception as exc:
        return _error(exc)
    try:
        client.starttls(ssl_context=stack.ssl_context())
        believed = " ".join(client.capabilities)
        client.login(USER, PASSWORD)
        client.select("INBOX")
        return Result(True, "logged in, selected INBOX" + _alerts(client), believed)
    except Exception as exc:
        failed = _error(exc)
        return Result(False, failed.detail + _alerts(client))
    finally:
        with contextlib.suppress(Exception):
            client.logout()
        with contextlib.suppress(Exception):
            client.shutdown()


def _alerts(client: imaplib.IMAP4) -> str:
    """imaplib keeps [ALERT] texts among its untagged responses, where a
    program must look for them (response("ALERT")); it raises nothing."""
    if "ALERT" not in client.untagged_responses:
        return ""
    alerts = client.untagged_responses["ALERT"]
    shown = " ".join(a.decode() if isinstance(a, bytes) else str(a) for a in alerts if a)
    return f" (untagged ALERT kept: {shown[:60] or 'the code only, without its text'})"


def run_poplib(stack: Stack) -> Result:
    endpoint = stack["pop3"]
    try:
        client = poplib.POP3(HOST, endpoint.port, timeout=TIMEOUT)
    except Exception as exc:
        return _error(exc)
    try:
        client.stls(context=stack.ssl_context())
        client.user(USER)
        client.pass_(PASSWORD)
        client.stat()
        client.quit()
        return Result(True, "logged in, read the mailbox size")
    except Exception as exc:
        return _error(exc)
    finally:
        with contextlib.suppress(Exception):
            client.close()


def run_smtplib(stack: Stack) -> Result:
    endpoint = stack["submission"]
    try:
        client = smtplib.SMTP(HOST, endpoint.port, timeout=TIMEOUT)
    except Exception as exc:
        return _error(exc)
    try:
        client.starttls(context=stack.ssl_context())
        client.ehlo()
        believed = " ".join(client.esmtp_features)
        client.login(USER, PASSWORD)
        client.sendmail(f"{USER}@localhost", [f"{USER}@localhost"], b"Subject: t\r\n\r\nhi\r\n")
        client.quit()
        return Result(True, "logged in, sent a message", believed)
    except Exception as exc:
        return _error(exc)
    finally:
        with contextlib.suppress(Exception):
            client.close()


# ----------------------------------------------------------------- curl


def curl_binary() -> str:
    path = shutil.which("curl")
    if path is None:  # a failure, never a skip (tests/interop: ./dev installs it)
        raise AssertionError("curl is not installed: run ./dev test as root")
    return path


async def run_curl(stack: Stack, protocol: str, workdir: Path) -> Result:
    listener = {"imap": "imap", "pop3": "pop3", "smtp": "submission"}[protocol]
    port = stack[listener].port
    args = [
        curl_binary(), "-4", "-q", "-v", "--ssl-reqd", "--max-time", str(CURL_TIMEOUT),
        "--cacert", str(stack.ca_file), "--user", f"{USER}:{PASSWORD}",
    ]  # fmt: skip
    if protocol == "imap":
        args.append(f"imap://{HOST}:{port}/INBOX;UID=1")
    elif protocol == "pop3":
        args.append(f"pop3://{HOST}:{port}/1")
    else:
        message = workdir / "message.eml"
        message.write_bytes(b"Subject: t\r\n\r\nhi\r\n")
        args += [
            "--mail-from", f"{USER}@localhost", "--mail-rcpt", f"{USER}@localhost",
            "--upload-file", str(message), f"smtp://{HOST}:{port}",
        ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(CURL_TIMEOUT + 5):
            _, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return Result(False, "curl hung (killed)")
    verbose = err.decode("utf-8", "replace").replace(PASSWORD, "<password>")
    # What curl read from the server: its "< " lines.
    believed = "\n".join(line for line in verbose.splitlines() if line.startswith("< "))
    if process.returncode == 0:
        return Result(True, "exit 0 (logged in, fetched or sent)", believed)
    last = [line for line in verbose.splitlines() if line.startswith("curl: (")]
    return Result(False, last[-1] if last else f"exit {process.returncode}", believed)


# ---------------------------------------------------------------- gsasl


async def run_gsasl(stack: Stack, protocol: str) -> Result:
    """GNU SASL's command-line client: STARTTLS (its default with
    --connect), the stack's CA, DIGEST-MD5 (a mechanism with a server
    proof; its SCRAM does not complete against authgate, see
    tests/interop/matrix.py), then LOGOUT or QUIT at the end of stdin."""
    path = shutil.which("gsasl")
    if path is None:  # a failure, never a skip
        raise AssertionError("gsasl is not installed: run ./dev test as root")
    listener = {"imap": "imap", "smtp": "submission"}[protocol]
    args = [
        path, "--client", f"--{protocol}", "--connect", f"{HOST}:{stack[listener].port}",
        "--starttls", "--x509-ca-file", str(stack.ca_file), "--mechanism", "DIGEST-MD5",
        "--authentication-id", USER, "--password", PASSWORD, "--realm", "localhost", "--quiet",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(CURL_TIMEOUT + 5):
            out, _ = await process.communicate(b"")
    except TimeoutError:
        process.kill()
        await process.wait()
        return Result(False, "gsasl hung (killed)")
    text = out.decode("utf-8", "replace").replace(PASSWORD, "<password>")
    errors = [line.split("gsasl: ", 1)[1] for line in text.splitlines() if "gsasl: " in line]
    errors = [line for line in errors if "poll stdin" not in line]
    if process.returncode == 0 and not errors:
        return Result(True, "exit 0 (authenticated)", text)
    return Result(False, errors[-1] if errors else f"exit {process.returncode}", text)


def _gsasl(protocol: str) -> Driver:
    async def drive(stack: Stack, workdir: Path) -> Result:
        return await run_gsasl(stack, protocol)

    return drive


# --------------------------------------------------------------- matrix

Driver = Callable[[Stack, Path], Awaitable[Result]]


def _threaded(function: Callable[[Stack], Result]) -> Driver:
    async def drive(stack: Stack, workdir: Path) -> Result:
        return await asyncio.to_thread(function, stack)

    return drive


def _curl(protocol: str) -> Driver:
    async def drive(stack: Stack, workdir: Path) -> Result:
        return await run_curl(stack, protocol, workdir)

    return drive


CLIENTS: dict[str, tuple[str, Driver]] = {
    "imaplib": ("imap", _threaded(run_imaplib)),
    "poplib": ("pop3", _threaded(run_poplib)),
    "smtplib": ("smtp", _threaded(run_smtplib)),
    "curl imap": ("imap", _curl("imap")),
    "curl pop3": ("pop3", _curl("pop3")),
    "curl smtp": ("smtp", _curl("smtp")),
    "gsasl imap": ("imap", _gsasl("imap")),
    "gsasl smtp": ("smtp", _gsasl("smtp")),
}


def start_stack(workdir: Path, scenario: str | None = None) -> AbstractAsyncContextManager[Stack]:
    return embedded_stack(
        workdir,
        users={USER: PASSWORD},
        host="127.0.0.1",
        extra_config=NO_DELAYS,
        scenario=scenario,
        record=True,
    )


async def run_clients(stack: Stack, scenario: str, workdir: Path) -> list[Run]:
    """Every client in turn against `stack`, playing `scenario`."""
    if scenarios.SCENARIOS[scenario].certificate is None:
        stack.play(scenario, {"delay": 0.2})
    runs = []
    for name, (protocol, drive) in CLIENTS.items():
        if protocol not in scenarios.SCENARIOS[scenario].protocols:
            continue
        before = len(stack.transcripts)
        result = await drive(stack, workdir)
        mine = stack.transcripts[before:]
        # The client has exited or returned; give the server a moment to
        # read its last bytes. (A client that closes during the TLS handshake
        # leaves the server's side waiting for its handshake timeout: not
        # waited for.)
        for transcript in mine:
            await transcript.wait_ended(SETTLE)
        runs.append(Run(name, scenario, result, mine))
    return runs


async def run_scenario(scenario: str, workdir: Path, stack: Stack | None = None) -> list[Run]:
    """The clients against `stack` (lens scenarios), or against a stack
    of the scenario's own (bad certificates, or no stack given)."""
    if stack is not None and scenarios.SCENARIOS[scenario].certificate is None:
        return await run_clients(stack, scenario, workdir)
    async with start_stack(workdir / scenario, scenario) as own:
        return await run_clients(own, scenario, workdir)


# -------------------------------------------------------------- verdicts


def _logins_before_tls(t: Transcript) -> list[bytes]:
    verbs = scenarios.LOGIN_VERBS[t.protocol]
    out = []
    for line in t.client_lines(tls=False):
        words = line.split()
        if t.protocol == "imap":
            words = words[1:]
        if words and words[0].decode("ascii", "replace").upper() in verbs:
            out.append(line)
    return out


def _login_lines(t: Transcript, *, tls: bool | None = None) -> list[bytes]:
    verbs = scenarios.LOGIN_VERBS[t.protocol]
    out = []
    for line in t.client_lines(tls=tls):
        words = line.split()
        if t.protocol == "imap":
            words = words[1:]
        if words and words[0].decode("ascii", "replace").upper() in verbs:
            if words[0].upper() == b"AUTH" and len(words) == 1:
                continue
            out.append(line)
    return out


def verdict(run: Run) -> tuple[bool | None, str]:
    """(safe, what the transcript shows); safe None: not applicable."""
    t = run.transcript
    result = run.result
    name = run.scenario
    if t is None:
        return None, "no connection"
    leaked = t.secret_before_tls(PASSWORD) is not None
    plain_logins = _logins_before_tls(t)
    if leaked:
        return False, "sent the password before TLS"
    if name in ("strip-starttls", "strip-starttls-refused", "cleartext-only-mechanisms"):
        if plain_logins:
            return False, f"logged in without TLS ({plain_logins[0][:40]!r})"
        if result.logged_in and not t.tls:
            return False, "carried on without TLS"
        if result.logged_in:
            return True, "started TLS first, logged in inside it"
        return True, "stopped before any credential"
    if name == "inject-after-starttls":
        if scenarios.INJECTED in result.believed:
            return False, "took the injected plaintext as a TLS-protected answer"
        if result.logged_in:
            return True, "dropped the injected bytes, logged in inside TLS"
        return True, "stopped: saw plaintext behind the STARTTLS reply"
    if name == "preauth":
        used = [
            line for line in t.client_lines(tls=False)
            if line.split()[1:2] not in ([b"CAPABILITY"], [b"LOGOUT"], [b"STARTTLS"])
        ]  # fmt: skip
        if used or (result.logged_in and not t.tls):
            return False, f"used the unencrypted PREAUTH session ({used[0][:40]!r})" if used else (
                "used the unencrypted PREAUTH session"
            )
        if t.tls:
            # Only a test server accepts that; an attacker sending PREAUTH would not.
            return True, "ignored PREAUTH and sent STARTTLS anyway, used only TLS"
        return True, "closed without using the session"
    if name == "tamper-capabilities":
        if not t.tls:
            return False, "never started TLS"
        if t.asked_capabilities(tls=True):
            return True, "asked capabilities again inside TLS"
        return False, "did not ask capabilities again inside TLS"
    if name == "tamper-capabilities-stale":
        again = [line for line in t.client_lines(tls=True) if line.upper().endswith(b"STARTTLS")
                 or line.upper() == b"STLS"]  # fmt: skip
        if again:
            return False, "sent STARTTLS a second time inside TLS"
        return True, "no second STARTTLS; " + ("logged in" if result.logged_in else "gave up")
    if name.startswith("bad-certificate-"):
        if t.client_bytes(tls=True) or result.logged_in:
            return False, "went on over the bad certificate"
        return True, "refused the certificate"
    if name == "bad-server-proof":
        proof_mechs = (b"SCRAM-", b"DIGEST-MD5")
        used = [line for line in _login_lines(t) if any(m in line.upper() for m in proof_mechs)]
        if not used:
            return None, "uses no mechanism with a server proof"
        if result.logged_in:
            return False, "accepted the wrong server proof"
        return True, "rejected the wrong server proof"
    if name == "temporary-failure":
        attempts = _login_lines(t)
        if result.logged_in:
            return False, "logged in?"
        if len(attempts) > 1:
            mechs = b", ".join(a.split()[1 if t.protocol != "imap" else 2][:12] for a in attempts)
            weak = any(m in mechs for m in (b"PLAIN", b"LOGIN"))
            return not weak, (
                f"tried {len(attempts)} mechanisms in turn ({mechs.decode()})"
                + (": a hostile server learns the password" if weak else "")
            )
        return True, "reported the error, no retry"
    if name == "disconnect-mid-sasl":
        if result.logged_in:
            return False, "reported success"
        return True, "reported an error"
    if name == "slow-auth":
        if result.logged_in:
            return True, "waited and logged in"
        return False, "gave up on a 0.2 s delay"
    if name == "oversized-line":
        if "hung" in result.detail:
            return False, "hung"
        return True, "logged in" if result.logged_in else "failed cleanly"
    if name == "alert-and-referral":
        if len(run.transcripts) > 1 or result.logged_in:
            return False, "followed the referral"
        if run.client.startswith("curl"):
            seen = scenarios.ALERT_TEXT in result.believed
            where = "ALERT text only in curl -v output" if seen else "ALERT not shown"
        elif "without its text" in result.detail:
            where = "response('ALERT') says an ALERT came, but its text is dropped"
        elif "untagged ALERT kept" in result.detail:
            where = "ALERT text kept for the program to ask for (response('ALERT')), not raised"
        else:
            where = "ALERT not shown"
        return True, f"did not follow the referral; {where}"
    return None, "?"


def table(runs: list[Run]) -> str:
    clients = list(CLIENTS)
    by = {(r.scenario, r.client): r for r in runs}
    lines = [
        "| scenario | " + " | ".join(clients) + " |",
        "|---|" + "---|" * len(clients),
    ]
    for name in scenarios.SCENARIOS:
        cells = []
        for client in clients:
            run = by.get((name, client))
            if run is None:
                cells.append("n/a")
                continue
            safe, note = verdict(run)
            mark = {True: "safe", False: "**UNSAFE**", None: "n/a"}[safe]
            cells.append(f"{mark}: {note}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(runs: list[Run]) -> str:
    out = []
    for run in runs:
        out.append(f"- `{run.scenario}` / {run.client}: {run.result.detail}")
    return "\n".join(out)


async def measure_all() -> list[Run]:
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with start_stack(Path(tmp) / "shared") as stack:
            for name in scenarios.SCENARIOS:
                runs += await run_scenario(name, Path(tmp), stack)
    return runs


def versions() -> str:
    import ssl
    import subprocess

    curl = subprocess.run(
        [curl_binary(), "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.splitlines()[0]
    return f"Python {sys.version.split()[0]} ({ssl.OPENSSL_VERSION}); {curl}"


# Client/scenario cells measured unsafe; test_hostile_clients.py asserts
# these stay unsafe and every other cell safe, so docs/clients.md stays true.
EXPECTED_UNSAFE = {
    ("tamper-capabilities", "poplib"),
    ("temporary-failure", "smtplib"),
    ("bad-server-proof", "curl imap"),
    ("bad-server-proof", "curl pop3"),
    ("bad-server-proof", "curl smtp"),
}

HEAD = """\
# What real mail clients do against a hostile server

Generated from real runs: `PYTHONPATH=. .venv/bin/python -m tests.testing.hostile_clients
> docs/clients.md` (about 30 s). `tests/testing/test_hostile_clients.py` runs the same
matrix on every test run and fails when a cell changes, so this page stays what the
clients do.

Every scenario is one of the pytest plugin's (`@pytest.mark.authgate(scenario=...)`,
README "Testing your mail client against a hostile server"); what each does and the
safe behaviour it checks are in `authgate/testing/scenarios.py`. Each client is driven
the way a careful program drives it: the STARTTLS port, TLS required
(`imaplib.IMAP4.starttls`, `poplib.POP3.stls`, `smtplib.SMTP.starttls`, `curl
--ssl-reqd`, `gsasl --starttls` with `--mechanism DIGEST-MD5`), only the stack's CA trusted, log in, read or send one message, leave. A
cell is judged from the client's result and the connection's transcript: *safe* means
it did what the scenario's "safe client" text says; **UNSAFE** is a finding; n/a: the
scenario does not apply (an IMAP-only scenario, or a client with no mechanism that has
a server proof: Python's libraries offer none).

Findings, in short:

- **curl** does not check the DIGEST-MD5 `rspauth` (it answers any value with an empty
  response and carries on), so a server that does not know the password passes as one
  that does (RFC 2831 section 2.1.3). Prefer a client that verifies the server's proof,
  or SCRAM with a client that checks `v=`.
- **smtplib** `login()` answers a temporary failure (454) to CRAM-MD5 by trying PLAIN,
  then LOGIN: a hostile server that says 454 gets the password in the clear (inside
  TLS, but to that server). A program that wants one mechanism calls
  `auth(mechanism, authobject)` itself instead of `login()`.
- **poplib** `stls()` does not ask CAPA again inside TLS; a program that acts on the
  list it read before TLS acts on what an attacker may have written (RFC 2595 section
  4). Call `capa()` again after `stls()`.
- **imaplib** records that an `[ALERT]` arrived (`response('ALERT')` gives `[None]`) but
  drops its text, which RFC 9051 section 7.1 says MUST be shown to the user.
- **gsasl** (GNU SASL 2.2.0) does check `rspauth` and stops. Without `--starttls`
  it uses STARTTLS only when offered: against `strip-starttls` it then authenticated
  with DIGEST-MD5 in plaintext (measured by hand, not in the table). With PREAUTH it
  sends STARTTLS anyway (only a test server accepts that, so it stays inside TLS).
- Every client refuses a stripped or refused STARTTLS when told to require TLS, ignores
  plaintext injected behind the STARTTLS reply (curl and gsasl stop with an error;
  curl's is the CVE-2021-22947 fix), and refuses all four bad certificates. On a
  1.1 MB line the Python libraries and curl fail cleanly; gsasl reads it and goes on.
"""


def main() -> None:
    runs = asyncio.run(measure_all())
    print(HEAD)
    print(f"Measured with {versions()}, {os.uname().sysname} {os.uname().machine}.")
    print()
    print(table(runs))
    print()
    print("### What each client reported\n")
    print(details(runs))


if __name__ == "__main__":
    main()
