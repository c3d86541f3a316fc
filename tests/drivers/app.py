"""One app's queries through psycopg 3 (text and binary), asyncpg and
SQLAlchemy 2's ORM over psycopg,
printed as JSON lines with each value's Python type, so a run against
cutover's SQLite engine can be compared line for line with a run against
the converted PostgreSQL.

usage: app.py DSN
"""

import asyncio
import datetime
import decimal
import json
import sys
import uuid

import asyncpg
import psycopg

DSN = sys.argv[1]
AT = datetime.datetime(2025, 6, 15, 15, 6, 40, tzinfo=datetime.timezone.utc)


def enc(v):
    if v is None:
        return None
    if isinstance(v, bool):
        return ["bool", v]
    if isinstance(v, int):
        return ["int", v]
    if isinstance(v, float):
        return ["float", repr(v)]
    if isinstance(v, decimal.Decimal):
        return ["decimal", str(v)]
    if isinstance(v, datetime.datetime):
        return ["datetime", v.isoformat()]
    if isinstance(v, datetime.date):
        return ["date", v.isoformat()]
    if isinstance(v, (bytes, bytearray, memoryview)):
        return ["bytes", bytes(v).hex()]
    if isinstance(v, uuid.UUID):
        return ["uuid", str(v)]
    if isinstance(v, (dict, list)):
        return ["json", v]
    return [type(v).__name__, str(v)]


def out(*parts):
    print(json.dumps(parts, sort_keys=True, ensure_ascii=False))


READS = [
    ("SELECT id, email, name, is_admin, active, created_at, birthday, prefs, nickname, balance, avatar FROM users ORDER BY id LIMIT 5", ()),
    ("SELECT id, title, price, views, score, published_at FROM posts WHERE user_id = %s ORDER BY id", (3,)),
    ("SELECT count(*) AS n, sum(views) AS total, avg(views) AS mean FROM posts", ()),
    ("SELECT u.email, count(p.id) AS posts FROM users u LEFT JOIN posts p ON p.user_id = u.id GROUP BY u.email ORDER BY posts DESC, u.email LIMIT 5", ()),
    ("SELECT id FROM users WHERE email ILIKE %s ORDER BY id", ("%USER2%",)),
    ("SELECT id, is_admin FROM users WHERE is_admin = %s ORDER BY id LIMIT 3", (True,)),
    ("SELECT id, created_at FROM users WHERE created_at >= %s ORDER BY created_at, id LIMIT 3", (datetime.datetime(2024, 3, 1, 14, 0, tzinfo=datetime.timezone.utc),)),
    ("SELECT id, deleted_at FROM posts ORDER BY deleted_at DESC, id LIMIT 4", ()),
    ("SELECT current_database() AS db, current_schema() AS schema", ()),
]


def psycopg_run(binary):
    label = "psycopg-binary" if binary else "psycopg-text"
    with psycopg.connect(DSN, autocommit=True) as conn:
        with conn.cursor(binary=binary) as cur:
            for sql, params in READS:
                cur.execute(sql, params)
                names = [d.name for d in cur.description]
                types = [d.type_code for d in cur.description]
                out(label, sql, names, types, [[enc(v) for v in row] for row in cur.fetchall()])
            # Ids are not compared after a failed insert: PostgreSQL's
            # sequence skips the value a failed insert took, SQLite's
            # AUTOINCREMENT does not.
            cur.execute("INSERT INTO tags (name, slug) VALUES (%s, %s) RETURNING id, name, slug", ("Py", "py-" + label))
            out(label, "insert", [enc(v) for v in cur.fetchone()[1:]])
            try:
                cur.execute("INSERT INTO tags (name, slug) VALUES (%s, %s)", ("Dup", "py-" + label))
            except psycopg.Error as e:
                out(label, "duplicate", e.sqlstate, e.diag.constraint_name)
            cur.execute("UPDATE posts SET views = views + 1 WHERE id = %s RETURNING views", (4,))
            out(label, "update", [enc(v) for v in cur.fetchone()])
            try:
                cur.execute("SELECT nope FROM users")
            except psycopg.Error as e:
                out(label, "undefined column", e.sqlstate)
        conn.autocommit = False
        with conn.transaction():
            conn.execute("INSERT INTO tags (name, slug) VALUES ('tx', %s)", ("tx-" + label,))
            try:
                with conn.transaction():
                    conn.execute("INSERT INTO tags (name, slug) VALUES ('tx', %s)", ("tx-" + label,))
            except psycopg.errors.UniqueViolation:
                out(label, "savepoint rolled back")
        row = conn.execute("SELECT count(*) FROM tags WHERE slug = %s", ("tx-" + label,)).fetchone()
        out(label, "after transaction", enc(row[0]))
        conn.rollback()


