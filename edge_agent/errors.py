"""One error tree for the whole agent.

Library exceptions (pymodbus, asyncua, paho, nfcpy, cbor2, cryptography) are translated where they
happen, ``raise ... from err``, with the device, address, tag UID or file attached, so that a log line
at 3 a.m. says what failed and where.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EdgeAgentError(Exception):
    """Root of every error the agent raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One mistake in a YAML file: where it is and what is wrong."""

    file: str
    line: int | None
    path: str  # dotted key path, e.g. "machine.port" or "points.speed.type"
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.message}"


class ConfigError(EdgeAgentError):
    """A config or firmware profile is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class Reason(StrEnum):
    """Why a cycle report is not ``ok``: the stable codes of docs/mqtt.md, and no others (a code
    outside this list does not type-check, and tests/docs compares the list with the doc)."""

    MALFORMED_NDEF = "malformed_ndef"
    NO_TRAVELER = "no_traveler"
    MALFORMED_TRAVELER = "malformed_traveler"
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    UID_MISMATCH = "uid_mismatch"
    PROGRESS_CORRUPT = "progress_corrupt"
    COMPLETE = "complete"
    OUT_OF_SEQUENCE = "out_of_sequence"
    WRONG_STATION = "wrong_station"
    UNKNOWN_OPERATION = "unknown_operation"
    OUT_OF_LIMITS = "out_of_limits"
    INVALID_PARAMETERS = "invalid_parameters"
    MACHINE_UNAVAILABLE = "machine_unavailable"
    MACHINE_NOT_IDLE = "machine_not_idle"
    PAUSED = "paused"
    NOT_RECORDING = "not_recording"
    TAG_READ_FAILED = "tag_read_failed"
    MACHINE_ERROR = "machine_error"
    MACHINE_FAULT = "machine_fault"
    SHUTDOWN = "shutdown"
    INTERRUPTED = "interrupted"
    INTERNAL_ERROR = "internal_error"


class PartRejected(EdgeAgentError):
    """The part's instructions are refused before the machine is touched.

    ``reason`` is a stable machine-readable code (it appears in cycle reports), the message says
    what a person should know.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        self.reason = Reason(reason)
        super().__init__(message)


class MachineError(EdgeAgentError):
    """The machine did not do what was asked: connection, protocol or handshake failure."""

    def __init__(self, message: str, *, device: str = "", retryable: bool = True) -> None:
        self.device = device
        self.detail = message  # without the device, for a log line that names it as a field
        self.retryable = retryable
        super().__init__(f"{device}: {message}" if device else message)


class MachineRefused(MachineError):
    """The machine answered but refused this gateway's identity (user name, password, user
    certificate): authentication refused. Not retried quickly; the config or the machine's user
    list must change."""

    def __init__(self, message: str, *, device: str = "") -> None:
        super().__init__(message, device=device, retryable=False)


class MachineFault(MachineError):
    """The machine answered but reported a fault (error code, timeout waiting for done)."""

    def __init__(self, message: str, *, device: str = "", code: int | None = None) -> None:
        self.code = code
        super().__init__(message, device=device, retryable=False)


class TagIOError(EdgeAgentError):
    """Reading or writing the tag failed (tag removed, read-only, full, reader gone)."""
