"""The ManageSieve section of docs/interop.md (`matrix._iter_docs` writes it
after the mail matrix): what tests/interop/test_managesieve.py runs and shows.

The text is fixed; only the version line is read from the installed
programs. test_managesieve checks that docs/interop.md holds the text, so a
change here without a regenerated (or hand-updated) file fails."""

from __future__ import annotations

import importlib.metadata

from tests.interop.notes import program_version, with_versions

SECTION: list[str] = [
    "## ManageSieve: authgate in front of Dovecot's managesieve",
    "",
    "From `tests/interop/test_managesieve.py` (in `./dev test`), against a real Dovecot "
    "with Pigeonhole's ManageSieve (`start_dovecot(sieve=True)`: a plain listener that "
    "offers STARTTLS and a `haproxy = yes` one, scripts in `~/sieve`, the active one the "
    "`~/.dovecot.sieve` symlink). authgate: two `managesieve` listeners with STARTTLS, "
    "`sieve` in terminate mode (logs in to Dovecot as the master user, PLAIN with the "
    "user as authzid, the client's address in a PROXY v2 header) and `sieve-relay` in "
    "relay mode (the client's SASL passed through, STARTTLS toward Dovecot); policy "
    "`require-secure-auth`, mechanisms SCRAM-SHA-256 and PLAIN, exempt network "
    "`127.0.0.77/32`. A success counts only when the script is in the user's home on the "
    "Dovecot side and is the active one.",
    "",
    "| client | case | terminate | relay |",
    "|---|---|---|---|",
    "| sieve-connect `--exec` | STARTTLS (CA checked), PLAIN, `put`, `list`, `activate` "
    "from 127.0.0.1 | ✔ script stored and active; Dovecot logs the master login with "
    "`rip=127.0.0.1` | ✔ the same |",
    "| sievelib `connect(starttls=True)` | PLAIN, and LOGIN (its two responses sent "
    "before any challenge), then `putscript`, `setactive`, `listscripts` | ✔ (Dovecot "
    "sees the master's PLAIN) | ✔ (Dovecot sees the client's PLAIN or LOGIN) |",
    "| sievelib `connect(starttls=False)` | cleartext from 127.0.0.1 | ✘ PLAIN not in "
    "`SASL` before TLS, sievelib finds no mechanism | ✘ the same |",
    '| raw socket | `AUTHENTICATE "PLAIN" {n+}` literal in cleartext from 127.0.0.1 | '
    "✘ `NO (ENCRYPT-NEEDED)`; no login reaches Dovecot | ✘ the same |",
    "| raw socket | the same from 127.0.0.77 (exempt) | ✔ `OK`, then `LISTSCRIPTS` "
    "answered by Dovecot | ✔ |",
    "| raw socket | STARTTLS with a PLAIN login in the same segment, from 127.0.0.1 | "
    "dropped; inside TLS only the capability list, "
    '`LISTSCRIPTS` gets `NO "Authenticate first."`; no login reaches Dovecot | the same |',
    "| raw socket | the greeting | `SIEVE` and `NOTIFY` are Dovecot's (asked once a "
    "minute), `SASL` is the policy's (`SCRAM-SHA-256` before TLS), Dovecot's `XCLIENT` "
    "is not repeated | – |",
    "",
    "The greeting's Sieve capabilities come from the backend: authgate asks Dovecot for "
    "its capability list (a connection that logs in to nothing) and keeps it for 60 s. "
    "After STARTTLS authgate sends its capability list again unasked (RFC 5804 section "
    "2.2), which both clients read. sieve-connect cannot choose its source address, so "
    "the exempt rows use a raw socket bound to 127.0.0.77.",
]


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def section_lines() -> list[str]:
    """The section, with the versions of the programs it ran."""
    managesieved = program_version(["dpkg-query", "-W", "-f=${Version}", "dovecot-managesieved"])
    connect = program_version(["sieve-connect", "--version"]).rpartition(" ")[2]
    versions = (
        f"Versions: dovecot-managesieved {managesieved}; sieve-connect {connect}; "
        f"sievelib {_package('sievelib')}."
    )
    return with_versions(SECTION, versions)
