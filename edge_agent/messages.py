"""What every message the agent sends has in common: its timestamps, JSON values and event envelope.

Cycle reports, telemetry, command replies and events are built in their own modules; the pieces
they share live here so that a timestamp or an event looks the same whoever produced it.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

EVENT_SCHEMA = "edge-agent/event/1"


def iso(ts: float) -> str:
    """A unix time as ISO 8601 UTC with milliseconds: 2026-11-26T08:15:02.123+00:00."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def jsonable(value: Any) -> Any:
    """A value read from a machine as JSON can carry it: NaN and infinities as null, bytes as hex."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def event(gateway_id: str, name: str, *, at: float | None = None, **fields: Any) -> dict[str, Any]:
    """An event for ``edge/<gateway_id>/events``: the envelope, then ``fields``."""
    return {
        "schema": EVENT_SCHEMA,
        "event": name,
        "gateway_id": gateway_id,
        "time": iso(time.time() if at is None else at),
        **fields,
    }


def uid_hex(uid: bytes) -> str:
    """A tag UID as every message, log line and file name writes it: upper-case hex."""
    return uid.hex().upper()