async def asyncpg_run():
    label = "asyncpg"
    conn = await asyncpg.connect(DSN)
    try:
        for sql, params in READS:
            n = 0
            def number(match):
                nonlocal n
                n += 1
                return f"${n}"
            import re
            numbered = re.sub(r"%s", number, sql)
            stmt = await conn.prepare(numbered)
            rows = await stmt.fetch(*params)
            out(label, sql, [a.name for a in stmt.get_attributes()], [a.type.oid for a in stmt.get_attributes()], [[enc(v) for v in r] for r in rows])
        row = await conn.fetchrow("INSERT INTO tags (name, slug) VALUES ($1, $2) RETURNING id, name", "Apg", "apg")
        out(label, "insert", [enc(v) for v in row[1:]])
        row = await conn.fetchrow(
            "INSERT INTO users (email, name, is_admin, created_at, balance) VALUES ($1, $2, $3, $4, 0) RETURNING id, is_admin, created_at",
            "apg@example.com", "A", True, AT,
        )
        out(label, "insert user", [enc(v) for v in row])
        try:
            await conn.execute("INSERT INTO tags (slug) VALUES ('x')")
        except asyncpg.PostgresError as e:
            out(label, "not null", e.sqlstate, e.column_name, e.table_name)
        async with conn.transaction():
            await conn.execute("UPDATE posts SET views = views + 10 WHERE id = 5")
        out(label, "views", enc(await conn.fetchval("SELECT views FROM posts WHERE id = 5")))
        out(label, "show", await conn.fetchval("SHOW transaction_isolation"))
        # executemany outside a transaction: all rows or none (the
        # extended protocol's implicit transaction up to Sync).
        try:
            await conn.executemany(
                "INSERT INTO tags (name, slug) VALUES ($1, $2)",
                [("many", "many-1"), ("many", "many-2"), ("many", "many-1")],
            )
        except asyncpg.PostgresError as e:
            out(label, "executemany", e.sqlstate)
        out(label, "after executemany", enc(await conn.fetchval("SELECT count(*) FROM tags WHERE name = 'many'")))
        await conn.executemany(
            "INSERT INTO tags (name, slug) VALUES ($1, $2)",
            [("many", "many-3"), ("many", "many-4")],
        )
        out(label, "after executemany", enc(await conn.fetchval("SELECT count(*) FROM tags WHERE name = 'many'")))
    finally:
        await conn.close()


def sqlalchemy_run():
    """SQLAlchemy's connect (SHOW TRANSACTION ISOLATION LEVEL, psycopg's
    TypeInfo query for hstore) and ORM unit of work, whose multi-object
    INSERT is `INSERT ... SELECT ... FROM (VALUES ...) AS imp_sen (...)
    ORDER BY sen_counter RETURNING ...`."""
    from sqlalchemy import create_engine, func, inspect, select
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

    class Base(DeclarativeBase):
        pass

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]
        slug: Mapped[str | None]

    label = "sqlalchemy"
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(DSN))
    out(label, "has_table", inspect(engine).has_table("tags"), inspect(engine).has_table("nope"))
    with Session(engine) as s:
        tags = [Tag(name="sa", slug=f"sa-{i}") for i in range(3)] + [Tag(name="sa", slug=None)]
        s.add_all(tags)
        s.commit()
        # (Relative: a PostgreSQL sequence skips the ids of the failed
        # inserts above, SQLite does not; README names it.)
        first = tags[0].id
        out(label, "ids", [t.id - first for t in tags])
        rows = s.scalars(select(Tag).where(Tag.name == "sa").order_by(Tag.id)).all()
        out(label, "rows", [[t.id - first, t.name, t.slug] for t in rows])
        rows[0].name = "sa renamed"
        s.commit()
        out(label, "count", s.scalar(select(func.count()).select_from(Tag).where(Tag.name.like("sa%"))))
        s.delete(rows[1])
        s.commit()
        out(label, "left", s.scalars(select(Tag.slug).where(Tag.name.like("sa%")).order_by(Tag.id)).all())
    engine.dispose()


psycopg_run(binary=False)
psycopg_run(binary=True)
asyncio.run(asyncpg_run())
sqlalchemy_run()
