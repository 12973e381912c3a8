"""What changed between two firmware profiles, in lines a person reads in an event or a log.

Covers what certifies a machine: points (where, what type, which limits), operations and their
parameters' limits, the handshake and the abort steps.
"""

from __future__ import annotations

from typing import Any

from .profile import Profile


def envelope_changes(old: Profile, new: Profile) -> list[str]:
    """One line per change, ``key.path: old -> new``; empty when the envelopes are the same."""
    changes: list[str] = []
    _compare(
        "points",
        {n: p.model_dump(exclude_none=True) for n, p in old.points.items()},
        {n: p.model_dump(exclude_none=True) for n, p in new.points.items()},
        changes,
    )
    _compare(
        "operations",
        {n: o.model_dump(exclude_none=True) for n, o in old.operations.items()},
        {n: o.model_dump(exclude_none=True) for n, o in new.operations.items()},
        changes,
    )
    for name, steps in (("handshake", "handshake"), ("on_abort", "on_abort")):
        before = [s.model_dump(exclude_none=True) for s in getattr(old, steps)]
        after = [s.model_dump(exclude_none=True) for s in getattr(new, steps)]
        if before != after:
            changes.append(f"{name}: changed ({len(before)} -> {len(after)} steps)")
    return changes


def _compare(path: str, old: Any, new: Any, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys(), key=str):
            where = f"{path}.{key}"
            if key not in new:
                out.append(f"{where}: removed")
            elif key not in old:
                out.append(f"{where}: added")
            else:
                _compare(where, old[key], new[key], out)
    elif old != new:
        out.append(f"{path}: {_show(old)} -> {_show(new)}")


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return str(value)
