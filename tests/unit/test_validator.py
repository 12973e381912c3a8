"""One validator: whatever `run`, `reload` and `push_profile` refuse, `check-config` refuses first,
with the same lines (file:line: key.path: message), exit 2 and never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent import statedir
from edge_agent.agent import Agent
from edge_agent.config import load_config, profile_for
from edge_agent.errors import ConfigError, ConfigProblem
from edge_agent.machine.profile import load_profile
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.uplink.outbox_sqlite import SqliteOutbox
from tests.fixtures_opcua import OPCUA_PROFILE, USER, OpcUaMachineProcess
from tests.unit.test_cli import REPO, edge_agent

PROFILE = REPO / "firmware_profiles/reference-plc.yaml"


def _station(tmp: Path, extra: str = "", profile: Path = PROFILE, name: str = "station") -> Path:
    (tmp / "k.pub").write_bytes((REPO / "config/keys/mes-example.pub").read_bytes())
    path = tmp / f"{name}.yaml"
    path.write_text(
        "gateway_id: gw-1\nstation: st-20\nreader: {type: simulated}\n"
        f"machine:\n  profile: {json.dumps(str(profile))}\n  host: 127.0.0.1\n  port: 5020\n"
        f"trusted_keys:\n  mes: k.pub\n{extra}"
    )
    return path


def _line(path: Path, start: str) -> int:
    lines = path.read_text().splitlines()
    return 1 + next(i for i, line in enumerate(lines) if line.lstrip().startswith(start))


def _profile(tmp: Path, old: str, new: str) -> Path:
    text = PROFILE.read_text()
    assert old in text
    path = tmp / "profile.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _not_pem(tmp: Path) -> tuple[Path, str]:
    (tmp / "k.pem").write_text("not a key\n")
    path = _station(tmp)
    path.write_text(path.read_text().replace("k.pub", "k.pem"))
    return path, f"{path}:9: trusted_keys.mes: {tmp / 'k.pem'} is not a PEM public key"


def _directory_key(tmp: Path) -> tuple[Path, str]:
    (tmp / "keys").mkdir()
    path = _station(tmp)
    path.write_text(path.read_text().replace("k.pub", "keys"))
    return path, f"{path}:9: trusted_keys.mes: {tmp / 'keys'} is a directory, not a key file"


def _ec_key(tmp: Path) -> tuple[Path, str]:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    path = _station(tmp)
    (tmp / "k.pub").write_bytes(pem)
    return path, f"{path}:9: trusted_keys.mes: {tmp / 'k.pub'} holds a key of type EC"


def _state_dir_under_a_file(tmp: Path) -> tuple[Path, str]:
    (tmp / "plain").write_text("")
    path = _station(tmp, "state_dir: plain/state\n")
    return path, f"{path}:10: state_dir: cannot create {tmp / 'plain/state'}: {tmp / 'plain'}"


def _program_outside_limits(tmp: Path) -> tuple[Path, str]:
    profile = _profile(tmp, "program: 1\n", "program: 7\n")
    line = _line(profile, "program: 7")
    path = _station(tmp, profile=profile)
    return path, f"{profile}:{line}: operations.drill.program: "


def _default_outside_envelope(tmp: Path) -> tuple[Path, str]:
    profile = _profile(tmp, "      dwell: dwell\n", "      dwell: {point: dwell, default: 20000}\n")
    line = _line(profile, "dwell: {point: dwell, default: 20000}")
    path = _station(tmp, profile=profile)
    return path, f"{profile}:{line}: operations.drill.parameters.dwell.default: "


def _ca_not_pem(tmp: Path) -> tuple[Path, str]:
    (tmp / "ca.pem").write_text("garbage\n")
    path = _station(tmp, "broker:\n  port: 8883\n  tls:\n    ca_file: ca.pem\n")
    return path, f"{path}:13: broker.tls.ca_file: {tmp / 'ca.pem'} is not a PEM certificate bundle"


def _tag_directory_under_a_file(tmp: Path) -> tuple[Path, str]:
    (tmp / "plain").write_text("")
    path = _station(tmp)
    path.write_text(
        path.read_text().replace("{type: simulated}", "{type: simulated, directory: plain/t}")
    )
    return path, f"{path}:3: reader.directory: cannot create {tmp / 'plain/t'}"


CASES: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "key file not PEM": _not_pem,
    "key file is a directory": _directory_key,
    "key of another algorithm": _ec_key,
    "state_dir cannot be created": _state_dir_under_a_file,
    "program number outside its point's limits": _program_outside_limits,
    "parameter default outside the envelope": _default_outside_envelope,
    "broker CA file not PEM": _ca_not_pem,
    "tag directory cannot be created": _tag_directory_under_a_file,
}


@pytest.mark.parametrize("case", CASES)
def test_check_config_refuses_what_run_refuses_with_the_same_line(
    tmp_path: Path, case: str
) -> None:
    config, expected = CASES[case](tmp_path)
    check = edge_agent("check-config", "-c", str(config))
    run = edge_agent("run", "-c", str(config))
    for out in (check, run):
        assert out.returncode == 2, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        problems = [line.strip() for line in out.stderr.splitlines() if line.startswith("  ")]
        assert len(problems) == 1, out.stderr  # one line per root cause
        assert problems[0].startswith(expected), problems
    assert check.stderr == run.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the mode says")
def test_unreadable_key_and_unwritable_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o500)
    path = _station(tmp_path, f"state_dir: {state}\n")
    (tmp_path / "k.pub").chmod(0)
    found = [str(p) for p in _problems(path)]
    assert found == [
        f"{path}:9: trusted_keys.mes: cannot read {tmp_path / 'k.pub'}: Permission denied",
        f"{path}:10: state_dir: cannot write in {state}: Permission denied",
    ]


def _problems(path: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return list(info.value.problems)


def test_a_pushed_profile_meets_the_same_rules_with_its_line(tmp_path: Path) -> None:
    config = load_config(_station(tmp_path))
    text = PROFILE.read_text().replace("program: 2\n", "program: 9\n")
    with pytest.raises(ConfigError) as info:
        profile_for(load_profile("cmd/push_profile", text=text), config, text=text)
    [problem] = info.value.problems
    line = 1 + text.splitlines().index("    program: 9")
    assert str(problem).startswith(f"cmd/push_profile:{line}: operations.mill.program: ")

    opcua = REPO / "firmware_profiles/reference-opcua.yaml"
    with pytest.raises(ConfigError) as info:
        profile_for(load_profile(opcua), config)
    [problem] = info.value.problems
    assert str(problem).startswith(f"{opcua}:{_line(opcua, 'driver:')}: driver: 'opcua' differs")


async def test_reload_refuses_a_key_that_is_not_pem_and_keeps_running(tmp_path: Path) -> None:
    path = _station(tmp_path)
    agent = Agent(load_config(path))
    (tmp_path / "k.pub").write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n")
    with pytest.raises(ConfigError) as info:
        await agent.reload()
    [problem] = info.value.problems
    assert str(problem).startswith(f"{path}:9: trusted_keys.mes: ")
    assert agent.keyring and agent.config.trusted_keys["mes"] == tmp_path / "k.pub"
    agent.uplink.outbox.close()


# ---------------------------------------------------------------- the state directory


async def _wait_for_lock(state: Path, pid: int) -> None:
    for _ in range(200):
        lock = state / statedir.LOCK_FILE
        if lock.exists() and f'"pid": {pid}' in lock.read_text():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the first agent never held the state directory")


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_agent",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_two_agents_on_one_state_dir_the_second_is_refused_naming_the_first(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    state = tmp_path / "state"
    extra = f"state_dir: {state}\nbroker: {{host: 127.0.0.1, port: {broker.port}}}\n"
    first_config = _station(tmp_path, extra)
    second_config = _station(tmp_path, extra, name="second")
    first = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_agent",
        "run",
        "-c",
        str(first_config),
        cwd=REPO,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_for_lock(state, first.pid)
        code, _, err = await _cli("run", "-c", str(second_config))
        assert code == 2 and "Traceback" not in err, err
        assert f"{second_config}:10: state_dir: {state} is in use by another edge-agent" in err
        assert f"(pid {first.pid}, config {first_config}, since " in err

        code, _, err = await _cli("check-config", "-c", str(second_config))
        assert code == 2 and f"pid {first.pid}" in err, err

        # The running agent's own config is valid: a reload applies it.
        code, out, err = await _cli("check-config", "-c", str(first_config))
        assert code == 0, err
        assert f"is in use by the agent running this config (pid {first.pid})" in out
    finally:
        first.terminate()
        await asyncio.wait_for(first.wait(), 30)
    code, _, err = await _cli("check-config", "-c", str(second_config))
    assert code == 0, err  # the kernel dropped the lock with the process


def test_an_outbox_held_by_another_process_or_not_sqlite_is_named(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = _station(tmp_path, f"state_dir: {state}\n")
    outbox = SqliteOutbox(state / statedir.OUTBOX_FILE)  # as a demo holds it
    try:
        for command in ("check-config", "run"):
            out = edge_agent(command, "-c", str(path))
            assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
            assert f"state_dir: the outbox {state / 'outbox.sqlite3'} is held by another" in (
                out.stderr
            )
    finally:
        outbox.close()
    # Damaged: not refused (run salvages it at open), but said.
    (state / statedir.OUTBOX_FILE).write_bytes(b"not a database at all" * 100)
    out = edge_agent("check-config", "-c", str(path))
    assert out.returncode == 0 and "is damaged (file is not a database)" in out.stdout, out
    assert "move it aside as outbox.sqlite3.corrupt-<UTC time>" in out.stdout


def test_claim_holds_until_released(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = load_config(_station(tmp_path, f"state_dir: {state}\n"))
    lock = statedir.claim(config)
    assert lock is not None
    try:
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            statedir.claim(config)
    finally:
        lock.release()
    again = statedir.claim(config)
    assert again is not None
    again.release()


# ---------------------------------------------------------------- --online


async def test_online_lists_every_point_the_machine_refuses(
    tmp_path: Path, reference_plc: object
) -> None:
    port = reference_plc.port  # type: ignore[attr-defined]
    text = (
        PROFILE.read_text()
        .replace("program: {table: holding, address: 9,", "program: {table: holding, address: 900,")
        .replace(
            "cycle_count: {table: input, address: 10,", "cycle_count: {table: input, address: 1000,"
        )
    )
    profile = tmp_path / "profile.yaml"
    profile.write_text(text)
    config = _station(tmp_path, profile=profile)
    config.write_text(config.read_text().replace("port: 5020", f"port: {port}"))
    code, _, err = await _cli("check-config", "--online", "-c", str(config))
    assert code == 2, err
    assert "the machine does not match the profile (2 problems)" in err
    assert (
        f"{profile}:{_line(profile, 'program:')}: points.program: read_holding_registers address 900"
        in err
    )
    assert (
        f"{profile}:{_line(profile, 'cycle_count:')}: points.cycle_count: read_input_registers address 1000"
        in err
    )
    assert "ILLEGAL_ADDRESS" in err

    config.write_text(config.read_text().replace(f"port: {port}", "port: 1"))
    code, _, err = await _cli("check-config", "--online", "-c", str(config))
    assert code == 1 and "machine unreachable" in err and "Traceback" not in err, err


def test_online_calls_a_refused_password_an_authentication_refusal(
    opcua_machine: OpcUaMachineProcess, tmp_path: Path
) -> None:
    config = _station(tmp_path, profile=OPCUA_PROFILE)
    config.write_text(
        config.read_text().replace(
            "  host: 127.0.0.1\n  port: 5020\n",
            f"  url: {opcua_machine.url}\n  timeout: 1\n  username: {USER[0]}\n  password: wrong\n",
        )
    )
    out = edge_agent("check-config", "--online", "-c", str(config))
    assert out.returncode == 2, out.stderr
    assert "authentication refused by the machine (1 problem)" in out.stderr
    assert f"{config}:{_line(config, 'username:')}: machine.username: " in out.stderr
    assert "authentication refused (BadUserAccessDenied)" in out.stderr


def test_output_cut_short_by_the_reader_ends_quietly(tmp_path: Path) -> None:
    """`edge-agent tag keygen ... | head -0`: the reader is gone before the first line."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "tag",
            "keygen",
            "--key-id",
            "k",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141, err  # as a tool killed by SIGPIPE
    assert err == ""
    assert (tmp_path / "k.pub").exists()  # the work was done; only the printing was cut


