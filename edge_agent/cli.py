"""Command line: ``edge-agent run | check-config | demo | tag | line``."""

from __future__ import annotations

import argparse
import asyncio
import os
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
        epilog="Exit codes: 0 ok, 1 failed (check-config --online: the machine is unreachable), "
        "2 invalid configuration or usage, 3 tag commands: no reader or tag. "
        "'edge-agent COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the station daemon",
        description="Run the station daemon until SIGTERM/SIGINT; SIGHUP reloads the config "
        "and firmware profile between cycles (an invalid one is refused, the old one runs on). "
        "The config is validated first with the checks of check-config; a problem is listed as "
        "file:line: key.path: message and the exit code is 2. While it runs, the agent holds its "
        "state_dir (edge-agent.lock): a second agent on the same directory is refused.",
    )
    run.add_argument("-c", "--config", required=True, type=Path, help="config YAML (see config/)")
    _log_options(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check-config",
        help="validate a config and its firmware profile without touching any device",
        description="Validate a config file, the firmware profile it names and the files it uses, "
        "with the same checks as run, reload and push_profile: the schema, the profile's rules, "
        "the values the profile itself writes (program numbers, defaults) against its limits, the "
        "trusted keys (Ed25519 PEM public keys), the broker's TLS files, the state directory (can "
        "be created and written, not held by another agent, its outbox opens) and the tag "
        "directory. Touches no device. Exit 0 when valid; exit 2 listing every problem, one line "
        "each, as file:line: key.path: message.",
        epilog="With --online: exit 1 when the machine cannot be reached, 2 when it answers but "
        "does not match the profile (every mismatch listed) or refuses the configured identity "
        "(authentication refused).",
    )
    check.add_argument("-c", "--config", required=True, type=Path, help="config YAML")
    check.add_argument(
        "--online",
        action="store_true",
        help="also connect to the machine and check every point the profile uses: it exists, has "
        "the profile's type and the needed access",
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
    demo.add_argument(
        "--sparkplug",
        action="store_true",
        help="also run the agent as a Sparkplug B edge node and print, one line per message, "
        "what a Sparkplug host receives (needs the sparkplug extra)",
    )

    from .cli_line import add_demo_options

    add_demo_options(demo)
    _log_options(demo, default_level="warning")
    demo.set_defaults(func=cmd_demo)

    health = sub.add_parser(
        "health",
        help="ask a running daemon's health endpoint whether the station is healthy",
        description="GET /healthz of the daemon's health endpoint (config: health.listen) and "
        "print the state in words. Exit 0 when healthy, 1 when not or when nothing answers "
        "(for Docker's HEALTHCHECK and monitoring scripts).",
    )
    health.add_argument(
        "--listen", default="127.0.0.1:9410", metavar="HOST:PORT", help="default 127.0.0.1:9410"
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.set_defaults(func=cmd_health)

    from . import cli_line, cli_profile, cli_tag

    cli_tag.register(sub)
    cli_profile.register(sub)
    cli_line.register(sub)
    return parser


def _log_options(p: argparse.ArgumentParser, default_level: str = "") -> None:
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=default_level or None,
        help=f"default: {default_level or 'log.level of the config'}",
    )
    p.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default=None,
        help="default: console"
        if default_level
        else "default: the config's log.format (auto: JSON unless on a terminal)",
    )


def _config_error(err: ConfigError, header: str = "invalid configuration") -> int:
    count = len(err.problems)
    print(f"edge-agent: {header} ({count} problem{'s' if count != 1 else ''}):", file=sys.stderr)
    for problem in err.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_check_config(args: argparse.Namespace) -> int:
    from . import statedir
    from .config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as err:
        return _config_error(err)
    problems, note = statedir.check(config)
    if problems:
        return _config_error(ConfigError(problems))
    p = config.profile
    print(
        f"{args.config}: valid. gateway {config.gateway_id}, station {config.station}, "
        f"machine {p.driver} via profile {p.name} {p.version} ({p.content_hash[:19]}), "
        f"{len(p.operations)} operations, reader {config.reader.type}, broker {config.broker.host}:{config.broker.port}, "
        f"{len(config.trusted_keys)} trusted key(s)"
    )
    if note:
        print(note)
    if args.online:
        return asyncio.run(_check_online(config))
    return EXIT_OK


