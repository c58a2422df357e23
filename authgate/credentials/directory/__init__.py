"""Directory users, verified by an LDAP simple bind (RFC 4513 section 5.1.3).

A directory answers one question: is this the user's password? It reveals
no secret, so only PLAIN and LOGIN can be offered for its users
(`DirectoryStore.offerable`), like a store of one-way hashes.

Two ways to find the user's entry:

* a DN template, ``uid={user},ou=people,dc=example,dc=org``: the name is
  escaped as an RDN attribute value (RFC 4514 section 2.4) and the server is
  asked to bind as that DN with the password;
* a search, ``(uid={user})`` under a base: the name is escaped as a filter
  assertion value (RFC 4515 section 3), exactly one entry must match, and
  its DN is bound with the password. The search runs anonymously or bound
  as a service account (``bind_dn``).

Client library: **python-ldap** (the maintained binding of OpenLDAP's own
libldap), called from worker threads: `Directory.verify` blocks by design,
the proxy already runs it off the event loop (`DirectoryStore.aresolve`),
and libldap is the most exercised LDAP client there is. `bonsai` is
asyncio-native but its event-loop integration buys nothing behind a thread
pool, and it is a smaller project. Neither ships a Linux wheel on PyPI:
both compile against libldap, so a fresh Debian machine needs
``libldap2-dev libsasl2-dev`` (and gcc and the Python headers, which the
machine image has) before ``pip install python-ldap``. The pure-Python
`ldap3` would install anywhere but has had no release since 2021.

TLS is done by Python's `ssl` module, not by libldap. Two reasons, both
observed with Debian 12's libldap 2.5.13: its implicit-TLS (``ldaps://``)
handshake ignores ``LDAP_OPT_NETWORK_TIMEOUT`` (a server that accepts the
TCP connection and never answers hangs the calling thread for good), and a
python-ldap connection cannot be touched from a second thread while a call
is in progress (the C extension aborts the process), so no watchdog can cut
the hang short. So a connection is made here: TCP connect with a timeout,
StartTLS by hand when asked for, the TLS handshake with a timeout, all in
Python with the same certificate checks as every other TLS connection
authgate makes (`ssl.create_default_context`, host name checked, TLS 1.2 or
newer). libldap then speaks plain LDAP over a private socketpair, and a
background event loop relays it through the TLS connection. Every phase has
a deadline: libldap's own operation timeout covers the rest.

Security notes, each handled below:

* An empty password is an "unauthenticated bind" (RFC 4513 section 5.1.2):
  servers that allow it report *success* for any existing DN. `verify`
  answers False without contacting the server.
* User names with control characters (NUL included) are refused before
  any escaping: no legitimate directory name has them.
* The directory matches names loosely (RFC 4518: case, NFKC, spaces):
  slapd binds "ALICE", " alice", "alice " and full-width "ａｌｉｃｅ" as
  alice. So a name the directory would read as another spelling is refused
  unless the difference is case (`_username_problem`), and the session's
  identity is the entry's own name, its `canonical_attribute` (uid by
  default) as the directory returns it: that is what the backend, the
  audit log and the lockout see (`PasswordVerdict`).
* Referrals are never chased (a referral would send the password to
  another server).
* A connection that was bound as a user is never used to search for
  anyone else: the search pool holds only connections bound as the service
  account (or anonymous); user binds go through a separate pool of
  connections that bind and, with a DN template, read the bound user's own
  entry for its canonical name (a base-scope read of that one DN).
"""

from __future__ import annotations

from authgate.credentials.directory.client import Directory
from authgate.credentials.directory.errors import DirectoryUnavailable
from authgate.credentials.directory.names import escape_dn_value, escape_filter_value
from authgate.credentials.directory.settings import DirectorySettings, parse_directory
from authgate.credentials.directory.store import DirectoryStore

__all__ = [
    "Directory",
    "DirectorySettings",
    "DirectoryStore",
    "DirectoryUnavailable",
    "escape_dn_value",
    "escape_filter_value",
    "parse_directory",
]
