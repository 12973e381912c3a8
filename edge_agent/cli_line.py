"""Command line for the line: ``edge-agent demo --line`` options and ``edge-agent line watch``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def add_demo_options(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--line",
        action="store_true",
        help="run a whole line instead of one station: four edge-agent processes (two reference "
        "PLCs, the reference OPC UA machine, an ACME X200 press), a conveyor routing parts of "
        "many variants to them, and the line view; exit 0 when every part finished every step",
    )
    demo.add_argument(
        "--record",
        type=Path,
        metavar="DIR",
        help="--line: keep the signed travelers, the public key, each part's route and the "
        "genealogies rebuilt from the stations' reports (genealogy.json) in DIR",
    )
    demo.add_argument(
        "--part",
        action="append",
        default=[],
        metavar="P-NNNNN",
        help="--line: print this part's genealogy at the end (repeatable)",
    )


def run_line_demo(args: argparse.Namespace) -> int:
    from .line.demo_line import LineDemoOptions, run_line_demo

    if args.machine or args.nfc or args.opcua or args.profile:
        print(
            "edge-agent demo: --line runs its own machines; --machine, --profile, --nfc and "
            "--opcua apply to the one-station demo",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    options = LineDemoOptions(
        parts=args.parts,
        rate=args.rate,
        broker=args.broker,
        record=args.record,
        show=tuple(args.part),
    )
    try:
        return asyncio.run(run_line_demo(options))
    except KeyboardInterrupt:
        return EXIT_FAILED


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    line = sub.add_parser(
        "line",
        help="look at a whole line through its broker",
        description="Tools that work on the whole line through the broker the stations report to.",
    )
    line_sub = line.add_subparsers(dest="line_command", required=True, metavar="COMMAND")
    watch = line_sub.add_parser(
        "watch",
        help="live view of every station and part; genealogy of a part",
        description="Show every station (busy/idle, jobs done, last cycle time) and the orders "
        "and parts in progress, from the stations' status and cycle reports (and a conveyor's "
        "events, if one publishes on line/+/conveyor). On a terminal the screen refreshes; into "
        "a pipe it prints one line per event. At the end (Ctrl-C, --duration, or --until-done) "
        "a summary and the genealogy of every --part, rebuilt only from what the stations "
        "published.",
    )
    watch.add_argument("--broker", required=True, metavar="HOST:PORT")
    watch.add_argument("--part", action="append", default=[], metavar="P-NNNNN")
    watch.add_argument(
        "--until-done",
        action="store_true",
        help="stop when the conveyor says the line is done (exit 1 if a part did not finish)",
    )
    watch.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds")
    watch.add_argument(
        "--json", metavar="FILE", help="write every part's genealogy to FILE as JSON at the end"
    )
    watch.set_defaults(func=cmd_line_watch)


def cmd_line_watch(args: argparse.Namespace) -> int:
    from .line.watch import watch

    host, sep, port = args.broker.rpartition(":")
    if not sep or not port.isdigit():
        print(
            f"edge-agent line watch: --broker must be HOST:PORT, got {args.broker!r}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return watch(
        host or "127.0.0.1",
        int(port),
        args.part,
        until_done=args.until_done,
        duration=args.duration,
        json_path=args.json,
    )
