"""The `ports` sub-command (authgate.firewall)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from authgate import config as config_mod
from authgate.config import ConfigError
from authgate.credentials.store import StoreError
from authgate.errors import UserError
from authgate.firewall import port_table, render_iptables, render_nft, render_table, warnings
from authgate.offers import load_store

__all__ = ["add_commands", "cmd_ports"]


def cmd_ports(args: argparse.Namespace) -> int:
    try:
        config = config_mod.load(args.config)
        store = load_store(config)
    except (ConfigError, StoreError) as exc:
        raise UserError(str(exc)) from None
    entries = port_table(config, store, include_standard=args.all)
    warns = warnings(config, store)
    if args.format == "nft":
        sys.stdout.write(render_nft(entries, config.path, warns))
    elif args.format == "iptables":
        sys.stdout.write(render_iptables(entries, config.path, warns))
    else:
        sys.stdout.write(render_table(entries))
        for warning in warns:
            print(f"warning: {warning}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `ports` on the CLI's subparsers."""
    p = sub.add_parser("ports", help="which ports to open in the firewall, and why")
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument(
        "--format",
        choices=("table", "nft", "iptables"),
        default="table",
        help="a table, an nftables file, or iptables/ip6tables commands",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="also list the standard services authgate does not serve (NNTP, LDAP, HTTP)",
    )
    p.set_defaults(func=cmd_ports)
