"""The NNTP section of docs/interop.md (`matrix._iter_docs` writes it after
the mail matrix): what tests/interop/test_inn.py runs and shows.

The text is fixed; only the version line is read from the installed
programs. test_inn checks that docs/interop.md holds the text, so a change
here without a regenerated (or hand-updated) file fails."""

from __future__ import annotations

import platform

from tests.interop.notes import program_version, with_versions

SECTION: list[str] = [
    "## NNTP: authgate in front of INN",
    "",
    "From `tests/interop/test_inn.py` (in `./dev test`), against a real INN 2.7 "
    "(`tests/interop/inn.py`: Debian's `nnrpd` in daemon mode on a loopback port, its own "
    "`inn.conf`, a `readers.conf` that checks AUTHINFO USER/PASS with `ckpasswd -f` "
    "against two crypt(3) accounts, the reader and one proxy account, and the group "
    "`local.test` with one article, its history and overview built by `makehistory`; "
    "AUTHINFO SASL through Cyrus SASL with its own `INN.conf` and sasldb, named by "
    "`SASL_CONF_PATH`; STARTTLS with authgate's dev certificate). "
    "authgate: four `nntp` listeners, relay and terminate mode, each with STARTTLS and "
    "with implicit TLS (NNTPS, port 563's role); policy `require-secure-auth`, mechanisms "
    "SCRAM-SHA-256, CRAM-MD5 and PLAIN, exempt network `127.0.0.2/32`. A success counts "
    "only when the "
    "reader got `211` for `GROUP local.test` and the article, by its Message-ID and body.",
    "",
    "| client | case | relay | terminate |",
    "|---|---|---|---|",
    "| nntplib | AUTHINFO USER/PASS in cleartext from 127.0.0.2 (exempt) | ✔ article | "
    "✔ article |",
    "| nntplib | `starttls()` (capabilities asked again: no STARTTLS after it), then "
    "login from 127.0.0.1 | ✔ article | ✔ article |",
    "| nntplib | `NNTP_SSL` (implicit TLS) from 127.0.0.1 | ✔ article | ✔ article |",
    "| nntplib | AUTHINFO USER in cleartext from 127.0.0.1 | ✘ `483`; CAPABILITIES said "
    "`AUTHINFO SASL`, `SASL SCRAM-SHA-256 CRAM-MD5`; `GROUP` still `480` | ✘ `483`, the "
    "same |",
    "| nntplib | wrong password from 127.0.0.2 | ✘ `481` (INN's refusal, passed on) | – |",
    "| nntplib | cleartext from 127.0.0.2 to a listener whose backend connection uses "
    "STARTTLS (`tls = \"starttls\"`, INN's certificate checked with the test CA) | "
    "✔ article | ✔ article |",
    "| nntplib | the same with public CAs as `ca_file` (INN's certificate not trusted) | "
    "✘ `403`, the password never sent to INN | – |",
    "| Net::NNTP | `authinfo` in cleartext from 127.0.0.2 | ✔ article | ✔ article |",
    "| Net::NNTP | `starttls`, then `authinfo`, from 127.0.0.1 | ✔ article | ✔ article |",
    "| Net::NNTP | `SSL => 1` (implicit TLS) from 127.0.0.1 | ✔ article | ✔ article |",
    "| Net::NNTP | `authinfo` in cleartext from 127.0.0.1 | – | ✘ `483` |",
    "| raw socket | AUTHINFO SASL PLAIN with initial response from 127.0.0.2 | ✔ article "
    "(sent to INN as AUTHINFO USER/PASS) | ✔ article |",
    "| raw socket + authgate's CRAM-MD5 client | AUTHINFO SASL CRAM-MD5 from 127.0.0.2 | "
    "✔ article (INN's challenge relayed, Cyrus SASL verifies) | ✔ article |",
    "| raw socket + authgate's SCRAM client | AUTHINFO SASL SCRAM-SHA-256 from 127.0.0.2 | "
    "✔ article (INN's `283` server-final reaches the reader as a `383`, answered `=`) | "
    "✔ article (server-final in authgate's `283`) |",
    "| raw socket | STARTTLS with a login and GROUP in the same segment, from 127.0.0.1 | "
    "dropped (one STARTTLS injection warning); inside TLS `AUTHINFO PASS` is `482`, "
    "`GROUP` `480`; the login sent again inside TLS reads the group | the same |",
    "| raw socket | STARTTLS after the login, from 127.0.0.2 | INN's `502` (the session is "
    "spliced), `GROUP` then `211` in the clear | the same |",
    "",
    "Relay mode sends a reader's AUTHINFO USER/PASS, and SASL PLAIN without an "
    "authorisation identity, to INN as AUTHINFO USER/PASS: readers.conf checks only "
    "those (INN's AUTHINFO SASL goes to Cyrus SASL's own users); after a SASL login INN "
    "grants access only through an auth group that matched the host, so readers.conf "
    "starts with one (`hosts: \"*\"`, a `default:` user no access group lists). "
    "Terminate mode logs in "
    "to INN as the one proxy account, so INN sees every reader as that account. Neither "
    "reader speaks AUTHINFO SASL, hence the raw-socket row; curl has no NNTP login.",
]


def section_lines() -> list[str]:
    """The section, with the versions of the programs it ran."""
    versions = (
        f"Versions: INN {program_version(['dpkg-query', '-W', '-f=${Version}', 'inn2'])}; "
        f"Python {platform.python_version()} nntplib; Perl Net::NNTP "
        f"{program_version(['perl', '-MNet::NNTP', '-e', 'print $Net::NNTP::VERSION'])} with "
        "IO::Socket::SSL "
        f"{program_version(['perl', '-MIO::Socket::SSL', '-e', 'print $IO::Socket::SSL::VERSION'])}."
    )
    return with_versions(SECTION, versions)
