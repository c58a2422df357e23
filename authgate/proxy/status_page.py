"""The read-only status page (`/` on the metrics listener): each listener
with its effective policy for the four kinds of client, sessions and logins
per minute over the last hour (an inline SVG chart), the blocked addresses
with their expiry, and the last audit events.

One self-contained HTML document: inline CSS and SVG, no script, no
external asset (it works offline, and the Content-Security-Policy the
server sends forbids loading anything). Every value that came from outside
(user names, addresses, event fields) is HTML-escaped.

Who may see it: clients on loopback by default; with `[metrics]
status_password_file`, anyone with that password (HTTP Basic, any user
name) and nobody without it.

With `workers = N` the listeners and policies are every worker's; the chart
and the audit events are those of the worker that answered, and the blocks
too unless [defence] redis_url shares them.
"""

from __future__ import annotations

import datetime
import html
import ipaddress
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from authgate.config import TLSMode
from authgate.proxy.runtime import ListenerRuntime

__all__ = ["Activity", "PolicyCell", "policy_rows", "render"]

MINUTES: Final = 60
_OUTSIDERS: Final = ("198.51.100.7", "2001:db8::7", "203.0.113.9", "192.0.2.1")


class Activity:
    """Sessions (the most seen at once) and login attempts per minute, for
    the last MINUTES minutes. `sample` every few seconds from the loop."""

    def __init__(self) -> None:
        self._minutes: deque[tuple[int, int, int]] = deque(maxlen=MINUTES)
        self._last_logins: int | None = None

    def sample(self, now: float, sessions: int, logins_total: int) -> None:
        minute = int(now // 60)
        new = 0 if self._last_logins is None else max(0, logins_total - self._last_logins)
        self._last_logins = logins_total
        if self._minutes and self._minutes[-1][0] == minute:
            _, peak, count = self._minutes[-1]
            self._minutes[-1] = (minute, max(peak, sessions), count + new)
        else:
            self._minutes.append((minute, sessions, new))

    def series(self, now: float) -> list[tuple[int, int, int]]:
        """(minutes ago, sessions, logins) for the last hour, oldest first,
        with the minutes nothing was sampled as zeros."""
        current = int(now // 60)
        known = {m: (s, n) for m, s, n in self._minutes}
        return [
            (ago, *known.get(current - ago, (0, 0)))
            for ago in range(MINUTES - 1, -1, -1)
        ]


@dataclass(frozen=True)
class PolicyCell:
    text: str
    kind: str  # "offer", "refuse", "na": the cell's class


def _cell(runtime: ListenerRuntime, exempt: bool, tls: bool) -> PolicyCell:
    listener = runtime.listener
    policy = listener.policy
    if tls and listener.tls is TLSMode.NONE:
        return PolicyCell("no TLS on this listener", "na")
    if not tls and listener.tls is TLSMode.IMPLICIT:
        return PolicyCell("always TLS (implicit)", "na")
    if exempt:
        if not policy.exempt.networks:
            return PolicyCell("no exempt networks", "na")
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = policy.exempt.networks[
            0
        ].network_address
    else:
        outsiders = [ipaddress.ip_address(a) for a in _OUTSIDERS]
        address = next((a for a in outsiders if a not in policy.exempt), outsiders[-1])
    decision = runtime.offer.decide(address, tls=tls)
    if decision.tls_required:
        return PolicyCell("nothing before TLS", "refuse")
    parts = list(decision.offered)
    if decision.cleartext_login:
        parts.append("login command")
    if not parts:
        return PolicyCell("nothing", "refuse")
    return PolicyCell(" ".join(parts), "offer")


def policy_rows(runtime: ListenerRuntime) -> list[PolicyCell]:
    """Not exempt without TLS, not exempt with TLS, exempt without, exempt with."""
    return [_cell(runtime, exempt, tls) for exempt in (False, True) for tls in (False, True)]


@dataclass(frozen=True)
class Snapshot:
    version: str
    hostname: str
    now: float
    listeners: Sequence[tuple[ListenerRuntime, list[str], int]]  # runtime, addresses, sessions
    activity: Sequence[tuple[int, int, int]]
    blocks: Sequence[tuple[str, float]]  # network, seconds left
    events: Sequence[tuple[float, str, dict[str, str | int | None]]]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _left(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _chart(series: Sequence[tuple[int, int, int]]) -> str:
    width, height, pad = 720, 180, 30
    top = max([1, *(s for _, s, _ in series), *(n for _, _, n in series)])
    step = (width - 2 * pad) / max(1, len(series) - 1)

    def points(index: int) -> str:
        return " ".join(
            f"{pad + i * step:.1f},{height - pad - (row[index] / top) * (height - 2 * pad):.1f}"
            for i, row in enumerate(series)
        )

    return (
        f'<svg id="activity" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="sessions and logins per minute, last hour">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#999"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>'
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end" font-size="11">{top}</text>'
        f'<text x="{pad - 4}" y="{height - pad + 4}" text-anchor="end" font-size="11">0</text>'
        f'<text x="{pad}" y="{height - 8}" font-size="11">-60 min</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end" font-size="11">now</text>'
        f'<polyline class="sessions" fill="none" stroke="#1f6feb" stroke-width="2" '
        f'points="{points(1)}"/>'
        f'<polyline class="logins" fill="none" stroke="#d97706" stroke-width="2" '
        f'points="{points(2)}"/>'
        "</svg>"
        '<p class="legend"><span class="k1">&#9632;</span> sessions (most at once) '
        '<span class="k2">&#9632;</span> login attempts per minute</p>'
    )


_STYLE: Final = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top;font-size:.9em}
th{background:#f0f0f0}td.offer{background:#eef8ee}td.refuse{background:#fbeaea}
td.na{color:#888}.legend .k1{color:#1f6feb}.legend .k2{color:#d97706}
.muted{color:#777}
"""


def render(snap: Snapshot) -> str:
    out = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>authgate {_e(snap.hostname)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>authgate {_e(snap.version)} on {_e(snap.hostname)}</h1>",
        f'<p class="muted">as of {_e(_when(snap.now))}; this page does not refresh itself</p>',
        "<h2>Listeners</h2>",
        '<table id="listeners"><tr><th>listener</th><th>listens on</th><th>sessions</th>'
        "<th>not exempt, no TLS</th><th>not exempt, TLS</th>"
        "<th>exempt, no TLS</th><th>exempt, TLS</th></tr>",
    ]
    for runtime, addresses, sessions in snap.listeners:
        listener = runtime.listener
        cells = "".join(f'<td class="{c.kind}">{_e(c.text)}</td>' for c in policy_rows(runtime))
        out.append(
            f'<tr class="listener" data-name="{_e(listener.name)}">'
            f"<td><b>{_e(listener.name)}</b><br><span class=\"muted\">"
            f"{_e(listener.protocol.value)}, tls {_e(listener.tls.value)}, "
            f"{_e(listener.policy.security.value)}</span></td>"
            f"<td>{_e(', '.join(addresses))}<br><span class=\"muted\">&rarr; "
            f"{_e(listener.backend.address)}</span></td><td>{sessions}</td>{cells}</tr>"
        )
    out.append("</table>")
    out.append("<h2>Sessions and logins, last hour</h2>")
    out.append(_chart(snap.activity))
    out.append(f"<h2>Blocked addresses ({len(snap.blocks)})</h2>")
    if snap.blocks:
        out.append('<table id="blocks"><tr><th>network</th><th>expires</th><th>left</th></tr>')
        for network, left in snap.blocks:
            out.append(
                f'<tr class="block" data-network="{_e(network)}"><td>{_e(network)}</td>'
                f"<td>{_e(_when(snap.now + left))}</td><td>{_e(_left(left))}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append('<p id="blocks" class="muted">none</p>')
    out.append(f"<h2>Last audit events ({len(snap.events)})</h2>")
    out.append('<table id="events"><tr><th>time</th><th>event</th><th>details</th></tr>')
    for when, event, fields in reversed(snap.events):
        details = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        out.append(
            f'<tr class="event"><td>{_e(_when(when))}</td><td>{_e(event)}</td>'
            f"<td>{_e(details)}</td></tr>"
        )
    out.append("</table></body></html>")
    return "\n".join(out)
