"""Content store durability and speed, on a SQLite file in a temp folder.

    python bench/bench_store.py            # 8 writers x 250 ratings (threads and processes), paging 10,000
    python bench/bench_store.py --quick    # 4 x 100, paging 2,000

1. Writers: N threads, then N processes, each with its own `Store` (engine + connection pool, as
   separate server workers have), add ratings at once; then exactly N x M rows must be there.
   Peer in the same run: the same inserts through the bare `sqlite3` module (same pragmas, one
   INSERT per transaction), to show what the ORM and the rating summary cost.
2. History paging: newest-first pages of 50 with filters (none, kind, model, text search,
   min rating) through every page; target < 200 ms per page.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

from aigc.feedback.store import Store


def _writer(url: str, w: int, n: int, gids: list[int], start: threading.Barrier | None) -> None:
    store = Store.open(url)
    if start is not None:
        start.wait()
    for i in range(n):
        store.add_rating(gids[i % len(gids)], 1 + (w + i) % 5, "stars", comment=f"{w}:{i}", user=f"w{w}:{i}")
    store.close()


def _proc_writer(url: str, w: int, n: int, gids: list[int], start) -> None:
    store = Store.open(url)
    start.wait()
    for i in range(n):
        store.add_rating(gids[i % len(gids)], 1 + (w + i) % 5, "stars", comment=f"{w}:{i}", user=f"w{w}:{i}")
    store.close()


def _raw_writer(path: str, w: int, n: int, start: threading.Barrier) -> None:
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    con.execute("PRAGMA synchronous=NORMAL")
    start.wait()
    for i in range(n):
        con.execute("BEGIN IMMEDIATE")
        con.execute(
            "INSERT INTO ratings (generation_id, created, kind, value, comment) VALUES (1, ?, 'stars', 3, ?)",
            (time.time(), f"{w}:{i}"),
        )
        con.execute("COMMIT")
    con.close()


def check(url: str, total: int) -> None:
    with Store.open(url) as store, store.engine.connect() as c:
        n, distinct = c.exec_driver_sql("SELECT count(*), count(DISTINCT comment) FROM ratings").one()
    assert n == distinct == total, (n, distinct, total)


def bench_writers(root: Path, writers: int, per: int) -> None:
    total = writers * per
    for mode in ("threads", "processes", "raw sqlite3 threads"):
        path = root / f"{mode.replace(' ', '_')}.db"
        url = f"sqlite:///{path}"
        with Store.open(url) as store:
            gids = [
                store.add_generation(kind="text", model="m@1", prompt=f"p{i}", output_text="o")
                for i in range(5)
            ]
        t0 = time.perf_counter()
        if mode == "processes":
            ctx = mp.get_context("spawn")
            start = ctx.Barrier(writers + 1)
            procs = [
                ctx.Process(target=_proc_writer, args=(url, w, per, gids, start)) for w in range(writers)
            ]
            for p in procs:
                p.start()
            start.wait()  # all open: time the writes only
            t0 = time.perf_counter()
            for p in procs:
                p.join()
            assert all(p.exitcode == 0 for p in procs)
        else:
            start = threading.Barrier(writers)
            if mode == "threads":
                threads = [
                    threading.Thread(target=_writer, args=(url, w, per, gids, start)) for w in range(writers)
                ]
            else:
                threads = [
                    threading.Thread(target=_raw_writer, args=(str(path), w, per, start))
                    for w in range(writers)
                ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        elapsed = time.perf_counter() - t0
        check(url, total)
        print(
            f"{mode:20s} {writers} writers x {per} ratings: {total} rows, none lost or duplicated, "
            f"{elapsed:5.2f} s ({total / elapsed:5.0f} commits/s)",
            flush=True,
        )


def bench_paging(root: Path, n: int) -> None:
    url = f"sqlite:///{root / 'paging.db'}"
    with Store.open(url) as store:
        t0 = time.perf_counter()
        store.add_generations(
            [
                dict(
                    kind=("text", "image", "music")[i % 3],
                    model=f"model{i % 7}@1",
                    prompt=f"prompt {i} " + ("sunset" if i % 11 == 0 else "city"),
                    output_text=f"output {i}",
                    seed=i,
                    params={"temperature": 0.8, "top_p": 0.95, "i": i},
                    created=1.7e9 + i,
                )
                for i in range(n)
            ]
        )
        print(f"inserted {n:,} generations in {time.perf_counter() - t0:.2f} s (one transaction)")
        for g in store.list_generations(kind="text", limit=1000)["data"][::2]:
            store.add_rating(g["id"], 5, "stars")
        for name, filters in [
            ("all", {}),
            ("kind=image", {"kind": "image"}),
            ("model=model3@1", {"model": "model3@1"}),
            ("q=sunset", {"q": "sunset"}),
            ("min_rating=4", {"min_rating": 4}),
        ]:
            times, before = [], None
            while True:
                t0 = time.perf_counter()
                page = store.list_generations(limit=50, before=before, **filters)
                times.append(time.perf_counter() - t0)
                if not page["has_more"]:
                    break
                before = page["last_id"]
            print(
                f"paging {name:15s} {len(times):4d} pages of 50: median {statistics.median(times) * 1000:5.1f} ms, "
                f"slowest {max(times) * 1000:5.1f} ms (target < 200 ms)",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="aigc-bench-store-") as tmp:
        root = Path(tmp)
        if args.quick:
            bench_writers(root, 4, 100)
            bench_paging(root, 2_000)
        else:
            bench_writers(root, 8, 250)
            bench_paging(root, 10_000)


if __name__ == "__main__":
    main()
