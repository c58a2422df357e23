"""Interop tests: real clients and real servers (Dovecot) on loopback."""
