"""Store v3 for the studio: presets per user, jobs with an owner, comparison win rates; the v2 -> v3
migration keeps an older file's data."""

from __future__ import annotations

import sqlite3

import pytest

from aigc.errors import AigcError
from aigc.feedback.schema import SCHEMA_VERSION
from aigc.feedback.store import MAX_PRESETS, NotFoundError, Store, wilson_interval


@pytest.fixture
def store(tmp_path):
    s = Store.open(str(tmp_path / "aigc.db"))
    yield s
    s.close()


# a v2 store as aigc 0.1 left it (the v2 DDL of schema.py), with a job and a comparison in it
V2_SQL = """
CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY, applied FLOAT NOT NULL);
CREATE TABLE generations (
    id INTEGER NOT NULL PRIMARY KEY, created FLOAT NOT NULL, kind VARCHAR(16) NOT NULL,
    model VARCHAR(256) NOT NULL, prompt TEXT NOT NULL, params JSON NOT NULL, seed BIGINT,
    output_text TEXT, output_ref VARCHAR(128), duration FLOAT, model_hash VARCHAR(64), moderation VARCHAR(64),
    rating_count INTEGER DEFAULT '0' NOT NULL, rating_sum FLOAT DEFAULT '0' NOT NULL, rating FLOAT);
CREATE INDEX ix_generations_created ON generations (created);
CREATE INDEX ix_generations_kind_id ON generations (kind, id);
CREATE INDEX ix_generations_model_id ON generations (model, id);
CREATE INDEX ix_generations_rating ON generations (rating);
CREATE TABLE ratings (
    id INTEGER NOT NULL PRIMARY KEY,
    generation_id INTEGER NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    created FLOAT NOT NULL, kind VARCHAR(8) NOT NULL, value INTEGER NOT NULL, comment TEXT,
    correction TEXT, user_id VARCHAR(128));
CREATE INDEX ix_ratings_generation_id ON ratings (generation_id);
CREATE INDEX ix_ratings_created ON ratings (created);
CREATE TABLE comparisons (
    id INTEGER NOT NULL PRIMARY KEY, created FLOAT NOT NULL,
    a_id INTEGER NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    b_id INTEGER NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    winner_id INTEGER NOT NULL, user_id VARCHAR(128));
CREATE INDEX ix_comparisons_created ON comparisons (created);
CREATE INDEX ix_comparisons_a_id ON comparisons (a_id);
CREATE INDEX ix_comparisons_b_id ON comparisons (b_id);
CREATE TABLE jobs (
    id INTEGER NOT NULL PRIMARY KEY, created FLOAT NOT NULL, updated FLOAT NOT NULL, finished FLOAT,
    kind VARCHAR(32) NOT NULL, status VARCHAR(16) NOT NULL, model VARCHAR(256), params JSON NOT NULL,
    progress FLOAT, result JSON, error TEXT);
CREATE INDEX ix_jobs_created ON jobs (created);
CREATE INDEX ix_jobs_status ON jobs (status);
INSERT INTO schema_version VALUES (1, 1700000000.0);
INSERT INTO schema_version VALUES (2, 1700000000.5);
INSERT INTO generations (id, created, kind, model, prompt, params, output_text)
    VALUES (1, 1700000001.0, 'text', 'story@1', 'p', '{}', 'one');
INSERT INTO generations (id, created, kind, model, prompt, params, output_text)
    VALUES (2, 1700000002.0, 'text', 'story@2', 'p', '{}', 'two');
INSERT INTO comparisons VALUES (1, 1700000003.0, 1, 2, 2, 'u');
INSERT INTO jobs VALUES (1, 1700000004.0, 1700000005.0, 1700000005.0, 'tune', 'succeeded', 'story', '{"x": 1}',
                         1.0, '{"ok": true}', NULL);
"""


def test_migrates_a_v2_file_to_v3_and_keeps_the_data(tmp_path):
    from test_store import _schema

    path = tmp_path / "v2.db"
    con = sqlite3.connect(path)
    con.executescript(V2_SQL)
    con.close()
    with Store.open(str(path)) as s:
        assert s.schema_version() == SCHEMA_VERSION == 4
        job = s.get_job(1)
        assert (job["kind"], job["status"], job["params"], job["result"], job["user"]) == (
            "tune", "succeeded", {"x": 1}, {"ok": True}, None,
        )  # fmt: skip
        assert s.comparison_stats("story@2", "story@1")["wins"] == 1
        # the new table and column work on the migrated file
        s.save_preset("u", "text", "warm", {"temperature": 1.2})
        assert [p["name"] for p in s.list_presets("u")["data"]] == ["warm"]
        assert s.add_job("train", {}, user="u") == 2
    fresh = tmp_path / "fresh.db"
    Store.open(str(fresh)).close()
    assert _schema(f"sqlite:///{path}") == _schema(f"sqlite:///{fresh}")


