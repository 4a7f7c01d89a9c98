"""The command line itself: --version, options after the command, shell completion."""

from __future__ import annotations

import subprocess
from importlib.metadata import version

import pytest

from chorus.cli.main import build_parser
from chorus.config import Settings
from tests.cli import chorus, one_line_error

UNREACHABLE = "nats://127.0.0.1:1"


def test_version_prints_the_installed_distribution_version(settings: Settings) -> None:
    result = chorus(settings, "--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"chorus {version('chorus-agents')}"


@pytest.mark.parametrize(
    "argv",
    [
        ["agents", "--once", "--nats-url", UNREACHABLE],
        ["--nats-url", UNREACHABLE, "agents", "--once"],
        ["state", "get", "orders.7", "--nats-url", UNREACHABLE],
        ["--nats-url", UNREACHABLE, "runs", "show", "3f2a"],
    ],
    ids=["after", "before", "after-a-nested-command", "before-a-nested-command"],
)
def test_the_server_url_is_taken_before_or_after_the_command(
    settings: Settings, argv: list[str]
) -> None:
    line = one_line_error(chorus(settings, *argv))

    assert f"cannot reach NATS at {UNREACHABLE}" in line


def _completion(settings: Settings, shell: str) -> str:
    result = chorus(settings, "completion", shell)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _commands() -> list[str]:
    [commands] = [a for a in build_parser()._actions if a.dest == "command"]
    assert isinstance(commands.choices, dict)
    return list(commands.choices)


def test_bash_completion_is_valid_bash_naming_every_command(settings: Settings) -> None:
    script = _completion(settings, "bash")

    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr
    for command in _commands():
        assert command in script, command
    assert {"agents", "tail", "runs", "state", "completion"} <= set(_commands())


def test_bash_completion_completes_commands_and_options(settings: Settings) -> None:
    script = _completion(settings, "bash")
    probe = (
        script
        + '\nCOMP_WORDS=(chorus ag); COMP_CWORD=1; _shtab_chorus; echo "${COMPREPLY[*]}"'
        + '\nCOMP_WORDS=(chorus tail --hi); COMP_CWORD=2; _shtab_chorus; echo "${COMPREPLY[*]}"'
    )

    completed = subprocess.run(["bash"], input=probe, text=True, capture_output=True, timeout=20)

    assert completed.returncode == 0, completed.stderr
    commands, options = completed.stdout.splitlines()
    assert set(commands.split()) == {"agent", "agents"}
    assert options.split() == ["--history"]


def test_fish_completion_names_the_commands(settings: Settings) -> None:
    script = _completion(settings, "fish")

    [listed] = [ln for ln in script.splitlines() if ln.startswith("set -g _shtab_chorus_commands")]
    assert set(_commands()) <= set(listed.split())


def test_zsh_completion_names_the_commands(settings: Settings) -> None:
    script = _completion(settings, "zsh")

    assert script.startswith("#compdef chorus")
    assert all(command in script for command in _commands())


def test_an_unknown_shell_is_refused_naming_the_choices(settings: Settings) -> None:
    result = chorus(settings, "completion", "powershell")

    assert result.returncode == 2
    assert "choose from 'bash', 'zsh', 'fish'" in result.stderr


def test_output_cut_short_by_the_reader_is_no_error(settings: Settings) -> None:
    import sys

    from tests.helpers import child_env

    piped = subprocess.run(
        ["bash", "-c", f"'{sys.executable}' -m chorus completion fish | head -1"],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert piped.stdout.startswith("#")
    assert piped.stderr == ""
