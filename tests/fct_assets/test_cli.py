"""The `fct` command's habits: --version, --json on every command that prints a result, exit
codes (2 usage, 1 refused or failed) with one line, and its own output only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from fct_assets.cli import build_parser, main

FCT = Path(sys.executable).parent / "fct"  # the console script pyproject installs


@pytest.fixture
def empty(tmp_path, monkeypatch) -> dict[str, str]:
    """An empty Dagster instance and LanceDB folder, as the environment the CLI reads."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    environ = {"DAGSTER_HOME": str(home), "FCT_LANCEDB_URI": str(tmp_path / "lancedb")}
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    return environ


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fct: error: "), err
    return lines[0]


def test_version(capsys):
    assert main(["--version"]) == 0
    expected = f"fct 0.1.0 (dagster {version('dagster')}, torch {version('torch')})"
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.parametrize(
    "argv, says",
    [
        (["promote"], "the following arguments are required: version"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["search", "--version", "v2"], "one of the arguments --image --item-id is required"),
        (["estimate", "v2", "--items", "many"], "invalid int value: 'many'"),
        (["reproduce", "--preset", "huge"], "invalid choice: 'huge'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, says, capsys):
    assert main(argv) == 2
    assert says in _one_error_line(capsys.readouterr().err)


def test_refused_operations_exit_1_with_one_line(empty, capsys):
    assert main(["rollback"]) == 1
    _one_error_line(capsys.readouterr().err)
    assert main(["promote", "v9"]) == 1
    assert "v9 not promoted" in _one_error_line(capsys.readouterr().err)
    assert main(["add-version", "../x"]) == 1
    assert "'../x'" in _one_error_line(capsys.readouterr().err)
    assert main(["search", "--image", str(Path(empty["DAGSTER_HOME"]) / "no.png")]) == 1
    _one_error_line(capsys.readouterr().err)


def test_every_command_that_prints_a_result_takes_json(empty, capsys):
    commands = build_parser().commands
    assert list(commands) == [
        "reproduce",
        "promote",
        "diff",
        "rollback",
        "lineage",
        "add-version",
        "estimate",
        "catch-up",
        "ingest",
        "search",
    ]
    for name, sub in commands.items():
        assert any("--json" in a.option_strings for a in sub.options.values()), name
    assert main(["add-version", "v7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"version": "v7", "added": True}


def test_the_program_shows_its_own_output_not_library_warnings(empty):
    # `fct ingest` loads the definitions, whose partitioned check specs raise Dagster's
    # PreviewWarning; with warnings shown (PYTHONWARNINGS) the same command prints it. The path
    # does not exist: the command fails before any run, and says so in one line.
    missing = str(Path(empty["FCT_LANCEDB_URI"]).parent / "no-such-folder")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    quiet = subprocess.run(
        [str(FCT), "ingest", missing], env=env, capture_output=True, text=True, timeout=300
    )
    assert quiet.returncode == 1
    assert f"{missing}: no such file or folder" in _one_error_line(quiet.stderr)
    loud = subprocess.run(
        [str(FCT), "ingest", missing],
        env={**env, "PYTHONWARNINGS": "default"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "PreviewWarning" in loud.stderr
