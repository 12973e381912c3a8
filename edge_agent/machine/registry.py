"""Drivers found by name. A firmware profile says ``driver: modbus``; the core knows nothing more.

Each driver module exports:
  POINT_MODEL     a ``BasePoint`` subclass: how the driver addresses one point (validated per point)
  SETTINGS_MODEL  a pydantic model of the ``machine:`` section of the config (host, port, url, ...)
  create(settings, profile) -> MachineDriver
Modules are imported only when a profile names them, so a Modbus-only station never imports asyncua.
"""

from __future__ import annotations

import importlib
from types import ModuleType

DRIVERS: dict[str, str] = {
    "modbus": "edge_agent.machine.modbus",
    "opcua": "edge_agent.machine.opcua",
}


def driver_module(name: str) -> ModuleType:
    """Import the driver named ``name``. Raises KeyError for an unknown name."""
    return importlib.import_module(DRIVERS[name])
