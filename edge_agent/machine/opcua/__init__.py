"""OPC UA machines: the driver the registry finds as ``driver: opcua``.

    models.py         how a profile addresses a node, the ``machine:`` settings (no asyncua)
    security.py       the gateway's certificate and the server's trust
    address_space.py  every node of a profile resolved and checked at connect
    subscriptions.py  data change notifications: handshake waits and pushed telemetry
    driver.py         the session, reconnects, reads, writes and method calls

Importing this package does not import asyncua (≈ 48 MiB and 0.3 s), so ``check-config`` works
without the ``opcua`` extra and a Modbus-only station never pays for it; ``create()`` imports the
driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, ConfigProblem
from ..driver import check_profile_constants
from ..profile import Profile
from .models import (
    DATA_TYPES,
    POINT_MODEL,
    SETTINGS_MODEL,
    STANDARD_NAMESPACE,
    Address,
    MachineMismatch,
    OpcUaPoint,
    OpcUaSecurity,
    OpcUaSettings,
    parse_address,
)

if TYPE_CHECKING:
    from .driver import OpcUaDriver

__all__ = [
    "DATA_TYPES",
    "POINT_MODEL",
    "SETTINGS_MODEL",
    "STANDARD_NAMESPACE",
    "Address",
    "MachineMismatch",
    "OpcUaPoint",
    "OpcUaSecurity",
    "OpcUaSettings",
    "create",
    "parse_address",
]


def create(settings: OpcUaSettings | Mapping[str, Any], profile: Profile) -> OpcUaDriver:
    """A driver for ``profile``; ConfigError when a constant in the profile cannot be written."""
    if not isinstance(settings, OpcUaSettings):
        settings = OpcUaSettings.model_validate(dict(settings))
    try:
        from .driver import OpcUaDriver
    except ImportError as err:  # the opcua extra is not installed
        raise ConfigError(
            [
                ConfigProblem(
                    profile.source,
                    None,
                    "driver",
                    f"OPC UA needs the 'opcua' extra: pip install 'edge-agent[opcua]' ({err})",
                )
            ]
        ) from err
    driver = OpcUaDriver(settings, profile)
    check_profile_constants(driver, profile)
    return driver
