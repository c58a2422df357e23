"""NTLM as a SASL mechanism ([MS-NLMP]), server and client, no I/O.

The SASL profile (as SMTP/IMAP/POP3 "AUTH NTLM" use it) carries the three
NTLMSSP messages unchanged:

    C: NEGOTIATE_MESSAGE      initial response, or the answer to an empty challenge
    S: CHALLENGE_MESSAGE      8-byte server challenge, our names, TargetInfo
    C: AUTHENTICATE_MESSAGE   user, domain and the challenge responses

There is no server proof and no security layer, so the session-security
parts of NTLM (key exchange, signing, sealing, the MIC) are never
negotiated: the MIC only protects the negotiated flags, and no flag we
grant changes what the NT response proves.

Server: NTLMv2 is verified against the user's NT hash
(SecretLookup(..., NT_HASH)). NTLMv1 and the NTLM2 session response
(section 3.3.1) are DES-based and crackable from one captured exchange;
they are accepted only when `ServerContext.allow_ntlm_legacy` is set, for
old clients (Cyrus SASL, fetchmail, msmtp) that send nothing better. LM
responses are never accepted, not even as a fallback.

Clock: sans-IO code has none. The server sends MsvAvTimestamp only when
given one (`NTLMServer(ctx, timestamp=...)`, a FILETIME); without it,
clients take their own clock for the NTLMv2 blob. The server does not
check the blob's time against a clock either: freshness comes from the
random server challenge, which the NT proof covers. The client echoes the
server's MsvAvTimestamp, else uses `NTLMClient(..., timestamp=...)`, else
0 (section 3.1.5.1.2 wants the current time; servers that check skew need
one of the first two).

Client: NTLMv2 only. The domain is what the user name carries
(``DOMAIN\\user``), else empty.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from authgate.sasl._md4 import md4
from authgate.sasl._ntlm_messages import (
    AuthenticateMessage,
    AvId,
    Flag,
    NTLMFormatError,
    build_authenticate,
    build_challenge,
    build_negotiate,
    encode_av_pairs,
    encode_text,
    parse_authenticate,
    parse_challenge,
    parse_negotiate,
)
from authgate.sasl.base import (
    NO_RESPONSE,
    Call,
    Challenge,
    ClientAuthError,
    ClientContext,
    ClientCredentials,
    Failure,
    FailureReason,
    InitialResponse,
    Lookup,
    LookupAnswer,
    SaslProtocolError,
    SecretForm,
    SecretLookup,
    ServerContext,
    ServerOutcome,
    Stage,
    Success,
    invalid,
    malformed,
)

__all__ = [
    "NT_HASH_LEN",
    "NTLMClient",
    "NTLMServer",
    "desl",
    "nt_hash",
    "ntlm2_session_response",
    "ntlmv1_response",
    "ntlmv2_proof",
    "ntowfv2",
]

NT_HASH_LEN = 16

# NTLMv2_CLIENT_CHALLENGE (section 2.2.2.7) before its AvPairs:
# RespType, HiRespType, Reserved1, Reserved2, TimeStamp, ChallengeFromClient, Reserved3.
_V2_BLOB_HEADER = 28
_V2_MIN_RESPONSE = 16 + _V2_BLOB_HEADER
_V1_RESPONSE = 24


# ---------------------------------------------------------------- crypto


def nt_hash(password: str) -> bytes:
    """NTOWFv1 (section 3.3.1): MD4 of the UTF-16LE password.

    Password-equivalent for NTLM: whoever holds it can log in."""
    data = password.encode("utf-16-le")
    try:
        return hashlib.new("md4", data).digest()  # noqa: S324 - NTOWFv1 is MD4 by spec
    except ValueError:
        # OpenSSL 3 without the legacy provider: see _md4.py.
        return md4(data)


def _hmac_md5(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, "md5").digest()


def _upper(text: str) -> str:
    """Windows upper-cases one UTF-16 unit at a time; str.upper() may change
    the length ("ß" -> "SS"), which would make our NTOWFv2 differ from
    the client's. Keep characters whose upper case is not one character."""
    return "".join(u if len(u := c.upper()) == 1 else c for c in text)


