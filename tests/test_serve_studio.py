"""The studio's server side: presets, model details, data sets, training jobs, comparison win rates.

Each test asserts the HTTP answer and, where something is written, the store row or the files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aigc.feedback.store import Store
from aigc.serve.app import create_app
from aigc.serve.auth import hash_key
from aigc.serve.settings import Settings
from serve_helpers import write_text_run

KEY, OTHER = "studio-key", "other-key"
AUTH, AUTH2 = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER}"}
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(300))
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=4",
        "train.eval_batches=2", "train.eval_interval=10", "train.log_interval=1", "train.peak_flops=1e9",
        "sample.num=1", "sample.tokens=5"]  # fmt: skip


@pytest.fixture
def setup(tmp_path):
    """Models (tiny, story@1, story@2 with card/metrics/eval report), a prepared data set under
    $AIGC_HOME/data, two API keys."""
    from aigc.data import prepare_text

    root = tmp_path / "models"
    write_text_run(root / "tiny")
    write_text_run(root / "story" / "1", seed=1)
    run = write_text_run(root / "story" / "2", seed=2)
    cfg = json.loads((run / "config.json").read_text())  # host paths, as training records them: not shown
    cfg["data"] = {"source": "/secret/path/corpus.txt", "path": "/secret/path/data", "tokenizer": "char"}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "card.md").write_text(
        "# story v2\n\nTrained on <script>alert(1)</script> data.\n", encoding="utf-8"
    )
    rows = [
        {"kind": "train", "step": s, "loss": 4.0 - s / 1000, "lr": 1e-3, "time": s / 10}
        for s in range(1, 1201)
    ]
    rows += [
        {"kind": "eval", "step": s, "val_loss": 4.2 - s / 1000, "time": s / 10} for s in (400, 800, 1200)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    (run / "eval").mkdir()
    report = {"kind": "text", "protocol": {"samples": 50, "seed": 0}, "run": str(run), "data": "/secret/path",
              "model": {"val_loss": 3.1, "distinct_2": 0.5, "copies": {"nested": 1}},
              "real": {"distinct_2": 0.6}, "warnings": ["n capped"]}  # fmt: skip
    (run / "eval" / "report.json").write_text(json.dumps(report))
    home = Path(os.environ["AIGC_HOME"])
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare_text(str(src), home / "data" / "lines")
    (home / "data" / "not-prepared").mkdir()  # no meta.json: not listed
    keys = tmp_path / "keys.txt"
    keys.write_text(hash_key(KEY) + "\n" + hash_key(OTHER) + "\n")
    extra = tmp_path / "more-data"
    prepare_text(str(src), extra / "extra")
    settings = Settings(models_dirs=[root], api_keys_file=keys, db=str(tmp_path / "aigc.db"),
                        outputs_dir=tmp_path / "out", data_dirs=[extra], max_train_time_s=120)  # fmt: skip
    return settings, root, tmp_path


@pytest.fixture
def client(setup):
    settings, _, _ = setup
    with TestClient(create_app(settings), headers=AUTH) as c:
        yield c


# ----------------------------------------------------------------------------- presets


def test_presets_save_list_replace_delete_per_key(client, setup):
    r = client.post(
        "/v1/presets", json={"kind": "text", "name": "warm", "params": {"temperature": 1.2, "top_k": 40}}
    )
    assert r.status_code == 200, r.text
    pid = r.json()["id"]
    r = client.post("/v1/presets", json={"kind": "text", "name": "warm", "params": {"temperature": 0.9}})
    assert r.json()["id"] == pid and r.json()["params"] == {"temperature": 0.9}  # replaced
    client.post(
        "/v1/presets", json={"kind": "image", "name": "fast", "params": {"steps": 4, "sampler": "ddim"}}
    )
    assert [p["name"] for p in client.get("/v1/presets", params={"kind": "text"}).json()["data"]] == ["warm"]
    assert len(client.get("/v1/presets").json()["data"]) == 2
    # another key sees none of them and cannot delete them
    assert client.get("/v1/presets", headers=AUTH2).json()["data"] == []
    assert client.delete(f"/v1/presets/{pid}", headers=AUTH2).status_code == 404
    # the row in the store belongs to the key's hash
    with Store.open(setup[0].db) as s:
        assert [p["params"] for p in s.list_presets(hash_key(KEY), "text")["data"]] == [{"temperature": 0.9}]
    r = client.delete(f"/v1/presets/{pid}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert client.delete(f"/v1/presets/{pid}").status_code == 404
    assert [p["name"] for p in client.get("/v1/presets").json()["data"]] == ["fast"]


def test_presets_bad_input(client):
    r = client.post("/v1/presets", json={"kind": "video", "name": "x", "params": {}})
    assert r.status_code == 422 and "kind" in r.json()["detail"]
    r = client.post("/v1/presets", json={"kind": "text", "name": "x" * 65, "params": {}})
    assert r.status_code == 400 and "name" in r.json()["detail"]
    r = client.post("/v1/presets", json={"kind": "text", "name": "x", "params": {"a": {"nested": 1}}})
    assert r.status_code == 422
    r = client.post("/v1/presets", json={"kind": "text", "name": "x", "params": {"a": "y" * 30_000}})
    assert r.status_code == 400 and "at most 20000" in r.json()["detail"]
    assert TestClient(client.app).get("/v1/presets").status_code == 401  # no key


# ----------------------------------------------------------------------------- model details


def test_model_details_hides_host_paths_of_an_old_card(client, setup):
    """A card written before cards kept host paths out: the details show their last parts only."""
    _, root, _ = setup
    old = {"family": "gpt", "data": {"path": "/secret/path/data", "tokenizer": {"kind": "char"}},
           "init_from": "/home/ann/runs/base", "sample": {"prompt": "ROMEO:"}}  # fmt: skip
    (root / "story" / "1" / "card.md").write_text(
        "# gpt model card\n\n## Data\n\n- prepared data: `/secret/path/data` (source: tiny)\n"
        "- tuned from `/home/ann/runs/base` (story@1) with DPO\n\n## Samples\n\n- [a.txt](samples/a.txt)\n\n"
        "## Config\n\n```json\n" + json.dumps(old, indent=2) + "\n```\n",
        encoding="utf-8",
    )
    card = client.get("/v1/models/story@1/details").json()["card"]
    assert "/secret" not in card and "/home/ann" not in card
    assert (
        "prepared data: `data`" in card and "tuned from `base`" in card and "[a.txt](samples/a.txt)" in card
    )
    assert '"path": "data"' in card and '"init_from": "base"' in card and '"prompt": "ROMEO:"' in card


def test_model_details(client, setup):
    _, root, tmp = setup
    d = client.get("/v1/models/story@2/details").json()
    assert (d["id"], d["name"], d["version"], d["kind"], d["family"]) == (
        "story@2",
        "story",
        "2",
        "text",
        "gpt",
    )
    assert d["versions"] == ["story@1", "story@2"] and d["recorded_as"] == "story@2"
    assert "<script>" in d["card"] and not d["card_truncated"]  # raw text: the page escapes it
    m = d["metrics"]
    assert len(m["train"]) == 500 and m["train"][0] == [1, pytest.approx(3.999)]  # first and last kept
    assert m["train"][-1] == [1200, pytest.approx(4.0 - 1.2)] and m["eval"] == [
        [400, pytest.approx(3.8)], [800, pytest.approx(3.4)], [1200, pytest.approx(3.0)],
    ]  # fmt: skip
    steps = [p[0] for p in m["train"]]
    assert steps == sorted(steps) and len(set(steps)) == 500
    assert m["last_train"]["step"] == 1200 and m["last_eval"]["val_loss"] == pytest.approx(3.0)
    assert m["rows"] == 1203  # the broken line is skipped
    ev = d["eval_report"]
    assert ev == {"kind": "text", "samples": 50, "model": {"val_loss": 3.1, "distinct_2": 0.5},
                  "real": {"distinct_2": 0.6}, "warnings": ["n capped"]}  # fmt: skip
    assert "/secret/path" not in json.dumps(d) and str(root) not in json.dumps(d)
    # plain name = newest version; a run with no card/metrics has empty ones
    assert client.get("/v1/models/story/details").json()["id"] == "story@2"
    t = client.get("/v1/models/tiny/details").json()
    assert t["card"] is None and t["metrics"]["train"] == [] and t["eval_report"] is None
    assert t["config"]["model"]["n_embd"] == 16
    # a card that is a symlink out of the run dir is not read
    secret = tmp / "secret.md"
    secret.write_text("top secret")
    (root / "tiny" / "card.md").symlink_to(secret)
    assert client.get("/v1/models/tiny/details").json()["card"] is None
    r = client.get("/v1/models/nope/details")
    assert r.status_code == 404 and "available" in r.json()["detail"]


# ----------------------------------------------------------------------------- data sets, train: bad input


def test_datasets_listing(client):
    page = client.get("/v1/datasets").json()
    assert page["object"] == "list"
    by = {d["id"]: d for d in page["data"]}
    assert set(by) == {"lines", "extra"}  # $AIGC_HOME/data and --data-dir; no meta.json: skipped
    assert by["lines"]["kind"] == "text" and by["lines"]["train_tokens"] > 0
    assert list(by["lines"]["families"]) == ["gpt", "lstm"]
    assert by["lines"]["families"]["gpt"][0] == "auto" and "tiny" in by["lines"]["families"]["gpt"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"family": "gpt", "data": "nope"}, 404, ["data set 'nope' not found", "lines", "aigc data prepare"]),
        ({"family": "gpt", "data": "../lines"}, 404, ["not found"]),  # names are looked up, never joined
        ({"family": "transformer", "data": "lines"}, 400, ["unknown family", "gpt, lstm", "diffusion"]),
        ({"family": "diffusion", "data": "lines"}, 400, ["holds text data", "gpt, lstm"]),
        ({"family": "gpt", "data": "lines", "preset": "/etc/passwd"}, 400, ["valid presets: auto, base"]),
        (
            {"family": "gpt", "data": "lines", "set": ["data.path=/etc"]},
            400,
            ["section model, train or sample"],
        ),
        ({"family": "gpt", "data": "lines", "max_time": 500}, 400, ["cap of 120 s"]),
        ({"family": "gpt", "data": "lines", "max_steps": 0}, 400, ["max_steps"]),
        ({"family": "gpt", "data": "lines", "name": "../x"}, 422, ["name"]),
        ({"family": "gpt", "data": "lines", "name": "tiny"}, 409, ["already exists as an unversioned run"]),
        ({"family": "gpt", "data": "lines", "gpu": True}, 422, ["unknown field 'gpu'"]),
    ],
)
def test_train_bad_input(client, setup, body, status, words):
    r = client.post("/v1/train", json={"name": "fresh", **body})
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["detail"]
    with Store.open(setup[0].db) as s:
        assert s.list_jobs(kind="train")["data"] == []  # nothing started
    assert not list(setup[1].glob(".train-*"))


# ----------------------------------------------------------------------------- train: real runs


def wait_for(client, job_id, cond, timeout=120.0, headers=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = client.get(f"/v1/train/{job_id}", headers=headers).json()
        if cond(v):
            return v
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there: {v}")


@pytest.mark.slow
def test_train_job_runs_publishes_a_version_and_is_private(client, setup):
    settings, root, _ = setup
    body = {"family": "gpt", "data": "lines", "name": "fresh", "preset": "tiny", "max_steps": 20, "set": TINY}
    r = client.post("/v1/train", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    jid = job["id"]
    assert job["status"] in ("queued", "running") and job["object"] == "train.job"
    # one job at a time
    r2 = client.post("/v1/train", json={**body, "name": "other"})
    assert r2.status_code == 409 and "already running" in r2.json()["detail"]
    # another key can neither see nor cancel it
    assert client.get(f"/v1/train/{jid}", headers=AUTH2).status_code == 404
    assert client.post(f"/v1/train/{jid}/cancel", headers=AUTH2).status_code == 404
    assert client.get(f"/v1/train/{jid}/events", headers=AUTH2).status_code == 404
    assert client.get("/v1/train", headers=AUTH2).json()["data"] == []
    # the SSE stream carries the loss points as they come, then [DONE]
    events = []
    with client.stream("GET", f"/v1/train/{jid}/events") as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    final = events[-1]
    assert final["status"] == "succeeded", final
    points = [p for e in events for p in e["points"]]
    assert [p[0] for p in points] == list(range(1, 21))  # log_interval=1: every step, each sent once
    assert final["model"] == "fresh@1" and final["step"] == 20 and final["val_loss"] is not None
    # the run is in the models dir as a version, served at once, with its metrics and log
    run = root / "fresh" / "1"
    assert (run / "model.safetensors").is_file() and (run / "train.log").is_file()
    assert not list(root.glob(".train-*"))
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "fresh" in ids
    d = client.get("/v1/models/fresh@1/details").json()
    assert len(d["metrics"]["train"]) == 20 and d["config"]["train"]["max_steps"] == 20
    r = client.post("/v1/completions", json={"model": "fresh", "prompt": "line", "max_tokens": 5, "seed": 1})
    assert r.status_code == 200
    # the store row says the same, owned by the key
    with Store.open(settings.db) as s:
        [row] = s.list_jobs(kind="train")["data"]
    assert row["status"] == "succeeded" and row["result"]["model"] == "fresh@1" and row["progress"] == 1.0
    assert row["user"] and row["user"] != KEY  # the key's hash, never the key
    listed = client.get("/v1/train").json()
    assert [j["id"] for j in listed["data"]] == [jid] and listed["data"][0]["loss"] == final["loss"]

    # a second run of the same name becomes version 2; cancelled mid-way it leaves nothing
    r = client.post("/v1/train", json={**body, "max_steps": 100000, "max_time": 100})
    jid2 = r.json()["id"]
    wait_for(client, jid2, lambda v: v["step"] >= 1)
    v = client.post(f"/v1/train/{jid2}/cancel").json()
    assert v["status"] in ("running", "cancelled")
    v = wait_for(client, jid2, lambda v: v["status"] == "cancelled")
    assert v["eta_s"] is None and not (root / "fresh" / "2").exists()
    assert not list(root.glob(".train-*")) and not list(root.glob(".train-*.log"))
    # and then a new job may start
    r = client.post("/v1/train", json={**body, "max_steps": 2})
    assert r.status_code == 202
    v = wait_for(client, r.json()["id"], lambda v: v["status"] in ("succeeded", "failed"))
    assert v["status"] == "succeeded" and v["model"] == "fresh@2"


@pytest.mark.slow
def test_train_job_failure_reports_the_trainers_error(client, setup):
    # an override the config refuses: the trainer exits 1 with its one-line error, the job fails with it
    body = {"family": "gpt", "data": "lines", "name": "bad", "max_steps": 2, "set": ["train.no_such_key=1"]}
    jid = client.post("/v1/train", json=body).json()["id"]
    v = wait_for(client, jid, lambda v: v["status"] in ("succeeded", "failed"))
    assert v["status"] == "failed" and "no_such_key" in v["error"] and "\n" not in v["error"]
    assert not (setup[1] / "bad").exists() and not list(setup[1].glob(".train-*"))


# ----------------------------------------------------------------------------- win rate


def test_comparison_stats_between_versions(client):
    def sample(model: str) -> int:
        r = client.post(
            "/v1/completions", json={"model": model, "prompt": "soft", "max_tokens": 4, "seed": 3}
        )
        return r.json()["generation_ids"][0]

    for winner in ("new", "new", "old"):
        old, new = sample("story@1"), sample("story")  # plain name: the newest version, story@2
        r = client.post(
            "/v1/comparisons", json={"a": old, "b": new, "winner": new if winner == "new" else old}
        )
        assert r.status_code == 200
    st = client.get("/v1/comparisons/stats", params={"a": "story", "b": "story@1"}).json()
    assert (st["a"], st["b"], st["wins"], st["losses"], st["n"]) == ("story@2", "story@1", 2, 1, 3)
    assert st["win_rate"] == pytest.approx(2 / 3) and 0 < st["ci_low"] < 2 / 3 < st["ci_high"] < 1
    r = client.get("/v1/comparisons/stats", params={"a": "story@1", "b": "story@1"})
    assert r.status_code == 400 and "two different models" in r.json()["detail"]
    gone = client.get("/v1/comparisons/stats", params={"a": "removed@3", "b": "story@1"}).json()
    assert gone["n"] == 0 and gone["win_rate"] is None


def test_a_new_server_fails_the_jobs_its_host_left_running(setup):
    import socket

    settings, root, _ = setup
    with Store.open(settings.db) as s:
        mine = s.add_job("train", {"family": "gpt", "data": "lines", "name": "x", "host": socket.gethostname()},
                         user=hash_key(KEY))  # fmt: skip
        s.update_job(mine, status="running")
        theirs = s.add_job("train", {"family": "gpt", "data": "lines", "name": "y", "host": "another-replica"},
                           user=hash_key(KEY))  # fmt: skip
        s.update_job(theirs, status="running")
    (root / f".train-{mine}").mkdir()  # the half-trained run it left
    with TestClient(create_app(settings), headers=AUTH) as c:
        views = {v["id"]: v for v in c.get("/v1/train").json()["data"]}
    assert (
        views[f"train-{mine}"]["status"] == "failed" and "server stopped" in views[f"train-{mine}"]["error"]
    )
    assert views[f"train-{theirs}"]["status"] == "running"  # another server's job is left alone
    assert not (root / f".train-{mine}").exists()


def test_serve_cli_training_options(run_cli, tmp_path):
    code, out, _ = run_cli("serve", "--help")
    assert code == 0 and "--data-dir" in out and "--max-train-time" in out
    (tmp_path / "models").mkdir()
    code, _, err = run_cli("serve", "--models", tmp_path / "models", "--data-dir", tmp_path / "nope")
    assert code == 1 and "--data-dir" in err and "not a directory" in err
    code, _, err = run_cli("serve", "--models", tmp_path / "models", "--max-train-time", "0")
    assert code == 1 and "--max-train-time" in err
