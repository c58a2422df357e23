"""The port helpers the test harnesses share."""

from __future__ import annotations

import socket

from tests.netutil import HOST, free_ports


def test_free_ports_are_distinct_and_free() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket() as sock:
            sock.bind((HOST, port))  # nothing holds them any more
