"""App passwords through the gateway, with Python's real mail clients:
IMAP LOGIN, POP3 USER/PASS and SMTP AUTH PLAIN; the audit log names the
label (never the secret); a protocol limit and `password_login = false`
are enforced; the last use is recorded with the client's address."""

from __future__ import annotations

import asyncio
import imaplib
import json
import logging
import poplib
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.credentials.apps import usage_path
from authgate.credentials.store import UserStore
from authgate.testing.kit import audit_records
from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

MAIN = "Main-Passw0rd-77"

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with embedded_stack(
        tmp_path,
        users={"alice": MAIN},
        security="none",
        mechanisms=["PLAIN", "LOGIN", "CRAM-MD5"],
        layout=(
            ListenerSpec("imap", "imap", "none"),
            ListenerSpec("pop3", "pop3", "none"),
            ListenerSpec("submission", "smtp", "none"),
        ),
        # Failures still counted, with short delays and no block: the
        # refusals below are the point, not the defence's penalties.
        extra_config=f'[audit]\nfile = "{tmp_path / "audit.log"}"\n'
        "[defence]\nfailure_delay = 0\npenalties = [0.1]\nblock_after = 50\n",
    ) as running:
        yield running


def store_of(stack: Stack) -> UserStore:
    store = stack.gateway.runtime("imap").store
    assert isinstance(store, UserStore)
    return store


def imap_login(stack: Stack, password: str) -> bool:
    ep = stack["imap"]
    with imaplib.IMAP4(ep.host, ep.port, timeout=10) as client:
        try:
            client.login("alice", password)
        except imaplib.IMAP4.error:
            return False
        client.logout()
        return True


def pop3_login(stack: Stack, password: str) -> bool:
    ep = stack["pop3"]
    client = poplib.POP3(ep.host, ep.port, timeout=10)
    try:
        client.user("alice")
        client.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        client.close()
    return True


def smtp_login(stack: Stack, password: str) -> bool:
    ep = stack["submission"]
    with smtplib.SMTP(ep.host, ep.port, timeout=10) as client:
        client.ehlo("client.example")
        client.user, client.password = "alice", password
        try:
            client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError:
            return False
        return True



async def test_app_password_in_every_protocol_audited_by_label(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate.login")
    store = store_of(stack)
    password = store.add_app_password("alice", "phone")
    assert await asyncio.to_thread(imap_login, stack, password)
    assert await asyncio.to_thread(pop3_login, stack, password)
    assert await asyncio.to_thread(smtp_login, stack, password)
    assert await asyncio.to_thread(imap_login, stack, MAIN)
    records = await audit_records(tmp_path / "audit.log", "login", 4)
    assert [r.get("app") for r in records] == ["phone", "phone", "phone", None]
    assert password not in (tmp_path / "audit.log").read_text()
    # The login records name the label too (and never the password).
    logins = [r.getMessage() for r in caplog.records if r.name == "authgate.login"]
    assert [line.rsplit(" app_password=", 1)[-1] for line in logins] == ["phone"] * 3 + ["-"]
    assert not any(password in line for line in logins)
    usage = json.loads(usage_path(tmp_path / "users.toml").read_text())
    assert usage["alice"]["phone"]["from"] == "127.0.0.1"


async def test_protocol_limit_and_password_login_off(stack: Stack, tmp_path: Path) -> None:
    store = store_of(stack)
    mailer = store.add_app_password("alice", "mailer", ["smtp"])
    assert await asyncio.to_thread(smtp_login, stack, mailer)
    assert not await asyncio.to_thread(imap_login, stack, mailer)
    assert not await asyncio.to_thread(pop3_login, stack, mailer)
    store.set_password_login("alice", False)
    assert not await asyncio.to_thread(imap_login, stack, MAIN)
    assert not await asyncio.to_thread(smtp_login, stack, MAIN)
    assert await asyncio.to_thread(smtp_login, stack, mailer)
    failed = await audit_records(tmp_path / "audit.log", "login-failed", 4)
    assert all(r["user"] == "alice" for r in failed)
