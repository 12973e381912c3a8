"""Readers found by the config's ``reader.type``, imported only when configured."""

from __future__ import annotations

from typing import Any

from .reader import TagReader


def create_reader(config: Any) -> TagReader:
    if config.type == "simulated":
        from .simulated import SimulatedReader

        return SimulatedReader(config.name, config.directory, config.poll_interval)
    raise KeyError(config.type)
