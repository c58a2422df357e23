"""What goes wrong when the directory cannot answer, in words without secrets."""

from __future__ import annotations

import ldap  # type: ignore[import-untyped,unused-ignore]

from authgate.credentials.base import CredentialsUnavailable


class DirectoryUnavailable(CredentialsUnavailable):
    """The directory could not answer (down, timed out, misconfigured). The
    proxy maps it to a temporary failure (SMTP 454 4.7.0, IMAP
    NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP]). The message never contains a
    password."""


def _describe(exc: BaseException) -> str:
    """An LDAP error in words, from libldap's description only (its `info`
    may echo request data)."""
    if isinstance(exc, ldap.LDAPError) and exc.args and isinstance(exc.args[0], dict):
        desc = exc.args[0].get("desc")
        if isinstance(desc, str):
            return desc
    return exc.__class__.__name__
