"""Run every benchmark (or those named): `python -m bench [generate unet_train ...]`.

Each benchmark is a script `bench/bench_<name>.py` that measures our code and its peer side by side in
one process and prints the ratio; record results in docs/benchmarks.md with the command and machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main(names: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        wanted = {n.removeprefix("bench_").removesuffix(".py") for n in names}
        unknown = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            valid = ", ".join(s.stem.removeprefix("bench_") for s in scripts)
            print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; valid: {valid}", file=sys.stderr)
            return 1
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    failed = 0
    for script in scripts:
        print(f"=== {script.stem}", flush=True)
        failed += subprocess.call([sys.executable, str(script)]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
