"""Tools that run authgate hard: benchmarks (loadgen, serve, compare; see
README.md) and anything else that is too slow for the test suite."""

from __future__ import annotations

import argparse


def add_event_loop_option(parser: argparse.ArgumentParser) -> None:
    """`--event-loop`: the loop authgate runs on, as its `event_loop` setting."""
    parser.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="uvloop",
        help="authgate's event_loop setting (default uvloop, authgate's own default)",
    )
