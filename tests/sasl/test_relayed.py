"""relayed_user: the user a relayed exchange names, read from the client's
messages. Checked against the real client machines and, as the reference,
the user our own server machines look up from the same messages."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from authgate.sasl import MECHANISMS
from authgate.sasl.base import (
    ClientAuthError,
    ClientContext,
    ClientCredentials,
    Lookup,
    ServerContext,
)
from authgate.sasl.relayed import relayed_user
from authgate.testing.kit import to_first_lookup

NAMING = ["PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "NTLM"]

names = st.text(
    st.characters(whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters="._-@+=,"),
    min_size=1,
    max_size=30,
).filter(lambda n: unicodedata.normalize("NFKC", n) == n)  # SCRAM's SASLprep leaves it be
passwords = st.text(st.characters(whitelist_categories=("Lu", "Ll", "Nd", "Po")), min_size=1, max_size=30)


def exchange(mechanism: str, user: str, password: str) -> tuple[list[bytes], str]:
    """The client's messages up to the server's first lookup, and the user
    that lookup names."""
    info = MECHANISMS[mechanism]
    client = info.client(ClientCredentials(user, password), ClientContext())
    messages, outcome = to_first_lookup(client, info.server(ServerContext()))
    assert isinstance(outcome, Lookup), outcome
    return messages, outcome.request.authcid


def named(mechanism: str, messages: list[bytes]) -> str | None:
    for index, message in enumerate(messages):
        user = relayed_user(mechanism, index, message)
        if user is not None:
            return user
    return None


@pytest.mark.parametrize("mechanism", NAMING)
@given(user=names, password=passwords)
def test_reads_the_user_the_server_would_look_up(mechanism: str, user: str, password: str) -> None:
    assume(not (mechanism == "NTLM" and "\\" in user))  # DOMAIN\user for NTLM clients
    try:
        messages, looked_up = exchange(mechanism, user, password)
    except ClientAuthError:  # SCRAM: a name SASLprep refuses (unassigned in Unicode 3.2)
        assume(False)
    assert named(mechanism, messages) == looked_up == user


@given(user=names, password=passwords)
def test_a_login_password_is_never_read_as_a_user(user: str, password: str) -> None:
    messages, _ = exchange("LOGIN", user, password)
    assert messages[-1] == password.encode()
    assert relayed_user("LOGIN", 1, messages[-1]) is None


def test_mechanisms_that_name_nobody_early() -> None:
    assert relayed_user("GSSAPI", 0, b"alice") is None
    assert relayed_user("EXTERNAL", 0, b"alice") is None
    assert relayed_user("PLAIN", 1, b"\0alice\0pw") is None  # PLAIN has one message
    assert relayed_user("SCRAM-SHA-256", 1, b"c=biws,r=abc,p=xyz") is None  # client-final


@pytest.mark.parametrize("mechanism", [*NAMING, "GSSAPI"])
@given(index=st.integers(0, 3), message=st.binary(max_size=300))
def test_any_message_gives_a_printable_name_or_none(mechanism: str, index: int, message: bytes) -> None:
    user = relayed_user(mechanism, index, message)
    assert user is None or (user and user.isprintable())
