"""Shared fixtures. Tests are tiny, hermetic and CPU-only; real data sets are optional."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """The real data sets folder (../shared/data or AIGC_DATA_PATH), or None when absent."""
    for candidate in [
        *os.environ.get("AIGC_DATA_PATH", "").split(os.pathsep),
        str(REPO.parent / "shared" / "data"),
    ]:
        if candidate and (Path(candidate) / "text" / "tinyshakespeare.txt").is_file():
            return Path(candidate)
    return None


@pytest.fixture
def data_root() -> Path:
    root = shared_data()
    if root is None:
        pytest.skip("real data sets not found: set AIGC_DATA_PATH to the shared data folder (see README)")
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny models, which run fastest on one intra-op thread; with two, a test slows down
    by orders of magnitude when other processes share the cores (CI machines, parallel jobs)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _hermetic(tmp_path, monkeypatch):
    """Keep every test away from the user's home and the network."""
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "aigc-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture
def run_cli():
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    import contextlib
    import io

    from aigc.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return code, stdout.getvalue(), stderr.getvalue()

    return run


# ---------------------------------------------------------------------------- browser tests
# Playwright (Python) driving Debian's chromium headless; never `playwright install`. The flags are
# what this machine's closed network needs (no background connections, no QUIC).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    """A headless chromium for one test module; skips when chromium or playwright is absent."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed: apt-get install -y chromium (.ci/run does it)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright not installed: pip install 'aigc[dev]'"
    )
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def default_sigint():
    """SIGINT handled as in a terminal (KeyboardInterrupt), whatever the test run was started with: a
    job started in the background by a shell without job control (a CI runner) ignores SIGINT."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
