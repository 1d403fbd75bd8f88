"""Cost of moderating text with the default rules: `Moderator.check` and a stream's `StreamGuard`.

The peer, in the same process, is the check without its quick screen: every category's own
pattern searched, as `check` did before the screen (`Moderator._patterns`, which it still uses
to name the categories and phrases once the screen finds something). Text: Tiny Shakespeare when
the shared data is there, else this repository's Python source.

    python bench/bench_moderation.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from aigc.safety.moderation import Moderator, StreamGuard, _fold, normalize


def corpus() -> str:
    root = Path(os.environ.get("AIGC_DATA_PATH", "/work/shared/data"))
    path = root / "text" / "tinyshakespeare.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    src = Path(__file__).resolve().parents[1] / "src" / "aigc"
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(src.rglob("*.py")))


def best(fn, repeat: int, number: int) -> float:
    """Best of `repeat` timings of `number` calls -> seconds per call."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return min(times)


def category_patterns(m: Moderator, t: str) -> bool:
    """The peer: each category's pattern searched, as `check` did before the screen."""
    return any(p is not None and m.policies[n] != "allow" and p.search(t) for n, p in m._patterns.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    m = Moderator.load()
    text = corpus()
    # spans with no match, as most generated text is (the rules would stop at the first match)
    spans = {}
    for n in (55, 1000, 4000):
        start = 0
        while m.check(text[start : start + n]).flagged:
            start += n
        spans[n] = text[start : start + n]
    print(
        f"default rules ({len(m.categories)} categories), text spans without a match, best of {args.repeat}"
    )
    print(f"{'characters':>10}  {'category patterns':>18}  {'screen (check)':>15}  {'check()':>9}  ratio")
    for n, span in spans.items():
        t = normalize(span)
        number = max(20, 20_000 // n)
        old = best(lambda t=t: category_patterns(m, t), args.repeat, number)
        new = best(lambda t=t: any(p.search(f) for f in [_fold(t)] for p in m._screen), args.repeat, number)
        full = best(lambda span=span, t=t: m.check(span, t), args.repeat, number)
        print(
            f"{n:>10}  {old * 1e6:>15.1f} us  {new * 1e6:>12.1f} us  {full * 1e6:>6.1f} us  {old / new:.1f}x"
        )
    # a 48-token reply streamed in 4-character deltas, then finished (what a served stream does)
    reply = spans[4000][:192]

    def stream() -> None:
        g = StreamGuard(m)
        for i in range(0, len(reply), 4):
            g.feed(reply[i : i + 4])
        g.finish(reply)

    per = best(stream, args.repeat, 50)
    print(f"a {len(reply)}-character stream in 4-character deltas + finish: {per * 1e6:.0f} us "
          f"({per / (len(reply) // 4) * 1e6:.1f} us per delta)")  # fmt: skip


if __name__ == "__main__":
    main()
