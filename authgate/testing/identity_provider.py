"""A small OAuth 2.0 identity provider for tests: key pairs, a JWK set and
an RFC 7662 introspection endpoint served over real HTTP on loopback, and
tokens made to order (right ones, and every kind of wrong one).

    with IdentityProvider() as idp:
        token = idp.token("alice@example.org")
        idp.jwks_url, idp.introspection_url, idp.issuer, idp.audience

It runs an `http.server` in one thread, stopped when the `with` block ends.
Introspection clients authenticate with HTTP Basic (`client_id`,
`client_secret`); tokens it issued are active until their `exp`, unless
revoked with `revoke(token)`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import http.server
import json
import threading
import time
import urllib.parse
import uuid
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

__all__ = ["IdentityProvider"]

Key = RSAKey | ECKey | OKPKey


class IdentityProvider:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        issuer: str = "https://idp.test",
        audience: str = "mail.test",
        client_id: str = "authgate",
        client_secret: str = "introspection-secret",  # noqa: S107 (a test provider's)
    ) -> None:
        self.host = host
        self.issuer = issuer
        self.audience = audience
        self.client_id = client_id
        self.client_secret = client_secret
        self.keys: dict[str, Key] = {
            "RS256": RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}),
            "ES256": ECKey.generate_key("P-256", parameters={"kid": "ec-1"}),
            "EdDSA": OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}),
        }
        # A key of the same kind that the JWK set never lists: "wrong key".
        self.stranger = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
        self.revoked: set[str] = set()
        self.requests: list[str] = []  # paths asked for, in order
        self._issued: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- tokens

    def claims(self, user: str, *, lifetime: int = 300, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, user)),
            "email": user,
            "iat": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
        }
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        user: str,
        *,
        alg: str = "RS256",
        lifetime: int = 300,
        key: Key | None = None,
        kid: str | None = "",
        padding: int = 0,
        **extra: Any,
    ) -> str:
        """A signed JWT for `user` (its `email`). `extra` claims override or,
        as None, remove the defaults; `padding` adds a claim of that many
        characters (a long token); `key` signs with another key; `kid=None`
        leaves the key id out."""
        claims = self.claims(user, lifetime=lifetime, **extra)
        if padding:
            claims["groups"] = "g" * padding
        signer = key or self.keys[alg]
        header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
        if kid is not None:
            header["kid"] = kid or signer.kid
        value = jwt.encode(header, claims, signer, algorithms=[alg])
        with self._lock:
            self._issued[value] = claims
        return value

    @staticmethod
    def unsigned(claims: dict[str, Any]) -> str:
        """An `alg: none` JWT: no signature at all (RFC 7519 section 6)."""

        def part(obj: dict[str, Any]) -> str:
            raw = json.dumps(obj, separators=(",", ":")).encode()
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."

    @staticmethod
    def tampered(token: str, **changes: Any) -> str:
        """`token` with its claims changed and the old signature kept."""
        header, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims.update(changes)
        raw = json.dumps(claims, separators=(",", ":")).encode()
        return f"{header}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{signature}"

    def revoke(self, token: str) -> None:
        with self._lock:
            self.revoked.add(token)

    def jwks(self) -> dict[str, Any]:
        return dict(KeySet(list(self.keys.values())).as_dict(private=False))

    def rotate(self, alg: str = "RS256", kid: str = "rsa-2") -> None:
        """A new key for `alg` under a new key id (the old one is dropped)."""
        if alg == "RS256":
            self.keys[alg] = RSAKey.generate_key(2048, parameters={"kid": kid})
        elif alg == "ES256":
            self.keys[alg] = ECKey.generate_key("P-256", parameters={"kid": kid})
        else:
            self.keys[alg] = OKPKey.generate_key("Ed25519", parameters={"kid": kid})

    # -- HTTP

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the provider first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def jwks_url(self) -> str:
        return self.base_url + "/jwks.json"

    @property
    def introspection_url(self) -> str:
        return self.base_url + "/introspect"

    def start(self) -> IdentityProvider:
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: tests read `requests` instead

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # http.server's name
                provider.requests.append(self.path)
                if self.path == "/jwks.json":
                    self._send(200, provider.jwks())
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                provider.requests.append(self.path)
                if self.path != "/introspect":
                    self._send(404, {"error": "not found"})
                    return
                if not provider._client_ok(self.headers.get("Authorization", "")):
                    self._send(401, {"error": "invalid_client"})
                    return
                length = min(int(self.headers.get("Content-Length", "0")), 1 << 20)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                self._send(200, provider._introspect(form.get("token", [""])[0]))

        self._server = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> IdentityProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client_ok(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            raw = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        ident, _, secret = raw.partition(":")
        expected = f"{self.client_id}:{self.client_secret}"
        given = f"{urllib.parse.unquote(ident)}:{urllib.parse.unquote(secret)}"
        return hmac.compare_digest(given.encode(), expected.encode())

    def _introspect(self, token: str) -> dict[str, Any]:
        with self._lock:
            claims = self._issued.get(token)
            revoked = token in self.revoked
        if claims is None or revoked or claims.get("exp", 0) < time.time():
            return {"active": False}
        return {"active": True, "token_type": "Bearer", "client_id": "mail-client", **claims}
