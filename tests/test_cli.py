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


def _unescaped_markup(text: str) -> list[str]:
    from rich.markup import RE_TAGS

    return [m.group(0) for m in RE_TAGS.finditer(text) if not m.group(2)]  # group 2: escaping backslashes


@pytest.mark.parametrize("path", [("c2pa",), ("serve",), ("generate", "image"), ("generate", "music")])
def test_help_shows_extras_in_brackets(run_cli, monkeypatch, path):
    """Rich reads `[c2pa]` as markup and drops it ("pip install aigc)") unless it is escaped."""
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(*path, "--help")
    assert code == 0 and "aigc[c2pa]" in out


def test_no_help_text_holds_unescaped_markup():
    root = typer.main.get_command(app)
    found = []

    def walk(cmd, path: tuple[str, ...]) -> None:
        texts = [cmd.help or "", cmd.short_help or "", *(getattr(p, "help", None) or "" for p in cmd.params)]
        found.extend((" ".join(path), tag) for t in texts for tag in _unescaped_markup(t))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))

    walk(root, ())
    assert not found, f"escape these for rich (\\[...]): {found}"


def test_models_on_a_missing_folder_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("models", tmp_path / "nope")
    assert code == 1 and "nope not found" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "a-file").write_text("")
    code, _, err = run_cli("models", tmp_path / "a-file")
    assert code == 1 and "is not a directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("models", tmp_path / "empty")
    assert code == 0 and "no trained models" in err


def test_serve_on_a_port_in_use_is_one_line(run_cli, tmp_path):
    import socket

    (tmp_path / "models").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli("serve", "--models", tmp_path / "models", "--port", port,
                                 "--db", tmp_path / "store" / "aigc.db")  # fmt: skip
    assert code == 1 and err.strip() == f"error: port {port} on 127.0.0.1 is in use; pick another with --port"
    assert out == "" and not (tmp_path / "store").exists()  # failed before the store was opened
    code, _, err = run_cli("serve", "--models", tmp_path / "models", "--port", "70000")
    assert code == 1 and "--port 70000 is out of range; allowed: 0..65535" in err