def test_every_command_says_what_it_does_in_its_help() -> None:
    import argparse

    from edge_agent.cli import build_parser

    def commands(
        parser: argparse.ArgumentParser, name: str
    ) -> list[tuple[str, argparse.ArgumentParser]]:
        found = [(name, parser)]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    found += commands(child, f"{name} {sub}")
        return found

    every = commands(build_parser(), "edge-agent")
    names = {name for name, _ in every}
    assert {"edge-agent run", "edge-agent check-config", "edge-agent tag encode"} <= names
    for name, parser in every:
        assert parser.description, f"{name} --help does not say what it does"
    help_text = dict(every)["edge-agent check-config"].format_help()
    assert "exit 2" in help_text and "exit 1 when the machine cannot be reached" in help_text


def test_a_handshake_typo_is_one_line_with_did_you_mean(tmp_path: Path) -> None:
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        PROFILE.read_text()
        .replace("  - set: trigger\n", "  - sett: trigger\n")
        .replace("{wait: done, equals: true, timeout: 5}", "{wait: done, equal: true, timeout: 5}")
        .replace("{wait: done, equals: false, timeout: 2}", "{wait: done, timeout: -2}")
    )
    found = [str(p) for p in _problems(_station(tmp_path, profile=profile))]
    assert found == [
        f"{profile}:{_line(profile, '- sett:')}: handshake[2].sett: unknown key (did you mean 'set'?)",
        f"{profile}:{_line(profile, '- {wait: done, equal:')}: handshake[3].equal: unknown key "
        "(did you mean 'equals'?)",
        f"{profile}:{_line(profile, '- {wait: done, timeout: -2}')}: handshake[6].timeout: "
        "Input should be greater than 0",
    ]


def test_a_bad_default_is_one_problem_at_defaults(tmp_path: Path) -> None:
    profile = _profile(
        tmp_path, "driver: modbus\n", "driver: modbus\ndefaults: {word_order: badc}\n"
    )
    found = [str(p) for p in _problems(_station(tmp_path, profile=profile))]
    assert found == [
        f"{profile}:{_line(profile, 'defaults:')}: defaults.word_order: "
        "Input should be 'big' or 'little'"
    ]
