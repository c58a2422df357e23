"""Property tests for the byte parsers of the scenarios and transcripts:
capability rewriting, the lens's line splitting, transcript lines."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from authgate.testing import scenarios
from authgate.testing.scenarios import Lens, ScenarioOptions, edit_capabilities
from authgate.testing.transcripts import CLIENT, SERVER, Transcript

TOKEN = st.from_regex(r"[A-Z0-9][A-Z0-9=+-]{0,12}", fullmatch=True)
TOKENS = st.lists(TOKEN, min_size=1, max_size=8)
ANY_BYTES = st.binary(max_size=300)


def same(tokens: list[str]) -> list[str]:
    return list(tokens)


@given(TOKENS)
def test_imap_identity_edit_keeps_the_bytes(tokens: list[str]) -> None:
    caps = " ".join(tokens).encode()
    data = b"* CAPABILITY " + caps + b"\r\n* OK [CAPABILITY " + caps + b"] hi\r\na OK done\r\n"
    assert edit_capabilities("imap", data, same, reply_to="CAPABILITY") == data


@given(st.lists(st.from_regex(r"[A-Z][A-Z0-9-]{0,10}( [A-Za-z0-9-]{1,8})?", fullmatch=True),
                max_size=6))  # fmt: skip
def test_smtp_ehlo_edit_drops_only_starttls(keywords: list[str]) -> None:
    keywords = [k for k in keywords if k.split()[0] not in ("AUTH", "STARTTLS")]
    lines = ["localhost", *keywords, "STARTTLS", "AUTH PLAIN"]
    data = b"".join(
        (b"250 " if i == len(lines) - 1 else b"250-") + line.encode() + b"\r\n"
        for i, line in enumerate(lines)
    )
    out = edit_capabilities("smtp", data, scenarios.no_starttls, reply_to="EHLO")
    expected = ["localhost", *keywords, "AUTH PLAIN"]
    assert out.decode().split("\r\n")[:-1] == [
        ("250 " if i == len(expected) - 1 else "250-") + line for i, line in enumerate(expected)
    ]


@given(st.lists(st.from_regex(r"[A-Z][A-Z0-9-]{0,10}", fullmatch=True), max_size=6))
def test_pop3_capa_edit_round_trips(lines: list[str]) -> None:
    lines = [line for line in lines if line not in ("SASL", "STLS")]
    body = [*lines, "STLS", "SASL SCRAM-SHA-256 PLAIN"]
    data = ("+OK list\r\n" + "".join(f"{line}\r\n" for line in body) + ".\r\n").encode()
    assert edit_capabilities("pop3", data, same, reply_to="CAPA") == data
    weaker = edit_capabilities("pop3", data, scenarios.weaker, reply_to="CAPA")
    assert b"SASL" not in weaker and weaker.endswith(scenarios.TAMPERED.encode() + b"\r\n.\r\n")


@given(ANY_BYTES, st.lists(st.integers(min_value=1, max_value=40), max_size=10))
def test_lens_passes_the_same_bytes_however_they_are_cut(data: bytes, cuts: list[int]) -> None:
    """slow-auth with no delay changes nothing: whatever the segments, the
    machine gets the client's complete lines, in order, and the rest once
    the splice takes over."""
    scenario = scenarios.SCENARIOS["slow-auth"]
    whole = Lens(scenario, "imap", ScenarioOptions(delay=0))
    cut = Lens(scenario, "imap", ScenarioOptions(delay=0))
    expected = whole.from_client(data).to_machine + whole.take_held()
    got, rest = b"", data
    for size in cuts:
        got += cut.from_client(rest[:size]).to_machine
        rest = rest[size:]
    got += cut.from_client(rest).to_machine + cut.take_held()
    assert got == expected == data


@given(st.lists(st.tuples(st.booleans(), ANY_BYTES), max_size=12))
def test_transcript_lines_are_the_recorded_bytes(chunks: list[tuple[bool, bytes]]) -> None:
    transcript = Transcript("imap", "imap", 1)
    for from_client, data in chunks:
        transcript.record(CLIENT if from_client else SERVER, data)
    for sender in (CLIENT, SERVER):
        sent = b"".join(d for c, d in chunks if (CLIENT if c else SERVER) == sender)
        assert transcript.sent_by(sender) == sent
        lines = transcript.lines(sender)
        unfinished = 1 if sent and not sent.endswith(b"\n") else 0
        assert len(lines) == sent.count(b"\n") + unfinished
        assert all(b"\n" not in line and not line.endswith(b"\r") for line in lines)
        assert b"".join(lines) == b"".join(p.rstrip(b"\r") for p in sent.split(b"\n"))
    # never raises, whatever the bytes
    transcript.text()
    transcript.secret_before_tls("pw")


@given(st.text(min_size=4, max_size=30).filter(lambda s: "\x00" not in s))
def test_secret_found_in_an_auth_plain_initial_response(password: str) -> None:
    transcript = Transcript("submission", "smtp", 1)
    blob = base64.b64encode(b"\0alice\0" + password.encode())
    transcript.record(CLIENT, b"EHLO x\r\nAUTH PLAIN " + blob + b"\r\n")
    assert transcript.secret_before_tls(password) is not None
    transcript.mark_tls()
    transcript2 = Transcript("submission", "smtp", 2)
    transcript2.mark_tls()
    transcript2.record(CLIENT, b"AUTH PLAIN " + blob + b"\r\n")
    assert transcript2.secret_before_tls(password) is None