async def _check_online(config: AgentConfig) -> int:
    """Connect to the machine and read every point on its own, so that every point the machine
    refuses is listed, not the first. The OPC UA driver checks every node at connect."""
    from .config import locate, machine_for
    from .errors import ConfigProblem, MachineError, MachineFault, MachineRefused

    profile = config.profile
    driver = machine_for(profile, config.machine)  # validated: load_config built it already
    mismatches: list[ConfigProblem] = []
    try:
        await driver.connect()
        for name in profile.points:
            try:
                await driver.read([name])
            except MachineFault as err:  # the machine answered: it has no such point
                message = str(err).removeprefix(f"{driver.device}: ")
                mismatches.append(ConfigProblem(profile.source, None, f"points.{name}", message))
    except MachineRefused as err:
        user = getattr(config.machine, "username", None)
        key = ("machine", "username" if user else "user_certificate")
        problem = config.problem(key if key in config.lines else ("machine",), str(err))
        return _config_error(ConfigError([problem]), "authentication refused by the machine")
    except MachineError as err:
        found = getattr(err, "problems", None)  # the machine does not match the profile
        if found:
            return _config_error(ConfigError(found), "the machine does not match the profile")
        if not err.retryable:  # it answered, and said no (security policy, certificate)
            key = ("machine", "security")
            problem = config.problem(key if key in config.lines else ("machine",), str(err))
            return _config_error(ConfigError([problem]), "the machine refused the connection")
        print(f"edge-agent: machine unreachable: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await driver.close()
    if mismatches:
        found = locate(mismatches, profile.source, None)
        return _config_error(ConfigError(found), "the machine does not match the profile")
    print(
        f"{driver.device}: online; all {len(profile.points)} points of {profile.name} answer as the profile says"
    )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from . import statedir
    from .agent import Agent
    from .config import load_config
    from .instructions.signing import KeyFileError
    from .uplink.outbox_sqlite import OutboxError

    try:  # the same validation as check-config: a problem is listed, never a traceback
        config = load_config(args.config)
        lock = statedir.claim(config)
    except ConfigError as err:
        setup_logging(args.log_level or "info", args.log_format or "auto")
        return _config_error(err)
    setup_logging(args.log_level or config.log.level, args.log_format or config.log.format)

    async def main() -> int:
        from .service.run import Service

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        early: list[int] = []  # a SIGHUP while the agent is being built: a reload once it runs
        loop.add_signal_handler(signal.SIGHUP, early.append, signal.SIGHUP)
        agent = Agent(config)
        service = Service(agent, stop)
        loop.add_signal_handler(signal.SIGHUP, service.request_reload)
        if early:
            service.request_reload()
        await service.run()
        # A component that could not recover: a non-zero exit makes systemd start us afresh.
        return EXIT_FAILED if agent.supervisor.fatal is not None else EXIT_OK

    try:
        return asyncio.run(main())
    except (KeyFileError, OutboxError) as err:  # a file changed between validation and use
        print(f"edge-agent: cannot start: {err}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if lock is not None:
            lock.release()


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
        sparkplug=args.sparkplug,
        opcua=args.opcua or (args.machine or "").startswith("opc.tcp://"),
    )
    try:
        return asyncio.run(run_demo(options))
    except ConfigError as err:
        return _config_error(err)
    except FileNotFoundError as err:  # the shipped profile is not where an install put it
        print(f"edge-agent demo: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except ModuleNotFoundError as err:  # an install without the demo extra
        print(
            f"edge-agent demo: this demo needs the Python package '{err.name}', which is not "
            "installed: pip install 'edge-agent[demo]' (in a checkout: pip install -e '.[demo]')",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


def cmd_health(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    url = f"http://{args.listen}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as err:  # 503: the daemon answered, the station is not well
        body = err.read()
    except (OSError, ValueError) as err:
        print(f"edge-agent health: no answer from {url}: {getattr(err, 'reason', err)}")
        return EXIT_FAILED
    try:
        answer = json.loads(body)
        healthy, state = bool(answer["healthy"]), str(answer["state"])
    except (ValueError, KeyError, TypeError):
        print(f"edge-agent health: {url} did not answer as edge-agent does")
        return EXIT_FAILED
    print(f"edge-agent health: {state}")
    return EXIT_OK if healthy else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe is seen here, not at exit
    except BrokenPipeError:
        # The reader went away (`edge-agent tag ... | head`): end quietly, as a tool killed by
        # SIGPIPE would (128 + 13); stdout goes to /dev/null so the final flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