def test_presets_are_per_user_and_kind(store):
    a = store.save_preset("alice", "text", "warm", {"temperature": 1.2, "top_k": 40, "seed_lock": False})
    assert a["object"] == "preset" and a["params"]["top_k"] == 40
    store.save_preset("alice", "image", "warm", {"steps": 10})
    store.save_preset("bob", "text", "warm", {"temperature": 0.1})
    # the same name again replaces it (same id, new params)
    again = store.save_preset("alice", "text", " warm ", {"temperature": 0.7})
    assert again["id"] == a["id"] and again["params"] == {"temperature": 0.7}
    mine = store.list_presets("alice", kind="text")["data"]
    assert [(p["name"], p["params"]) for p in mine] == [("warm", {"temperature": 0.7})]
    assert len(store.list_presets("alice")["data"]) == 2
    assert "user" not in mine[0]  # the owner's key hash is not echoed back
    # bob cannot delete alice's preset: it looks missing
    with pytest.raises(NotFoundError, match="no preset"):
        store.delete_preset("bob", a["id"])
    store.delete_preset("alice", a["id"])
    assert [p["kind"] for p in store.list_presets("alice")["data"]] == ["image"]
    with pytest.raises(NotFoundError):
        store.delete_preset("alice", a["id"])


def test_preset_validation(store):
    with pytest.raises(AigcError, match="preset kind must be one of text, image, music"):
        store.save_preset("u", "video", "x", {})
    with pytest.raises(AigcError, match="a preset name is 1-64 characters"):
        store.save_preset("u", "text", "  ", {})
    with pytest.raises(AigcError, match="at most 20000 allowed"):
        store.save_preset("u", "text", "big", {"x": "y" * 30_000})
    with pytest.raises(AigcError, match="JSON object"):
        store.save_preset("u", "text", "list", [1, 2])
    for i in range(MAX_PRESETS):
        store.save_preset("u", "music", f"p{i}", {"bars": i})
    with pytest.raises(AigcError, match=f"at most {MAX_PRESETS} music presets per user"):
        store.save_preset("u", "music", "one more", {})
    store.save_preset("u", "music", "p3", {"bars": 99})  # replacing one is still allowed


def test_jobs_have_an_owner(store):
    j1 = store.add_job("train", {"n": 1}, model="m", user="alice")
    store.add_job("train", {"n": 2}, user="bob")
    store.add_job("tune", {}, user="alice")
    assert store.get_job(j1)["user"] == "alice"
    assert [j["params"] for j in store.list_jobs(kind="train", user="alice")["data"]] == [{"n": 1}]
    assert len(store.list_jobs(user="alice")["data"]) == 2 and len(store.list_jobs()["data"]) == 3


def test_comparison_stats_and_wilson_interval(store):
    def gen(model: str) -> int:
        return store.add_generation(kind="text", model=model, prompt="p", output_text="x")

    # story@2 beats story@1 three times out of four, in both a/b orders; a third model is not counted
    for a_model, b_model, winner_side in [("story@1", "story@2", "b"), ("story@2", "story@1", "a"),
                                          ("story@2", "story@1", "a"), ("story@1", "story@2", "a"),
                                          ("story@1", "other", "a")]:  # fmt: skip
        a, b = gen(a_model), gen(b_model)
        store.add_comparison(a, b, a if winner_side == "a" else b)
    st = store.comparison_stats("story@2", "story@1")
    assert (st["wins"], st["losses"], st["n"], st["win_rate"]) == (3, 1, 4, 0.75)
    scipy_stats = pytest.importorskip("scipy.stats")
    ci = scipy_stats.binomtest(3, 4).proportion_ci(confidence_level=0.95, method="wilson")
    assert st["ci_low"] == pytest.approx(ci.low, abs=1e-6) and st["ci_high"] == pytest.approx(
        ci.high, abs=1e-6
    )
    flipped = store.comparison_stats("story@1", "story@2")
    assert (flipped["wins"], flipped["losses"], flipped["win_rate"]) == (1, 3, 0.25)
    none = store.comparison_stats("story@1", "nobody")
    assert (none["n"], none["win_rate"], none["ci_low"]) == (0, None, None)
    with pytest.raises(AigcError, match="two different models"):
        store.comparison_stats("x", "x")
    for k, n in [(0, 5), (5, 5), (8, 10), (1, 1)]:
        lo, hi = wilson_interval(k, n)
        ref = scipy_stats.binomtest(k, n).proportion_ci(method="wilson")
        assert (lo, hi) == (pytest.approx(ref.low, abs=1e-6), pytest.approx(ref.high, abs=1e-6))
