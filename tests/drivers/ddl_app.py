"""An app's own migrations through the SQLite engine: SQLAlchemy 2's
create_all/drop_all (SERIAL keys, VARCHAR, BOOLEAN and JSONB server
defaults, now(), gen_random_uuid(), a named UNIQUE constraint, an index,
a cascading foreign key) and hand-written PostgreSQL DDL through psycopg 3
(ALTER TABLE ADD/DROP/RENAME, IF [NOT] EXISTS with their notices, DDL
rolled back with its transaction, the errors for what exists or does
not). Printed line by line, so a run against cutover's SQLite engine can be
compared with a run against PostgreSQL.

usage: ddl_app.py DSN
"""

import datetime
import decimal
import sys

import psycopg
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    create_engine,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB


def out(*parts):
    print(*parts, flush=True)


dsn = sys.argv[1]
engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg://"))
md = MetaData()
authors = Table(
    "ddl_authors",
    md,
    Column("id", Integer, primary_key=True),
    Column("email", String(120), nullable=False, unique=True),
    Column("active", Boolean, nullable=False, server_default=text("true")),
    Column("joined", DateTime(timezone=True), server_default=func.now()),
    Column("born", Date),
    Column("prefs", JSONB, server_default=text("'{}'::jsonb")),
)
books = Table(
    "ddl_books",
    md,
    Column("id", BigInteger, primary_key=True),
    Column("author_id", ForeignKey("ddl_authors.id", ondelete="CASCADE"), nullable=False),
    Column("title", Text, nullable=False),
    Column("price", Numeric(10, 2)),
    Column("ref", Uuid, server_default=text("gen_random_uuid()")),
    UniqueConstraint("author_id", "title", name="ddl_books_author_title"),
    Index("ddl_books_price_idx", "price"),
)

md.create_all(engine)
out("has tables", inspect(engine).has_table("ddl_authors"), inspect(engine).has_table("ddl_books"))
with engine.begin() as c:
    aid = c.execute(
        insert(authors).values(email="a@example.com", born=datetime.date(1990, 1, 2)).returning(authors.c.id)
    ).scalar()
    row = c.execute(select(authors.c.email, authors.c.active, authors.c.born, authors.c.prefs, authors.c.joined)).one()
    out("author", row[:4], abs(datetime.datetime.now(datetime.timezone.utc) - row[4]) < datetime.timedelta(minutes=5))
    c.execute(
        insert(books),
        [
            {"author_id": aid, "title": "t1", "price": decimal.Decimal("9.25")},
            {"author_id": aid, "title": "t2", "price": None},
        ],
    )
    out("books", c.execute(select(books.c.title, books.c.price, func.length(func.cast(books.c.ref, Text))).order_by(books.c.title)).all())
    refs = c.execute(select(books.c.ref)).scalars().all()
    out("uuids", [r.version for r in refs], len(set(refs)))
try:
    with engine.begin() as c:
        c.execute(insert(books).values(author_id=aid, title="t1"))
except Exception as e:
    out("duplicate", e.orig.sqlstate, e.orig.diag.constraint_name)
with engine.begin() as c:
    c.execute(authors.delete())
    out("cascade", c.execute(select(func.count()).select_from(books)).scalar())

