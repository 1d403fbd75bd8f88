"""`make lint` is part of the contract: the code base passes the pinned ruff's checks and format."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (it comes with the dev extra: make test)")
@pytest.mark.parametrize("args", [["check", "--output-format", "concise"], ["format", "--check"]])
def test_ruff_is_clean(args):
    res = subprocess.run([RUFF, *args, "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, f"ruff {args[0]} found problems (run `make format`):\n{res.stdout[-3000:]}"