def ntowfv2(nt: bytes, user: str, domain: str) -> bytes:
    """NTOWFv2 (section 3.3.2): HMAC_MD5(NT hash, UTF16LE(UPPER(user) + domain))."""
    return _hmac_md5(nt, (_upper(user) + domain).encode("utf-16-le"))


def ntlmv2_proof(key: bytes, server_challenge: bytes, blob: bytes) -> bytes:
    """NTProofStr (section 3.3.2): HMAC_MD5(NTOWFv2, ServerChallenge + temp)."""
    return _hmac_md5(key, server_challenge + blob)


def _expand_des_key(key7: bytes) -> bytes:
    """Spread 56 key bits over 8 bytes, 7 bits each, with odd parity in the
    low bit (DES ignores it, but the layout is the standard one)."""
    bits = int.from_bytes(key7, "big")
    out = bytearray()
    for i in range(8):
        byte = ((bits >> (49 - 7 * i)) & 0x7F) << 1
        out.append(byte | ((bin(byte).count("1") + 1) & 1))
    return bytes(out)


def _des(key7: bytes, block: bytes) -> bytes:
    # Single DES is 3DES-EDE with K1 = K2 = K3 (encrypt, decrypt, encrypt
    # with one key is one encryption); cryptography only keeps DES in its
    # "decrepit" module as TripleDES.
    key = _expand_des_key(key7) * 3
    encryptor = Cipher(TripleDES(key), modes.ECB()).encryptor()  # noqa: S305 - DES by spec
    return encryptor.update(block) + encryptor.finalize()


def desl(key16: bytes, data8: bytes) -> bytes:
    """DESL (section 6): three DES encryptions of `data8` under the 16-byte
    key split 7/7/2 (the last padded with five zero bytes)."""
    return (
        _des(key16[0:7], data8) + _des(key16[7:14], data8) + _des(key16[14:16] + b"\x00" * 5, data8)
    )


def ntlmv1_response(nt: bytes, server_challenge: bytes) -> bytes:
    """NTLMv1 NtChallengeResponse (section 3.3.1, no extended session security)."""
    return desl(nt, server_challenge)


def ntlm2_session_response(nt: bytes, server_challenge: bytes, client_challenge: bytes) -> bytes:
    """NTLM2 session response (section 3.3.1 with EXTENDED_SESSIONSECURITY):
    DESL over the first 8 bytes of MD5(ServerChallenge + ClientChallenge)."""
    digest = hashlib.md5(server_challenge + client_challenge, usedforsecurity=False).digest()
    return desl(nt, digest[:8])


def _random_source(random: Callable[[int], bytes] | None) -> Callable[[int], bytes]:
    return random or os.urandom


def _challenge_bytes(random: Callable[[int], bytes]) -> bytes:
    value = random(8)
    if len(value) != 8:
        raise SaslProtocolError("the random source returned the wrong number of bytes")
    return value


# ---------------------------------------------------------------- server


# What NTLMServer.step expects, in turn.
_NEGOTIATE = "the NEGOTIATE message"
_AUTHENTICATE = "the AUTHENTICATE message"


def _netbios_name(hostname: str) -> str:
    """NetBIOS names are at most 15 characters, conventionally upper case:
    the first label of our host name."""
    return hostname.split(".", 1)[0].upper()[:15] or "AUTHGATE"


