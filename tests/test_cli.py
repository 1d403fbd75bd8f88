"""Every CLI sub-command answers --help; --version works; `python -m aigc` works."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer.main

from aigc import __version__
from aigc.cli import app


def _command_paths() -> list[tuple[str, ...]]:
    root = typer.main.get_command(app)
    paths: list[tuple[str, ...]] = []

    def walk(cmd, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))

    walk(root, ())
    return paths


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"aigc {__version__}"


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "aigc")
def test_every_command_has_help(run_cli, path):
    code, out, err = run_cli(*path, "--help")
    assert code == 0, err
    assert "Usage" in out


def test_python_dash_m_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "aigc", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_unknown_command_is_a_usage_error(run_cli):
    code, _, err = run_cli("no-such-command")
    assert code != 0 and "no-such-command" in err
