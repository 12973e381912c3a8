"""The reference PLC (pymodbus server) on a free loopback port, per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from edge_agent.sim.reference_plc import ReferencePlc

__all__ = ["reference_plc"]


@pytest_asyncio.fixture
async def reference_plc() -> AsyncIterator[ReferencePlc]:
    """A running ReferencePlc; ``.host``/``.port`` say where. Stopped after the test."""
    plc = ReferencePlc()
    await plc.start("127.0.0.1", 0)
    try:
        yield plc
    finally:
        await plc.stop()
