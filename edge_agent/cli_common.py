"""What the ``edge-agent tag`` and ``edge-agent profile`` commands share: the usage error, the
wrapper that turns a handler's errors into one line on stderr and an exit code, and ``keygen``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError, TagIOError
from .instructions.signing import KeyFileError, check_key_id, generate_keypair

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A problem with arguments, files or config: one line on stderr, exit 2."""


def handled(family: str) -> Callable[[Handler], Handler]:
    """Wrap a handler of ``edge-agent <family> COMMAND``: usage, config and key-file errors become
    one line on stderr and exit code 2; a tag that cannot be read or written, exit code 3."""

    def wrap(handler: Handler) -> Handler:
        def run(args: argparse.Namespace) -> int:
            command = f"edge-agent {family} {getattr(args, f'{family}_command')}"
            try:
                return handler(args)
            except (UsageError, KeyFileError, ValueError) as err:
                print(f"{command}: {err}", file=sys.stderr)
            except ConfigError as err:  # every problem, one per line, each file:line: key: message
                for problem in err.problems:
                    print(problem, file=sys.stderr)
            except TagIOError as err:
                print(f"{command}: {err}", file=sys.stderr)
                return 3
            return 2

        return run

    return wrap


def add_keygen(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    run: Callable[[Handler], Handler],
    *,
    help: str,
    description: str,
    keep: str,
    give: str,
) -> None:
    """``keygen``: an Ed25519 key pair in ID.key and ID.pub; ``keep`` and ``give`` say where each
    half goes (``give`` may name ``{id}`` and ``{pub}``). Shared by ``tag`` and ``profile``."""
    keygen = commands.add_parser("keygen", help=help, description=description)
    keygen.add_argument("--key-id", required=True, help="1-16 characters of A-Z a-z 0-9 _ . -")
    keygen.add_argument("--out", required=True, type=Path, help="directory for ID.key and ID.pub")

    def make(args: argparse.Namespace) -> int:
        private_path, public_path = generate_keypair(check_key_id(args.key_id), args.out)
        print(f"private key {private_path} ({keep})")
        print(f"public key  {public_path} ({give.format(id=args.key_id, pub=public_path)})")
        return 0

    keygen.set_defaults(func=run(make))
