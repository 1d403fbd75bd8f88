"""The store's tables (latest version) and the ordered migrations that build them.

The ORM classes describe the schema as of SCHEMA_VERSION. Databases are never made from them with
`create_all`: every database, new or old, is brought up to date by running the migration functions
it has not run yet (`MIGRATIONS`, keyed by version, each inside the open write transaction), and
`schema_version` records which ran. A migration writes its tables out as they were at its version,
so later changes to the classes never change what an old migration does; a test checks that the
migrated schema matches the classes. All DDL here is dialect-neutral (SQLite and PostgreSQL).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import CreateColumn

from aigc.errors import AigcError

MAX_USER = 128  # characters in a user / API key id
MAX_PRESET_NAME = 64  # characters in a saved preset's name
UNIQUE_RATING = "uq_ratings_generation_user_kind"  # the index that makes a rater's new vote replace the old


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
    # v4: one rating per rater and kind; rating again replaces it (NULL users never collide)
    __table_args__ = (Index(UNIQUE_RATING, "generation_id", "user_id", "kind", unique=True),)

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
    # v3
    user_id: Mapped[str | None] = mapped_column(String(MAX_USER), index=True)  # who started it

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
            "user": self.user_id,
        }


class Preset(Base):
    """Saved generation parameters of one user (API key hash) for one studio tab."""

    __tablename__ = "presets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    user_id: Mapped[str] = mapped_column(String(MAX_USER))
    kind: Mapped[str] = mapped_column(String(16))  # text | image | music
    name: Mapped[str] = mapped_column(String(MAX_PRESET_NAME))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    __table_args__ = (sa.UniqueConstraint("user_id", "kind", "name", name="uq_presets_user_kind_name"),)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "preset",
            "created": self.created,
            "updated": self.updated,
            "kind": self.kind,
            "name": self.name,
            "params": self.params,
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


def _migrate_v3(conn: Connection) -> None:
    """Jobs know who started them (the studio's training jobs are per API key); saved presets."""
    _add_column(conn, "jobs", sa.Column("user_id", String(MAX_USER)))
    md = sa.MetaData()
    jobs = sa.Table("jobs", md, autoload_with=conn)
    Index("ix_jobs_user_id", jobs.c.user_id).create(conn)
    sa.Table(
        "presets",
        md,
        sa.Column("id", Integer, primary_key=True),
        sa.Column("created", Float, nullable=False),
        sa.Column("updated", Float, nullable=False),
        sa.Column("user_id", String(MAX_USER), nullable=False),
        sa.Column("kind", String(16), nullable=False),
        sa.Column("name", String(64), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.UniqueConstraint("user_id", "kind", "name", name="uq_presets_user_kind_name"),
    )
    md.create_all(conn, tables=[md.tables["presets"]])


def _migrate_v4(conn: Connection) -> None:
    """One rating per (generation, user, kind): a rater who rates again replaces their rating.

    Before, every click was a new vote, so a store may hold several from one rater. Of those the
    latest stays, taking the latest comment and correction any of them had (what rating again now
    does); the older ones go and the rating summary of their generations is recomputed. Ratings
    without a user (NULL: old rows, scripts) all stay, as nothing tells their raters apart."""
    md = sa.MetaData()
    ratings = sa.Table("ratings", md, autoload_with=conn)
    gens = sa.Table("generations", md, autoload_with=conn)
    o = ratings.alias("o")
    same = (
        (o.c.generation_id == ratings.c.generation_id)
        & (o.c.user_id == ratings.c.user_id)
        & (o.c.kind == ratings.c.kind)
    )
    older = sa.exists().where(same & (o.c.id < ratings.c.id))
    newer = sa.exists().where(same & (o.c.id > ratings.c.id))
    # 1. a rater's latest rating keeps the latest comment / correction of their older ones
    for col in ("comment", "correction"):
        latest = (
            sa.select(o.c[col])
            .where(same & (o.c.id < ratings.c.id) & o.c[col].is_not(None))
            .order_by(o.c.id.desc())
            .limit(1)
            .scalar_subquery()
        )
        conn.execute(
            ratings.update()
            .where(ratings.c.user_id.is_not(None) & ratings.c[col].is_(None) & older & ~newer)
            .values({col: latest})
        )
    # 2. drop the older ones, 3. recompute the summary of the generations they were on
    stale = ratings.c.user_id.is_not(None) & newer
    touched = list(conn.scalars(sa.select(ratings.c.generation_id).where(stale).distinct()))
    if touched:
        conn.execute(ratings.delete().where(stale))
        mine = ratings.c.generation_id == gens.c.id
        score = sa.case((ratings.c.kind == "thumb", 3.0 + 2.0 * ratings.c.value), else_=ratings.c.value * 1.0)
        n = sa.select(sa.func.count()).where(mine).scalar_subquery()
        total = sa.select(sa.func.coalesce(sa.func.sum(score), 0.0)).where(mine).scalar_subquery()
        mean = sa.select(sa.func.avg(score)).where(mine).scalar_subquery()
        for i in range(0, len(touched), 500):  # bound the IN list
            conn.execute(
                gens.update()
                .where(gens.c.id.in_(touched[i : i + 500]))
                .values(rating_count=n, rating_sum=total, rating=mean)
            )
    # 4. from now on the database keeps it so
    Index(UNIQUE_RATING, ratings.c.generation_id, ratings.c.user_id, ratings.c.kind, unique=True).create(conn)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _migrate_v1,
    2: _migrate_v2,
    3: _migrate_v3,
    4: _migrate_v4,
}
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


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Base",
    "Comparison",
    "Generation",
    "Job",
    "Preset",
    "Rating",
    "SchemaVersion",
    "UNIQUE_RATING",
    "migrate",
]
