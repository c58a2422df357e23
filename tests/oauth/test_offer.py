"""Where OAUTHBEARER and XOAUTH2 are offered: only with an [oauth] token
verifier, and, being cleartext credentials, under require-secure-auth only
inside TLS or to exempt networks, exactly like PLAIN."""

from __future__ import annotations

from pathlib import Path

from authgate.config import load
from authgate.credentials.store import UserStore
from authgate.offers import NO_OAUTH_REASON, listener_offer
from authgate.policy import Withheld

CONFIG = """
hostname = "mail.test"
[policy]
security = "require-secure-auth"
mechanisms = ["SCRAM-SHA-256", "OAUTHBEARER", "XOAUTH2", "PLAIN"]
exempt_networks = ["127.0.0.2/32"]
[tls]
cert = "c.pem"
key = "k.pem"
[users]
file = "users.toml"
[[listeners]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:1143"
tls = "starttls"
[listeners.backend]
address = "127.0.0.1:2143"
master_user = "authgate"
master_password = "x"
"""
OAUTH = """
[oauth]
jwks = "jwks.json"
issuer = "https://idp.test"
audience = "mail.test"
"""


def offer_for(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "authgate.toml"
    path.write_text(text)
    config = load(path)
    store = UserStore()  # an SHA-only store would leave PLAIN: bearer is not the store's
    store.set_user_secrets("alice", ["{SSHA512}" + "A" * 88])
    return config, listener_offer(
        config.listeners[0], store, config.hostname, oauth=config.oauth is not None
    )


def test_offered_in_the_admins_order_inside_tls_only(tmp_path: Path) -> None:
    config, offer = offer_for(tmp_path, CONFIG + OAUTH)
    assert config.oauth is not None and config.oauth.audience == ("mail.test",)
    assert offer.verifiable == ("OAUTHBEARER", "XOAUTH2", "PLAIN")  # SCRAM: SHA store
    inside = offer.decide("203.0.113.5", tls=True)
    assert inside.offered == ("OAUTHBEARER", "XOAUTH2", "PLAIN")
    outside = offer.decide("203.0.113.5", tls=False)
    assert outside.offered == ()
    assert outside.withheld["OAUTHBEARER"] is Withheld.NEEDS_TLS
    assert offer.decide("127.0.0.2", tls=False).offered == ("OAUTHBEARER", "XOAUTH2", "PLAIN")


def test_not_offered_without_a_token_verifier(tmp_path: Path) -> None:
    _config, offer = offer_for(tmp_path, CONFIG)
    assert "OAUTHBEARER" not in offer.verifiable
    assert offer.store.reasons["XOAUTH2"] == NO_OAUTH_REASON
