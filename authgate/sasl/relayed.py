"""The user a relayed SASL exchange names, read from the client's messages
before they go to the backend.

Relay mode verifies nothing itself, yet a user locked out by the brute-force
defence must be refused before the backend checks one more guess. Some
mechanisms name the user before the credential is checked, in this client
message (0 is the first: the initial response, or the answer to the first
challenge):

| mechanism  | message | the user is                                             |
|------------|---------|---------------------------------------------------------|
| PLAIN      | 0       | the authcid, the middle field (1)                       |
| LOGIN      | 0       | the whole message (message 1, the password, is not read)|
| CRAM-MD5   | 0       | the name before the space in "user digest"              |
| DIGEST-MD5 | any     | the digest-response's username directive                |
| SCRAM-*    | any     | n= of the client-first-message                          |
| NTLM       | any     | the AUTHENTICATE message's UserName (after NEGOTIATE)   |
| OAUTHBEARER| 0       | the GS2 authzid (a=), when the client gives one         |
| XOAUTH2    | 0       | user=                                                   |

(1) IMAP LOGIN and POP3 USER/PASS are relayed as PLAIN, so they count here.

For each of them the message that names the user also carries, or comes
before, the proof, so the lockout is enforced before the backend sees any
proof. Any other mechanism names nobody early; only the backend's verdict
counts for it. Only the field named above is decoded: a password is never
read as a user name (it would end up as a lockout key).

Pure functions, never raising: bytes in, a name or None out.
"""

from __future__ import annotations

from authgate.sasl._ntlm_messages import NTLMFormatError, parse_authenticate
from authgate.sasl.digest_md5 import DirectiveSyntaxError, parse_directives
from authgate.sasl.oauth import OAuthMessage, parse_oauthbearer, parse_xoauth2

_MAX_MESSAGE = 64 * 1024  # longer than any message that names a user


def relayed_user(mechanism: str, index: int, message: bytes) -> str | None:
    """The user `message`, the client's message number `index` (from 0) in a
    `mechanism` exchange, names; None if it names nobody (or not validly)."""
    if len(message) > _MAX_MESSAGE:
        return None
    name: str | None
    if mechanism == "PLAIN":
        name = _plain(message) if index == 0 else None
    elif mechanism == "LOGIN":
        name = _text(message) if index == 0 else None
    elif mechanism == "CRAM-MD5":
        name = _cram_md5(message) if index == 0 else None
    elif mechanism == "DIGEST-MD5":
        name = _digest_md5(message)
    elif mechanism.startswith("SCRAM-"):
        name = _scram(message)
    elif mechanism == "NTLM":
        name = _ntlm(message)
    elif mechanism in ("OAUTHBEARER", "XOAUTH2") and index == 0:
        parse = parse_oauthbearer if mechanism == "OAUTHBEARER" else parse_xoauth2
        parsed = parse(message)  # the token is parsed, never kept or returned
        name = parsed.user if isinstance(parsed, OAuthMessage) else None
    else:
        name = None
    return name if name and name.isprintable() else None


def _text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _plain(message: bytes) -> str | None:
    fields = message.split(b"\x00")
    return _text(fields[1]) if len(fields) == 3 else None


def _cram_md5(message: bytes) -> str | None:
    user, sep, _digest = message.rpartition(b" ")
    return _text(user) if sep else None


def _digest_md5(message: bytes) -> str | None:
    try:
        directives = parse_directives(message)
    except DirectiveSyntaxError:
        return None
    values = dict(directives)
    users = [value for name, value in directives if name == "username"]
    if len(users) != 1:
        return None
    # RFC 2831 section 2.1.2: ISO 8859-1 unless charset=utf-8 is given.
    if values.get("charset", b"").lower() == b"utf-8":
        return _text(users[0])
    return users[0].decode("iso-8859-1")


def _scram(message: bytes) -> str | None:
    text = _text(message)
    if text is None:
        return None
    # RFC 5802 section 7: gs2-cbind-flag "," [authzid] "," n=saslname "," r=...
    parts = text.split(",", 3)
    if len(parts) < 4 or not (parts[0] in ("n", "y") or parts[0].startswith("p=")):
        return None
    if not parts[2].startswith("n="):
        return None
    name = parts[2][2:]
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        return None  # section 5.1: "=" only as =2C or =3D
    return name.replace("=2C", ",").replace("=3D", "=")


def _ntlm(message: bytes) -> str | None:
    try:
        return parse_authenticate(message).user
    except NTLMFormatError:
        return None
