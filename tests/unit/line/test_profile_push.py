"""Certified envelopes on a running station: a real mosquitto, the reference PLC, the whole agent.

Only a profile signed by a key of ``profile_keys``, unaltered and newer than the active one (or an
explicit rollback to one accepted before) changes what the machine may be asked to do.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.instructions.model import Step
from edge_agent.instructions.signing import generate_keypair
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, PROFILE, Station, certified, running_station, write_config
from tests.unit.line.test_commands import ALL, Line, error, narrower_profile

SPINDLE = "spindle_speed: {table: holding, address: 0, type: u16, unit: rpm, min: 0, max: 12000}"


@pytest.fixture
async def station(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> AsyncIterator[Station]:
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=ALL) as s:
        yield s


@pytest.fixture
def line(broker: EmbeddedBroker, recorder: MqttRecorder) -> Line:
    return Line(broker, recorder)


def _refusals(tmp: Path) -> dict[str, dict[str, str]]:
    """Every way a push can be wrong, each with the params the line would send."""
    generate_keypair("other", tmp)
    text = narrower_profile()
    tampered = certified(tmp, text)
    tampered["yaml"] = text.replace("max: 1000}", "max: 1100}", 1)
    older = PROFILE.read_text().replace('version: "1.0"', 'version: "0.9"')
    return {
        "missing": {"yaml": text},
        "untrusted_key": certified(tmp, text, key_id="other"),
        "traveler_key": certified(tmp, text, key_id="mes"),  # the MES's key certifies nothing
        "tampered": tampered,
        "not_newer": certified(tmp, older),
        "malformed": {"yaml": text, "signature": "{}"},
    }


async def test_only_a_certified_newer_profile_changes_the_envelope(
    station: Station, line: Line, recorder: MqttRecorder, reference_plc: ReferencePlc
) -> None:
    for case, params in _refusals(station.tmp).items():
        reply = await line.call("push_profile", params)
        assert error(reply) == "profile_refused", (case, reply)
        reason = "untrusted_key" if case == "traveler_key" else case
        assert reply["error"]["message"].startswith(f"{reason}: pushed profile"), reply
        status = (await line.call("status"))["result"]
        assert status["profile"]["version"] == "1.0", case
    assert not [e for e in recorder.json("gw-test/events") if e["event"] == "profile_changed"]

    # DRILL's 1500 rpm is inside the active envelope: the refusals left it as it was.
    tag = station.tag([Step("drill", DRILL, "st-20")], uid=b"\x04\x00\x00\x00\x00\x01\x01")
    assert (await station.cycle(tag)).status == "ok"

    reply = await line.call("push_profile", certified(station.tmp, narrower_profile()))
    assert reply["ok"] is True, reply
    assert reply["result"]["profile"]["signed_by"] == "cert"
    event = next(
        e for e in await recorder.wait_for("gw-test/events", 1) if e["event"] == "profile_changed"
    )
    assert event["how"] == "push"
    assert event["previous"]["version"] == "1.0" and event["profile"]["version"] == "1.1"
    assert event["profile"]["signed_by"] == "cert" and event["profile"]["signed_at"]
    assert "points.spindle_speed.max: 12000 -> 1000" in event["changes"]

    # The certified envelope judges the next part, and its report names who certified it.
    writes = reference_plc.requests[16] + reference_plc.requests[15] + reference_plc.requests[5]
    again = station.tag([Step("drill", DRILL, "st-20")], uid=b"\x04\x00\x00\x00\x00\x01\x02")
    refused = await station.cycle(again)
    assert refused.reason == "out_of_limits"
    assert (
        writes
        == reference_plc.requests[16] + reference_plc.requests[15] + reference_plc.requests[5]
    )
    assert refused.profile["signed_by"] == "cert" and refused.profile["version"] == "1.1"
    assert (await line.call("status"))["result"]["profile"]["signed_by"] == "cert"


async def test_a_pushed_rollback_returns_only_to_a_profile_accepted_before(
    station: Station, line: Line
) -> None:
    original = certified(station.tmp, PROFILE.read_text())
    assert (await line.call("push_profile", certified(station.tmp, narrower_profile())))["ok"]
    reply = await line.call("push_profile", original)
    assert error(reply) == "profile_refused" and "not_newer" in reply["error"]["message"]
    reply = await line.call("push_profile", {**original, "rollback": True})
    assert reply["ok"] is True, reply
    assert reply["result"]["profile"]["version"] == "1.0"

    never = PROFILE.read_text().replace('version: "1.0"', 'version: "0.5"')
    reply = await line.call("push_profile", {**certified(station.tmp, never), "rollback": True})
    assert error(reply) == "profile_refused"
    assert "not_accepted_before" in reply["error"]["message"]


def _configs(tmp: Path, profile: Path) -> tuple[Path, Path]:
    """Two configs for the profile file ``profile``: signatures required, and not."""
    path = write_config(tmp, 5020, 1883)
    text = path.read_text().replace(json.dumps(str(PROFILE)), json.dumps(str(profile)))
    required, optional = tmp / "required.yaml", tmp / "optional.yaml"
    required.write_text(text.replace("machine: {", "machine: {require_signed_profile: true, "))
    optional.write_text(text)
    return required, optional


def _sign_on_disk(tmp: Path, profile: Path, key_id: str = "cert") -> None:
    params = certified(tmp, profile.read_text(), key_id=key_id)
    (profile.parent / (profile.name + ".sig")).write_text(params["signature"])


def test_profile_on_disk_signature_is_checked_with_file_and_key(tmp_path: Path) -> None:
    profile = tmp_path / "machine.yaml"
    shutil.copy(PROFILE, profile)
    required, optional = _configs(tmp_path, profile)
    with pytest.raises(ConfigError) as err:
        load_config(required)
    (problem,) = err.value.problems
    assert problem.path == "machine.profile" and problem.line == 4
    assert "machine.yaml is not signed" in problem.message

    _sign_on_disk(tmp_path, profile)
    config = load_config(required)
    assert config.profile.signature is not None
    assert config.profile.describe()["signed_by"] == "cert"

    # One limit changed after signing: refused even where signatures are not required.
    profile.write_text(profile.read_text().replace(SPINDLE, SPINDLE.replace("12000", "13000")))
    with pytest.raises(ConfigError) as err:
        load_config(optional)
    assert "signature refused" in str(err.value) and "changed after it was signed" in str(err.value)


def test_a_key_removed_from_profile_keys_stops_being_accepted(tmp_path: Path) -> None:
    profile = tmp_path / "machine.yaml"
    shutil.copy(PROFILE, profile)
    path, _ = _configs(tmp_path, profile)
    _sign_on_disk(tmp_path, profile)
    assert load_config(path).profile.signature is not None
    text = path.read_text()
    generate_keypair("new", tmp_path)
    path.write_text(text.replace("profile_keys: {cert:", "profile_keys: {new:"))
    path.write_text(path.read_text().replace("cert.pub", "new.pub"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "signed with key 'cert', which is not a trusted profile key" in str(err.value)


def test_an_unsigned_profile_is_accepted_with_a_warning_when_not_required(tmp_path: Path) -> None:
    profile = tmp_path / "machine.yaml"
    shutil.copy(PROFILE, profile)
    config = load_config(_configs(tmp_path, profile)[1])
    assert config.profile.signature is None and "signed_by" not in config.profile.describe()


async def test_a_wider_envelope_that_was_refused_never_lets_a_part_through(
    station: Station, line: Line, reference_plc: ReferencePlc
) -> None:
    """Each way of getting a wider envelope wrong is refused, and a part that only the wider
    envelope would allow stays rejected with nothing written to the machine."""
    wider = PROFILE.read_text().replace('version: "1.0"', 'version: "1.1"')
    wider = wider.replace(SPINDLE, SPINDLE.replace("max: 12000", "max: 14000"))
    generate_keypair("other", station.tmp)
    tampered = certified(
        station.tmp, PROFILE.read_text().replace('version: "1.0"', 'version: "1.1"')
    )
    tampered["yaml"] = wider  # the signature of the certified 1.1, over the widened text
    for params in (
        {"yaml": wider},
        certified(station.tmp, wider, key_id="other"),
        certified(station.tmp, wider, key_id="mes"),
        tampered,
    ):
        assert error(await line.call("push_profile", params)) == "profile_refused"

    writes = sum(reference_plc.requests[code] for code in (5, 6, 15, 16))
    fast = {**DRILL, "spindle_speed": 13000}
    tag = station.tag([Step("drill", fast, "st-20")], uid=b"\x04\x00\x00\x00\x00\x02\x01")
    report = await station.cycle(tag)
    assert report.status == "rejected" and report.reason == "out_of_limits", report
    assert "maximum 12000" in str(report.error)
    assert sum(reference_plc.requests[code] for code in (5, 6, 15, 16)) == writes


async def test_a_profile_change_swaps_the_whole_station_and_a_refused_one_changes_nothing(
    station: Station, line: Line
) -> None:
    control = station.agent.control
    before = control.active
    assert error(await line.call("push_profile", {"yaml": narrower_profile()})) == (
        "profile_refused"
    )
    assert control.active is before  # refused before anything was built into the station

    assert (await line.call("push_profile", certified(station.tmp, narrower_profile())))["ok"]
    pushed = control.active
    assert pushed is not before and pushed.profile.version == "1.1"
    # Every part of the station judges by the pushed profile and drives the new driver.
    for part in (pushed.cycle, pushed.adjustments):
        assert part.profile is pushed.profile and part.driver is pushed.driver
    assert pushed.telemetry.driver is pushed.driver and station.agent.driver is pushed.driver
    assert pushed.driver is not before.driver and not before.driver.connected  # the old one closed
    assert pushed.keyring is before.keyring  # the tag keys are the config's, not the profile's

    assert (await line.call("rollback_profile"))["ok"]
    back = control.active
    assert back.profile.version == "1.0" and back.cycle.profile is back.profile
    assert back.adjustments.profile is back.profile and back.cycle.driver is back.driver

    assert (await line.call("reload"))["ok"]
    reloaded = control.active
    assert reloaded is not back and reloaded.cycle is not back.cycle
    assert reloaded.driver is back.driver  # same machine settings and profile: the driver stays
