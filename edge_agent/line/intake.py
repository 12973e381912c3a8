"""What a command message must pass before it may cost the station anything.

The size and nesting of a payload are checked before it is parsed, a command id answered
recently is answered again from memory instead of running twice, an MQTT 5 response topic must
lie within the topics the gateway is configured to answer on, and a pushed profile is parsed off
the event loop with its size, nesting and aliases bounded. Everything here is bounded in memory.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from ..errors import ConfigError, ConfigProblem
from ..machine.profile import Profile, load_profile
from ..yamlfile import check_untrusted

#: A JSON string (escapes included); what is inside it is no nesting.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
#: Every byte except the four brackets, for bytes.translate(None, ...).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")

#: A pushed profile: nesting (a profile needs 5 levels), and how long parsing may take.
PROFILE_MAX_DEPTH = 50
PROFILE_PARSE_TIMEOUT = 10.0


def nesting_exceeds(payload: bytes, max_depth: int) -> bool:
    """True when the JSON in ``payload`` nests arrays/objects more than ``max_depth`` deep.

    Without recursion and in C-speed passes: strings are cut out, everything but brackets is
    dropped, then each pass removes the innermost pairs; what is left after ``max_depth`` passes
    lies deeper. Unbalanced input stops early and is left to the JSON parser to refuse.
    """
    if payload.count(b"[") + payload.count(b"{") <= max_depth:
        return False  # the usual command: too few brackets to be too deep
    brackets = _STRING.sub(b"", payload).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return False
        inner = _INNERMOST.sub(b"", brackets)
        if inner == brackets:
            return False  # not balanced: not JSON, json.loads says so
        brackets = inner
    return bool(_INNERMOST.search(brackets))


#: A payload that opens with its correlation_id: ``{"correlation_id": "..."`` or ``: 123``.
_FIRST_ID = re.compile(
    rb'\A\s*\{\s*"correlation_id"\s*:\s*("(?:[^"\\]|\\.){1,200}"|-?(?:0|[1-9][0-9]{0,17}))\s*[,}]'
)


def leading_correlation_id(payload: bytes) -> str | int | None:
    """The correlation_id of a command whose JSON opens with it, read without parsing the rest;
    None when it does not open so (the full parse then decides). For refusing a flood cheaply."""
    match = _FIRST_ID.match(payload)
    if match is None:
        return None
    token = match.group(1)
    if not token.startswith(b'"'):
        return int(token)
    try:
        value = json.loads(token)
    except ValueError:  # bad escapes, control characters, not UTF-8
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 200 or lone_surrogate(token, value):
        return None
    return value


def lone_surrogate(payload: bytes, data: object) -> bool:
    """True when parsed JSON holds half a surrogate pair (``"\\ud800"``): Python accepts the escape,
    but the text cannot be encoded as UTF-8, so a reply or log line quoting it could not be sent."""
    if b"\\u" not in payload:
        return False  # raw bytes were decoded as UTF-8: only an escape can name a lone surrogate
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def response_topic_allowed(topic: str, filters: list[str]) -> bool:
    """A response topic is used only when it is a plain topic within one of ``filters``."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        return False
    return any(mqtt.topic_matches_sub(f, topic) for f in filters)


@dataclass
class _Seen:
    expires: float
    reply: dict[str, Any] | None = None  # None while the command runs
    again: bool = False  # asked again while it ran: answer once more when it ends


@dataclass
class ReplyCache:
    """The replies to the last ``size`` command ids, each for ``window`` seconds (LRU)."""

    window: float
    size: int
    _seen: OrderedDict[tuple[str, str | int], _Seen] = field(default_factory=OrderedDict)

    def lookup(self, key: tuple[str, str | int]) -> _Seen | None:
        """The entry for a command id seen within the window, else None."""
        seen = self._seen.get(key)
        if seen is None:
            return None
        if seen.expires < time.monotonic():
            del self._seen[key]
            return None
        self._seen.move_to_end(key)
        return seen

    def start(self, key: tuple[str, str | int]) -> None:
        if self.size <= 0 or self.window <= 0:
            return
        self._seen[key] = _Seen(time.monotonic() + self.window)
        self._seen.move_to_end(key)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)

    def finish(self, key: tuple[str, str | int], reply: dict[str, Any] | None) -> bool:
        """Keep ``reply`` (None: forget the id, nothing was done). True when asked again."""
        seen = self._seen.get(key)
        if seen is None:
            return False
        if reply is None:
            del self._seen[key]
        else:
            seen.reply = reply
        return seen.again

    def __len__(self) -> int:
        return len(self._seen)


def _load_pushed(origin: str, text: str, max_bytes: int) -> Profile:
    check_untrusted(text, origin, max_bytes=max_bytes, max_depth=PROFILE_MAX_DEPTH)
    return load_profile(origin, text=text)


async def load_pushed_profile(origin: str, text: str, *, max_bytes: int = 262_144) -> Profile:
    """Validate a profile sent over the network, in a worker thread, bounded in size and time.

    The checks make the parse linear in the (capped) size; the timeout is the backstop that
    keeps a command from waiting forever. Raises ConfigError like ``load_profile``.
    """
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(_load_pushed, origin, text, max_bytes), PROFILE_PARSE_TIMEOUT
        )
    except TimeoutError:
        raise ConfigError(
            [ConfigProblem(origin, None, "", f"not parsed within {PROFILE_PARSE_TIMEOUT:g} s")]
        ) from None
