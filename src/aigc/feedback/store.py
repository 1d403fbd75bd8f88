"""The content store: generations, ratings, comparisons and jobs in one SQL database.

SQLAlchemy 2, dialect-neutral: a SQLite file by default (`$AIGC_HOME/aigc.db`, WAL mode), any
SQLAlchemy URL (`--db` / `$AIGC_DB`, e.g. `postgresql+psycopg://...`) when several users or server
replicas share it. Outputs (images, audio) are not stored here: a generation keeps a reference
into the content-addressed folder (`aigc.feedback.blobs`).

`Store.open` migrates the database to the latest schema (`aigc.feedback.schema`) and checks it
can write, so a server fails at start, not on its first request. Rows leave as JSON-ready dicts;
lists in OpenAI's shape (`{"object": "list", "data": [...], "has_more", "last_id"}`), newest
first, keyset-paged (`before=last_id`), so a page costs the same on page 1 and page 1,000.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from aigc.errors import AigcError
from aigc.feedback.blobs import check_ref
from aigc.feedback.export import EXPORT_FORMATS, export_rows
from aigc.feedback.schema import (
    MAX_PRESET_NAME,
    MAX_USER,
    MIGRATIONS,
    SCHEMA_VERSION,
    Comparison,
    Generation,
    Job,
    Preset,
    Rating,
    SchemaVersion,
    migrate,
)
from aigc.utils.paths import aigc_home

GENERATION_KINDS = ("text", "image", "music", "audio")
MODERATION_FILTERS = ("flagged", "blocked", "any", "none")  # list_generations(moderation=...)
RATING_RANGES = {"thumb": (-1, 1), "stars": (1, 5)}  # thumbs are -1 / 1 (no 0)
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
PRESET_KINDS = ("text", "image", "music")  # the studio tabs that have parameters
MAX_PRESETS = 200  # saved presets per user and kind
MAX_PRESET_BYTES = 20_000  # a preset's parameters as JSON
MAX_LIMIT = 1000
MAX_COMMENT = 20_000


class NotFoundError(AigcError):
    """An id that is not in the store (HTTP 404)."""


def default_url() -> str:
    """`$AIGC_DB`, else a SQLite file `$AIGC_HOME/aigc.db`."""
    return os.environ.get("AIGC_DB") or f"sqlite:///{aigc_home() / 'aigc.db'}"


def stars_score(kind: str, value: int) -> float:
    """A rating on the common 1-5 star scale (thumb down = 1, thumb up = 5), for sorting and filters."""
    return (3.0 + 2.0 * value) if kind == "thumb" else float(value)


# ----------------------------------------------------------------------------- engine


def _sqlite_hooks(engine: Engine) -> None:
    """Pragmas on every new connection; BEGIN IMMEDIATE for write transactions.

    pysqlite's own transaction handling skips DDL and starts transactions lazily; we turn it off
    and emit BEGIN ourselves (SQLAlchemy's documented recipe), so migrations are transactional and
    a writer takes the write lock up front: a deferred transaction that reads, then writes, fails
    at once with SQLITE_BUSY when another writer got in between (the busy timeout does not apply).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # readers never block the writer, nor it them. Switching a file to WAL can fail at once with
        # "database is locked" while other connections open it (sqlite's busy timeout does not
        # apply there: seen with 6 threads opening a new store), so retry for a while
        for attempt in range(100):
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 99:
                    raise
                time.sleep(0.01 + 0.002 * attempt)
        cur.execute("PRAGMA synchronous=NORMAL")  # safe against process crashes in WAL mode
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("aigc_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _sqlite_path(url: sa.URL) -> Path | None:
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def _parse_url(url: str | None) -> sa.URL:
    url = url or default_url()
    if "://" not in url:  # a plain path: a SQLite file
        url = f"sqlite:///{Path(url).expanduser().absolute()}"
    try:
        return sa.make_url(url)
    except sa.exc.ArgumentError:
        raise AigcError(
            f"--db {url!r} is not a database URL; pass a SQLite file path, sqlite:///PATH or "
            "postgresql+psycopg://user:pass@host/db"
        ) from None


def _generation_values(
    *,
    kind: str,
    model: str,
    prompt: str,
    params: dict[str, Any] | None = None,
    seed: int | None = None,
    output_text: str | None = None,
    output_ref: str | None = None,
    duration: float | None = None,
    model_hash: str | None = None,
    moderation: str | None = None,
    created: float | None = None,
    params_json: bool = False,
) -> dict[str, Any]:
    """A validated generation row's column values (not yet added); `params_json`: `params` as the
    JSON text its check made (what the JSON column stores), not the dict."""
    if kind not in GENERATION_KINDS:
        raise AigcError(f"generation kind must be one of {', '.join(GENERATION_KINDS)}, got {kind!r}")
    if not isinstance(model, str) or not model:
        raise AigcError("a generation needs the model's name (model=...)")
    if not isinstance(prompt, str):
        raise AigcError(f"a generation's prompt must be a string, got {type(prompt).__name__}")
    params = dict(params or {})
    try:
        text = json.dumps(params)
    except (TypeError, ValueError) as e:
        raise AigcError(f"generation params must be JSON-serialisable: {e}") from None
    if output_ref is not None:
        check_ref(output_ref)
    return dict(
        created=time.time() if created is None else created,
        kind=kind,
        model=model,
        prompt=prompt,
        params=text if params_json else params,
        seed=seed,
        output_text=output_text,
        output_ref=output_ref,
        duration=duration,
        model_hash=model_hash,
        moderation=moderation,
        rating_count=0,
        rating_sum=0.0,
    )


# Rating is the hot write path (many users, several workers): statements built once, on Core
# rather than the ORM, so the write lock is held for as little Python as possible. A rater has one
# rating per generation and kind (a unique index); rating again replaces its value.
# 1. lock the generation's row (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers),
#    so two votes of one rater on it cannot both miss each other's row; no row: no such generation
_RATE_LOCK = sa.select(Generation.id).where(Generation.id == sa.bindparam("gid")).with_for_update()
# 2. the rater's earlier rating of this kind, if any (after the lock: it sees every committed vote)
_RATE_MINE = sa.select(Rating.id, Rating.value).where(
    (Rating.generation_id == sa.bindparam("gid"))
    & (Rating.user_id == sa.bindparam("user"))
    & (Rating.kind == sa.bindparam("rkind"))
)
# 3. a new rating, or the earlier one replaced (a comment or correction left out keeps the old one)
_RATE_INSERT = sa.insert(Rating).returning(Rating.id)
_RATE_REPLACE = (
    sa.update(Rating)
    .where(Rating.id == sa.bindparam("rid"))
    .values(
        created=sa.bindparam("now"),
        value=sa.bindparam("new_value"),
        comment=sa.func.coalesce(sa.bindparam("new_comment", type_=sa.Text), Rating.comment),
        correction=sa.func.coalesce(sa.bindparam("new_correction", type_=sa.Text), Rating.correction),
    )
)
# 4. the summary, computed from the stored values (+1 vote and its score, or the score's change)
_RATE_SUMMARY = (
    sa.update(Generation)
    .where(Generation.id == sa.bindparam("gid"))
    .values(
        rating_count=Generation.rating_count + sa.bindparam("added"),
        rating_sum=Generation.rating_sum + sa.bindparam("delta"),
        rating=(Generation.rating_sum + sa.bindparam("delta"))
        / (Generation.rating_count + sa.bindparam("added")),
    )
    .returning(Generation.rating, Generation.rating_count)
)
# new generations, ids in the order of the rows
_GENERATION_INSERT = sa.insert(Generation).returning(Generation.id, sort_by_parameter_order=True)
# the same on SQLite, through the driver (`Store._sqlite_add`): the columns `_generation_values` fills
_GENERATION_COLUMNS = tuple(_generation_values(kind="text", model="m", prompt=""))
_GENERATION_SQLITE = (
    f"INSERT INTO {Generation.__tablename__} ({', '.join(_GENERATION_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_GENERATION_COLUMNS))})"
)


# ----------------------------------------------------------------------------- the store


def _check_limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise AigcError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")
    return limit


def _page(rows: list[Any], limit: int) -> dict[str, Any]:
    """OpenAI's list shape; `last_id` is the cursor for the next page (`before=`)."""
    data = [r.to_dict() for r in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """95% Wilson score interval of a proportion k / n (Wilson 1927); (None, None) when n = 0."""
    if n == 0:
        return None, None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def _add_my_ratings(s: Session, rows: list[dict[str, Any]], rater: str) -> None:
    """Set `my_rating` on generation rows: `rater`'s own rating of each kind, or None (one query)."""
    mine: dict[int, dict[str, int | None]] = {r["id"]: dict.fromkeys(RATING_RANGES) for r in rows}
    if mine:
        query = sa.select(Rating.generation_id, Rating.kind, Rating.value).where(
            (Rating.user_id == rater) & Rating.generation_id.in_(list(mine))
        )
        for gid, kind, value in s.execute(query):
            mine[gid][kind] = value
    for r in rows:
        r["my_rating"] = mine[r["id"]]


def _check_user(user: str | None) -> str | None:
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER):
        raise AigcError(f"user must be a string of at most {MAX_USER} characters")
    return user


class Store:
    """Generations, ratings, comparisons and jobs. Thread-safe; one per process is enough."""

    def __init__(self, engine: Engine, where: str):
        self.engine = engine
        self.where = where  # for messages (password hidden)
        self._write = engine.execution_options(aigc_write=True)

    @classmethod
    def open(cls, url: str | None = None, *, lock_timeout: float = 30.0, create: bool = True) -> Store:
        """Open (creating and migrating as needed) the store at `url`.

        `url`: a SQLAlchemy URL or a SQLite file path; None: `$AIGC_DB` or `$AIGC_HOME/aigc.db`.
        Checks at once that the database is reachable and writable, so a server fails at start,
        not on its first request. `lock_timeout`: seconds a writer waits for a lock (SQLite).
        `create=False` (commands that only read what is stored): a SQLite file that does not exist
        is an error, not a new empty database with its folders.
        """
        parsed = _parse_url(url)
        where = parsed.render_as_string(hide_password=True)
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            path = _sqlite_path(parsed)
            if not parsed.database or parsed.database == ":memory:":
                raise AigcError(
                    "an in-memory SQLite store is not supported (every connection would see its own "
                    "empty database); pass a file path, e.g. --db /tmp/aigc.db"
                )
            if path is not None:
                where = str(path)
                if path.is_dir():
                    raise AigcError(f"store {path} is a directory; pass a file path to --db / AIGC_DB")
                if not create and not path.is_file():
                    raise AigcError(
                        f"no database at {path}; generate something first (aigc serve records every "
                        "generation; aigc generate text --record) or pass the right --db / AIGC_DB"
                    )
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise AigcError(
                        f"cannot create the store's folder {path.parent}: {e.strerror}; "
                        "pass a writable path with --db or set AIGC_HOME / AIGC_DB"
                    ) from None
            kwargs["connect_args"] = {"timeout": lock_timeout}  # sqlite3's busy timeout
        else:
            kwargs["pool_pre_ping"] = True  # a server's connections outlive database restarts
        try:
            engine = sa.create_engine(parsed, **kwargs)
        except sa.exc.NoSuchModuleError:
            raise AigcError(
                f"unknown database kind {parsed.drivername!r} in --db / AIGC_DB; use a SQLite file path, "
                "sqlite:///PATH or postgresql+psycopg://user:pass@host/db"
            ) from None
        except ImportError as e:
            raise AigcError(
                f"no driver for {parsed.drivername}: {e}; install it (PostgreSQL: pip install 'aigc[postgres]')"
            ) from None
        if engine.dialect.name == "sqlite":
            _sqlite_hooks(engine)
        store = cls(engine, where)
        try:
            with store._write.begin() as conn:
                migrate(conn)
                # a write that changes nothing, to find a read-only file or database now
                conn.execute(sa.text("DELETE FROM schema_version WHERE version < 0"))
        except sa.exc.OperationalError as e:
            engine.dispose()
            reason = " ".join(str(e.orig if e.orig is not None else e).split())  # one line
            hint = (
                "check it is writable and not locked by another program"
                if engine.dialect.name == "sqlite"
                else "check the server is running and the URL, user and password are right"
            )
            raise AigcError(
                f"cannot open the store {where} for writing: {reason}; {hint}, or pass another --db / AIGC_DB"
            ) from None
        except sa.exc.DatabaseError as e:
            engine.dispose()
            raise AigcError(
                f"{where} is not a usable database ({' '.join(str(e.orig).split())}); "
                "pass another --db / AIGC_DB"
            ) from None
        return store

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        with Session(self._write if write else self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    def schema_version(self) -> int:
        with self._session() as s:
            return s.scalar(sa.select(sa.func.max(SchemaVersion.version))) or 0

    # -- generations

    def add_generation(
        self,
        *,
        kind: str,
        model: str,
        prompt: str,
        params: dict[str, Any] | None = None,
        seed: int | None = None,
        output_text: str | None = None,
        output_ref: str | None = None,
        duration: float | None = None,
        model_hash: str | None = None,
        moderation: str | None = None,
        created: float | None = None,
    ) -> int:
        """Record one generation; returns its id."""
        row = dict(kind=kind, model=model, prompt=prompt, params=params, seed=seed, output_text=output_text,
                   output_ref=output_ref, duration=duration, model_hash=model_hash, moderation=moderation,
                   created=created)  # fmt: skip
        return self.add_generations([row])[0]

    def add_generations(self, rows: list[dict[str, Any]]) -> list[int]:
        """Many `add_generation(**row)` in one transaction (the server's outputs, imports).

        One Core INSERT ... RETURNING on a plain connection (as rating does) rather than ORM
        objects in a session: the server calls this after every request, between decode steps that
        evict the CPU caches, and there the session path took ~0.95 ms a row, this one ~0.3 ms
        (0.29 / 0.11 ms hot; measured on the 2-core box). On SQLite the rows go in through the
        driver (`_sqlite_add`), a third of that again."""
        sqlite = self.engine.dialect.name == "sqlite"
        values = [_generation_values(**r, params_json=sqlite) for r in rows]  # (one json.dumps a row)
        if sqlite:
            return self._sqlite_add(values)
        with self._write.begin() as conn:
            return list(conn.scalars(_GENERATION_INSERT, values))

    def _sqlite_add(self, values: list[dict[str, Any]]) -> list[int]:
        """`add_generations` on SQLite: one BEGIN IMMEDIATE transaction on a pooled connection's
        sqlite3 handle, an INSERT per row, its id from `lastrowid`.

        What the Core path does, minus its per-statement work: a served text request ends with
        this write on its last chunk's path, and hot it took 124 µs a row through Core, 34 µs
        here (16 rows: 447 / 229 µs). `params` comes as the JSON text the JSON type stores (`json.dumps`,
        made once by `_generation_values`' check: twice was a quarter of the write);
        a sqlite3 error leaves as SQLAlchemy's (`sa.exc.OperationalError` for a lock timeout), as
        from the Core path, so callers handle one kind.
        """
        fairy = self.engine.raw_connection()  # the pool's: the connect hook's pragmas are set
        try:
            db = fairy.driver_connection
            db.execute("BEGIN IMMEDIATE")
            try:
                ids = []
                for v in values:
                    ids.append(db.execute(_GENERATION_SQLITE, [v[c] for c in _GENERATION_COLUMNS]).lastrowid)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return ids
        except sqlite3.Error as e:
            raise sa.exc.DBAPIError.instance(_GENERATION_SQLITE, None, e, sqlite3.Error) from e
        finally:
            fairy.close()

    def get_generation(self, generation_id: int, *, rater: str | None = None) -> dict[str, Any]:
        """One generation; with `rater`, also `my_rating` (see `list_generations`)."""
        with self._session() as s:
            row = s.get(Generation, generation_id)
            if row is None:
                raise NotFoundError(f"no generation with id {generation_id}; list them with `aigc history`")
            out = row.to_dict()
            if rater is not None:
                _add_my_ratings(s, [out], rater)
            return out

    def list_generations(
        self,
        *,
        kind: str | None = None,
        model: str | None = None,
        min_rating: float | None = None,
        q: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 20,
        before: int | None = None,
        moderation: str | None = None,
        rater: str | None = None,
    ) -> dict[str, Any]:
        """Newest first, keyset-paged: pass the previous page's `last_id` as `before`.

        `since` / `until`: unix times, `since <= created < until`.
        `moderation`: "flagged" or "blocked" (rows whose verdict starts so: "blocked:self-harm"),
        "any" (either), "none" (no verdict).
        `min_rating` is on the 1-5 star scale (a thumb up counts 5, a thumb down 1); `q` searches
        the prompt and the text output, case-insensitively. With `rater` (a user id), every row
        also has `my_rating`: `{"stars": 1-5 | None, "thumb": -1 | 1 | None}`, that rater's own.
        """
        limit = _check_limit(limit)
        query = sa.select(Generation).order_by(Generation.id.desc()).limit(limit + 1)
        if kind is not None:
            if kind not in GENERATION_KINDS:
                raise AigcError(f"kind must be one of {', '.join(GENERATION_KINDS)}, got {kind!r}")
            query = query.where(Generation.kind == kind)
        if model is not None:
            query = query.where(Generation.model == model)
        if min_rating is not None:
            query = query.where(Generation.rating >= float(min_rating))
        if q:
            query = query.where(
                Generation.prompt.icontains(q, autoescape=True)
                | Generation.output_text.icontains(q, autoescape=True)
            )
        if moderation is not None:
            if moderation not in MODERATION_FILTERS:
                raise AigcError(
                    f"moderation filter must be one of {', '.join(MODERATION_FILTERS)}, got {moderation!r}"
                )
            if moderation == "none":
                query = query.where(Generation.moderation.is_(None))
            elif moderation == "any":
                query = query.where(Generation.moderation.is_not(None))
            else:
                query = query.where(Generation.moderation.startswith(moderation + ":", autoescape=True))
        if since is not None:
            query = query.where(Generation.created >= float(since))
        if until is not None:
            query = query.where(Generation.created < float(until))
        if before is not None:
            query = query.where(Generation.id < before)
        with self._session() as s:
            page = _page(list(s.scalars(query)), limit)
            if rater is not None:
                _add_my_ratings(s, page["data"], rater)
            return page

    # -- ratings

    def add_rating(
        self,
        generation_id: int,
        value: int,
        kind: Literal["thumb", "stars"] = "thumb",
        comment: str | None = None,
        user: str | None = None,
        correction: str | None = None,
    ) -> int:
        """Rate a generation (see `rate`); returns the rating's id."""
        return self.rate(generation_id, value, kind, comment=comment, user=user, correction=correction)["id"]

    def rate(
        self,
        generation_id: int,
        value: int,
        kind: Literal["thumb", "stars"] = "thumb",
        comment: str | None = None,
        user: str | None = None,
        correction: str | None = None,
    ) -> dict[str, Any]:
        """Rate a generation: a thumb (-1 or 1) or 1-5 stars; `correction` is the output as it should be.

        A `user` has one rating of each kind per generation: rating again replaces its value (and its
        comment / correction, when given) and keeps its id. Ratings without a user are all kept.
        Returns `{"id", "replaced", "rating", "rating_count"}`, the last two the generation's
        summary after this vote (mean on the 1-5 star scale, number of ratings).
        """
        if kind not in RATING_RANGES:
            raise AigcError(f"rating kind must be one of {', '.join(RATING_RANGES)}, got {kind!r}")
        lo, hi = RATING_RANGES[kind]
        allowed = "-1 or 1" if kind == "thumb" else f"an integer from {lo} to {hi}"
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not lo <= value <= hi
            or (kind == "thumb" and value == 0)
        ):
            raise AigcError(f"a {kind} rating must be {allowed}, got {value!r}")
        for name, text in (("comment", comment), ("correction", correction)):
            if text is not None and (not isinstance(text, str) or len(text) > MAX_COMMENT):
                raise AigcError(f"{name} must be a string of at most {MAX_COMMENT} characters")
        _check_user(user)
        score, now = stars_score(kind, value), time.time()
        with self._write.begin() as conn:
            if conn.execute(_RATE_LOCK, {"gid": generation_id}).first() is None:
                raise NotFoundError(f"cannot rate generation {generation_id}: no such generation")
            mine = None
            if user is not None:
                mine = conn.execute(_RATE_MINE, {"gid": generation_id, "user": user, "rkind": kind}).first()
            if mine is None:
                rid = conn.execute(
                    _RATE_INSERT,
                    dict(generation_id=generation_id, created=now, kind=kind, value=value, comment=comment,
                         correction=correction, user_id=user),
                ).scalar_one()  # fmt: skip
                added, delta = 1, score
            else:
                rid = mine.id
                conn.execute(
                    _RATE_REPLACE,
                    dict(rid=rid, now=now, new_value=value, new_comment=comment, new_correction=correction),
                )  # fmt: skip
                added, delta = 0, score - stars_score(kind, mine.value)
            mean, count = conn.execute(
                _RATE_SUMMARY, {"gid": generation_id, "added": added, "delta": delta}
            ).one()
        return {"id": rid, "replaced": mine is not None, "rating": mean, "rating_count": count}

    def list_ratings(
        self, *, generation_id: int | None = None, limit: int = 20, before: int | None = None
    ) -> dict[str, Any]:
        limit = _check_limit(limit)
        query = sa.select(Rating).order_by(Rating.id.desc()).limit(limit + 1)
        if generation_id is not None:
            query = query.where(Rating.generation_id == generation_id)
        if before is not None:
            query = query.where(Rating.id < before)
        with self._session() as s:
            return _page(list(s.scalars(query)), limit)

    # -- comparisons

    def add_comparison(self, a: int, b: int, winner: int, user: str | None = None) -> int:
        """Record that `winner` (== a or b) is the better of generations a and b."""
        if a == b:
            raise AigcError(f"a comparison needs two different generations, got {a} twice")
        if winner not in (a, b):
            raise AigcError(f"winner must be one of the two compared ids ({a} or {b}), got {winner!r}")
        _check_user(user)
        with self._session(write=True) as s:
            for gid in (a, b):
                if s.get(Generation, gid) is None:
                    raise NotFoundError(f"cannot compare generation {gid}: no such generation")
            row = Comparison(created=time.time(), a_id=a, b_id=b, winner_id=winner, user_id=user)
            s.add(row)
            s.flush()
            return row.id

    def list_comparisons(self, *, limit: int = 20, before: int | None = None) -> dict[str, Any]:
        limit = _check_limit(limit)
        query = sa.select(Comparison).order_by(Comparison.id.desc()).limit(limit + 1)
        if before is not None:
            query = query.where(Comparison.id < before)
        with self._session() as s:
            return _page(list(s.scalars(query)), limit)

    def comparison_stats(self, a: str, b: str) -> dict[str, Any]:
        """How model `a` fares against model `b` (the `model` names of the compared generations).

        Counts every comparison of one generation of `a` with one of `b`, in either order: `wins`
        (a's was picked), `losses`; `win_rate` = wins / n with its 95% Wilson score interval
        (`ci_low`, `ci_high`; None when n = 0). A comparison always has a winner, so no ties.
        """
        if a == b:
            raise AigcError(f"compare two different models, got {a!r} twice")
        ga, gb = sa.orm.aliased(Generation), sa.orm.aliased(Generation)
        winner = sa.case((Comparison.winner_id == Comparison.a_id, ga.model), else_=gb.model)
        query = (
            sa.select(winner, sa.func.count())
            .select_from(Comparison)
            .join(ga, ga.id == Comparison.a_id)
            .join(gb, gb.id == Comparison.b_id)
            .where(((ga.model == a) & (gb.model == b)) | ((ga.model == b) & (gb.model == a)))
            .group_by(winner)
        )
        with self._session() as s:
            counts = dict(s.execute(query).all())
        wins, losses = counts.get(a, 0), counts.get(b, 0)
        n = wins + losses
        low, high = wilson_interval(wins, n)
        return {"object": "comparison.stats", "a": a, "b": b, "wins": wins, "losses": losses, "n": n,
                "win_rate": wins / n if n else None, "ci_low": low, "ci_high": high}  # fmt: skip

    # -- presets (saved studio parameters, per user)

    def save_preset(self, user: str, kind: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Save `params` as `user`'s preset `name` for `kind`; the same name again replaces it."""
        _check_user(user)
        if kind not in PRESET_KINDS:
            raise AigcError(f"preset kind must be one of {', '.join(PRESET_KINDS)}, got {kind!r}")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_PRESET_NAME:
            raise AigcError(f"a preset name is 1-{MAX_PRESET_NAME} characters, got {name!r}")
        if not isinstance(params, dict):
            raise AigcError("preset params must be a JSON object of parameter -> value")
        try:
            size = len(json.dumps(params))
        except (TypeError, ValueError) as e:
            raise AigcError(f"preset params must be JSON-serialisable: {e}") from None
        if size > MAX_PRESET_BYTES:
            raise AigcError(f"preset params are {size} bytes as JSON; at most {MAX_PRESET_BYTES} allowed")
        name, now = name.strip(), time.time()
        mine = (Preset.user_id == user) & (Preset.kind == kind)
        with self._session(write=True) as s:
            row = s.scalar(sa.select(Preset).where(mine & (Preset.name == name)))
            if row is None:
                count = s.scalar(sa.select(sa.func.count()).select_from(Preset).where(mine))
                if count >= MAX_PRESETS:
                    raise AigcError(f"at most {MAX_PRESETS} {kind} presets per user; delete some first")
                row = Preset(created=now, user_id=user, kind=kind, name=name)
                s.add(row)
            row.updated, row.params = now, params
            s.flush()
            return row.to_dict()

    def list_presets(self, user: str, kind: str | None = None) -> dict[str, Any]:
        """`user`'s presets (of `kind`), by name; OpenAI's list shape, all in one page."""
        query = sa.select(Preset).where(Preset.user_id == user).order_by(Preset.kind, Preset.name)
        if kind is not None:
            if kind not in PRESET_KINDS:
                raise AigcError(f"preset kind must be one of {', '.join(PRESET_KINDS)}, got {kind!r}")
            query = query.where(Preset.kind == kind)
        with self._session() as s:
            data = [r.to_dict() for r in s.scalars(query)]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}  # fmt: skip

    def delete_preset(self, user: str, preset_id: int) -> None:
        """Delete one of `user`'s presets (another user's looks the same as a missing one)."""
        with self._session(write=True) as s:
            row = s.get(Preset, preset_id)
            if row is None or row.user_id != user:
                raise NotFoundError(f"no preset with id {preset_id}; list yours with GET /v1/presets")
            s.delete(row)

    # -- jobs

    def add_job(
        self,
        kind: str,
        params: dict[str, Any] | None = None,
        model: str | None = None,
        user: str | None = None,
    ) -> int:
        """A new job (status `queued`) of `kind` (train, tune, ...) started by `user`; the worker updates it."""
        if not isinstance(kind, str) or not 1 <= len(kind) <= 32:
            raise AigcError(f"a job kind is a name of 1-32 characters (e.g. train, tune), got {kind!r}")
        try:
            json.dumps(params or {})
        except (TypeError, ValueError) as e:
            raise AigcError(f"job params must be JSON-serialisable: {e}") from None
        now = time.time()
        with self._session(write=True) as s:
            row = Job(created=now, updated=now, kind=kind, status="queued", model=model, params=params or {},
                      user_id=_check_user(user))  # fmt: skip
            s.add(row)
            s.flush()
            return row.id

    def update_job(
        self,
        job_id: int,
        *,
        status: str | None = None,
        progress: float | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        if status is not None and status not in JOB_STATUSES:
            raise AigcError(f"job status must be one of {', '.join(JOB_STATUSES)}, got {status!r}")
        with self._session(write=True) as s:
            row = s.get(Job, job_id)
            if row is None:
                raise NotFoundError(f"no job with id {job_id}")
            row.updated = time.time()
            if status is not None:
                row.status = status
                if status in ("succeeded", "failed", "cancelled"):
                    row.finished = row.updated
            if progress is not None:
                row.progress = float(progress)
            if result is not None:
                row.result = result
            if error is not None:
                row.error = error
            s.flush()
            return row.to_dict()

    def get_job(self, job_id: int) -> dict[str, Any]:
        with self._session() as s:
            row = s.get(Job, job_id)
            if row is None:
                raise NotFoundError(f"no job with id {job_id}")
            return row.to_dict()

    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        user: str | None = None,
        limit: int = 20,
        before: int | None = None,
    ) -> dict[str, Any]:
        limit = _check_limit(limit)
        query = sa.select(Job).order_by(Job.id.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(Job.status == status)
        if kind is not None:
            query = query.where(Job.kind == kind)
        if user is not None:
            query = query.where(Job.user_id == user)
        if before is not None:
            query = query.where(Job.id < before)
        with self._session() as s:
            return _page(list(s.scalars(query)), limit)

    # -- export

    def export_feedback(self, format: str, *, min_gap: float = 1.0) -> list[dict[str, Any]]:
        """Feedback as TRL data set rows (dpo, kto or sft); see `aigc.feedback.export`."""
        with self._session() as s:
            return export_rows(s, format, min_gap=min_gap)


__all__ = [
    "EXPORT_FORMATS",
    "GENERATION_KINDS",
    "JOB_STATUSES",
    "MIGRATIONS",
    "RATING_RANGES",
    "SCHEMA_VERSION",
    "PRESET_KINDS",
    "NotFoundError",
    "Store",
    "default_url",
    "migrate",
    "stars_score",
]
