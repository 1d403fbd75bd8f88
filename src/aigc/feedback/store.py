"""The content store: generations, ratings, comparisons and jobs in one SQL database.

SQLAlchemy 2 ORM, dialect-neutral: a SQLite file by default (`$AIGC_HOME/aigc.db`, WAL mode), any
SQLAlchemy URL (`--db` / `$AIGC_DB`, e.g. `postgresql+psycopg://...`) when several users or server
replicas share it. Outputs (images, audio) are not stored here: a generation keeps a reference
into the content-addressed folder (`aigc.feedback.blobs`).

Schema changes are an ordered list of migration functions keyed by version (`MIGRATIONS`), run
automatically at open inside one write transaction; `schema_version` records which ran. The ORM
classes below describe the latest version; a test checks the migrated schema matches them.

Feedback leaves as TRL data sets (`export_feedback`): dpo (prompt / chosen / rejected), kto
(prompt / completion / label) and sft (prompt / completion).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.schema import CreateColumn

from aigc.errors import AigcError

GENERATION_KINDS = ("text", "image", "music", "audio")
RATING_RANGES = {"thumb": (-1, 1), "stars": (1, 5)}  # thumbs are -1 / 1 (no 0)
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
EXPORT_FORMATS = ("dpo", "kto", "sft")
MAX_LIMIT = 1000
MAX_USER = 128
MAX_COMMENT = 20_000


class NotFoundError(AigcError):
    """An id that is not in the store (HTTP 404)."""


def aigc_home() -> Path:
    return Path(os.environ.get("AIGC_HOME") or Path.home() / ".aigc")


def default_url() -> str:
    """`$AIGC_DB`, else a SQLite file `$AIGC_HOME/aigc.db`."""
    return os.environ.get("AIGC_DB") or f"sqlite:///{aigc_home() / 'aigc.db'}"


def stars_score(kind: str, value: int) -> float:
    """A rating on the common 1-5 star scale (thumb down = 1, thumb up = 5), for sorting and filters."""
    return (3.0 + 2.0 * value) if kind == "thumb" else float(value)


# ----------------------------------------------------------------------------- tables (latest schema)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    applied: Mapped[float] = mapped_column(Float)


class Generation(Base):
    __tablename__ = "generations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[float] = mapped_column(Float, index=True)  # unix seconds, UTC
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(256))  # name@version as the user named it
    prompt: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)  # every parameter, resolved
    seed: Mapped[int | None] = mapped_column(sa.BigInteger)
    output_text: Mapped[str | None] = mapped_column(Text)
    output_ref: Mapped[str | None] = mapped_column(String(128))  # a blob ref (images, audio)
    duration: Mapped[float | None] = mapped_column(Float)  # seconds
    # v2
    model_hash: Mapped[str | None] = mapped_column(String(64))
    moderation: Mapped[str | None] = mapped_column(String(64))
    # denormalised rating summary, kept by add_rating so filters and sorting need no join
    rating_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rating_sum: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    rating: Mapped[float | None] = mapped_column(Float, index=True)  # mean, 1-5 star scale
    __table_args__ = (
        Index("ix_generations_kind_id", "kind", "id"),
        Index("ix_generations_model_id", "model", "id"),
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "generation",
            "created": self.created,
            "kind": self.kind,
            "model": self.model,
            "model_hash": self.model_hash,
            "prompt": self.prompt,
            "params": self.params,
            "seed": self.seed,
            "output_text": self.output_text,
            "output_ref": self.output_ref,
            "duration": self.duration,
            "moderation": self.moderation,
            "rating": self.rating,
            "rating_count": self.rating_count,
        }


class Rating(Base):
    __tablename__ = "ratings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"), index=True)
    created: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(8))  # thumb | stars
    value: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    # v2
    correction: Mapped[str | None] = mapped_column(Text)  # the output as the user would have it
    user_id: Mapped[str | None] = mapped_column(String(MAX_USER))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "rating",
            "generation_id": self.generation_id,
            "created": self.created,
            "kind": self.kind,
            "value": self.value,
            "comment": self.comment,
            "correction": self.correction,
            "user": self.user_id,
        }


class Comparison(Base):
    __tablename__ = "comparisons"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[float] = mapped_column(Float, index=True)
    a_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"), index=True)
    b_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"), index=True)
    winner_id: Mapped[int] = mapped_column(Integer)  # a_id or b_id
    user_id: Mapped[str | None] = mapped_column(String(MAX_USER))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "comparison",
            "created": self.created,
            "a": self.a_id,
            "b": self.b_id,
            "winner": self.winner_id,
            "user": self.user_id,
        }


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[float] = mapped_column(Float, index=True)
    updated: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))  # train | tune | ...
    status: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str | None] = mapped_column(String(256))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[float | None] = mapped_column(Float)  # 0..1
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "job",
            "created": self.created,
            "updated": self.updated,
            "finished": self.finished,
            "kind": self.kind,
            "status": self.status,
            "model": self.model,
            "params": self.params,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
        }


# ----------------------------------------------------------------------------- migrations
# Each function takes a connection inside the open write transaction. Table shapes are written out
# as they were at that version (not taken from the ORM classes above, which move on).


def _migrate_v1(conn: Connection) -> None:
    """The first store: generations and their ratings."""
    md = sa.MetaData()
    sa.Table(
        "generations",
        md,
        sa.Column("id", Integer, primary_key=True),
        sa.Column("created", Float, nullable=False),
        sa.Column("kind", String(16), nullable=False),
        sa.Column("model", String(256), nullable=False),
        sa.Column("prompt", Text, nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("seed", sa.BigInteger),
        sa.Column("output_text", Text),
        sa.Column("output_ref", String(128)),
        sa.Column("duration", Float),
        Index("ix_generations_created", "created"),
        Index("ix_generations_kind_id", "kind", "id"),
        Index("ix_generations_model_id", "model", "id"),
    )
    sa.Table(
        "ratings",
        md,
        sa.Column("id", Integer, primary_key=True),
        sa.Column("generation_id", Integer, ForeignKey("generations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created", Float, nullable=False),
        sa.Column("kind", String(8), nullable=False),
        sa.Column("value", Integer, nullable=False),
        sa.Column("comment", Text),
        Index("ix_ratings_generation_id", "generation_id"),
        Index("ix_ratings_created", "created"),
    )
    md.create_all(conn)


def _add_column(conn: Connection, table: str, column: sa.Column) -> None:
    spec = CreateColumn(column).compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE {conn.dialect.identifier_preparer.quote(table)} ADD COLUMN {spec}"))


def _migrate_v2(conn: Connection) -> None:
    """Model hash, moderation verdict, rating summary, corrections, users; comparisons and jobs."""
    _add_column(conn, "generations", sa.Column("model_hash", String(64)))
    _add_column(conn, "generations", sa.Column("moderation", String(64)))
    _add_column(conn, "generations", sa.Column("rating_count", Integer, nullable=False, server_default="0"))
    _add_column(conn, "generations", sa.Column("rating_sum", Float, nullable=False, server_default="0"))
    _add_column(conn, "generations", sa.Column("rating", Float))
    _add_column(conn, "ratings", sa.Column("correction", Text))
    _add_column(conn, "ratings", sa.Column("user_id", String(MAX_USER)))
    md = sa.MetaData()
    gens = sa.Table("generations", md, autoload_with=conn)
    ratings = sa.Table("ratings", md, autoload_with=conn)
    Index("ix_generations_rating", gens.c.rating).create(conn)
    # back-fill the rating summary from the ratings already there (thumbs on the 1-5 scale)
    score = sa.case((ratings.c.kind == "thumb", 3.0 + 2.0 * ratings.c.value), else_=ratings.c.value * 1.0)
    mine = ratings.c.generation_id == gens.c.id
    n = sa.select(sa.func.count()).where(mine).scalar_subquery()
    total = sa.select(sa.func.coalesce(sa.func.sum(score), 0.0)).where(mine).scalar_subquery()
    mean = sa.select(sa.func.avg(score)).where(mine).scalar_subquery()
    conn.execute(gens.update().values(rating_count=n, rating_sum=total, rating=mean))
    sa.Table(
        "comparisons",
        md,
        sa.Column("id", Integer, primary_key=True),
        sa.Column("created", Float, nullable=False),
        sa.Column("a_id", Integer, ForeignKey("generations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("b_id", Integer, ForeignKey("generations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("winner_id", Integer, nullable=False),
        sa.Column("user_id", String(MAX_USER)),
        Index("ix_comparisons_created", "created"),
        Index("ix_comparisons_a_id", "a_id"),
        Index("ix_comparisons_b_id", "b_id"),
    )
    sa.Table(
        "jobs",
        md,
        sa.Column("id", Integer, primary_key=True),
        sa.Column("created", Float, nullable=False),
        sa.Column("updated", Float, nullable=False),
        sa.Column("finished", Float),
        sa.Column("kind", String(32), nullable=False),
        sa.Column("status", String(16), nullable=False),
        sa.Column("model", String(256)),
        sa.Column("params", JSON, nullable=False),
        sa.Column("progress", Float),
        sa.Column("result", JSON),
        sa.Column("error", Text),
        Index("ix_jobs_created", "created"),
        Index("ix_jobs_status", "status"),
    )
    md.create_all(conn, tables=[md.tables["comparisons"], md.tables["jobs"]])


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_v1, 2: _migrate_v2}
SCHEMA_VERSION = max(MIGRATIONS)


def migrate(conn: Connection) -> list[int]:
    """Bring the database up to SCHEMA_VERSION; returns the versions applied (caller commits)."""
    versions = sa.Table(
        "schema_version",
        sa.MetaData(),
        sa.Column("version", Integer, primary_key=True, autoincrement=False),
        sa.Column("applied", Float, nullable=False),
    )
    if conn.dialect.name == "postgresql":  # serialise replicas migrating at once (SQLite: BEGIN IMMEDIATE)
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7411)"))
    inspector = sa.inspect(conn)
    if not inspector.has_table("schema_version"):
        if inspector.has_table("generations"):
            raise AigcError(
                "the database has a generations table but no schema_version: it is not an aigc store "
                "(or predates versioning); point --db / AIGC_DB at another database"
            )
        versions.create(conn)
    current = conn.execute(sa.select(sa.func.max(versions.c.version))).scalar() or 0
    if current > SCHEMA_VERSION:
        raise AigcError(
            f"the store's schema is version {current}, newer than this aigc knows ({SCHEMA_VERSION}); "
            "upgrade aigc (pip install -U aigc) or use another --db"
        )
    applied = []
    for version in sorted(v for v in MIGRATIONS if v > current):
        MIGRATIONS[version](conn)
        conn.execute(versions.insert().values(version=version, applied=time.time()))
        applied.append(version)
    return applied


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
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
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
    def open(cls, url: str | None = None, *, lock_timeout: float = 30.0) -> Store:
        """Open (creating and migrating as needed) the store at `url`.

        `url`: a SQLAlchemy URL or a SQLite file path; None: `$AIGC_DB` or `$AIGC_HOME/aigc.db`.
        Checks at once that the database is reachable and writable, so a server fails at start,
        not on its first request. `lock_timeout`: seconds a writer waits for a lock (SQLite).
        """
        parsed = _parse_url(url)
        where = parsed.render_as_string(hide_password=True)
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            path = _sqlite_path(parsed)
            if path is not None:
                where = str(path)
                if path.is_dir():
                    raise AigcError(f"store {path} is a directory; pass a file path to --db / AIGC_DB")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise AigcError(
                        f"cannot create the store's folder {path.parent}: {e.strerror}; "
                        "pass a writable path with --db or set AIGC_HOME / AIGC_DB"
                    ) from None
            kwargs["connect_args"] = {"timeout": lock_timeout}  # sqlite3's busy timeout
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
            reason = str(e.orig).strip() if e.orig is not None else str(e)
            raise AigcError(
                f"cannot open the store {where} for writing: {reason}; check it is writable and not "
                "locked by another program, or pass another --db / AIGC_DB"
            ) from None
        except sa.exc.DatabaseError as e:
            engine.dispose()
            raise AigcError(
                f"{where} is not a usable database ({e.orig}); pass another --db / AIGC_DB"
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
        if kind not in GENERATION_KINDS:
            raise AigcError(f"generation kind must be one of {', '.join(GENERATION_KINDS)}, got {kind!r}")
        if not isinstance(model, str) or not model:
            raise AigcError("a generation needs the model's name (model=...)")
        params = dict(params or {})
        try:
            json.dumps(params)
        except (TypeError, ValueError) as e:
            raise AigcError(f"generation params must be JSON-serialisable: {e}") from None
        if output_ref is not None:
            from aigc.feedback.blobs import check_ref

            check_ref(output_ref)
        row = Generation(
            created=time.time() if created is None else created,
            kind=kind,
            model=model,
            prompt=prompt,
            params=params,
            seed=seed,
            output_text=output_text,
            output_ref=output_ref,
            duration=duration,
            model_hash=model_hash,
            moderation=moderation,
            rating_count=0,
            rating_sum=0.0,
        )
        with self._session(write=True) as s:
            s.add(row)
            s.flush()
            return row.id

    def add_generations(self, rows: list[dict[str, Any]]) -> list[int]:
        """Many `add_generation(**row)` in one transaction (imports, benchmarks)."""
        now = time.time()
        objs = [
            Generation(**{"created": now, "params": {}, "rating_count": 0, "rating_sum": 0.0, **r})
            for r in rows
        ]
        for o in objs:
            if o.kind not in GENERATION_KINDS:
                raise AigcError(
                    f"generation kind must be one of {', '.join(GENERATION_KINDS)}, got {o.kind!r}"
                )
        with self._session(write=True) as s:
            s.add_all(objs)
            s.flush()
            return [o.id for o in objs]

    def get_generation(self, generation_id: int) -> dict[str, Any]:
        with self._session() as s:
            row = s.get(Generation, generation_id)
            if row is None:
                raise NotFoundError(f"no generation with id {generation_id}; list them with `aigc history`")
            return row.to_dict()

    def list_generations(
        self,
        *,
        kind: str | None = None,
        model: str | None = None,
        min_rating: float | None = None,
        q: str | None = None,
        limit: int = 20,
        before: int | None = None,
    ) -> dict[str, Any]:
        """Newest first, keyset-paged: pass the previous page's `last_id` as `before`.

        `min_rating` is on the 1-5 star scale (a thumb up counts 5, a thumb down 1); `q` searches
        the prompt and the text output, case-insensitively.
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
        if before is not None:
            query = query.where(Generation.id < before)
        with self._session() as s:
            return _page(list(s.scalars(query)), limit)

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
        """Rate a generation: a thumb (-1 or 1) or 1-5 stars; `correction` is the output as it should be."""
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
        score = stars_score(kind, value)
        with self._session(write=True) as s:
            if s.get(Generation, generation_id) is None:
                raise NotFoundError(f"cannot rate generation {generation_id}: no such generation")
            row = Rating(
                generation_id=generation_id,
                created=time.time(),
                kind=kind,
                value=value,
                comment=comment,
                correction=correction,
                user_id=user,
            )
            s.add(row)
            # one UPDATE computing from the stored values, so concurrent raters never lose a vote
            s.execute(
                sa.update(Generation)
                .where(Generation.id == generation_id)
                .values(
                    rating_count=Generation.rating_count + 1,
                    rating_sum=Generation.rating_sum + score,
                    rating=(Generation.rating_sum + score) / (Generation.rating_count + 1),
                )
                .execution_options(synchronize_session=False)
            )
            s.flush()
            return row.id

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

    # -- jobs

    def add_job(self, kind: str, params: dict[str, Any] | None = None, model: str | None = None) -> int:
        now = time.time()
        with self._session(write=True) as s:
            row = Job(created=now, updated=now, kind=kind, status="queued", model=model, params=params or {})
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
        self, *, status: str | None = None, limit: int = 20, before: int | None = None
    ) -> dict[str, Any]:
        limit = _check_limit(limit)
        query = sa.select(Job).order_by(Job.id.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(Job.status == status)
        if before is not None:
            query = query.where(Job.id < before)
        with self._session() as s:
            return _page(list(s.scalars(query)), limit)

    # -- export

    def export_feedback(self, format: str, *, min_gap: float = 1.0) -> list[dict[str, Any]]:
        """Feedback as TRL data set rows, deduplicated. Only text outputs take part.

        dpo: prompt / chosen / rejected, from comparisons (majority vote per pair; ties dropped) and
             from uncompared same-prompt generations whose mean ratings differ by >= `min_gap` stars;
        kto: prompt / completion / label, one row per generation with thumbs (label = majority);
        sft: prompt / completion, from the corrections users wrote.
        """
        if format not in EXPORT_FORMATS:
            raise AigcError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
        with self._session() as s:
            if format == "sft":
                rows = s.execute(
                    sa.select(Generation.prompt, Rating.correction)
                    .join(Rating, Rating.generation_id == Generation.id)
                    .where(Rating.correction.is_not(None))
                    .order_by(Rating.id)
                )
                out = [{"prompt": p, "completion": c} for p, c in rows if c.strip()]
            elif format == "kto":
                votes = s.execute(
                    sa.select(Generation.prompt, Generation.output_text, sa.func.sum(Rating.value))
                    .join(Rating, Rating.generation_id == Generation.id)
                    .where(Rating.kind == "thumb", Generation.output_text.is_not(None))
                    .group_by(Generation.id, Generation.prompt, Generation.output_text)
                    .order_by(Generation.id)
                )
                out = [{"prompt": p, "completion": c, "label": v > 0} for p, c, v in votes if v != 0]
            else:
                out = self._dpo_rows(s, min_gap)
        return _dedupe(out)

    def _dpo_rows(self, s: Session, min_gap: float) -> list[dict[str, Any]]:
        texts = {
            gid: (prompt, text)
            for gid, prompt, text in s.execute(
                sa.select(Generation.id, Generation.prompt, Generation.output_text).where(
                    Generation.output_text.is_not(None)
                )
            )
        }
        # 1. explicit comparisons: count wins per unordered pair, keep the majority
        wins: Counter[tuple[int, int]] = Counter()
        for a, b, w in s.execute(sa.select(Comparison.a_id, Comparison.b_id, Comparison.winner_id)):
            loser = b if w == a else a
            wins[(w, loser)] += 1
        out, compared = [], {frozenset(pair) for pair in wins}  # ties too: no rating-gap pair for them
        for (w, lo), n in sorted(wins.items()):
            if n <= wins.get((lo, w), 0):
                continue  # a tie or the minority view
            if w in texts and lo in texts and texts[w][0] == texts[lo][0]:
                out.append({"prompt": texts[w][0], "chosen": texts[w][1], "rejected": texts[lo][1]})
        # 2. rating gaps between outputs of the same prompt (pairs users compared are left to that)
        by_prompt: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for gid, prompt, rating in s.execute(
            sa.select(Generation.id, Generation.prompt, Generation.rating).where(
                Generation.rating.is_not(None), Generation.output_text.is_not(None)
            )
        ):
            by_prompt[prompt].append((rating, gid))
        for prompt, rated in by_prompt.items():
            for (ra, ga), (rb, gb) in itertools.combinations(sorted(rated, reverse=True), 2):
                if ra - rb >= min_gap and frozenset((ga, gb)) not in compared:
                    out.append({"prompt": prompt, "chosen": texts[ga][1], "rejected": texts[gb][1]})
        return [r for r in out if r["chosen"] != r["rejected"]]


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for row in rows:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


__all__ = [
    "EXPORT_FORMATS",
    "GENERATION_KINDS",
    "JOB_STATUSES",
    "MIGRATIONS",
    "RATING_RANGES",
    "SCHEMA_VERSION",
    "NotFoundError",
    "Store",
    "default_url",
    "migrate",
    "stars_score",
]
