"""OAuth 2.0 bearer tokens for OAUTHBEARER and XOAUTH2: the `[oauth]`
settings and the token verifier (local JWT checks against a JWK set, or
RFC 7662 introspection at the identity provider)."""

from authgate.oauth.settings import OAuthSettings, parse_oauth
from authgate.oauth.verifier import TokenVerifier

__all__ = ["OAuthSettings", "TokenVerifier", "parse_oauth"]
