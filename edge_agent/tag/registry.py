"""Readers found by the config's ``reader.type``, imported only when configured."""

from __future__ import annotations

from typing import Any

from .reader import TagReader


def create_reader(config: Any) -> TagReader:
    reader = _create(config)
    if getattr(config, "on_return", "next_step") == "ignore":
        from .presence import ReturnFilter

        return ReturnFilter(reader, return_window=config.return_window)
    return reader


def _create(config: Any) -> TagReader:
    if config.type == "simulated":
        from .simulated import SimulatedReader

        return SimulatedReader(config.name, config.directory, config.poll_interval)
    if config.type == "nfc":
        from .nfc import NfcReader  # nfcpy itself is imported by the reader thread

        return NfcReader(
            config.name,
            config.device,
            targets=tuple(config.targets),
            poll_interval=config.poll_interval,
            backoff_max=config.backoff_max,
            password=bytes.fromhex(config.password) if config.password else None,
        )
    if config.type == "autoid":
        from .autoid import AutoIdReader  # asyncua itself is imported when it connects

        return AutoIdReader(
            config.name,
            config.url,
            region=config.region,
            timeout=config.timeout,
            backoff_max=config.backoff_max,
        )
    raise KeyError(config.type)
