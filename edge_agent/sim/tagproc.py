"""Tag simulators in a process of their own: a busy reader process cannot make a tag answer late.

A simulator thread inside the reader's process waits for the GIL and for the CPU with everything
else that process runs (the event loop, the station, the test), so on a loaded machine it answered
later than nfcpy's air-interface timeouts (a Type 2 READ 5 ms) and the reader took the tag for
gone. In a process of its own, asleep in ``recvfrom`` until a frame comes, the simulator is woken
by the kernel as soon as the reader sends. What the host's scheduler still adds on a loaded
machine, the reader's udp transport waits out (``UDP_REPLY_WAIT`` in ``tag/nfc/reader.py``).

The parent holds a proxy with the simulator's interface: ``present`` / ``remove`` a tag, the
test hooks (``Remote`` attributes), the logs of what was written (``RemoteLog``). Each call is one
round trip over a pipe. Its answer carries the simulator's copy of the tag last presented, which
is copied into the caller's image object in place, so the caller sees what the reader wrote on
its tag after its next call (``remove``, ``stop``, ``sync``, any hook).

Processes come from multiprocessing's forkserver (spawn where there is none): started once with
the simulator modules and nfcpy imported, it forks each simulator in milliseconds.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import multiprocessing
import signal
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, ClassVar, Generic, Self, TypeVar, cast, overload

TagT = TypeVar("TagT")
V = TypeVar("V")

_PRELOAD = ["edge_agent.sim.ntag", "edge_agent.sim.type4", "edge_agent.sim.felica", "nfc"]
_ANSWER_WITHIN = 30.0  # seconds; a simulator slower than that is broken, not busy


class SimulatorProcess(Generic[TagT]):
    """One simulated tag radio in a child process; ``device`` is the path to give nfcpy."""

    radio: ClassVar[str]  # "module:Class" of the in-process simulator the child runs

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._held: TagT | None = None  # the caller's image of the tag last presented
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        return f"udp:{self.host}:{self.port}"

    def start(self) -> str:
        ctx = _context()
        ours, theirs = ctx.Pipe()
        process = ctx.Process(
            target=_run,
            args=(theirs, self.radio, self.host, self.port),
            name=f"tag-sim-{self.radio.rpartition(':')[2]}",
            daemon=True,
        )
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        try:
            self.port = self._answer("start")
        except RuntimeError:
            self.stop()
            raise
        return self.device

    def stop(self) -> None:
        """Stop the simulator; the caller's image of the tag last presented gets its final state."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            self._call("stop")
        except RuntimeError:
            pass  # already gone: nothing more to learn from it
        finally:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------- the field

    def present(self, tag: TagT) -> None:
        """Put ``tag`` in the field (a copy goes to the simulator; ``tag`` follows its writes)."""
        if self._held is not None:
            self.sync()  # the tag in hand first gets what the reader wrote on it
        self._held = tag
        self._call("present", value=tag)

    def remove(self) -> TagT | None:
        """Take the tag out of the field: the caller's image of it, None if none was there."""
        held = self._held
        return held if self._call("remove") else None

    def sync(self) -> None:
        """Bring the caller's image of the tag last presented up to date with the simulator's."""
        self._call("sync")

    # ------------------------------------------------------------------------- the pipe

    def _call(self, op: str, name: str = "", value: Any = None) -> Any:
        with self._lock:
            if self._conn is None:
                raise RuntimeError(f"tag simulator {self.radio} is not running")
            self._conn.send((op, name, value))
            return self._answer(f"{op} {name}".strip())

    def _answer(self, what: str) -> Any:
        conn = self._conn
        assert conn is not None
        try:
            if not conn.poll(_ANSWER_WITHIN):
                raise RuntimeError(
                    f"tag simulator on {self.device} did not answer {what!r} "
                    f"within {_ANSWER_WITHIN:g} s"
                )
            status, result, snapshot, in_field = conn.recv()
        except (EOFError, OSError) as err:
            raise RuntimeError(f"tag simulator on {self.device} has ended ({what})") from err
        if status != "ok":
            raise RuntimeError(f"tag simulator on {self.device}: {result}")
        if snapshot is not None and self._held is not None:
            _copy_into(self._held, snapshot)
        if not in_field:
            self._held = None  # gone from the field: the simulator changes it no more
        return result


