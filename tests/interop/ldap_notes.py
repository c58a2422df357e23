"""The LDAP section of docs/interop.md (`matrix._iter_docs` writes it after
the mail matrix): what tests/interop/test_ldap_relay.py runs and shows.

The text is fixed; only the version line is read from the installed
programs. test_ldap_relay checks that docs/interop.md holds the text, so a
change here without a regenerated (or hand-updated) file fails."""

from __future__ import annotations

from tests.interop.notes import program_version, with_versions

SECTION: list[str] = [
    "## LDAP: authgate in front of slapd",
    "",
    "From `tests/interop/test_ldap_relay.py` (in `./dev test`), against the suite's "
    "slapd (`tests/ldap_server.py`: `{SSHA}` passwords, `ou=people` readable by bound "
    "users only, `ou=staff` by anyone). authgate: an `ldap` listener (StartTLS offered) "
    "and an `ldaps` one (implicit TLS, relaying to slapd's `ldaps://`), policy "
    "`require-secure-auth`, mechanisms CRAM-MD5 and PLAIN, exempt network "
    "`127.0.0.2/32`, relay mode (the only mode for LDAP). Each case is checked at both "
    "ends: what the client got, and in slapd's `-d stats` log whether the bind reached it.",
    "",
    "| client | case | through authgate |",
    "|---|---|---|",
    "| ldapwhoami `-ZZ -x` | simple bind after StartTLS, 127.0.0.1 | ✔ `dn:uid=alice,...`; "
    "audit `login` (SIMPLE) |",
    "| ldapsearch `-ZZ -x` | bind, then search `ou=people` | ✔ the entry (readable only "
    "when bound) |",
    "| ldapwhoami `-x` | simple bind in cleartext, 127.0.0.1 | ✘ `Confidentiality required "
    "(13)`; slapd saw no bind |",
    "| ldapwhoami `-x` via `ldaps://` | simple bind on the LDAPS listener | ✔ |",
    "| ldapwhoami `-Y DIGEST-MD5` | a SASL mechanism not in the list | ✘ `Authentication "
    "method not supported (7)` from authgate; slapd saw nothing |",
    "| ldapwhoami `-Y CRAM-MD5` | a SASL mechanism in the list | relayed; slapd answers "
    "itself (`Invalid credentials (49)`, `SASL(-13): user not found`: it keeps only "
    "`{SSHA}`, which CRAM-MD5 cannot use) |",
    "| python-ldap (socket bound to 127.0.0.2) | simple bind in cleartext from the exempt "
    "network | ✔ `whoami_s()` names alice |",
    "| python-ldap | anonymous bind and search, then a simple bind in the same cleartext "
    "session | search ✔, bind ✘ `CONFIDENTIALITY_REQUIRED`, session goes on; after "
    "`start_tls_s()` the same bind ✔; slapd saw one bind |",
    "| python-ldap | wrong password inside TLS | ✘ `INVALID_CREDENTIALS` (slapd's 49), "
    "audit `login-failed` reason `invalid-credentials` (the defence counts it) |",
    "| raw BER | StartTLS and a bind in one segment | the bind is dropped (logged as "
    "STARTTLS injection), never reaches slapd; inside TLS Who am I? is anonymous |",
    "",
    "libldap's tools and python-ldap send no ALPN and non-minimal BER lengths "
    "(`84 00 00 00 nn`), both accepted; they cannot choose their source address, so the "
    "exempt case uses python-ldap's `fileno` (a socket bound to 127.0.0.2 first).",
]


def section_lines() -> list[str]:
    """The section, with the versions of the programs it ran."""
    import ldap

    versions = (
        f"Versions: {program_version(['/usr/sbin/slapd', '-VV'])}; "
        f"{program_version(['ldapwhoami', '-VV'])}; python-ldap {ldap.__version__}."
    )
    return with_versions(SECTION, versions)
