"""Config validation: every shipped example loads; every mistake is named by file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from tests import REPO_ROOT

REPO = REPO_ROOT
EXAMPLES = sorted((REPO / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_examples_load(path: Path) -> None:
    config = load_config(path)
    assert config.profile.operations
    assert config.trusted_keys


def _config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "k.pub").write_bytes((REPO / "config/keys/mes-example.pub").read_bytes())
    path = tmp_path / "station.yaml"
    path.write_text(text.replace("PROFILE", str(REPO / "firmware_profiles/reference-plc.yaml")))
    return path


GOOD = """\
gateway_id: gw-1
station: st-20
reader: {type: simulated}
machine:
  profile: PROFILE
  host: 127.0.0.1
  port: 5020
trusted_keys: {mes: k.pub}
"""


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_minimal_config_has_working_defaults(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, GOOD))
    assert config.broker.host == "localhost" and config.broker.port == 1883
    assert config.client_id == "edge-agent-gw-1"
    assert config.machine.port == 5020 and config.machine.unit_id == 1
    assert config.trusted_keys["mes"] == tmp_path / "k.pub"  # relative to the config file


def test_misspelt_key_names_line_and_suggests(tmp_path: Path) -> None:
    path = _config(tmp_path, GOOD + "brokr: {host: x}\n")
    [p] = problems(path)
    assert p == f"{path}:9: brokr: unknown key (did you mean 'broker'?)"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("station: st-20", "station: a-station-name-too-long").replace(
        "gateway_id: gw-1\n", ""
    )
    text += "broker: {port: 99999, hots: x}\n"
    found = problems(_config(tmp_path, text))
    joined = "\n".join(found)
    assert "gateway_id: required key is missing" in joined
    assert ":1: station:" in joined  # gateway_id was removed, so station is on line 1
    assert "broker.port:" in joined and "broker.hots: unknown key (did you mean 'host'?)" in joined
    assert len(found) == 4


def test_driver_settings_are_checked_with_line(tmp_path: Path) -> None:
    path = _config(
        tmp_path, GOOD.replace("port: 5020", "port: many").replace("host: 127.0.0.1", "hostname: x")
    )
    found = problems(path)
    assert any(f"{path}:6: machine.hostname: unknown key" in p for p in found), found
    assert any(f"{path}:7: machine.port:" in p for p in found), found


def test_profile_problems_name_the_profile_file(tmp_path: Path) -> None:
    profile = tmp_path / "broken.yaml"
    profile.write_text(
        (REPO / "firmware_profiles/reference-plc.yaml")
        .read_text()
        .replace("type: u16, unit: rpm", "type: u17, unit: rpm")
    )
    path = _config(tmp_path, GOOD.replace("PROFILE", str(profile)))
    found = problems(path)
    assert any(p.startswith(f"{profile}:") and "points.spindle_speed.type" in p for p in found), (
        found
    )


def test_missing_key_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = GOOD.replace("k.pub", "nope.pub") + "broker: {password: '${EDGE_TEST_SECRET}'}\n"
    found = problems(_config(tmp_path, text))
    assert any("environment variable EDGE_TEST_SECRET is not set" in p for p in found), found
    monkeypatch.setenv("EDGE_TEST_SECRET", "s3cret")
    found = problems(_config(tmp_path, text))
    assert len(found) == 1 and "trusted_keys.mes: no such file" in found[0]


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = _config(tmp_path, GOOD + "broker: [unclosed\n")
    [p] = problems(path)
    assert p.startswith(f"{path}:") and "not valid YAML" in p


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = _config(tmp_path, GOOD + "station: st-30\n")
    [p] = problems(path)
    assert p == f"{path}:9: station: duplicate key"


def test_paths_in_driver_settings_are_relative_to_the_config_file(tmp_path: Path) -> None:
    text = GOOD.replace(
        "PROFILE\n  host: 127.0.0.1\n  port: 5020",
        f"{REPO / 'firmware_profiles/reference-opcua.yaml'}\n  url: opc.tcp://127.0.0.1:4840/m\n"
        "  security: {policy: Basic256Sha256, mode: Sign, pki: certs, certificate: certs/own.der, private_key: /abs/own.pem}",
    )
    config = load_config(_config(tmp_path, text))
    assert config.machine.security.pki == tmp_path / "certs"
    assert config.machine.security.certificate == tmp_path / "certs/own.der"
    assert str(config.machine.security.private_key) == "/abs/own.pem"  # absolute stays as given