class NTLMServer:
    """The server side of SASL NTLM.

    `timestamp` (FILETIME: 100 ns ticks since 1601-01-01 UTC), when given,
    is sent as MsvAvTimestamp; see the module docstring.
    """

    name = "NTLM"

    def __init__(self, ctx: ServerContext, *, timestamp: int | None = None) -> None:
        if timestamp is not None and not 0 <= timestamp < 2**64:
            raise ValueError("timestamp must be a 64-bit FILETIME")
        self._ctx = ctx
        self._timestamp = timestamp
        self._stage = Stage("NTLM server")
        self._server_challenge = b""
        self._challenge_flags = 0
        self._auth: AuthenticateMessage | None = None

    # -- driver interface

    def start(self, initial: InitialResponse) -> ServerOutcome:
        self._stage.check(Call.START)
        if initial is NO_RESPONSE:
            # RFC 4422 section 5: ask for the initial response with an
            # empty challenge; the NEGOTIATE message comes back.
            self._stage.expect(Call.STEP, what=_NEGOTIATE)
            return Challenge(b"")
        return self._on_negotiate(initial)

    def step(self, response: bytes) -> ServerOutcome:
        self._stage.check(Call.STEP)
        if self._stage.awaits(_NEGOTIATE):
            return self._on_negotiate(response)
        return self._on_authenticate(response)

    def resume(self, answer: LookupAnswer) -> ServerOutcome:
        self._stage.check(Call.RESUME)
        self._stage.end()
        auth = self._auth
        if auth is None:  # pragma: no cover - set whenever the stage is
            raise SaslProtocolError("NTLM server lost its AUTHENTICATE message")
        self._auth = None
        if answer is None:
            return invalid("unknown user or no NT hash stored")
        if not isinstance(answer, bytes) or len(answer) != NT_HASH_LEN:
            raise SaslProtocolError("the store answered an NT_HASH lookup with something else")
        if self._verify(auth, answer):
            return Success(authcid=auth.user)
        return invalid()

    # -- stages

    def _on_negotiate(self, data: bytes) -> ServerOutcome:
        try:
            negotiate = parse_negotiate(data)
        except NTLMFormatError as exc:
            self._stage.end()
            return malformed(f"malformed NTLM message: {exc}")

        # Section 3.2.5.1.1: UNICODE when the client offers it (or offers no
        # charset at all), OEM only for clients that insist.
        unicode = bool(negotiate.flags & Flag.UNICODE) or not negotiate.flags & Flag.OEM
        flags = (
            Flag.NTLM
            | Flag.REQUEST_TARGET
            | Flag.TARGET_INFO
            | Flag.TARGET_TYPE_SERVER
            | (Flag.UNICODE if unicode else Flag.OEM)
        )
        # Only matters for NTLM2 session responses (legacy), but granting it
        # when asked keeps such clients from falling back to plain NTLMv1.
        if negotiate.flags & Flag.EXTENDED_SESSIONSECURITY:
            flags |= Flag.EXTENDED_SESSIONSECURITY

        # A stand-alone server is its own NetBIOS "domain" (section 3.2.5.1.1:
        # TargetName is the server name when TARGET_TYPE_SERVER is set).
        hostname = self._ctx.hostname
        nb_name = _netbios_name(hostname)
        target_info: list[tuple[int, bytes]] = [
            (AvId.NB_DOMAIN_NAME, nb_name.encode("utf-16-le")),
            (AvId.NB_COMPUTER_NAME, nb_name.encode("utf-16-le")),
            (AvId.DNS_COMPUTER_NAME, hostname.encode("utf-16-le")),
        ]
        if "." in hostname:
            dns_domain = hostname.split(".", 1)[1]
            target_info.append((AvId.DNS_DOMAIN_NAME, dns_domain.encode("utf-16-le")))
        if self._timestamp is not None:
            target_info.append((AvId.TIMESTAMP, struct.pack("<Q", self._timestamp)))

        try:
            # TargetName follows the negotiated charset; AV_PAIR strings are
            # always UTF-16LE (section 2.2.2.1).
            target_name = encode_text(nb_name, unicode, "TargetName")
        except NTLMFormatError:
            target_name = nb_name.encode("ascii", "replace")

        self._server_challenge = _challenge_bytes(_random_source(self._ctx.random))
        self._challenge_flags = int(flags)
        self._stage.expect(Call.STEP, what=_AUTHENTICATE)
        return Challenge(
            build_challenge(int(flags), self._server_challenge, target_name, tuple(target_info))
        )

    def _on_authenticate(self, data: bytes) -> ServerOutcome:
        self._stage.end()
        try:
            auth = parse_authenticate(data)
        except NTLMFormatError as exc:
            return malformed(f"malformed NTLM message: {exc}")

        nt_len = len(auth.nt_response)
        if not auth.user:
            return invalid("anonymous NTLM authentication is not accepted")
        if nt_len == 0:
            return Failure(FailureReason.TOO_WEAK, "LM-only NTLM responses are never accepted")
        if nt_len == _V1_RESPONSE:
            if not self._ctx.allow_ntlm_legacy:
                return Failure(
                    FailureReason.TOO_WEAK,
                    "NTLMv1 / NTLM2 session response refused: the legacy NTLM switch"
                    " (allow_ntlm_legacy) is off",
                )
            if self._uses_ntlm2_session(auth) and len(auth.lm_response) != _V1_RESPONSE:
                return malformed("NTLM2 session response without its client challenge")
        elif nt_len < _V2_MIN_RESPONSE:
            return malformed("NtChallengeResponse has an impossible length")

        self._auth = auth
        self._stage.expect(Call.RESUME, what="the user's NT hash")
        return Lookup(SecretLookup(auth.user, SecretForm.NT_HASH))

    # -- verification

    def _uses_ntlm2_session(self, auth: AuthenticateMessage) -> bool:
        # Both sides must have agreed on extended session security: what we
        # granted in the CHALLENGE and what the client kept in AUTHENTICATE.
        return bool(self._challenge_flags & auth.flags & Flag.EXTENDED_SESSIONSECURITY)

    def _verify(self, auth: AuthenticateMessage, nt: bytes) -> bool:
        response = auth.nt_response
        if len(response) > _V1_RESPONSE:
            # NTLMv2 (section 3.3.2): the domain is the one the client put
            # in this message; the proof covers the whole client blob.
            key = ntowfv2(nt, auth.user, auth.domain)
            expected = ntlmv2_proof(key, self._server_challenge, response[16:])
            return hmac.compare_digest(expected, response[:16])
        # Legacy (only reached with allow_ntlm_legacy). The LM field is never
        # verified on its own: a client whose NT response is wrong fails.
        if self._uses_ntlm2_session(auth):
            expected = ntlm2_session_response(nt, self._server_challenge, auth.lm_response[:8])
        else:
            expected = ntlmv1_response(nt, self._server_challenge)
        return hmac.compare_digest(expected, response)