with psycopg.connect(dsn, autocommit=True) as conn:
    conn.add_notice_handler(lambda d: out("notice", d.severity, d.message_primary))

    def run(sql):
        try:
            cur = conn.execute(sql)
            out("ok", cur.statusmessage)
        except psycopg.Error as e:
            # SQLite does not name the foreign key a write broke.
            said = {"23514": e.diag.constraint_name, "23503": ""}.get(e.sqlstate, e.diag.message_primary)
            out("error", e.sqlstate, said)

    run("CREATE TABLE IF NOT EXISTS ddl_authors (id serial PRIMARY KEY)")
    run("CREATE TABLE ddl_authors (id serial PRIMARY KEY)")
    run("ALTER TABLE ddl_books ADD COLUMN pages integer NOT NULL DEFAULT 0")
    run("ALTER TABLE ddl_books ADD COLUMN IF NOT EXISTS pages integer")
    run("ALTER TABLE ddl_books RENAME COLUMN pages TO page_count")
    run("ALTER TABLE ddl_books ADD CONSTRAINT ddl_books_ref_key UNIQUE (ref)")
    run("CREATE INDEX IF NOT EXISTS ddl_books_price_idx ON ddl_books (price)")
    run("CREATE INDEX ON ddl_books (title DESC)")
    run("INSERT INTO ddl_authors (email) VALUES ('b@example.com')")
    run("INSERT INTO ddl_books (author_id, title) SELECT id, 'x' FROM ddl_authors")
    out("row", conn.execute("SELECT title, page_count FROM ddl_books").fetchall())
    # integer columns keep PostgreSQL's range.
    run("UPDATE ddl_books SET page_count = 3000000000")
    run("INSERT INTO ddl_reviews_nope (x) VALUES (1)")
    # Constraints SQLite's ALTER TABLE cannot add, checked against the rows
    # there as PostgreSQL checks them.
    run("UPDATE ddl_books SET price = 0")
    run("ALTER TABLE ddl_books ADD CONSTRAINT ddl_books_price_check CHECK (price > 0)")
    run("ALTER TABLE ddl_books ADD CONSTRAINT ddl_books_price_check CHECK (price >= 0)")
    run("UPDATE ddl_books SET price = -1")
    run("CREATE INDEX ddl_books_pages_idx ON ddl_books (page_count)")
    run("CREATE TABLE ddl_reviews (id serial PRIMARY KEY, book_id bigint, stars int)")
    run("INSERT INTO ddl_reviews (book_id, stars) VALUES (424242, 5)")
    run("ALTER TABLE ddl_reviews ADD CONSTRAINT ddl_reviews_book_fk FOREIGN KEY (book_id) REFERENCES ddl_books (id) ON DELETE CASCADE")
    run("DELETE FROM ddl_reviews")
    run("ALTER TABLE ddl_reviews ADD CONSTRAINT ddl_reviews_book_fk FOREIGN KEY (book_id) REFERENCES ddl_books (id) ON DELETE CASCADE")
    run("INSERT INTO ddl_reviews (book_id, stars) VALUES (424242, 5)")
    run("INSERT INTO ddl_reviews (book_id, stars) SELECT id, 4 FROM ddl_books")
    run("DELETE FROM ddl_books")
    out("reviews after cascade", conn.execute("SELECT count(*) FROM ddl_reviews").fetchone())
    run("DROP TABLE ddl_reviews")
    run("ALTER TABLE ddl_books DROP COLUMN page_count")
    run("ALTER TABLE ddl_books DROP COLUMN IF EXISTS page_count")
    run("ALTER TABLE ddl_books DROP COLUMN page_count")
    run("ALTER TABLE ddl_books RENAME TO ddl_volumes")
    out("renamed", conn.execute("SELECT count(*) FROM ddl_volumes").fetchone())
    run("ALTER TABLE nope ADD COLUMN x text")
    run("ALTER TABLE IF EXISTS nope ADD COLUMN x text")
    with conn.transaction():
        conn.execute("CREATE TABLE ddl_scratch (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, note text)")
        out("in transaction", conn.execute("INSERT INTO ddl_scratch (note) VALUES ('n') RETURNING id").fetchone())
        try:
            with conn.transaction():
                conn.execute("DROP TABLE ddl_scratch")
                raise RuntimeError("roll back the savepoint")
        except RuntimeError:
            pass
        out("after savepoint", conn.execute("SELECT note FROM ddl_scratch").fetchall())
        conn.execute("DROP TABLE ddl_scratch")
    try:
        with conn.transaction():
            conn.execute("CREATE TABLE ddl_gone (id serial PRIMARY KEY)")
            conn.execute("SELECT 1/0")
    except psycopg.Error as e:
        out("rolled back", e.sqlstate)
    run("SELECT * FROM ddl_gone")
    run("DROP TABLE IF EXISTS ddl_gone")
    run("DROP TABLE ddl_gone")
    # Temporary tables are the session's own.
    run("CREATE TEMP TABLE ddl_staging (email text NOT NULL, n integer, seen boolean DEFAULT false)")
    run("INSERT INTO ddl_staging (email, n) VALUES ('c@example.com', 1), ('d@example.com', 2)")
    out("staged", conn.execute("SELECT email, n, seen FROM ddl_staging ORDER BY email").fetchall())
    run("INSERT INTO ddl_authors (email) SELECT email FROM ddl_staging WHERE n > 1")
    with psycopg.connect(dsn, autocommit=True) as other:
        try:
            other.execute("SELECT * FROM ddl_staging")
        except psycopg.Error as e:
            out("other session", e.sqlstate)
    run("DROP TABLE ddl_staging")
    run("SELECT * FROM ddl_staging")
    out("moved", conn.execute("SELECT email FROM ddl_authors ORDER BY email").fetchall())
    run("DROP INDEX ddl_books_price_idx")
    run("DROP TABLE ddl_volumes, ddl_authors")
out("left", inspect(engine).has_table("ddl_authors"), inspect(engine).has_table("ddl_volumes"))
