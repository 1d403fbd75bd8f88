"""The content store: schema + migrations, validation, paging, export, blobs, open errors."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest
import sqlalchemy as sa

from aigc.errors import AigcError
from aigc.feedback.blobs import Blobs, check_ref
from aigc.feedback.schema import SCHEMA_VERSION, Base
from aigc.feedback.store import NotFoundError, Store, default_url


@pytest.fixture
def store(tmp_path):
    s = Store.open(str(tmp_path / "aigc.db"))
    yield s
    s.close()


def gen(store: Store, prompt: str = "p", text: str | None = "out", **kw) -> int:
    return store.add_generation(
        kind=kw.pop("kind", "text"), model=kw.pop("model", "m@1"), prompt=prompt, output_text=text, **kw
    )


# ----------------------------------------------------------------------------- schema + migrations


def _schema(url: str) -> dict[str, tuple[set[str], set[str]]]:
    """{table: ({(column, nullable)}, {index names})} as the database has them."""
    engine = sa.create_engine(url)
    insp = sa.inspect(engine)
    out = {
        t: (
            {(c["name"], c["nullable"]) for c in insp.get_columns(t)},
            {i["name"] for i in insp.get_indexes(t)},
        )
        for t in insp.get_table_names()
    }
    engine.dispose()
    return out


def test_fresh_store_matches_orm_and_pragmas(tmp_path):
    path = tmp_path / "sub" / "fresh.db"  # the folder is created
    Store.open(str(path)).close()
    schema = _schema(f"sqlite:///{path}")
    for name, table in Base.metadata.tables.items():
        cols, idx = schema[name]
        assert cols == {(c.name, c.nullable) for c in table.columns}, name
        assert {i.name for i in table.indexes} <= idx, name
    assert {
        "ix_generations_kind_id",
        "ix_generations_model_id",
        "ix_generations_created",
        "ix_generations_rating",
    } <= schema["generations"][1]
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


def test_pragmas_on_every_connection(store):
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


V1_SQL = """
CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY, applied FLOAT NOT NULL);
CREATE TABLE generations (
    id INTEGER NOT NULL PRIMARY KEY, created FLOAT NOT NULL, kind VARCHAR(16) NOT NULL,
    model VARCHAR(256) NOT NULL, prompt TEXT NOT NULL, params JSON NOT NULL, seed BIGINT,
    output_text TEXT, output_ref VARCHAR(128), duration FLOAT);
CREATE INDEX ix_generations_created ON generations (created);
CREATE INDEX ix_generations_kind_id ON generations (kind, id);
CREATE INDEX ix_generations_model_id ON generations (model, id);
CREATE TABLE ratings (
    id INTEGER NOT NULL PRIMARY KEY,
    generation_id INTEGER NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    created FLOAT NOT NULL, kind VARCHAR(8) NOT NULL, value INTEGER NOT NULL, comment TEXT);
CREATE INDEX ix_ratings_generation_id ON ratings (generation_id);
CREATE INDEX ix_ratings_created ON ratings (created);
INSERT INTO schema_version VALUES (1, 1700000000.0);
INSERT INTO generations VALUES (1, 1700000001.0, 'text', 'gpt@1', 'Once upon', '{"temperature": 0.8}', 7,
                                'a time', NULL, 0.5);
INSERT INTO generations VALUES (2, 1700000002.0, 'image', 'ddpm@2', 'a cat', '{}', 8, NULL,
                                '%s.png', 1.5);
