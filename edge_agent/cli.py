"""Command line: ``edge-agent run | check-config | demo | tag | line``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import ConfigError
from .log import setup_logging

if TYPE_CHECKING:
    from .config import AgentConfig

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Edge runtime for product-driven manufacturing: reads the instructions a part carries "
        "on its NFC/RFID tag, programs the station's machine (Modbus TCP, OPC UA) and reports every "
        "cycle over MQTT.",
        epilog="Exit codes: 0 ok, 1 failed, 2 invalid configuration or usage.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the station daemon",
        description="Run the station daemon until SIGTERM/SIGINT.",
    )
    run.add_argument("-c", "--config", required=True, type=Path, help="config YAML (see config/)")
    _log_options(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check-config",
        help="validate a config and its firmware profile without touching any device",
        description="Validate a config file and the firmware profile it names. Touches no device. "
        "Exit 0 when valid; exit 2 listing every problem as file:line: key.path: message.",
    )
    check.add_argument("-c", "--config", required=True, type=Path)
    check.add_argument(
        "--online",
        action="store_true",
        help="also connect to the machine and check every point the profile uses: it exists, has "
        "the profile's type and the needed access (exit 1: unreachable, 2: does not match)",
    )
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser(
        "demo",
        help="run a whole station in one process on embedded defaults",
        description="Start an embedded reference PLC, an embedded MQTT broker, a simulated reader fed with "
        "signed demo parts, and the agent; print one line per cycle and a summary.",
    )
    demo.add_argument("--parts", type=int, default=20, help="number of demo parts (default 20)")
    demo.add_argument(
        "--machine",
        metavar="HOST:PORT|URL",
        help="use an external reference PLC (HOST:PORT) or, with an opc.tcp://HOST:PORT/PATH "
        "URL, an external OPC UA server, instead of the embedded machine",
    )
    demo.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="use an external MQTT broker instead of the embedded one",
    )
    demo.add_argument(
        "--profile",
        type=Path,
        help="firmware profile (default: firmware_profiles/reference-plc.yaml)",
    )
    demo.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="parts per second (default: as fast as the station goes)",
    )
    demo.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="keep the disk outbox here (default: a temporary directory); the demo exits once "
        "the broker has acknowledged every report, waiting out a broker outage",
    )
    demo.add_argument(
        "--nfc",
        action="store_true",
        help="present every part as an NTAG215 through nfcpy's udp driver (simulated tag)",
    )
    demo.add_argument(
        "--opcua",
        action="store_true",
        help="run against the reference OPC UA machine (embedded, or --machine opc.tcp://...) "
        "with profile firmware_profiles/reference-opcua.yaml",
    )
    from .cli_line import add_demo_options
    from .cli_line import register as register_line

    add_demo_options(demo)
    _log_options(demo, default_level="warning")
    demo.set_defaults(func=cmd_demo)

    from .cli_tag import register

    register(sub)
    register_line(sub)
    return parser


def _log_options(p: argparse.ArgumentParser, default_level: str = "") -> None:
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=default_level or None
    )
    p.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default=None,
        help="default: JSON unless on a terminal",
    )


def _config_error(err: ConfigError) -> int:
    print(
        f"edge-agent: invalid configuration ({len(err.problems)} problem{'s' if len(err.problems) != 1 else ''}):",
        file=sys.stderr,
    )
    for problem in err.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as err:
        return _config_error(err)
    p = config.profile
    print(
        f"{args.config}: valid. gateway {config.gateway_id}, station {config.station}, "
        f"machine {p.driver} via profile {p.name} {p.version} ({p.content_hash[:19]}), "
        f"{len(p.operations)} operations, reader {config.reader.type}, broker {config.broker.host}:{config.broker.port}, "
        f"{len(config.trusted_keys)} trusted key(s)"
    )
    if args.online:
        return asyncio.run(_check_online(config))
    return EXIT_OK


async def _check_online(config: AgentConfig) -> int:
    """Connect to the machine and read every point; the OPC UA driver checks each node at connect."""
    from .errors import MachineError
    from .machine import registry

    profile = config.profile
    try:
        driver = registry.driver_module(profile.driver).create(config.machine, profile)
    except ConfigError as err:
        return _config_error(err)
    try:
        await driver.connect()
        await driver.read(list(profile.points))
    except MachineError as err:
        problems = getattr(err, "problems", None)  # the machine does not match the profile
        if problems:
            return _config_error(ConfigError(problems))
        print(f"edge-agent: machine check failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await driver.close()
    print(
        f"{driver.device}: online; all {len(profile.points)} points of {profile.name} answer as the profile says"
    )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import Agent
    from .config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as err:
        setup_logging(args.log_level or "info", args.log_format or "auto")
        return _config_error(err)
    setup_logging(args.log_level or config.log.level, args.log_format or config.log.format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(config).run(stop)

    asyncio.run(main())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    setup_logging(args.log_level or "warning", args.log_format or "console")
    if args.parts < 1:
        print("edge-agent demo: --parts must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if args.line:
        from .cli_line import run_line_demo

        return run_line_demo(args)
    options = DemoOptions(
        parts=args.parts,
        machine=args.machine,
        broker=args.broker,
        profile=args.profile,
        rate=args.rate,
        state_dir=args.state_dir,
        nfc=args.nfc,
        opcua=args.opcua or (args.machine or "").startswith("opc.tcp://"),
    )
    try:
        return asyncio.run(run_demo(options))
    except ConfigError as err:
        return _config_error(err)
    except FileNotFoundError as err:  # the shipped profile is not where an install put it
        print(f"edge-agent demo: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
