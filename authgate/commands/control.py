"""`authgate status`, `sessions`, `block`, `unblock`: a running authgate's
state and its blocks, through its control socket (authgate.proxy.control).

Every serving process is asked (one socket per worker with `workers = N`)
and the answers are added up: sessions per listener summed, blocks merged
(the longest of each network's), blocks and unblocks sent to every worker.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Final

from authgate import config as config_mod
from authgate.config import ConfigError
from authgate.errors import UserError

__all__ = ["add_commands", "parse_duration"]

MAX_SECONDS: Final = 366 * 86400  # (authgate.proxy.control.MAX_BLOCK_SECONDS)
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION: Final = re.compile(r"(\d{1,9})([smhdw]?)")
TIMEOUT: Final = 15.0


def parse_duration(text: str) -> int:
    """'90', '90s', '10m', '2h', '1d', '1w', or several ('1h30m'): seconds.
    ValueError for anything else, zero, or more than a year."""
    raw = text.strip().lower()
    if not raw:
        raise ValueError("empty duration")
    total, pos = 0, 0
    while pos < len(raw):
        match = _DURATION.match(raw, pos)
        if match is None:
            raise ValueError(f"{text!r} is not a duration (such as 600, 10m, 2h, 1d)")
        total += int(match[1]) * _UNITS[match[2] or "s"]
        pos = match.end()
        if not match[2] and pos < len(raw):
            raise ValueError(f"{text!r} is not a duration (such as 600, 10m, 2h, 1d)")
    if not 1 <= total <= MAX_SECONDS:
        raise ValueError(f"{text!r} is outside 1 second .. 366 days")
    return total


def _ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise UserError(f"{path}: no control socket (is authgate running?)") from None
        except PermissionError:
            raise UserError(f"{path}: permission denied (run as root or authgate's user)") from None
        except OSError as exc:
            raise UserError(f"{path}: {exc.strerror or exc} (is authgate running?)") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        answer = json.loads(data)
    except ValueError:
        raise UserError(f"{path}: no answer from authgate") from None
    if not isinstance(answer, dict):
        raise UserError(f"{path}: a strange answer from authgate")
    if not answer.get("ok"):
        raise UserError(f"{path}: {answer.get('error', 'refused')}")
    return answer


def _ask_all(args: argparse.Namespace, request: dict[str, Any]) -> list[dict[str, Any]]:
    if args.socket is not None:
        paths = [args.socket]
    else:
        try:
            config = config_mod.load(args.config)
        except ConfigError as exc:
            raise UserError(str(exc)) from None
        if config.control.socket is None:
            raise UserError(f"{args.config}: no [control] socket configured")
        from authgate.proxy.control import socket_paths  # (the proxy only when needed)

        paths = socket_paths(config.control.socket, config.workers)
    return [_ask(path, request) for path in paths]


def _merge_status(answers: list[dict[str, Any]]) -> dict[str, Any]:
    first = answers[0]
    listeners: dict[str, dict[str, Any]] = {}
    for answer in answers:
        for item in answer["listeners"]:
            entry = listeners.setdefault(item["name"], {**item, "sessions": 0})
            entry["sessions"] += item["sessions"]
    blocks: dict[str, int] = {}
    for answer in answers:
        for block in answer["blocks"]:
            blocks[block["network"]] = max(blocks.get(block["network"], 0), block["seconds_left"])
    return {
        "version": first["version"],
        "workers": len(answers),
        "pids": [a["pid"] for a in answers],
        "uptime": max(a["uptime"] for a in answers),
        "sessions": sum(a["sessions"] for a in answers),
        "listeners": list(listeners.values()),
        "blocks": [{"network": n, "seconds_left": s} for n, s in
                   sorted(blocks.items(), key=lambda kv: -kv[1])],
        "backends": first["backends"],
    }


def _duration_text(seconds: int) -> str:
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) + (f"{seconds}s" if seconds or not parts else "")


def cmd_status(args: argparse.Namespace) -> int:
    status = _merge_status(_ask_all(args, {"command": "status"}))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"authgate {status['version']}: up {_duration_text(status['uptime'])}, "
          f"{status['workers']} process(es), {status['sessions']} session(s)")
    print("listeners:")
    for item in status["listeners"]:
        print(f"  {item['name']:<14} {item['protocol']:<5} tls {item['tls']:<9} "
              f"{', '.join(item['addresses'])} -> {item['backend']}: {item['sessions']} session(s)")
    print("backends:")
    for item in status["backends"]:
        state = "reachable" if item["reachable"] else f"UNREACHABLE ({item['error']})"
        print(f"  {item['backend']}: {state}")
    print(f"blocked: {len(status['blocks'])}")
    for block in status["blocks"]:
        print(f"  {block['network']}: {_duration_text(block['seconds_left'])} left")
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"command": "sessions"}
    if args.listener:
        request["listener"] = args.listener
    sessions = [s for a in _ask_all(args, request) for s in a["sessions"]]
    sessions.sort(key=lambda s: (s["listener"], s["since"]))
    if args.json:
        print(json.dumps(sessions, indent=2))
        return 0
    now = time.time()
    for s in sessions:
        who = s["user"] if s["user"] is not None else "-"
        host = f"[{s['client']}]" if ":" in s["client"] else s["client"]
        client = f"{host}:{s['client_port']}"
        print(f"{s['listener']:<14} {client:<28} {s['phase']:<8} {who!s:<24} "
              f"{_duration_text(int(now - s['since']))}")
    print(f"{len(sessions)} session(s)", file=sys.stderr)
    return 0


def cmd_block(args: argparse.Namespace) -> int:
    try:
        seconds = parse_duration(args.duration)
    except ValueError as exc:
        raise UserError(f"--for: {exc}") from None
    answers = _ask_all(args, {"command": "block", "address": args.address, "seconds": seconds})
    print(f"blocked {answers[0]['network']} for {_duration_text(seconds)}")
    return 0


def cmd_unblock(args: argparse.Namespace) -> int:
    answers = _ask_all(args, {"command": "unblock", "address": args.address})
    was = any(a["was_blocked"] for a in answers)
    print(f"unblocked {answers[0]['network']}" + ("" if was else " (it was not blocked)"))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the control commands on the CLI's subparsers."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, default=Path("/etc/authgate/authgate.toml"),
                       help="the running authgate's config (for [control] socket and workers)")
        p.add_argument("--socket", type=Path, help="the control socket itself (one process)")

    p = sub.add_parser("status", help="a running authgate: listeners, sessions, blocks, backends")
    common(p)
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("sessions", help="a running authgate's sessions")
    common(p)
    p.add_argument("--listener", help="only this listener's")
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.set_defaults(func=cmd_sessions)
    p = sub.add_parser("block", help="block an address in a running authgate")
    common(p)
    p.add_argument("address", help="IPv4 or IPv6 address (its network is blocked, as by [defence])")
    p.add_argument("--for", dest="duration", required=True, help="how long: 600, 10m, 2h, 1d")
    p.set_defaults(func=cmd_block)
    p = sub.add_parser("unblock", help="lift an address's block in a running authgate")
    common(p)
    p.add_argument("address", help="IPv4 or IPv6 address")
    p.set_defaults(func=cmd_unblock)