# ---------------------------------------------------------------- client


# What we ask for: both charsets (the server picks), the NTLM family,
# a TargetInfo to build the NTLMv2 blob from. Nothing for session security.
_CLIENT_FLAGS = (
    Flag.UNICODE
    | Flag.OEM
    | Flag.REQUEST_TARGET
    | Flag.NTLM
    | Flag.ALWAYS_SIGN
    | Flag.EXTENDED_SESSIONSECURITY
    | Flag.TARGET_INFO
)


# What NTLMClient expects, in turn (a success may come at any time: only
# after the AUTHENTICATE message is it one we can accept).
_CHALLENGE = "the CHALLENGE message"
_SUCCESS = "the success"


class NTLMClient:
    """The client side of SASL NTLM (NTLMv2 only).

    `timestamp` (FILETIME) is used in the NTLMv2 blob when the server sends
    no MsvAvTimestamp; see the module docstring.
    """

    name = "NTLM"

    def __init__(
        self,
        creds: ClientCredentials,
        ctx: ClientContext,
        *,
        timestamp: int | None = None,
    ) -> None:
        if creds.authzid and creds.authzid != creds.username:
            # NTLM has no authorization identity: silently logging in as
            # the authcid instead would be a surprise.
            raise ValueError("NTLM cannot carry an authorization identity")
        if timestamp is not None and not 0 <= timestamp < 2**64:
            raise ValueError("timestamp must be a 64-bit FILETIME")
        self._creds = creds
        self._ctx = ctx
        self._timestamp = timestamp or 0
        self._stage = Stage("NTLM client")
        domain, sep, user = creds.username.partition("\\")
        self._domain, self._user = (domain, user) if sep else ("", creds.username)

    def start(self) -> bytes:
        self._stage.check(Call.START)
        self._stage.expect(Call.STEP, Call.FINISH, what=_CHALLENGE)
        return build_negotiate(int(_CLIENT_FLAGS))

    def step(self, challenge: bytes) -> bytes:
        self._stage.check(Call.STEP)
        if not self._stage.awaits(_CHALLENGE):
            raise ClientAuthError("server sent another challenge after the AUTHENTICATE message")
        try:
            message = self._authenticate(challenge)
        except NTLMFormatError as exc:
            self._stage.end()  # a client that failed stays failed
            raise ClientAuthError(f"NTLM: {exc}") from None
        self._stage.expect(Call.STEP, Call.FINISH, what=_SUCCESS)
        return message

    def finish(self, additional: bytes | None) -> None:
        # NTLM in SASL has no server proof to check; `additional` carries
        # nothing. But a success before we answered the CHALLENGE means the
        # server never saw a proof from us: not an exchange we finished.
        # (A second finish is harmless here: there is nothing to check.)
        self._stage.check(Call.FINISH)
        if not self._stage.awaits(_SUCCESS):
            raise ClientAuthError("server reported success before the NTLM exchange completed")

    def _authenticate(self, data: bytes) -> bytes:
        challenge = parse_challenge(data)
        if challenge.flags & Flag.UNICODE:
            unicode = True
        elif challenge.flags & Flag.OEM:
            unicode = False
        else:
            raise NTLMFormatError("CHALLENGE selects no character set")

        timestamp = self._timestamp
        server_time = [v for k, v in challenge.target_info if k == AvId.TIMESTAMP]
        if server_time:
            if len(server_time[0]) != 8:
                raise NTLMFormatError("MsvAvTimestamp is not 8 bytes")
            timestamp = struct.unpack("<Q", server_time[0])[0]

        client_challenge = _challenge_bytes(_random_source(self._ctx.random))
        # Section 3.3.2 "temp": the server's AV pairs come back unchanged
        # (we add no MsvAvFlags, so no MIC is expected of us).
        blob = (
            b"\x01\x01"
            + b"\x00" * 6
            + struct.pack("<Q", timestamp)
            + client_challenge
            + b"\x00" * 4
            + encode_av_pairs(challenge.target_info)
            + b"\x00" * 4
        )
        key = ntowfv2(nt_hash(self._creds.password), self._user, self._domain)
        proof = ntlmv2_proof(key, challenge.server_challenge, blob)
        if server_time:
            # Section 3.1.5.1.2: with MsvAvTimestamp present the client
            # SHOULD send Z(24) instead of an LMv2 response.
            lm_response = b"\x00" * 24
        else:
            lm_response = _hmac_md5(key, challenge.server_challenge + client_challenge)
            lm_response += client_challenge

        flags = (challenge.flags & _CLIENT_FLAGS) & ~(Flag.UNICODE | Flag.OEM)
        flags |= Flag.UNICODE if unicode else Flag.OEM
        return build_authenticate(
            int(flags),
            lm_response,
            proof + blob,
            encode_text(self._domain, unicode, "domain"),
            encode_text(self._user, unicode, "user name"),
            b"",
        )
