"""Message payloads: JSON encoding, the per-gateway ``seq``, and what a full outbox may drop."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .outbox import Keep


def dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def classify(suffix: str) -> Keep:
    """What a full outbox may drop: cycle reports never, telemetry first."""
    if suffix == "cycles":
        return Keep.RECORD
    return Keep.TELEMETRY if suffix.split("/")[0] == "telemetry" else Keep.EVENT


def with_seq(body: dict[str, Any]) -> Callable[[int], bytes]:
    return lambda seq: dumps({**body, "seq": seq})


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
