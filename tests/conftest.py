"""Shared fixtures: real peers on loopback (mosquitto, the reference PLC), never mocks."""

from tests.fixtures_broker import *  # noqa: F403
from tests.fixtures_nfc import *  # noqa: F403
from tests.fixtures_opcua import *  # noqa: F403
from tests.fixtures_plc import *  # noqa: F403