INSERT INTO ratings VALUES (1, 1, 1700000003.0, 'thumb', 1, 'nice');
INSERT INTO ratings VALUES (2, 1, 1700000004.0, 'stars', 2, NULL);
"""


def test_migrates_a_v1_file_and_keeps_the_data(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(V1_SQL % ("ab" * 32))
    con.close()

    store = Store.open(str(path))
    assert store.schema_version() == SCHEMA_VERSION == 4
    g1 = store.get_generation(1)
    assert (g1["prompt"], g1["output_text"], g1["params"], g1["seed"]) == (
        "Once upon",
        "a time",
        {"temperature": 0.8},
        7,
    )
    # the rating summary is back-filled from the old ratings: thumb up = 5 stars, then 2 stars
    assert g1["rating_count"] == 2 and g1["rating"] == pytest.approx(3.5)
    assert store.get_generation(2)["rating"] is None and store.get_generation(2)["rating_count"] == 0
    assert [r["comment"] for r in store.list_ratings()["data"]] == [None, "nice"]
    # new tables and columns work; new ids follow the old ones
    assert store.add_comparison(1, 2, winner=1, user="u") == 1
    assert store.add_rating(1, 5, "stars", user="bob") == 3
    assert store.get_generation(1)["rating"] == pytest.approx(4.0)
    store.close()
    # same schema as a fresh store, and opening again migrates nothing
    fresh = tmp_path / "fresh.db"
    Store.open(str(fresh)).close()
    assert _schema(f"sqlite:///{path}") == _schema(f"sqlite:///{fresh}")
    con = sqlite3.connect(path)
    versions = con.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert versions == [(1,), (2,), (3,), (4,)]
    con.close()


def v3_with_duplicate_votes(url: str) -> None:
    """A v3 store (SQLite or PostgreSQL) as aigc left it when every click was a new vote."""
    from aigc.feedback.schema import MIGRATIONS

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY, applied FLOAT NOT NULL)"
            )
        )
        for v in (1, 2, 3):
            MIGRATIONS[v](conn)
            conn.execute(sa.text(f"INSERT INTO schema_version VALUES ({v}, 0)"))
        conn.execute(sa.text(
            "INSERT INTO generations (id, created, kind, model, prompt, params, output_text, rating_count, "
            "rating_sum, rating) VALUES (1, 1, 'text', 'm@1', 'p', '{}', 'o', 8, 24, 3.0), "
            "(2, 1, 'text', 'm@1', 'p', '{}', 'o2', 1, 5, 5.0)"
        ))  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO ratings (id, generation_id, created, kind, value, comment, correction, user_id) "
            "VALUES "
            "(1, 1, 1, 'stars', 5, NULL, NULL, 'anonymous:127.0.0.1'),"
            "(2, 1, 2, 'stars', 5, 'nice', 'fixed', 'anonymous:127.0.0.1'),"
            "(3, 1, 3, 'stars', 4, NULL, NULL, 'anonymous:127.0.0.1'),"  # the latest of three: kept
            "(4, 1, 4, 'thumb', -1, 'gloomy', NULL, 'k'),"
            "(5, 1, 5, 'thumb', -1, 'still gloomy', NULL, 'k'),"
            "(6, 1, 6, 'stars', 2, NULL, NULL, 'k'),"  # another kind of the same rater
            "(7, 1, 7, 'thumb', 1, NULL, NULL, NULL),"  # raters without a name: all kept
            "(8, 1, 8, 'thumb', 1, NULL, NULL, NULL),"
            "(9, 2, 9, 'thumb', 1, NULL, NULL, 'k')"
        ))  # fmt: skip
        if conn.dialect.name == "postgresql":  # ids were given: move the sequences past them
            for table in ("generations", "ratings"):
                conn.execute(sa.text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))"))
    engine.dispose()


def check_duplicate_votes_migrated(store: Store) -> None:
    assert store.schema_version() == SCHEMA_VERSION == 4
    kept = {r["id"]: (r["value"], r["comment"], r["correction"]) for r in store.list_ratings()["data"]}
    assert kept == {
        3: (4, "nice", "fixed"),  # the latest value, the latest comment and correction given
        5: (-1, "still gloomy", None),
        6: (2, None, None),
        7: (1, None, None),
        8: (1, None, None),
        9: (1, None, None),
    }
    g = store.get_generation(1)
    assert g["rating_count"] == 5 and g["rating"] == pytest.approx((4 + 1 + 2 + 5 + 5) / 5)
    assert store.get_generation(2)["rating_count"] == 1  # untouched
    # and from now on rating again replaces
    assert store.rate(1, 1, "stars", user="anonymous:127.0.0.1")["id"] == 3
    assert store.get_generation(1)["rating_count"] == 5
    assert store.rate(1, 1, "stars", user="new rater")["id"] == 10


def test_migrating_duplicate_votes_keeps_each_raters_latest(tmp_path):
    """A v3 store holds every click as a vote; v4 keeps one per (generation, rater, kind)."""
    path = tmp_path / "v3.db"
    v3_with_duplicate_votes(f"sqlite:///{path}")
    with Store.open(str(path)) as store:
        check_duplicate_votes_migrated(store)
    fresh = tmp_path / "fresh.db"
    Store.open(str(fresh)).close()
    assert _schema(f"sqlite:///{path}") == _schema(f"sqlite:///{fresh}")


def test_refuses_newer_schema_and_foreign_db(tmp_path):
    path = tmp_path / "new.db"
    Store.open(str(path)).close()
    con = sqlite3.connect(path)
    con.execute("INSERT INTO schema_version VALUES (99, 0)")
    con.commit()
    con.close()
    with pytest.raises(AigcError, match="version 99, newer"):
        Store.open(str(path))
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE generations (x)")
    con.close()
    with pytest.raises(AigcError, match="not an aigc store"):
        Store.open(str(other))


# ----------------------------------------------------------------------------- open errors


def test_unwritable_or_locked_store_fails_at_open(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AigcError, match="cannot create the store's folder"):
        Store.open(str(blocker / "aigc.db"))
    with pytest.raises(AigcError, match="is a directory"):
        Store.open(str(tmp_path))
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(AigcError, match="junk.db"):
        Store.open(str(junk))
    # read-only (root ignores file modes, so use SQLite's read-only open)
    path = tmp_path / "ro.db"
    Store.open(str(path)).close()
    with pytest.raises(AigcError, match="for writing: attempt to write a readonly database"):
        Store.open(f"sqlite:///file:{path}?mode=ro&uri=true")
    # locked: another program holds the write lock
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    with pytest.raises(AigcError, match="database is locked"):
        Store.open(str(path), lock_timeout=0.2)
    con.execute("ROLLBACK")
    con.close()
    Store.open(str(path)).close()


def test_default_url_and_bad_url(tmp_path, monkeypatch):
    assert default_url() == f"sqlite:///{tmp_path / 'aigc-home' / 'aigc.db'}"
    with Store.open() as s:  # $AIGC_HOME/aigc.db
        gen(s)
    assert (tmp_path / "aigc-home" / "aigc.db").is_file()
    monkeypatch.setenv("AIGC_DB", f"sqlite:///{tmp_path / 'env.db'}")
    Store.open().close()
    assert (tmp_path / "env.db").is_file()
    for memory in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(AigcError, match="in-memory SQLite store is not supported"):
            Store.open(memory)
    with pytest.raises(AigcError, match="not a database URL"):
        Store.open("sqlite:/x://")
    with pytest.raises(AigcError, match="unknown database kind 'nosuchdialect'"):
        Store.open("nosuchdialect://x/y")
    with pytest.raises(AigcError, match="no driver for postgresql\\+nosuchdriver|unknown database kind"):
        Store.open("postgresql+nosuchdriver://u@h/db")


# ----------------------------------------------------------------------------- generations


def test_generation_roundtrip_and_validation(store):
    ref = "0" * 64 + ".png"
    gid = store.add_generation(
        kind="image",
        model="ddpm@3",
        model_hash="abc",
        prompt="a cat",
        params={"steps": 20, "guidance": 3.0},
        seed=123,
        output_ref=ref,
        duration=1.25,
        moderation="ok",
    )
    g = store.get_generation(gid)
    assert g | {"created": 0} == {
        "id": gid,
        "object": "generation",
        "created": 0,
        "kind": "image",
        "model": "ddpm@3",
        "model_hash": "abc",
        "prompt": "a cat",
        "params": {"steps": 20, "guidance": 3.0},
        "seed": 123,
        "output_text": None,
        "output_ref": ref,
        "duration": 1.25,
        "moderation": "ok",
        "rating": None,
        "rating_count": 0,
    }
    with pytest.raises(NotFoundError, match="no generation with id 999"):
        store.get_generation(999)
    with pytest.raises(AigcError, match="kind must be one of text, image, music, audio"):
        gen(store, kind="video")
    with pytest.raises(AigcError, match="JSON"):
        gen(store, params={"x": object()})
    with pytest.raises(AigcError, match="invalid output ref"):
        gen(store, output_ref="../../etc/passwd")


def test_sqlite_driver_insert_stores_what_the_core_insert_stores(store, tmp_path):
    """`add_generations` on SQLite goes in through the driver; the rows (every column as stored,
    JSON text included) and their ids are the Core INSERT's, and a lock timeout leaves as
    SQLAlchemy's OperationalError with nothing written and the store still usable."""
    from aigc.feedback.store import _GENERATION_INSERT, _generation_values

    rows = [
        dict(kind="text", model="m@1", prompt="héllo 诗", params={"t": 0.5, "stop": ["\n", "é"]}, seed=2**40,
             output_text="out 月", duration=0.25, model_hash="h", moderation="flagged:x", created=1.5e9),
        dict(kind="image", model="d@2", prompt="", output_ref="0" * 64 + ".png"),
        dict(kind="music", model="m@1", prompt="p", params={}, output_text=None),
    ]  # fmt: skip
    with store._write.begin() as conn:  # the Core path, as on PostgreSQL
        core_ids = list(conn.scalars(_GENERATION_INSERT, [_generation_values(**r) for r in rows]))
    ids = store.add_generations(rows)
    assert ids == [core_ids[-1] + 1 + i for i in range(len(rows))]
    db = sqlite3.connect(tmp_path / "aigc.db")
    stored = {r[0]: r[1:] for r in db.execute("SELECT * FROM generations")}
    for core_id, gid in zip(core_ids, ids, strict=True):
        core, new = store.get_generation(core_id), store.get_generation(gid)
        assert new | {"id": 0, "created": 0} == core | {"id": 0, "created": 0}
        assert stored[gid][1:] == stored[core_id][1:]  # the same text in every column but `created`
    assert stored[ids[0]][0] == 1.5e9

    busy = Store.open(str(tmp_path / "aigc.db"), lock_timeout=0.05)
    holder = sqlite3.connect(tmp_path / "aigc.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        with pytest.raises(sa.exc.OperationalError, match="locked"):
            busy.add_generations(rows)
        holder.execute("ROLLBACK")
        assert busy.add_generations(rows[:1]) == [ids[-1] + 1]  # no transaction was left open
    finally:
        busy.close()
        holder.close()
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 2 * len(rows) + 1
    db.close()


def test_list_filters_and_keyset_paging(store):
    ids = []
    for i in range(25):
        ids.append(
            gen(
                store,
                prompt=f"prompt {i} {'cat' if i % 5 == 0 else 'dog'}",
                kind="text" if i % 2 == 0 else "music",
                model=f"m@{i % 3}",
            )
        )
    page = store.list_generations(limit=10)
    assert page["object"] == "list" and page["has_more"]
    assert [g["id"] for g in page["data"]] == ids[::-1][:10]
    seen, before = [], None
    while True:
        page = store.list_generations(limit=7, before=before)
        seen += [g["id"] for g in page["data"]]
        if not page["has_more"]:
            break
        before = page["last_id"]
    assert seen == ids[::-1]
    assert [g["id"] for g in store.list_generations(kind="music", limit=100)["data"]] == ids[1::2][::-1]
    assert {g["model"] for g in store.list_generations(model="m@1", limit=100)["data"]} == {"m@1"}
    assert [g["id"] for g in store.list_generations(q="CAT", limit=100)["data"]] == ids[::5][::-1]
    assert store.list_generations(q="100%", limit=5)["data"] == []  # % is literal, not a wildcard
    store.add_rating(ids[3], 1, "thumb")
    store.add_rating(ids[4], 3, "stars")
    assert [g["id"] for g in store.list_generations(min_rating=4, limit=100)["data"]] == [ids[3]]
    t0 = store.get_generation(ids[10])["created"]
    t1 = store.get_generation(ids[12])["created"]
    assert [g["id"] for g in store.list_generations(since=t0, until=t1, limit=100)["data"]] == [
        ids[11],
        ids[10],
    ]
    for bad in (0, 1001, "5"):
        with pytest.raises(AigcError, match="limit must be an integer from 1 to 1000"):
            store.list_generations(limit=bad)


# ----------------------------------------------------------------------------- ratings, comparisons


def test_ratings_validation_and_summary(store):
    g = gen(store)
    with pytest.raises(NotFoundError, match="no such generation"):
        store.add_rating(12345, 1)
    for kind, value, allowed in [
        ("thumb", 0, "-1 or 1"),
        ("thumb", 2, "-1 or 1"),
        ("stars", 0, "from 1 to 5"),
        ("stars", 6, "from 1 to 5"),
        ("stars", 3.5, "from 1 to 5"),
        ("thumb", True, "-1 or 1"),
    ]:
        with pytest.raises(AigcError, match=allowed):
            store.add_rating(g, value, kind)
    with pytest.raises(AigcError, match="rating kind must be one of thumb, stars"):
        store.add_rating(g, 1, "likes")
    with pytest.raises(AigcError, match="user"):
        store.add_rating(g, 1, user="x" * 129)
    assert store.list_ratings()["data"] == []  # nothing half-written by the refusals
    r1 = store.add_rating(g, -1, "thumb", comment="meh", user="ann")
    r2 = store.add_rating(g, 4, "stars", correction="better", user="bob")
    data = store.list_ratings(generation_id=g)["data"]
    assert [r["id"] for r in data] == [r2, r1]
    assert data[1] | {"created": 0} == {
        "id": r1,
        "object": "rating",
        "generation_id": g,
        "created": 0,
        "kind": "thumb",
        "value": -1,
        "comment": "meh",
        "correction": None,
        "user": "ann",
    }
    row = store.get_generation(g)
    assert row["rating_count"] == 2 and row["rating"] == pytest.approx((1 + 4) / 2)


def test_rating_again_replaces_the_raters_own_rating(store):
    g, other = gen(store), gen(store)
    first = store.rate(g, 2, "stars", comment="dull", correction="better", user="ann")
    assert (first["replaced"], first["rating"], first["rating_count"]) == (False, 2.0, 1)
    store.add_rating(g, 1, "thumb", user="ann")  # another kind: a rating of its own
    store.add_rating(g, 4, "stars", user="bob")  # another rater
    # ann rates again: her stars are replaced in place (same id, count kept, sum adjusted); a
    # comment or correction left out keeps the old one
    again = store.rate(g, 5, "stars", user="ann")
    assert again == {
        "id": first["id"],
        "replaced": True,
        "rating": pytest.approx((5 + 5 + 4) / 3),
        "rating_count": 3,
    }
    assert store.add_rating(g, 3, "stars", comment="ok after all", user="ann") == first["id"]
    mine = [r for r in store.list_ratings(generation_id=g)["data"] if r["user"] == "ann"]
    assert {(r["kind"], r["value"], r["comment"], r["correction"]) for r in mine} == {
        ("stars", 3, "ok after all", "better"),
        ("thumb", 1, None, None),
    }
    store.add_rating(g, -1, "thumb", user="ann")  # a thumb flipped: 5 -> 1 on the star scale
    row = store.get_generation(g)
    assert row["rating_count"] == 3 and row["rating"] == pytest.approx((3 + 1 + 4) / 3)
    assert len(store.list_ratings(generation_id=g)["data"]) == 3
    # the same rater on another generation, and raters without a name: separate votes
    store.add_rating(other, 5, "stars", user="ann")
    store.add_rating(other, 1, "stars")
    store.add_rating(other, 1, "stars")
    assert store.get_generation(other)["rating_count"] == 3
    # each row can carry the asking rater's own rating
    assert store.get_generation(g, rater="ann")["my_rating"] == {"thumb": -1, "stars": 3}
    assert store.get_generation(g, rater="bob")["my_rating"] == {"thumb": None, "stars": 4}
    assert "my_rating" not in store.get_generation(g)
    listed = {r["id"]: r["my_rating"] for r in store.list_generations(rater="ann")["data"]}
    assert listed == {g: {"thumb": -1, "stars": 3}, other: {"thumb": None, "stars": 5}}


def test_export_sees_one_rating_per_rater(store):
    from aigc.feedback.export import load_feedback
    from aigc.tuning.preference import feedback_rows

    a = gen(store, prompt="q", text="first")
    b = gen(store, prompt="q", text="second")
    for _ in range(3):  # "regenerate with feedback" pressed three times: one thumbs-down
        store.add_rating(a, -1, "thumb", comment="too gloomy", user="ann")
    store.add_rating(a, 1, "thumb", user="ann")  # ...and then she liked it after all
    store.add_rating(b, 4, "stars", user="ann")
    store.add_rating(b, 2, "stars", user="bob")
    store.add_rating(b, 5, "stars", user="bob")
    with store._session() as s:
        ratings = {
            g["id"]: [(r["user"], r["kind"], r["value"]) for r in g["ratings"]] for g in load_feedback(s)
        }
    assert ratings == {a: [("ann", "thumb", 1)], b: [("ann", "stars", 4), ("bob", "stars", 5)]}
    assert [len(g["ratings"]) for g in feedback_rows(store, "m", "text")] == [1, 2]
    assert store.export_feedback("kto") == [{"prompt": "q", "completion": "first", "label": True}]
    # a: 5 stars (thumb up), b: 4.5 -> no pair at min_gap 1; the old votes would have made a (2) < b
    assert store.export_feedback("dpo") == []


def test_comparisons(store):
    a, b = gen(store, text="A"), gen(store, text="B")
    with pytest.raises(AigcError, match="two different generations"):
        store.add_comparison(a, a, a)
    with pytest.raises(AigcError, match=f"winner must be one of the two compared ids \\({a} or {b}\\)"):
        store.add_comparison(a, b, 77)
    with pytest.raises(NotFoundError, match="cannot compare generation 77"):
        store.add_comparison(a, 77, a)
    cid = store.add_comparison(a, b, b, user="u1")
    [c] = store.list_comparisons()["data"]
    assert (c["id"], c["a"], c["b"], c["winner"], c["user"]) == (cid, a, b, b, "u1")
    # unrated but compared outputs of one prompt make a dpo pair
    assert store.export_feedback("dpo") == [{"prompt": "p", "chosen": "B", "rejected": "A"}]


def test_jobs(store):
    j = store.add_job("tune", {"method": "dpo"}, model="gpt@1")
    assert store.get_job(j)["status"] == "queued"
    store.update_job(j, status="running", progress=0.5)
    done = store.update_job(j, status="succeeded", result={"model": "gpt@2"})
    assert (done["status"], done["progress"], done["result"]) == ("succeeded", 0.5, {"model": "gpt@2"})
    assert done["finished"] is not None
    with pytest.raises(AigcError, match="job status must be one of queued, running"):
        store.update_job(j, status="done")
    with pytest.raises(NotFoundError):
        store.get_job(99)
    with pytest.raises(AigcError, match="job kind"):
        store.add_job("")
    with pytest.raises(AigcError, match="JSON"):
        store.add_job("train", {"f": print})
    j2 = store.add_job("train", {})
    assert [x["id"] for x in store.list_jobs()["data"]] == [j2, j]
    assert [x["id"] for x in store.list_jobs(status="queued")["data"]] == [j2]


# ----------------------------------------------------------------------------- export


def test_export_dpo_kto_sft(store):
    a = gen(store, prompt="q1", text="good")
    b = gen(store, prompt="q1", text="bad")
    c = gen(store, prompt="q1", text="ok")
    d = gen(store, prompt="q2", text="other prompt")
    img = gen(store, prompt="q1", text=None, kind="image", output_ref="1" * 64 + ".png")
    # comparisons: a beats b twice, b beats a once -> a; c vs d differ in prompt -> no pair
    store.add_comparison(a, b, a)
    store.add_comparison(b, a, a)
    store.add_comparison(a, b, b)
    store.add_comparison(c, d, c)
    # a tie between b and c drops out
    store.add_comparison(b, c, b)
    store.add_comparison(b, c, c)
    # ratings: c (5) vs b (1) on the same prompt -> a rating-gap pair; image outputs never take part
    store.add_rating(c, 1, "thumb")
    store.add_rating(b, -1, "thumb")
    store.add_rating(b, -1, "thumb", user="x")
    store.add_rating(img, 1, "thumb")
    store.add_rating(d, 5, "stars", correction="the right answer")
    store.add_rating(d, 4, "stars", correction="the right answer")  # same correction twice -> one row
    store.add_rating(a, 1, "thumb")
    store.add_rating(a, -1, "thumb")  # a's thumbs cancel out -> no kto row

    # a (thumbs +1 -1: 3 stars) vs c (5 stars): a gap of 2 >= min_gap; b vs c were compared (a tie)
    assert store.export_feedback("dpo") == [
        {"prompt": "q1", "chosen": "good", "rejected": "bad"},
        {"prompt": "q1", "chosen": "ok", "rejected": "good"},
    ]
    assert store.export_feedback("dpo", min_gap=2.5) == [
        {"prompt": "q1", "chosen": "good", "rejected": "bad"}
    ]
    assert store.export_feedback("kto") == [
        {"prompt": "q1", "completion": "bad", "label": False},
        {"prompt": "q1", "completion": "ok", "label": True},
    ]
    assert store.export_feedback("sft") == [{"prompt": "q2", "completion": "the right answer"}]
    with pytest.raises(AigcError, match="export format must be one of dpo, kto, sft"):
        store.export_feedback("ppo")


# ----------------------------------------------------------------------------- blobs


def test_blobs_content_addressed(tmp_path):
    blobs = Blobs(tmp_path / "outputs")
    data = b"\x89PNG fake image bytes"
    ref = blobs.put(data, ".PNG")
    digest = hashlib.sha256(data).hexdigest()
    assert ref == f"{digest}.png" and check_ref(ref) == ref
    assert blobs.path(ref) == tmp_path / "outputs" / digest[:2] / ref
    assert blobs.get(ref) == data and blobs.exists(ref)
    mtime = blobs.path(ref).stat().st_mtime_ns
    assert blobs.put(data, "png") == ref and blobs.path(ref).stat().st_mtime_ns == mtime  # written once
    assert [p.name for p in (tmp_path / "outputs" / digest[:2]).iterdir()] == [ref]  # no temp files left
    for bad in ["../" + ref, ref.upper(), digest, f"{digest}.png/../../x", f"{digest[:-1]}/.png", "", 5]:
        with pytest.raises(AigcError, match="invalid output ref"):
            blobs.path(bad)
    with pytest.raises(AigcError, match="invalid extension"):
        blobs.put(data, "../x")
    blobs.path(ref).write_bytes(b"tampered")
    with pytest.raises(AigcError, match="corrupt"):
        blobs.get(ref)
    with pytest.raises(NotFoundError):
        blobs.get("f" * 64 + ".wav")


def test_blobs_default_root_under_aigc_home(tmp_path):
    ref = Blobs().put(b"x", "wav")
    assert (tmp_path / "aigc-home" / "outputs" / ref[:2] / ref).read_bytes() == b"x"


def test_store_rows_are_json(store):
    gid = gen(store, params={"nested": {"a": [1, 2]}})
    json.dumps(store.list_generations()["data"])
    json.dumps(store.get_generation(gid))


def test_unreachable_postgresql_fails_at_open():
    pytest.importorskip("psycopg", reason="psycopg not installed: pip install 'aigc[postgres]'")
    with pytest.raises(AigcError) as info:
        Store.open("postgresql+psycopg://ann:secret@127.0.0.1:1/aigc?connect_timeout=2")
    message = str(info.value)
    assert "\n" not in message and "secret" not in message  # one line, password hidden
    assert message.startswith("cannot open the store postgresql+psycopg://ann:***@127.0.0.1:1/aigc")
    assert "check the server is running" in message
