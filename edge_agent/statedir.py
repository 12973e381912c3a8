"""The state directory belongs to one agent at a time: the last stage of validation.

``run`` holds an advisory lock on ``<state_dir>/edge-agent.lock`` for its whole life and writes its
process id and config file into it, so that a second agent on the same directory is refused at
start with the name of the one that holds it, instead of failing inside the outbox. ``check-config``
asks the same question without keeping the lock. The outbox file is opened too: one held by another
process (a demo, an agent started without ``run``) is named before start; a damaged one is not
refused (the outbox moves it aside and salvages it at open), ``check-config`` says so in a note.
The kernel drops the lock when the process ends, however it ends: a lock is never stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import AgentConfig
from .errors import ConfigError, ConfigProblem

LOCK_FILE = "edge-agent.lock"
OUTBOX_FILE = "outbox.sqlite3"


@dataclass
class StateDirLock:
    """The state directory, held by this process until ``release`` or exit."""

    path: Path
    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def claim(config: AgentConfig) -> StateDirLock | None:
    """For ``run``: create the state directory and hold it. Raises ConfigError naming the process
    that holds it, or the outbox problem. None without ``state_dir`` (the outbox is in memory)."""
    if config.state_dir is None:
        return None
    path = config.state_dir / LOCK_FILE
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError([_problem(config, f"cannot use {path}: {err.strerror}")]) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ConfigError([_problem(config, _held(config.state_dir, holder))]) from None
    me = {
        "pid": os.getpid(),
        "config": str(Path(config.source).resolve()),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    lock = StateDirLock(path, fd)
    problem = _outbox_problem(config.state_dir / OUTBOX_FILE)
    if problem is not None:
        lock.release()
        raise ConfigError([_problem(config, problem)])
    return lock


def check(config: AgentConfig) -> tuple[list[ConfigProblem], str | None]:
    """For ``check-config``: would ``run`` get the state directory? Returns the problems, and a
    note when the agent that holds it runs this very config file (then a reload applies it)."""
    if config.state_dir is None or not config.state_dir.is_dir():
        return [], None  # stage 4 of load_config said whether it can be created
    path = config.state_dir / LOCK_FILE
    holder: dict[str, Any] | None = None
    if path.exists():
        # Read-only: a lock file created here by another user would keep the agent out.
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            return [_problem(config, f"cannot open {path}: {err.strerror}")], None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
        finally:
            os.close(fd)  # also drops the lock if it was taken
        if not os.access(path, os.R_OK | os.W_OK):
            return [_problem(config, f"cannot write {path}: permission denied")], None
    if holder is not None:
        if holder.get("config") == str(Path(config.source).resolve()):
            note = (
                f"state_dir {config.state_dir} is in use by the agent running this config "
                f"(pid {holder.get('pid')}): a reload applies it (SIGHUP or the reload command)"
            )
            return [], note
        return [_problem(config, _held(config.state_dir, holder))], None
    outbox = config.state_dir / OUTBOX_FILE
    problem = _outbox_problem(outbox)
    if problem is not None:
        return [_problem(config, problem)], None
    return [], _outbox_damage(outbox)


def _problem(config: AgentConfig, message: str) -> ConfigProblem:
    return config.problem(("state_dir",), message)


def _read_holder(fd: int) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        found = json.loads(os.pread(fd, 4096, 0) or b"{}")
        if isinstance(found, dict):
            return found
    return {}


def _held(state_dir: Path, holder: dict[str, Any]) -> str:
    who = "another edge-agent"
    if holder.get("pid"):
        who += f" (pid {holder['pid']}, config {holder.get('config', '?')}"
        who += f", since {holder['since']})" if holder.get("since") else ")"
    return (
        f"{state_dir} is in use by {who}; two agents cannot share a state directory "
        "(give each its own state_dir)"
    )


def _outbox_problem(path: Path) -> str | None:
    """Why the outbox at ``path`` would not open (None: it would, or it does not exist yet)."""
    if not path.exists():
        return None
    if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
        return f"cannot write the outbox {path}: not a file this user can read and write"
    try:
        db = sqlite3.connect(path, timeout=0, isolation_level=None)
    except sqlite3.Error as err:
        return f"cannot open the outbox {path}: {err}"
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            return (
                f"the outbox {path} is held by another process (an edge-agent not started "
                "with 'run', e.g. a demo); two agents cannot share a state directory"
            )
        return f"cannot open the outbox {path}: {err}"
    except sqlite3.DatabaseError:
        return None  # damaged: the outbox salvages it at open (_outbox_damage says so)
    finally:
        db.close()
    return None


def _outbox_damage(path: Path) -> str | None:
    """A note when the outbox file is damaged: ``run`` moves it aside and salvages it."""
    if not path.is_file():
        return None
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        found = db.execute("PRAGMA quick_check(1)").fetchone()
        damage = None if found and found[0] == "ok" else str(found[0] if found else "?")
    except sqlite3.DatabaseError as err:
        damage = str(err)
    finally:
        db.close()
    if damage is None:
        return None
    return (
        f"the outbox {path} is damaged ({damage.splitlines()[-1]}): run will move it aside as "
        f"{path.name}.corrupt-<UTC time> and copy every readable message into a new outbox"
    )
