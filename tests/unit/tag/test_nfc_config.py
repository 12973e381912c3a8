"""``reader: {type: nfc, ...}`` in the station config: validated with file:line, built by the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.tag.nfc import NfcReader, NfcSettings
from edge_agent.tag.registry import create_reader
from tests.station_harness import write_config


def _config(tmp_path: Path, reader: str) -> Path:
    path = write_config(tmp_path, 5020, 1883)
    text = path.read_text().replace("reader: {type: simulated}", f"reader: {reader}")
    path.write_text(text)
    return path


def test_nfc_reader_config_builds_an_nfc_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NTAG_PASSWORD", "A1B2C3D4E5F6")
    reader_yaml = (
        "{type: nfc, device: 'tty:USB0:pn532', targets: [106A], poll_interval: 0.05,"
        " password: '${NTAG_PASSWORD}'}"
    )
    config = load_config(_config(tmp_path, reader_yaml))
    assert isinstance(config.reader, NfcSettings)
    reader = create_reader(config.reader)
    assert isinstance(reader, NfcReader)
    assert (reader.device, reader.targets, reader.poll_interval) == (
        "tty:USB0:pn532",
        ("106A",),
        0.05,
    )
    assert reader.password == bytes.fromhex("A1B2C3D4E5F6")  # from the environment


def test_nfc_reader_config_mistakes_name_file_line_and_key(tmp_path: Path) -> None:
    path = _config(tmp_path, "{type: nfc, device: 'serial0', targets: [107X]}")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(str(p) for p in err.value.problems)
    assert f"{path}:3: reader.device: String should match pattern" in text
    assert f"{path}:3: reader.targets" in text
