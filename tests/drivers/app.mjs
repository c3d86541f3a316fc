// One app's queries through node-postgres (hand-written SQL, untyped text
// parameters) and drizzle-orm's pg-core query builder, printed as JSON
// lines with each value's JavaScript type, so a run against cutover's
// SQLite engine can be compared line for line with a run against the
// converted PostgreSQL.
//
// usage: node app.mjs DSN   (node_modules from NODE_PATH's parent)

import pg from "pg";
import { drizzle } from "drizzle-orm/node-postgres";
import {
  pgTable, bigint, text, boolean, timestamp, date, jsonb, numeric, varchar, doublePrecision,
} from "drizzle-orm/pg-core";
import { eq, and, desc, asc, gt, sql, relations, inArray, ilike, isNull, count } from "drizzle-orm";

const dsn = process.argv[2];

function enc(v) {
  if (v === null || v === undefined) return null;
  if (v instanceof Date) return ["Date", v.toISOString()];
  if (Buffer.isBuffer(v)) return ["Buffer", v.toString("hex")];
  if (Array.isArray(v)) return ["Array", v.map(enc)];
  if (typeof v === "object") return ["Object", Object.fromEntries(Object.entries(v).map(([k, x]) => [k, enc(x)]))];
  return [typeof v, v];
}

function out(...parts) {
  console.log(JSON.stringify(parts));
}

const users = pgTable("users", {
  id: bigint("id", { mode: "number" }).primaryKey().generatedByDefaultAsIdentity(),
  email: text("email").notNull(),
  name: text("name"),
  isAdmin: boolean("is_admin").notNull().default(false),
  active: boolean("active"),
  createdAt: timestamp("created_at", { withTimezone: true }),
  birthday: date("birthday"),
  prefs: jsonb("prefs"),
  nickname: varchar("nickname", { length: 8 }),
  balance: numeric("balance"),
});

const posts = pgTable("posts", {
  id: bigint("id", { mode: "number" }).primaryKey(),
  userId: bigint("user_id", { mode: "number" }).notNull(),
  title: text("title").notNull(),
  body: text("body"),
  price: numeric("price"),
  publishedAt: timestamp("published_at", { withTimezone: true }),
  deletedAt: timestamp("deleted_at", { withTimezone: true }),
  views: bigint("views", { mode: "number" }).notNull().default(0),
  score: doublePrecision("score"),
});

const tags = pgTable("tags", {
  id: bigint("id", { mode: "number" }).primaryKey().generatedByDefaultAsIdentity(),
  name: text("name").notNull(),
  slug: text("slug"),
});

const usersRelations = relations(users, ({ many }) => ({ posts: many(posts) }));
const postsRelations = relations(posts, ({ one }) => ({
  author: one(users, { fields: [posts.userId], references: [users.id] }),
}));

async function nodePostgres() {
  const client = new pg.Client({ connectionString: dsn });
  await client.connect();
  const queries = [
    ["SELECT id, email, is_admin, created_at, prefs, balance FROM users ORDER BY id LIMIT 3", []],
    ["SELECT id, title FROM posts WHERE user_id = $1 AND views >= $2 ORDER BY id", ["3", "0"]],
    ["SELECT count(*) AS n FROM users WHERE created_at > $1", ["2024-03-01T14:00:00Z"]],
    ["SELECT id FROM users WHERE is_admin = $1 ORDER BY id LIMIT 3", ["true"]],
    ["SELECT $2::int AS second, $1::text AS first", ["a", "2"]],
    ["SELECT id, email FROM users WHERE id = ANY($1) ORDER BY id", [[3, 1, 2]]],
    ["SELECT id FROM users WHERE email = ANY($1) ORDER BY id", [["user4@example.com", "x\"y", "user1@example.com"]]],
  ];
  for (const [text, values] of queries) {
    const r = await client.query(text, values);
    out("pg", text, r.fields.map((f) => [f.name, f.dataTypeID]), r.rows.map((row) => Object.values(row).map(enc)), r.command, r.rowCount);
  }
  try {
    await client.query("INSERT INTO tags (name, slug) VALUES ($1, $2), ($1, $2)", ["dup", "dup"]);
  } catch (e) {
    out("pg", "duplicate", e.code, e.constraint, e.table);
  }
  await client.query("BEGIN");
  await client.query("INSERT INTO tags (name, slug) VALUES ('in tx', 'in-tx')");
  await client.query("ROLLBACK");
  const r = await client.query("SELECT count(*)::int AS n FROM tags WHERE slug = 'in-tx'");
  out("pg", "rolled back", r.rows[0].n);
  await client.end();
}

