"""The policy function: what is offered to whom, and why a request is refused."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.config import Address, BackendSettings, Listener, TLSMode
from authgate.credentials.store import StoreOffer
from authgate.offers import ListenerOffer
from authgate.policy import (
    ExemptNetworks,
    ListenerPolicy,
    Protocol,
    Refusal,
    Security,
    Withheld,
    choose_client_mechanism,
    decide,
)
from authgate.sasl import DEFAULT_ORDER, MECHANISMS

ALL = DEFAULT_ORDER
CHALLENGE_RESPONSE = ("CRAM-MD5", "DIGEST-MD5", "NTLM")
LAN = ExemptNetworks.parse(["192.168.0.0/16", "fd00::/8"])
OUTSIDER = "198.51.100.7"


def listener(security: Security, protocol: Protocol = Protocol.IMAP) -> ListenerPolicy:
    return ListenerPolicy(protocol=protocol, security=security, mechanisms=ALL, exempt=LAN)


@pytest.mark.parametrize("tls", [False, True])
def test_none_offers_everything_everywhere(tls: bool) -> None:
    d = decide(listener(Security.NONE), OUTSIDER, tls=tls)
    assert d.offered == ALL
    assert d.cleartext_login and not d.tls_required and not d.exempt
    assert all(d.refusal(m) is None for m in ALL)


def test_secure_auth_without_tls_offers_only_challenge_response() -> None:
    d = decide(listener(Security.REQUIRE_SECURE_AUTH), OUTSIDER, tls=False)
    assert d.offered == CHALLENGE_RESPONSE
    assert not d.cleartext_login
    assert not d.tls_required
    assert d.withheld == {"LOGIN": Withheld.NEEDS_TLS, "PLAIN": Withheld.NEEDS_TLS}
    # SMTP maps this to 538 5.7.11, IMAP to [PRIVACYREQUIRED]
    assert d.refusal("plain") is Refusal.MECHANISM_NEEDS_TLS
    assert d.login_refusal() is Refusal.MECHANISM_NEEDS_TLS


def test_secure_auth_inside_tls_offers_everything_in_admin_order() -> None:
    d = decide(listener(Security.REQUIRE_SECURE_AUTH), OUTSIDER, tls=True)
    assert d.offered == ALL
    assert d.cleartext_login


def test_require_encrypted_without_tls_offers_nothing() -> None:
    d = decide(listener(Security.REQUIRE_ENCRYPTED), OUTSIDER, tls=False)
    assert d.offered == ()
    assert d.tls_required and d.session_tls_required
    assert not d.cleartext_login
    assert d.refusal("CRAM-MD5") is Refusal.TLS_REQUIRED  # SMTP 530 5.7.0
    assert d.login_refusal() is Refusal.TLS_REQUIRED


def test_require_encrypted_smtp_does_not_require_tls_for_the_session() -> None:
    # Many servers that hand us mail on port 25 cannot do TLS (the seed's note):
    # require-encrypted governs authentication there, not the mail session.
    d = decide(listener(Security.REQUIRE_ENCRYPTED, Protocol.SMTP), OUTSIDER, tls=False)
    assert d.tls_required and not d.session_tls_required


def test_require_encrypted_inside_tls_offers_everything() -> None:
    d = decide(listener(Security.REQUIRE_ENCRYPTED), OUTSIDER, tls=True)
    assert d.offered == ALL and d.cleartext_login and not d.tls_required


@pytest.mark.parametrize("client", ["192.168.1.20", "fd00::1", "::ffff:192.168.7.7"])
@pytest.mark.parametrize("security", list(Security))
def test_exempt_clients_are_treated_as_none(client: str, security: Security) -> None:
    d = decide(listener(security), client, tls=False)
    assert d.exempt
    assert d.effective is Security.NONE
    assert d.offered == ALL and d.cleartext_login and not d.tls_required


@pytest.mark.parametrize("client", ["192.169.0.1", "fe80::1", "::ffff:10.0.0.1", "not-an-ip"])
def test_non_exempt_clients(client: str) -> None:
    assert not decide(listener(Security.REQUIRE_SECURE_AUTH), client, tls=False).exempt


def test_store_limits_offer_whatever_the_order() -> None:
    # A store of SHA hashes verifies only PLAIN and LOGIN.
    d = decide(listener(Security.NONE), OUTSIDER, tls=False, verifiable=["PLAIN", "LOGIN"])
    assert d.offered == ("LOGIN", "PLAIN")
    assert d.withheld["CRAM-MD5"] is Withheld.STORE_CANNOT_VERIFY
    assert d.refusal("CRAM-MD5") is Refusal.NOT_AVAILABLE  # SMTP 504 5.5.4


def test_sha_store_under_secure_auth_without_tls_offers_nothing_but_is_not_tls_required() -> None:
    d = decide(
        listener(Security.REQUIRE_SECURE_AUTH), OUTSIDER, tls=False, verifiable=["PLAIN", "LOGIN"]
    )
    assert d.offered == ()
    assert not d.tls_required
    assert d.refusal("PLAIN") is Refusal.MECHANISM_NEEDS_TLS


def test_cleartext_login_follows_cleartext_mechanisms() -> None:
    only_cr = ListenerPolicy(Protocol.IMAP, Security.NONE, ("CRAM-MD5",))
    d = decide(only_cr, OUTSIDER, tls=True)
    assert not d.cleartext_login
    assert d.login_refusal() is Refusal.NOT_AVAILABLE


def test_channel_binding_mechanisms_need_tls() -> None:
    pol = ListenerPolicy(Protocol.IMAP, Security.NONE, ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert decide(pol, OUTSIDER, tls=False).offered == ("SCRAM-SHA-256",)
    assert decide(pol, OUTSIDER, tls=False).refusal("SCRAM-SHA-256-PLUS") is (
        Refusal.CHANNEL_BINDING_UNAVAILABLE
    )
    assert decide(pol, OUTSIDER, tls=True).offered == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")


def test_channel_binding_data_goes_with_an_advertised_plus_mechanism() -> None:
    """RFC 5802 section 6: SCRAM gets binding data exactly when a -PLUS is
    advertised (so a client's "y" is a downgrade only then)."""
    both = ListenerPolicy(Protocol.IMAP, Security.NONE, ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert decide(both, OUTSIDER, tls=True).binds_channel
    assert not decide(both, OUTSIDER, tls=False).binds_channel  # -PLUS withheld before TLS
    plain = ListenerPolicy(Protocol.IMAP, Security.NONE, ("SCRAM-SHA-256", "SCRAM-SHA-1"))
    assert not decide(plain, OUTSIDER, tls=True).binds_channel
    # -PLUS configured but not verifiable by the store: not advertised, no binding.
    assert not decide(both, OUTSIDER, tls=True, verifiable=("SCRAM-SHA-256",)).binds_channel


def test_unknown_mechanism_is_not_available() -> None:
    d = decide(listener(Security.NONE), OUTSIDER, tls=True)
    assert d.refusal("GSSAPI") is Refusal.NOT_AVAILABLE
    assert d.refusal("cram-md5") is None


def test_server_choice_is_the_admins_first_common_mechanism() -> None:
    d = decide(listener(Security.NONE), OUTSIDER, tls=False)
    assert d.choose(["plain", "ntlm", "login"]) == "NTLM"
    assert d.choose(["GSSAPI"]) is None


def test_client_choice_prefers_our_order_and_usable_secrets() -> None:
    offers = ["PLAIN", "LOGIN", "CRAM-MD5"]
    assert choose_client_mechanism(offers, ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN"]) == "CRAM-MD5"
    assert choose_client_mechanism(offers, ["CRAM-MD5", "PLAIN"], usable=["PLAIN"]) == "PLAIN"
    assert choose_client_mechanism(offers, ["NTLM"]) is None


def test_exempt_networks_reject_bad_entries() -> None:
    for bad in ["10.0.0.0/33", "10.0.0.1/8", "banana", "fd00::/129"]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            ExemptNetworks.parse([bad])


@given(
    security=st.sampled_from(list(Security)),
    tls=st.booleans(),
    mechs=st.lists(st.sampled_from(sorted(MECHANISMS)), unique=True),
    verifiable=st.none() | st.sets(st.sampled_from(sorted(MECHANISMS))),
    addr=st.ip_addresses(),
)
def test_policy_invariants(
    security: Security,
    tls: bool,
    mechs: list[str],
    verifiable: set[str] | None,
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    pol = ListenerPolicy(Protocol.IMAP, security, tuple(mechs), LAN)
    d = decide(pol, addr, tls=tls, verifiable=verifiable)
    # Offered is a subsequence of the admin's order, and everything configured
    # is either offered or withheld with a reason.
    assert list(d.offered) == [m for m in mechs if m in d.offered]
    assert set(d.offered) | set(d.withheld) == set(mechs)
    assert not set(d.offered) & set(d.withheld)
    if verifiable is not None:
        assert set(d.offered) <= verifiable
    strict = not d.exempt and not tls
    if strict and security is not Security.NONE:
        # No cleartext password ever crosses an unencrypted non-exempt link.
        assert not any(MECHANISMS[m].cleartext for m in d.offered)
        assert not d.cleartext_login
    if strict and security is Security.REQUIRE_ENCRYPTED:
        assert d.offered == () and d.tls_required
    for m in mechs:
        assert (d.refusal(m) is None) == (m in d.offered)


@given(
    security=st.sampled_from(list(Security)),
    mechs=st.lists(st.sampled_from(sorted(MECHANISMS)), unique=True, min_size=1),
    verifiable=st.sets(st.sampled_from(sorted(MECHANISMS))),
    asked=st.lists(
        st.tuples(
            st.ip_addresses()
            | st.sampled_from(["192.168.3.4", "fd00::1", "::ffff:192.168.9.9", "not-an-ip"]),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_a_listeners_remembered_answers_are_the_policy_functions(
    security: Security,
    mechs: list[str],
    verifiable: set[str],
    asked: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | str, bool]],
) -> None:
    """ListenerOffer.decide remembers one answer per (exempt, TLS): for any
    sequence of clients, each gets what the pure function says for it."""
    policy = ListenerPolicy(Protocol.IMAP, security, tuple(mechs), LAN)
    listener = Listener(
        name="imap",
        protocol=Protocol.IMAP,
        listen=(Address("127.0.0.1", 1143),),
        tls=TLSMode.STARTTLS,
        backend=BackendSettings(Address("127.0.0.1", 2143)),
        policy=policy,
    )
    store = StoreOffer(mechanisms=tuple(m for m in mechs if m in verifiable))
    offer = ListenerOffer(listener, store)
    for client, tls in asked:
        expected = decide(policy, client, tls=tls, verifiable=store.mechanisms)
        assert offer.decide(client, tls=tls) == expected
