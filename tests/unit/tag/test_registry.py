"""Readers own their ``reader:`` settings and ``create()``; the registry finds them by ``type``."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.tag.reader import ReaderSettings, TagReader
from edge_agent.tag.registry import READERS, create_reader, reader_module
from tests import REPO_ROOT
from tests.station_harness import write_config

REPO = REPO_ROOT
REQUIRED = {"autoid": "url: 'opc.tcp://127.0.0.1:4840'"}  # keys without a default, per reader


@pytest.mark.parametrize("name", sorted(READERS))
def test_each_reader_module_owns_its_settings_and_create(tmp_path: Path, name: str) -> None:
    model = reader_module(name).SETTINGS_MODEL
    assert issubclass(model, ReaderSettings)
    assert typing.get_args(model.model_fields["type"].annotation) == (name,)
    extra = f", {REQUIRED[name]}" if name in REQUIRED else ""
    config = load_config(
        write_config(tmp_path, 5020, 1883, reader=f"{{type: {name}, name: door{extra}}}")
    )
    assert type(config.reader) is model
    reader = create_reader(config.reader)
    assert isinstance(reader, TagReader) and reader.name == "door"


def test_a_station_imports_only_its_own_reader(tmp_path: Path) -> None:
    # nfcpy and asyncua load when a reader opens its device; the other readers not at all.
    sim = write_config(tmp_path, 5020, 1883)
    (tmp_path / "nfc").mkdir()
    nfc = write_config(tmp_path / "nfc", 5020, 1883, reader="{type: nfc}")
    code = (
        "import sys\n"
        "from edge_agent.config import load_config\n"
        "from edge_agent.tag.registry import create_reader\n"
        f"create_reader(load_config({str(sim)!r}).reader)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('edge_agent.tag.', 'nfc', 'asyncua'))))\n"
        f"create_reader(load_config({str(nfc)!r}).reader)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nfc', 'asyncua')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    simulated, nfc_station = out.stdout.splitlines()
    assert simulated == str(
        ["edge_agent.tag.reader", "edge_agent.tag.registry", "edge_agent.tag.simulated"]
    )
    assert nfc_station == "[]"


def test_an_unknown_reader_type_is_named_with_the_others_of_its_stage(tmp_path: Path) -> None:
    path = write_config(tmp_path, 5020, 1883, station="far-too-long", reader="{type: rfid}")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert [str(p) for p in err.value.problems] == [
        f"{path}:2: station: String should have at most 8 characters",
        f"{path}:3: reader.type: 'rfid' is not a reader type: simulated, nfc, autoid",
    ]


def test_reader_keys_are_checked_in_key_order_with_suggestions(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, 5020, 1883, reader="{type: simulated, poll_intervall: 1}", extra="brokr: {}\n"
    )
    brokr = path.read_text().splitlines().index("brokr: {}") + 1  # after the reader's line 3
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert [str(p) for p in err.value.problems] == [
        f"{path}:3: reader.poll_intervall: unknown key (did you mean 'poll_interval'?)",
        f"{path}:{brokr}: brokr: unknown key (did you mean 'broker'?)",
    ]


def test_a_reader_without_type_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path, 5020, 1883, reader="{name: door}")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert [str(p) for p in err.value.problems] == [
        f"{path}:3: reader.type: required key is missing"
    ]
