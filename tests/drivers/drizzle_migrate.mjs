// drizzle-orm's own migrator over a migrations folder as drizzle-kit
// writes it for PostgreSQL (statement breakpoints, serial keys, a UNIQUE
// constraint in CREATE TABLE, a foreign key added by ALTER TABLE naming
// "public"."table", an index USING btree), run twice (the second run
// finds it applied), then the query builder over the tables it made.
// Printed as JSON lines, so a run against cutover's SQLite engine can be
// compared with PostgreSQL. drizzle's migrator keeps its journal in the
// "drizzle" schema unless told otherwise; the SQLite file has only
// public, so it is told `migrationsSchema: "public"`.
//
// usage: node drizzle_migrate.mjs DSN SCRATCH_DIR

import pg from "pg";
import { drizzle } from "drizzle-orm/node-postgres";
import { migrate } from "drizzle-orm/node-postgres/migrator";
import { pgTable, serial, integer, text, varchar, boolean, timestamp } from "drizzle-orm/pg-core";
import { eq, sql } from "drizzle-orm";
import fs from "node:fs";
import path from "node:path";

const dir = path.join(process.argv[3], "migrations");
fs.rmSync(dir, { recursive: true, force: true });
fs.mkdirSync(path.join(dir, "meta"), { recursive: true });
fs.writeFileSync(path.join(dir, "0000_init.sql"), `CREATE TABLE "dz_users" (
	"id" serial PRIMARY KEY NOT NULL,
	"email" varchar(255) NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "dz_users_email_unique" UNIQUE("email")
);
--> statement-breakpoint
CREATE TABLE "dz_posts" (
	"id" serial PRIMARY KEY NOT NULL,
	"author_id" integer NOT NULL,
	"title" text NOT NULL,
	"published" boolean DEFAULT false NOT NULL
);
--> statement-breakpoint
ALTER TABLE "dz_posts" ADD CONSTRAINT "dz_posts_author_id_dz_users_id_fk" FOREIGN KEY ("author_id") REFERENCES "public"."dz_users"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "dz_posts_author_idx" ON "dz_posts" USING btree ("author_id");`);
fs.writeFileSync(path.join(dir, "0001_views.sql"), `ALTER TABLE "dz_posts" ADD COLUMN "views" integer DEFAULT 0 NOT NULL;`);
fs.writeFileSync(path.join(dir, "meta", "_journal.json"), JSON.stringify({
  version: "7",
  dialect: "postgresql",
  entries: [
    { idx: 0, version: "7", when: 1700000000000, tag: "0000_init", breakpoints: true },
    { idx: 1, version: "7", when: 1700000001000, tag: "0001_views", breakpoints: true },
  ],
}));

const users = pgTable("dz_users", {
  id: serial("id").primaryKey(),
  email: varchar("email", { length: 255 }).notNull().unique(),
  createdAt: timestamp("created_at", { withTimezone: true }).defaultNow().notNull(),
});
const posts = pgTable("dz_posts", {
  id: serial("id").primaryKey(),
  authorId: integer("author_id").notNull().references(() => users.id, { onDelete: "cascade" }),
  title: text("title").notNull(),
  published: boolean("published").default(false).notNull(),
  views: integer("views").default(0).notNull(),
});

const out = (...parts) => console.log(JSON.stringify(parts));
const pool = new pg.Pool({ connectionString: process.argv[2] });
const db = drizzle(pool);
await pool.query('DROP TABLE IF EXISTS "dz_posts", "dz_users", "__drizzle_migrations"');
for (const run of [1, 2]) {
  await migrate(db, { migrationsFolder: dir, migrationsSchema: "public" });
  const applied = await pool.query("SELECT count(*)::int AS n FROM __drizzle_migrations");
  out("migrated", run, applied.rows[0].n);
}
const [u] = await db.insert(users).values({ email: "d@example.com" }).returning();
out("user", u.id, typeof u.id, u.email, u.createdAt instanceof Date);
await db.insert(posts).values([{ authorId: u.id, title: "a" }, { authorId: u.id, title: "b", published: true, views: 3 }]);
for (const p of await db.select({ title: posts.title, published: posts.published, views: posts.views }).from(posts).orderBy(posts.title)) {
  out("post", p);
}
out("count", await db.select({ n: sql`count(*)::int` }).from(posts).where(eq(posts.authorId, u.id)));
try {
  await db.insert(users).values({ email: "d@example.com" });
} catch (e) {
  const c = e.cause ?? e;
  out("unique", c.code, c.constraint);
}
try {
  await db.insert(posts).values({ authorId: 424242, title: "orphan" });
} catch (e) {
  out("foreign key", (e.cause ?? e).code);
}
await db.delete(users).where(eq(users.id, u.id));
out("cascade", await db.select({ n: sql`count(*)::int` }).from(posts));
const idx = await pool.query("SELECT indexname FROM pg_indexes WHERE tablename = 'dz_posts' ORDER BY 1").catch((e) => ({ rows: [e.code] }));
out("indexes", idx.rows);
await pool.query('DROP TABLE "dz_posts", "dz_users", "__drizzle_migrations"');
out("dropped");
await pool.end();
