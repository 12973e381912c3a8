"""`edge-agent tag keygen|encode|decode`, driven through argparse as the real CLI does."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from edge_agent import cli_tag
from tests import REPO_ROOT

RECIPES = REPO_ROOT / "config/recipes"
UID = "04A1B2C3D4E5F6"


def run(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent")
    cli_tag.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    result: int = args.func(args)
    return result


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    assert run("tag", "keygen", "--key-id", "mes-1", "--out", tmp_path / "keys") == 0
    return tmp_path / "keys"


def test_encode_then_decode(keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tag.bin"
    recipe = RECIPES / "bracket-long.yaml"
    assert (
        run(
            "tag",
            "encode",
            "--recipe",
            recipe,
            "--key",
            keys / "mes-1.key",
            "--uid",
            UID,
            "--out",
            out,
        )
        == 0
    )
    summary = capsys.readouterr().out
    assert "491/492 bytes (ntag215)" in summary and "progress slots 2 x 87 bytes" in summary
    assert len(out.read_bytes()) == 491

    trust = f"mes-1={keys / 'mes-1.pub'}"
    assert run("tag", "decode", out, "--uid", UID, "--trust", trust) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"VALID tag {UID}: traveler v1 signed by key 'mes-1'")
    assert "1. drill @ st-20: not done" in shown and "feed_rate=350.5" in shown
    assert "slot A: current, slot B: blank" in shown


def test_hex_output_and_hex_input(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = RECIPES / "bracket-short.yaml"
    args: list[str | Path] = ["tag", "encode", "--recipe", recipe, "--key", keys / "mes-1.key"]
    args += ["--uid", UID]
    assert run(*args, "--capacity", "300", "--out", "-") == 0
    captured = capsys.readouterr()
    assert "/300 bytes" in captured.err
    hex_file = tmp_path / "tag.hex"
    hex_file.write_text(captured.out)
    assert len(bytes.fromhex(captured.out.strip())) <= 300
    assert (
        run("tag", "decode", hex_file, "--uid", UID, "--trust", f"mes-1={keys / 'mes-1.pub'}") == 0
    )


def test_rejections_exit_1_with_reason(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tag.bin"
    recipe = RECIPES / "housing.yaml"
    assert (
        run(
            "tag",
            "encode",
            "--recipe",
            recipe,
            "--key",
            keys / "mes-1.key",
            "--uid",
            UID,
            "--out",
            out,
        )
        == 0
    )
    capsys.readouterr()
    trust = f"mes-1={keys / 'mes-1.pub'}"
    assert run("tag", "decode", out, "--uid", "04B2C3D4E5F6A7", "--trust", trust) == 1
    assert capsys.readouterr().out.startswith("REJECTED uid_mismatch: tag 04B2C3D4E5F6A7:")
    assert run("tag", "decode", out, "--uid", UID, "--trust", f"other={keys / 'mes-1.pub'}") == 1
    assert "REJECTED unknown_key" in capsys.readouterr().out
    (tmp_path / "url.bin").write_bytes(bytes.fromhex("d1010b55046578616d706c652e636f6d"))
    assert run("tag", "decode", tmp_path / "url.bin", "--uid", UID, "--trust", trust) == 1
    assert "REJECTED no_traveler" in capsys.readouterr().out


def test_usage_and_config_problems_exit_2(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = keys / "mes-1.key"
    big = RECIPES / "bracket-long.yaml"
    assert (
        run(
            "tag",
            "encode",
            "--recipe",
            big,
            "--key",
            key,
            "--uid",
            UID,
            "--tag",
            "ntag213",
            "--out",
            tmp_path / "x",
        )
        == 2
    )
    assert "157 bytes over" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    assert run("tag", "encode", "--recipe", big, "--key", key, "--uid", "zz", "--out", "-") == 2
    assert "--uid 'zz' is not hex" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "part_id: P-1\nproduct: p\nvariant: v\norder: o\nsteps:\n  - operation: drill\n    parameters: {depth: .nan}\n"
    )
    assert run("tag", "encode", "--recipe", bad, "--key", key, "--uid", UID, "--out", "-") == 2
    assert (
        capsys.readouterr().err.strip()
        == f"{bad}:7: steps[0].parameters.depth: must be a finite number"
    )

    assert (
        run(
            "tag",
            "decode",
            tmp_path / "missing.bin",
            "--uid",
            UID,
            "--trust",
            f"mes-1={keys / 'mes-1.pub'}",
        )
        == 2
    )
    assert run("tag", "decode", big, "--uid", UID) == 2
    assert "--trust" in capsys.readouterr().err
    assert run("tag", "keygen", "--key-id", "mes-1", "--out", keys) == 2
    assert "already exists" in capsys.readouterr().err
    assert run("tag", "keygen", "--key-id", "bad id", "--out", keys) == 2
