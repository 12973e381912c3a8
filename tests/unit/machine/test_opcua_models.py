"""OPC UA profiles and settings, checked without any server: addressing, types, settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from edge_agent.errors import ConfigError
from edge_agent.machine.opcua import (
    STANDARD_NAMESPACE,
    OpcUaPoint,
    OpcUaSettings,
    parse_address,
)
from edge_agent.machine.profile import PointType, load_profile
from tests.fixtures_opcua import OPCUA_PROFILE
from tests.station_harness import REPO

NS = "urn:edge-agent:reference-opcua-machine"


@pytest.mark.parametrize(
    ("node", "namespace", "expected"),
    [
        ("s=Double", NS, f"nsu={NS};s=Double"),
        (f"nsu={NS};s=Machine.Speed", None, f"nsu={NS};s=Machine.Speed"),
        ("i=1001", NS, f"nsu={NS};i=1001"),
        ("i=2258", None, "i=2258"),  # namespace 0 needs no URI
        (
            "g=72962B91-FA75-4AE6-8D28-B404DC7DAF63",
            NS,
            f"nsu={NS};g=72962B91-FA75-4AE6-8D28-B404DC7DAF63",
        ),
        ("b=AAEC", NS, f"nsu={NS};b=AAEC"),
    ],
)
def test_node_identifiers_of_every_kind(node: str, namespace: str | None, expected: str) -> None:
    assert str(parse_address(node, None, namespace)) == expected


def test_browse_path_elements_take_the_point_namespace_unless_braced() -> None:
    address = parse_address(None, "Machine/{http://example.com/DI/}Identification/Serial", NS)
    assert address.kind == "path"
    assert address.path == (
        (NS, "Machine"),
        ("http://example.com/DI/", "Identification"),
        (NS, "Serial"),
    )
    assert parse_address(None, "/Objects/Server", STANDARD_NAMESPACE).path == (
        (STANDARD_NAMESPACE, "Server"),
    )


@pytest.mark.parametrize(
    ("node", "path", "namespace", "message"),
    [
        ("ns=2;s=Double", None, None, "namespace index"),
        ("s=Double", None, None, "needs a namespace"),
        ("x=1", None, NS, "not an identifier"),
        ("i=-4", None, NS, "numeric identifier"),
        ("g=not-a-guid", None, NS, "GUID"),
        (None, None, NS, "exactly one"),
        ("s=A", "Machine/A", NS, "exactly one"),
        (None, "Machine/Double", None, "needs a namespace"),
    ],
)
def test_bad_addresses_are_refused_with_the_reason(
    node: str | None, path: str | None, namespace: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(node, path, namespace)


def test_reference_profile_points() -> None:
    profile = load_profile(OPCUA_PROFILE)
    points = profile.points
    assert all(isinstance(p, OpcUaPoint) for p in points.values())
    types = {n: p.type for n, p in points.items()}
    assert types["setpoint"] is PointType.F64
    assert types["count"] is PointType.I32
    assert types["cycles"] is PointType.U32
    assert not points["done"].writable and not points["result"].writable
    assert points["trigger"].writable


def test_a_bare_namespace_index_in_a_profile_names_file_line_and_key(tmp_path: Path) -> None:
    text = OPCUA_PROFILE.read_text().replace("{node: s=Int32,", "{node: 'ns=2;s=Int32',")
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    (problem,) = err.value.problems
    assert problem.path.startswith("points.count")
    assert (
        problem.line
        == text.splitlines().index(
            next(line for line in text.splitlines() if "ns=2;s=Int32" in line)
        )
        + 1
    )
    assert "namespace index" in problem.message


def test_call_arguments_must_be_parameters_of_every_operation(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        OPCUA_PROFILE.read_text().replace("args: [setpoint, setpoint]", "args: [setpoint, speed]")
    )
    with pytest.raises(ConfigError, match="passes parameter 'speed'"):
        load_profile(path)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"url": "http://host"}, "url"),
        ({"url": "opc.tcp://h:4840", "security": {"policy": "Basic256Sha256"}}, "policy None goes"),
        ({"url": "opc.tcp://h:4840", "security": {"mode": "Sign"}}, "policy None goes"),
        ({"url": "opc.tcp://h:4840", "username": "u"}, "both 'username' and 'password'"),
        (
            {
                "url": "opc.tcp://h:4840",
                "security": {
                    "policy": "Basic256Sha256",
                    "mode": "Sign",
                    "server_thumbprint": "abc",
                },
            },
            "40",
        ),
        (
            {
                "url": "opc.tcp://h:4840",
                "username": "u",
                "password": "p",
                "user_certificate": "c",
                "user_private_key": "k",
            },
            "one user identity",
        ),
    ],
)
def test_settings_are_checked_before_any_connection(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        OpcUaSettings.model_validate(settings)


def test_loading_profiles_does_not_import_asyncua() -> None:
    # The profile model is enough for check-config; asyncua (≈ 48 MiB) loads only with the driver.
    code = (
        "import sys\n"
        "from edge_agent.machine.profile import load_profile\n"
        f"load_profile({str(OPCUA_PROFILE)!r})\n"
        f"load_profile({str(REPO / 'firmware_profiles' / 'reference-plc.yaml')!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'asyncua'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