class Remote(Generic[V]):
    """A test hook of the simulator in the child: read and set through the pipe."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, obj: SimulatorProcess[Any], owner: type | None = None) -> V: ...
    def __get__(self, obj: SimulatorProcess[Any] | None, owner: type | None = None) -> Self | V:
        if obj is None:
            return self
        return cast(V, obj._call("get", self.name))

    def __set__(self, obj: SimulatorProcess[Any], value: V) -> None:
        obj._call("set", self.name, value)


class Log(list[V]):
    """A copy of one of the simulator's logs; ``clear()`` empties the simulator's own too."""

    def __init__(self, items: list[V], owner: SimulatorProcess[Any], name: str) -> None:
        super().__init__(items)
        self._owner, self._name = owner, name

    def clear(self) -> None:
        super().clear()
        self._owner._call("clear", self._name)


class RemoteLog(Generic[V]):
    """A log the simulator in the child keeps (pages written, ...): read as a ``Log`` copy."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, obj: SimulatorProcess[Any], owner: type | None = None) -> Log[V]: ...
    def __get__(
        self, obj: SimulatorProcess[Any] | None, owner: type | None = None
    ) -> Self | Log[V]:
        if obj is None:
            return self
        return Log(obj._call("get", self.name), obj, self.name)


def _copy_into(target: Any, source: Any) -> None:
    """Give ``target`` the state of ``source`` in place: buffers and lists keep their identity."""
    for key, value in vars(source).items():
        current = getattr(target, key, None)
        if isinstance(current, bytearray | list) and type(current) is type(value):
            current[:] = value
        else:
            setattr(target, key, value)


def _context() -> Any:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


# ----------------------------------------------------------------------------- the child


def _run(conn: Connection, radio_path: str, host: str, port: int) -> None:
    """The simulator process: the radio serves frames in its thread, this loop the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    module, _, name = radio_path.partition(":")
    radio = getattr(importlib.import_module(module), name)(host=host, port=port)
    try:
        radio.start()
    except Exception as err:  # no free port, nfcpy missing: the parent raises it
        conn.send(("error", f"cannot start on udp:{host}:{port}: {err}", None, False))
        return
    conn.send(("ok", radio.port, None, False))
    held: Any = None  # the image last presented, until the parent has its final state
    try:
        while True:
            try:
                op, key, value = conn.recv()
            except EOFError:  # the parent is gone
                return
            if op == "stop":
                radio.stop()
            try:
                result = _apply(radio, op, key, value)
            except Exception as err:  # a bad hook name or value: say so, keep serving
                conn.send(("error", f"{op} {key}: {err}", None, held is not None))
                continue
            if op == "present":
                held = value
            with radio._lock:  # a consistent copy: frames are handled under this lock
                snapshot = copy.deepcopy(held)
                in_field = held is not None and radio.tag is held and op != "stop"
            if not in_field:
                held = None
            conn.send(("ok", result, snapshot, in_field))
            if op == "stop":
                return
    finally:
        with contextlib.suppress(Exception):
            radio.stop()


def _apply(radio: Any, op: str, key: str, value: Any) -> Any:
    if op == "present":
        radio.present(value)
    elif op == "remove":
        return radio.remove() is not None
    elif op in ("get", "set", "clear"):
        if key.startswith("_") or not hasattr(radio, key):
            raise AttributeError(f"the simulator has no {key!r}")
        with radio._lock:
            if op == "get":
                return copy.deepcopy(getattr(radio, key))
            if op == "set":
                setattr(radio, key, value)
            else:
                getattr(radio, key).clear()
    elif op not in ("sync", "stop"):
        raise ValueError(f"unknown operation {op!r}")
    return None