async function drizzleOrm() {
  const client = new pg.Client({ connectionString: dsn });
  await client.connect();
  const db = drizzle(client, { schema: { users, posts, tags, usersRelations, postsRelations } });
  out("drizzle", "select", enc(await db.select().from(users).where(eq(users.id, 2))));
  out("drizzle", "filtered", enc(await db.select({ id: posts.id, title: posts.title, views: posts.views })
    .from(posts).where(and(eq(posts.userId, 3), gt(posts.views, 0))).orderBy(desc(posts.views), asc(posts.id)).limit(3)));
  out("drizzle", "in", enc(await db.select({ id: users.id }).from(users).where(inArray(users.id, [1, 2, 3])).orderBy(users.id)));
  out("drizzle", "ilike", enc(await db.select({ id: users.id }).from(users).where(ilike(users.email, "%USER1%")).orderBy(users.id)));
  out("drizzle", "count", enc(await db.select({ n: count() }).from(posts).where(isNull(posts.deletedAt))));
  out("drizzle", "join", enc(await db.select({ email: users.email, title: posts.title }).from(posts)
    .innerJoin(users, eq(posts.userId, users.id)).orderBy(posts.id).limit(3)));
  const [tag] = await db.insert(tags).values({ name: "Drizzle", slug: "drizzle" }).returning();
  out("drizzle", "insert", enc({ name: tag.name, slug: tag.slug }));
  const upserted = await db.insert(tags).values({ name: "Drizzle 2", slug: "drizzle" })
    .onConflictDoUpdate({ target: tags.slug, set: { name: sql`excluded.name` } }).returning({ name: tags.name });
  out("drizzle", "upsert", enc(upserted));
  out("drizzle", "update", enc(await db.update(posts).set({ views: 7 }).where(eq(posts.id, 6)).returning({ id: posts.id, views: posts.views })));
  const [user] = await db.insert(users).values({ email: "drizzle@example.com", isAdmin: true, createdAt: new Date("2025-06-15T15:06:40Z"), prefs: { theme: "dark", n: [1, 2] }, balance: "12.5" }).returning();
  // (A numeric keeps its value in SQLite, not trailing zeros: "12.50"
  // would read back as 12.5. README names this.)
  out("drizzle", "insert user", enc(user));
  out("drizzle", "delete", enc(await db.delete(tags).where(eq(tags.slug, "drizzle")).returning({ slug: tags.slug })));
  await db.transaction(async (tx) => {
    await tx.update(posts).set({ views: 8 }).where(eq(posts.id, 6));
    try {
      await tx.transaction(async (inner) => {
        await inner.insert(tags).values({ name: "x" , slug: null });
        await inner.execute(sql`SELECT * FROM no_such_table`);
      });
    } catch (e) {
      out("drizzle", "nested rolled back", e.cause?.code ?? e.code);
    }
  });
  out("drizzle", "after tx", enc(await db.select({ views: posts.views }).from(posts).where(eq(posts.id, 6))));
  out("drizzle", "relational", enc(await db.query.users.findMany({
    columns: { id: true, email: true },
    with: { posts: { columns: { id: true, title: true }, orderBy: (p, { asc }) => [asc(p.id)] } },
    where: (u, { lt }) => lt(u.id, 4),
    orderBy: (u, { asc }) => [asc(u.id)],
  })));
  await client.end();
}

await nodePostgres();
await drizzleOrm();
