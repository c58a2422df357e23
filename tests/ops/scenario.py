"""What the operations tests do to a running authgate: every kind of login
outcome, IPv4 and IPv6, direct and behind PROXY."""

from __future__ import annotations

from tests.ops.process import PASSWORD, Authgate, Imap

WRONG = "Wrong-pw-9"  # never in any log either
INJECTED = "192.0.2.66"
FAKE_USER = f"x WARNING authgate.login: login outcome=failed listener=imap client={INJECTED} client_port=1 proxy=- "


async def exercise(gate: Authgate) -> dict[str, str]:
    """Every kind of outcome, IPv4 and IPv6, direct and behind PROXY.
    Returns what was done from which address (the real client's)."""
    imap, balanced = gate.ports["imap"], gate.ports["balanced"]

    # Successes: never banned.
    ok = await Imap.open(imap, local="127.0.0.9")
    assert (await ok.cram_md5("alice", PASSWORD)).startswith(b"c OK")
    ok.close()
    ok = await Imap.open(balanced, real=("198.51.100.9", 40009))
    assert (await ok.cram_md5("alice", PASSWORD)).startswith(b"c OK")
    ok.close()
    ok = await Imap.open(imap, host="::1")
    assert (await ok.cram_md5("alice", PASSWORD)).startswith(b"c OK")
    ok.close()

    async def attacker(user: str = "alice", **where: object) -> None:
        # A policy refusal (cleartext LOGIN before TLS), then wrong
        # passwords until blocked, then a connection refused as blocked.
        client = await Imap.open(**where)  # type: ignore[arg-type]
        reply = await client.command("r", f'LOGIN "{user}" {WRONG}')
        assert reply[-1].startswith(b"r NO"), reply
        for _ in range(2):  # block_after
            assert (await client.cram_md5("alice", WRONG)).startswith(b"c NO")
        client.close()
        blocked = await Imap.open(**where)  # type: ignore[arg-type]
        assert b"BYE" in blocked.greeting, blocked.greeting
        blocked.close()

    # A user name made to look like the fields of another record: it must
    # not get INJECTED banned (test_fail2ban).
    await attacker(user=FAKE_USER, port=imap, local="127.0.0.2")
    await attacker(port=balanced, real=("203.0.113.7", 40007))
    await attacker(port=balanced, real=("2001:db8::7", 40008))
    await attacker(port=imap, host="::1")  # last: it blocks ::1
    return {
        "ok": "127.0.0.9 198.51.100.9",
        "bad": "127.0.0.2 203.0.113.7 2001:db8::7 ::1",
    }


