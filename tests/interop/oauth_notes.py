"""The bearer-token relay section of docs/interop.md (`matrix._iter_docs`
writes it after the mail matrix): what tests/interop/test_oauth_relay.py
runs and shows.

The text is fixed; only the version line is read from the installed
programs. test_oauth_relay checks that docs/interop.md holds the text, so a
change here without a regenerated (or hand-updated) file fails."""

from __future__ import annotations

from tests.interop.notes import program_version, with_versions

SECTION: list[str] = [
    "## OAUTHBEARER and XOAUTH2 relayed to Dovecot's oauth2 passdb",
    "",
    "From `tests/interop/test_oauth_relay.py` (in `./dev test`), against a real Dovecot "
    "started with `start_dovecot(oauth2=OAuth2Passdb(...))`: `oauthbearer xoauth2` added to "
    "`auth_mechanisms` and a `driver = oauth2` passdb (only for those two mechanisms, "
    "first) that verifies every token by RFC 7662 introspection "
    "(`introspection_mode = post`, HTTP Basic client credentials in the URL) at "
    "`authgate.testing.identity_provider` on loopback. authgate: `imap`, `pop3` and "
    "`submission` listeners in relay mode, no `[oauth]` section (authgate verifies "
    "nothing), policy `none`, `block_after = 3`. Each case has its own client address.",
    "",
    "| client | case | result |",
    "|---|---|---|",
    "| curl `--oauth2-bearer`, `AUTH=OAUTHBEARER` and `AUTH=XOAUTH2` | IMAP (fetch UID 1's "
    "Subject), POP3 (list), SMTP submission (send) with a valid token | ✔ each; Dovecot "
    "asked the provider once per login; the message reaches Dovecot's relay sink |",
    "| curl, the same | a revoked token | ✘ exit 67 (login denied) on all three |",
    "| imaplib `authenticate` | both mechanisms, no initial response, then SELECT and "
    "FETCH | ✔ |",
    "| imaplib `authenticate` | a token the provider never issued, an expired one | ✘ "
    "`[AUTHENTICATIONFAILED]` after Dovecot's error challenge, relayed unchanged "
    '(`{"status":"invalid_token"}`; XOAUTH2 `{"status":"401",...}`) |',
    "| msmtp `--auth=oauthbearer` / `xoauth2` | send | ✔ |",
    "| raw socket | three refused tokens from one address, answering each error "
    "challenge | ✘ `NO [AUTHENTICATIONFAILED]` each; the address is then blocked, a good "
    "token from it never reaches Dovecot; from another address it logs in |",
    "| raw socket | the error challenge cancelled (`*`) or the connection closed instead "
    "of answering | counted as a failed login like an answered one (blocked after three) |",
    "| raw socket | IMAP `AUTHENTICATE` line past 8192 octets (an 8.2 KiB base64 "
    "initial response) | ✔ (a relay listener offering bearer mechanisms reads long lines) |",
    "| raw socket | SMTP `AUTH` with a 1.6 KiB initial response | ✔ through authgate, "
    "which sends it after the empty `334`; straight to Dovecot `500 5.5.2 Line too long` |",
    "",
    "Dovecot 2.3.19's own limits: a SASL message of at most 8188 base64 octets on IMAP, "
    "POP3 and submission (a JWT of about 6 KiB), and on submission an `AUTH` command line "
    "of about 1 KiB, initial response included (RFC 4954 allows 12288). authgate keeps "
    "the `AUTH` lines it sends within RFC 5321's 512 octets. No token or SASL message "
    "appears in authgate's log records.",
]


def section_lines() -> list[str]:
    """The section, with the versions of the programs it ran."""
    dovecot = program_version(["dpkg-query", "-W", "-f=${Version}", "dovecot-core"])
    curl = program_version(["curl", "--version"]).split(" ")[:2]
    msmtp = program_version(["msmtp", "--version"]).rpartition(" ")[2]
    versions = f"Versions: dovecot-core {dovecot}; {' '.join(curl)}; msmtp {msmtp}."
    return with_versions(SECTION, versions)
