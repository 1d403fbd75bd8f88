"""The content store over HTTP: every generation recorded, history, ratings, comparisons, export,
start-up failures, lock timeouts (503) and durability (concurrent writers, SIGKILL).

Each test asserts the HTTP answer and the row the store holds afterwards (read back with a second
`Store` on the same file, as another process would)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aigc.errors import AigcError
from aigc.feedback.blobs import Blobs
from aigc.feedback.store import Store
from aigc.serve.app import create_app
from aigc.serve.auth import hash_key
from aigc.serve.settings import Settings
from serve_helpers import LiveServer, write_image_run, write_text_run

KEY = "store-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_text_run(root / "tiny")
    write_text_run(root / "story" / "1", seed=1)
    write_image_run(root / "pix")
    return root


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def client(root, db, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(hash_key(KEY) + "\n")
    settings = Settings(models_dirs=[root], api_keys_file=keys, db=str(db), outputs_dir=tmp_path / "outputs")
    with TestClient(create_app(settings), headers=AUTH) as c:
        yield c


def stored(db: Path, gid: int) -> dict:
    with Store.open(str(db)) as s:
        return s.get_generation(gid)


def weights_hash(run: Path) -> str:
    return hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- recording


def test_completion_is_recorded(client, db, root):
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 8, "n": 2, "seed": 7, "temperature": 0.9}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = out["generation_ids"]
    assert len(ids) == 2 and ids[0] != ids[1]
    for choice, gid in zip(out["choices"], ids, strict=True):
        row = stored(db, gid)
        assert row["kind"] == "text" and row["model"] == "tiny" and row["prompt"] == "ROMEO:"
        assert row["output_text"] == choice["text"] and row["seed"] == choice["seed"]
        assert row["params"]["temperature"] == 0.9 and row["params"]["max_new_tokens"] == 8
        assert row["model_hash"] == weights_hash(root / "tiny") and row["duration"] > 0
    assert stored(db, ids[1])["seed"] == 8  # sample k uses seed + k


def test_versioned_model_and_chat_are_recorded(client, db, root):
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "story",
            "messages": [{"role": "user", "content": "soft"}],
            "max_tokens": 6,
            "seed": 3,
        },
    )
    assert r.status_code == 200, r.text
    [gid] = r.json()["generation_ids"]
    row = stored(db, gid)
    assert row["model"] == "story@1" and row["model_hash"] == weights_hash(root / "story" / "1")
    assert row["output_text"] == r.json()["choices"][0]["message"]["content"]
    assert (
        row["params"]["messages"] == [{"role": "user", "content": "soft"}] and "User: soft" in row["prompt"]
    )


def test_streamed_completion_is_recorded(client, db):
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 8, "seed": 1, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    chunks = [json.loads(ln[6:]) for ln in lines]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    [last] = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    row = stored(db, last["choices"][0]["generation_id"])
    assert row["output_text"] == text and row["seed"] == 1


def test_image_is_recorded_with_its_png(client, db, tmp_path):
    r = client.post("/v1/images/generations", json={"model": "pix", "n": 2, "seed": 4, "steps": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    for item, gid in zip(out["data"], out["generation_ids"], strict=True):
        png = base64.b64decode(item["b64_json"])
        row = stored(db, gid)
        assert row["kind"] == "image" and row["output_text"] is None and row["params"]["steps"] == 2
        assert row["output_ref"] == hashlib.sha256(png).hexdigest() + ".png"
        assert Blobs(tmp_path / "outputs").get(row["output_ref"]) == png  # in the blob folder, not the DB
        got = client.get(f"/v1/outputs/{row['output_ref']}")
        assert got.status_code == 200 and got.content == png and got.headers["content-type"] == "image/png"
    assert client.get("/v1/outputs/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
    assert client.get("/v1/outputs/" + "0" * 64 + ".png").status_code == 404


def test_image_job_is_recorded(client, db):
    job = client.post(
        "/v1/jobs",
        json={"type": "images.generations", "input": {"model": "pix", "n": 2, "seed": 3, "steps": 2}},
    ).json()
    deadline = time.monotonic() + 60
    while (view := client.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert view["status"] == "succeeded", view
    for item in view["result"]["data"]:
        row = stored(db, item["generation_id"])
        png = base64.b64decode(item["b64_json"])
        assert row["kind"] == "image" and row["seed"] == item["seed"]
        assert row["output_ref"] == hashlib.sha256(png).hexdigest() + ".png"


# ----------------------------------------------------------------------------- history


def seed_rows(db: Path) -> list[int]:
    with Store.open(str(db)) as s:
        return s.add_generations(
            [
                dict(kind="text", model="a@1", prompt=f"prompt {i}", output_text=f"out {i}", seed=i)
                for i in range(5)
            ]
            + [dict(kind="image", model="pix", prompt="cat", output_ref="ab" * 32 + ".png", seed=9)]
        )


def test_generations_list_filters_and_paging(client, db):
    ids = seed_rows(db)
    page = client.get("/v1/generations", params={"limit": 2}).json()
    assert page["object"] == "list" and [g["id"] for g in page["data"]] == [ids[5], ids[4]]
    assert page["has_more"] and page["last_id"] == ids[4]
    nxt = client.get("/v1/generations", params={"limit": 2, "before": page["last_id"]}).json()
    assert [g["id"] for g in nxt["data"]] == [ids[3], ids[2]]
    assert [g["id"] for g in client.get("/v1/generations?kind=image").json()["data"]] == [ids[5]]
    assert len(client.get("/v1/generations?model=a@1").json()["data"]) == 5
    assert [g["id"] for g in client.get("/v1/generations", params={"q": "OUT 3"}).json()["data"]] == [ids[3]]
    client.post("/v1/ratings", json={"generation_id": ids[1], "value": 4, "kind": "stars"})
    rated = client.get("/v1/generations?min_rating=4").json()["data"]
    assert [(g["id"], g["rating"], g["rating_count"]) for g in rated] == [(ids[1], 4.0, 1)]
    one = client.get(f"/v1/generations/{ids[0]}")
    assert one.status_code == 200 and one.json()["prompt"] == "prompt 0"
    missing = client.get("/v1/generations/999999")
    assert missing.status_code == 404 and "999999" in missing.json()["detail"]
    assert client.get("/v1/generations?limit=0").status_code == 400
    assert client.get("/v1/generations?kind=video").status_code == 422


def test_feedback_routes_need_the_key(client):
    for path in ("/v1/generations", "/v1/ratings", "/v1/feedback/export?format=dpo"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 401
    r = client.post(
        "/v1/ratings", json={"generation_id": 1, "value": 1}, headers={"Authorization": "Bearer no"}
    )
    assert r.status_code == 401


# ----------------------------------------------------------------------------- ratings, comparisons, export


def test_ratings(client, db):
    [gid, *_] = seed_rows(db)
    r = client.post(
        "/v1/ratings", json={"generation_id": gid, "value": -1, "kind": "thumb", "comment": "meh"}
    )
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    with Store.open(str(db)) as s:
        [row] = s.list_ratings(generation_id=gid)["data"]
        assert row["id"] == rid and row["value"] == -1 and row["comment"] == "meh"
        assert row["user"] == hash_key(KEY)  # who rated: the key's hash, never the key
        assert s.get_generation(gid)["rating"] == 1.0  # thumb down = 1 star
    listed = client.get("/v1/ratings", params={"limit": 1}).json()
    assert listed["object"] == "list" and listed["data"][0]["id"] == rid

    unknown = client.post("/v1/ratings", json={"generation_id": 424242, "value": 1})
    assert unknown.status_code == 404 and "424242" in unknown.json()["detail"]
    for bad in ({"value": 0}, {"value": 2}, {"value": 6, "kind": "stars"}, {"value": 0, "kind": "stars"}):
        r = client.post("/v1/ratings", json={"generation_id": gid, **bad})
        assert r.status_code == 400 and "rating must be" in r.json()["detail"], (bad, r.text)
    assert (
        client.post("/v1/ratings", json={"generation_id": gid, "value": 1, "kind": "emoji"}).status_code
        == 422
    )
    assert client.get("/v1/ratings?limit=1001").status_code == 400
    with Store.open(str(db)) as s:
        assert len(s.list_ratings(generation_id=gid)["data"]) == 1  # refused ones wrote nothing


def test_rating_again_replaces_and_rows_show_my_rating(client, db):
    [gid, other, *_] = seed_rows(db)
    with Store.open(str(db)) as s:
        s.add_rating(gid, 1, "stars", user="someone else")
    ids = []
    for visit in range(5):  # five visits, five star clicks: one rating, the latest value
        r = client.post("/v1/ratings", json={"generation_id": gid, "value": 5 - visit % 2, "kind": "stars"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["replaced"] is (visit > 0) and body["rating_count"] == 2
        assert body["object"] == "rating" and body["value"] == 5 - visit % 2
        ids.append(body["id"])
    assert len(set(ids)) == 1
    assert body["rating"] == pytest.approx((5 + 1) / 2)
    for _ in range(3):  # "Regenerate with feedback" pressed three times: one thumbs-down
        client.post("/v1/ratings", json={"generation_id": gid, "value": -1, "comment": "too gloomy"})
    with Store.open(str(db)) as s:
        mine = [r for r in s.list_ratings(generation_id=gid)["data"] if r["user"] == hash_key(KEY)]
        assert sorted((r["kind"], r["value"]) for r in mine) == [("stars", 5), ("thumb", -1)]
        assert s.get_generation(gid)["rating_count"] == 3
    # list and get show the caller's own rating (none on a generation they did not rate)
    one = client.get(f"/v1/generations/{gid}").json()
    assert one["my_rating"] == {"stars": 5, "thumb": -1} and one["rating_count"] == 3
    listed = {g["id"]: g["my_rating"] for g in client.get("/v1/generations").json()["data"]}
    assert listed[gid] == {"stars": 5, "thumb": -1} and listed[other] == {"stars": None, "thumb": None}


def test_comparisons_and_export(client, db):
    a, b, *_ = seed_rows(db)
    r = client.post("/v1/comparisons", json={"a": a, "b": b, "winner": b})
    assert r.status_code == 200, r.text
    with Store.open(str(db)) as s:
        [row] = s.list_comparisons()["data"]
        assert (row["a"], row["b"], row["winner"]) == (a, b, b)
    assert client.post("/v1/comparisons", json={"a": a, "b": b, "winner": 3}).status_code == 400
    assert client.post("/v1/comparisons", json={"a": a, "b": 777777, "winner": a}).status_code == 404
    assert client.get("/v1/comparisons").json()["data"][0]["winner"] == b

    # seed_rows gave every generation its own prompt: a comparison only makes a DPO pair
    # when both share one, so rate two of the same prompt instead through a fresh pair
    with Store.open(str(db)) as s:
        x, y = s.add_generations(
            [dict(kind="text", model="m", prompt="P", output_text=t) for t in ("good", "bad")]
        )
    client.post("/v1/comparisons", json={"a": x, "b": y, "winner": x})
    client.post("/v1/ratings", json={"generation_id": x, "value": 1})
    client.post("/v1/ratings", json={"generation_id": y, "value": -1})
    dpo = client.get("/v1/feedback/export?format=dpo")
    assert dpo.status_code == 200 and dpo.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(ln) for ln in dpo.text.splitlines()]
    assert {"prompt": "P", "chosen": "good", "rejected": "bad"} in rows
    kto = [json.loads(ln) for ln in client.get("/v1/feedback/export?format=kto").text.splitlines()]
    assert {"prompt": "P", "completion": "good", "label": True} in kto
    assert {"prompt": "P", "completion": "bad", "label": False} in kto
    with Store.open(str(db)) as s:
        assert rows == s.export_feedback("dpo")  # the route is the library's export, as JSONL
    assert client.get("/v1/feedback/export?format=csv").status_code == 422


# ----------------------------------------------------------------------------- start-up and locks


def test_unwritable_store_fails_at_start(root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # its "subfolder" cannot be created, not even by root
    with pytest.raises(AigcError, match="cannot create the store's folder"):
        create_app(Settings(models_dirs=[root], db=str(blocker / "aigc.db")))
    ro = tmp_path / "ro"
    ro.mkdir()
    Store.open(str(ro / "a.db")).close()
    os.chmod(ro / "a.db", 0o444)
    os.chmod(ro, 0o555)
    try:
        if not os.access(ro / "a.db", os.W_OK):  # (root writes anyway)
            with pytest.raises(AigcError, match="cannot open the store"):
                create_app(Settings(models_dirs=[root], db=str(ro / "a.db")))
    finally:
        os.chmod(ro, 0o755)


def test_locked_store_fails_at_start(root, tmp_path):
    locked = tmp_path / "locked.db"
    Store.open(str(locked)).close()
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
    try:
        with pytest.raises(AigcError, match="locked"):
            create_app(Settings(models_dirs=[root], db=str(locked), store_lock_timeout_s=0.2))
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_lock_timeout_is_503(root, tmp_path):
    db = tmp_path / "busy.db"
    with TestClient(create_app(Settings(models_dirs=[root], db=str(db), store_lock_timeout_s=0.2))) as c:
        [gid] = seed_rows(db)[:1]
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # a long write elsewhere
        try:
            r = c.post("/v1/ratings", json={"generation_id": gid, "value": 1})
            assert r.status_code == 503 and r.headers["retry-after"] and "busy" in r.json()["detail"]
            g = c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
            assert g.status_code == 503  # a generation that cannot be recorded is not answered as done
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert c.post("/v1/ratings", json={"generation_id": gid, "value": 1}).status_code == 200


# ----------------------------------------------------------------------------- durability


@pytest.mark.slow
def test_concurrent_writers_through_http(root, tmp_path):
    """8 raters (API keys) at once through a live server, 250 ratings each: a thumbs-down on each of
    125 generations, then a second vote on each -> exactly 1,000 rows: every second vote replaced
    the rater's first (same id), none lost or doubled, every summary that of the second votes."""
    import httpx

    db = tmp_path / "many.db"
    keys = [f"rater-{w}-key-0123456789" for w in range(8)]
    key_file = tmp_path / "keys.txt"
    key_file.write_text("".join(hash_key(k) + "\n" for k in keys))
    with Store.open(str(db)) as s:
        gids = s.add_generations(
            [dict(kind="text", model="m", prompt="p", output_text=f"o{i}") for i in range(125)]
        )
    second = lambda w: 1 if w < 6 else -1  # noqa: E731 - 6 of 8 raters change their mind
    with LiveServer(create_app(Settings(models_dirs=[root], db=str(db), api_keys_file=key_file))) as live:
        errors: list[str] = []
        acked: list[list[tuple[int, bool]]] = [[] for _ in range(8)]

        def writer(w: int) -> None:
            with httpx.Client(
                base_url=live.url, timeout=60, headers={"Authorization": f"Bearer {keys[w]}"}
            ) as http:
                for vote, value in enumerate((-1, second(w))):
                    for gid in gids:
                        body = {"generation_id": gid, "value": value, "comment": f"{w}:{gid}:{vote}"}
                        r = http.post("/v1/ratings", json=body)
                        if r.status_code != 200:
                            errors.append(r.text)
                            return
                        acked[w].append((r.json()["id"], r.json()["replaced"]))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        dt = time.perf_counter() - t0
    assert not errors, errors[:3]
    with Store.open(str(db)) as s:
        page = s.list_ratings(limit=1000)
        rows, summaries = page["data"], [s.get_generation(g) for g in gids]
    assert len(rows) == 1000 and not page["has_more"]
    assert sorted(r["comment"] for r in rows) == sorted(f"{w}:{g}:1" for w in range(8) for g in gids)
    assert {(r["user"], r["generation_id"]) for r in rows} == {(hash_key(k), g) for k in keys for g in gids}
    for w in range(8):
        first, again = acked[w][:125], acked[w][125:]
        assert [i for i, _ in first] == [i for i, _ in again]  # the same rows, replaced
        assert not any(r for _, r in first) and all(r for _, r in again)
    assert len({i for a in acked for i, _ in a}) == 1000
    assert all(
        g["rating_count"] == 8 and g["rating"] == pytest.approx((6 * 5 + 2 * 1) / 8) for g in summaries
    )
    print(f"\n2000 ratings from 8 HTTP writers in {dt:.2f} s ({2000 / dt:.0f}/s)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_rating(tmp_path):
    """A server killed with SIGKILL mid-run keeps every rating it answered 200 for."""
    import httpx

    db, models = tmp_path / "kill.db", tmp_path / "models"
    models.mkdir()
    with Store.open(str(db)) as s:  # a generation per request: one rater (the host) rates each once
        gids = s.add_generations([dict(kind="text", model="m", prompt="p", output_text="o")] * 4000)
    port = _free_port()
    env = {**os.environ, "AIGC_HOME": str(tmp_path / "home")}
    cmd = [
        sys.executable,
        "-m",
        "aigc",
        "serve",
        "--models",
        str(models),
        "--db",
        str(db),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    acked: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        stop = threading.Event()

        def writer(w: int) -> None:
            with httpx.Client(base_url=url, timeout=10) as http:
                i = 0
                while not stop.is_set() and i < 1000:
                    comment = f"{w}:{i}"
                    gid = gids[w * 1000 + i]
                    try:
                        r = http.post(
                            "/v1/ratings", json={"generation_id": gid, "value": 1, "comment": comment}
                        )
                    except httpx.HTTPError:
                        return  # the server died: this request was never acknowledged
                    if r.status_code == 200:
                        acked.append((r.json()["id"], comment))
                    i += 1

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: writers are still sending
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) >= 300
    with Store.open(str(db)) as s:
        have = {}
        before = None
        while True:
            page = s.list_ratings(limit=1000, before=before)
            have.update({r["id"]: r["comment"] for r in page["data"]})
            if not page["has_more"]:
                break
            before = page["last_id"]
    assert all(have.get(rid) == comment for rid, comment in acked)  # every acknowledged one survived
    assert len(have) >= len(acked)  # (one may have committed with its answer lost in the kill)


# ----------------------------------------------------------------------------- CLI and studio


def test_cli_generate_record_and_serve_db_option(run_cli, root, tmp_path):
    db = tmp_path / "cli.db"
    code, out, err = run_cli(
        "generate", "text", "--model", root / "tiny", "--prompt", "ROMEO:", "--max-new-tokens", "5",
        "--seed", "3", "--no-echo", "--record", "--db", db,
    )  # fmt: skip
    assert code == 0, err
    assert "recorded as generation 1" in err
    row = stored(db, 1)
    assert row["prompt"] == "ROMEO:" and row["seed"] == 3 and row["output_text"] == out.rstrip("\n")
    code, out, _ = run_cli("serve", "--help")
    assert code == 0 and "--db" in out
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # fails before it serves (--port 0: whatever else listens on 8000 here)
    code, _, err = run_cli("serve", "--models", root, "--db", blocker / "aigc.db", "--port", "0")
    assert code == 1 and "cannot create the store's folder" in err and "Traceback" not in err


def test_studio_is_served_offline(client):
    import re

    # offline: nothing is fetched from another host (the SVG namespace is a name, not a fetch)
    remote = re.compile(r"https?://(?!www\.w3\.org/2000/svg\b)|//cdn|@import")
    page = client.get("/", headers={"Authorization": ""})  # the page holds no data: no key needed
    assert page.status_code == 200 and "<title>" in page.text and "ui/app.js" in page.text
    assert not remote.search(page.text)
    for asset in ("/ui/app.js", "/ui/style.css"):
        r = client.get(asset, headers={"Authorization": ""})
        assert r.status_code == 200 and len(r.text) > 100
        assert not remote.search(r.text), (asset, remote.search(r.text))


def test_history_pages_fast_with_10k_generations(client, db):
    """The studio's history: 10,000 generations, every page (filtered or not) well under 200 ms."""
    with Store.open(str(db)) as s:
        s.add_generations(
            [
                dict(
                    kind="text" if i % 3 else "image",
                    model=f"m@{i % 4}",
                    prompt=f"prompt {i}",
                    output_text=f"text {i}" if i % 3 else None,
                    output_ref=None if i % 3 else "ab" * 32 + ".png",
                )
                for i in range(10_000)
            ]  # fmt: skip
        )
    times, before, pages = [], None, 0
    for query in ({}, {"kind": "text", "model": "m@1"}, {"q": "prompt 99"}):
        before = None
        for _ in range(5):
            t0 = time.perf_counter()
            page = client.get(
                "/v1/generations", params={**query, "limit": 50, **({"before": before} if before else {})}
            )
            times.append(time.perf_counter() - t0)
            assert page.status_code == 200
            body = page.json()
            pages += 1
            if not body["has_more"]:
                break
            before = body["last_id"]
    times.sort()
    print(f"\nhistory: {pages} pages of 50 over 10,000 generations, median {times[len(times) // 2] * 1e3:.1f} ms, "
          f"max {times[-1] * 1e3:.1f} ms")  # fmt: skip
    assert times[len(times) // 2] < 0.2
