"""`depthflow --help`, `depthflow COMMAND --help` and `depthflow --version`."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from depthflow import __version__
from depthflow.cli import _parser, main
from depthflow.cli_help import COMMAND_SETTINGS, env_names
from depthflow.config import Settings


def commands() -> dict[str, argparse.ArgumentParser]:
    (action,) = (a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def help_of(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_command_has_its_environment_listed() -> None:
    assert set(commands()) == set(COMMAND_SETTINGS)
    fields = set(Settings.model_fields)
    for command, names in COMMAND_SETTINGS.items():
        assert names, command
        assert set(names) <= fields, command


@pytest.mark.parametrize("command", sorted(COMMAND_SETTINGS))
def test_help_names_the_environment_variables(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_of(command, capsys)
    assert "environment variables read" in text
    for name in env_names(command):
        assert name in text, (command, name)
    reads_database = {"config", "serve", "migrate", "replay", "export"}
    assert ("DATABASE_URL" in text) == (command in reads_database)


def test_what_each_command_reads() -> None:
    assert env_names("migrate") == ["DATABASE_URL", "LOG_LEVEL", "LOG_FORMAT"]
    assert env_names("simulate") == ["LOG_LEVEL", "LOG_FORMAT"]
    assert "REDIS_URL" not in env_names("replay")
    assert "BINANCE_WS_URL" not in env_names("replay")
    assert "SMA_SHORT" in env_names("replay")
    assert "BINANCE_WS_URL" in env_names("record")
    assert "DATABASE_URL" not in env_names("record")
    assert len(env_names("serve")) == len(Settings.model_fields)


def test_short_lists_show_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of("migrate", capsys)
    # The default URL's password is masked.
    assert "postgresql+asyncpg://postgres:***@localhost:5432/depthflow" in text
    assert "console on a terminal, else json" in text


def test_every_option_has_help_showing_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    for name, parser in commands().items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)
    text = help_of("simulate", capsys)
    assert "(default: 8765)" in text
    assert "(default: 127.0.0.1)" in text
    assert "drop every Nth event" in text
    assert "0 = never (default: 0)" in text
    assert "(no events) (default: empty)" in text
    # No "(default: None)" for options that have no default, no doubled defaults.
    assert "default: None" not in text
    serve = help_of("serve", capsys)
    assert "(default: 8000)" in serve
    record = help_of("record", capsys)
    assert record.count("(default: forever)") == 1


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "depthflow", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"depthflow {__version__}"
