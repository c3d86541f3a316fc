// One TypeORM 1 app and one Knex 3 app (node-postgres underneath) over the
// fixture's users and posts, printed as JSON lines, so a run against
// cutover's SQLite engine can be compared line for line with a run against
// the converted PostgreSQL. TypeORM connects with `SELECT * FROM
// current_schema()` and saves several rows in one INSERT with DEFAULT in
// some rows only; Knex builds its own inserts, updates and transactions,
// and its schema builder runs DDL as Knex migrations do.
//
// usage: node typeorm_knex_app.js DSN

require("reflect-metadata");
const { DataSource, EntitySchema, In, ILike, MoreThan } = require("typeorm");

const User = new EntitySchema({
  name: "User", tableName: "users",
  columns: {
    id: { type: "bigint", primary: true, generated: "increment" },
    email: { type: "text", unique: true },
    name: { type: "text", nullable: true },
    is_admin: { type: "boolean", default: false },
    created_at: { type: "timestamptz", nullable: true },
    prefs: { type: "jsonb", nullable: true },
  },
  relations: { posts: { type: "one-to-many", target: "Post", inverseSide: "user" } },
});
const Post = new EntitySchema({
  name: "Post", tableName: "posts",
  columns: {
    id: { type: "bigint", primary: true, generated: "increment" },
    title: { type: "text" },
    views: { type: "integer", default: 0 },
    price: { type: "numeric", nullable: true },
  },
  relations: { user: { type: "many-to-one", target: "User", joinColumn: { name: "user_id" }, inverseSide: "posts" } },
});

const out = (...parts) => console.log(JSON.stringify(parts));

(async () => {
  const ds = new DataSource({ type: "postgres", url: process.argv[2], entities: [User, Post], logging: false });
  await ds.initialize();
  const users = ds.getRepository("User");
  const posts = ds.getRepository("Post");
  out("find", (await users.find({ relations: { posts: true }, where: { id: In([1, 2, 3]) }, order: { id: "ASC", posts: { id: "ASC" } } }))
    .map((u) => [u.id, u.email, u.is_admin, u.created_at && u.created_at.toISOString(), u.posts.map((p) => [p.id, p.price])]));
  const u = await users.save({ email: "typeorm@example.com", prefs: { a: 1 }, created_at: new Date("2025-06-15T15:06:40Z") });
  out("save", u.is_admin, Object.keys(u).sort());
  const made = await posts.save([{ title: "o1", user: u }, { title: "o2", user: u, price: "2.25", views: 7 }]);
  out("save many", made.map((p) => [Number(p.id) - Number(made[0].id), p.views]));
  out("query builder", (await posts.createQueryBuilder("p").leftJoinAndSelect("p.user", "u")
    .where("u.id = :id", { id: u.id }).orderBy("p.id").getMany()).map((p) => [p.title, p.views, p.price, p.user.email]));
  out("count", await posts.count({ where: { user: { id: u.id } } }));
  out("increment", (await posts.increment({ title: In(["o1", "o2"]) }, "views", 3)).affected);
  out("more than", (await posts.find({ where: { user: { id: u.id }, views: MoreThan(5) }, order: { id: "ASC" } })).map((p) => p.title));
  out("ilike", await users.count({ where: { email: ILike("%TYPEORM%") } }));
  out("transaction", await ds.transaction(async (m) => {
    await m.save("Post", { title: "o-tx", user: u });
    return m.count("Post", { where: { title: "o-tx" } });
  }));
  try {
    await ds.transaction(async (m) => {
      await m.save("Post", { title: "o-rolled-back", user: u });
      await m.insert("User", { email: u.email });
    });
  } catch (e) {
    out("rollback", e.code);
  }
  out("after rollback", await posts.count({ where: { title: "o-rolled-back" } }));
  out("upsert", (await users.upsert({ email: u.email, name: "T2" }, ["email"])).identifiers.map((i) => i.id === u.id));
  out("name", (await users.findOneBy({ id: u.id })).name);
  out("delete", (await posts.delete({ user: { id: u.id } })).affected);
  out("delete user", (await users.delete({ id: u.id })).affected);
  await ds.destroy();

  const knex = require("knex")({ client: "pg", connection: process.argv[2] });
  out("knex select", await knex("users").select("id", "email", "is_admin").whereIn("id", [1, 2]).orderBy("id"));
  const ids = await knex("posts").insert([{ user_id: 1, title: "k1" }, { user_id: 1, title: "k2", views: 4 }]).returning(["id", "views"]);
  out("knex insert", ids.map((r) => [Number(r.id) - Number(ids[0].id), r.views]));
  out("knex transaction", await knex.transaction(async (trx) => {
    await trx("posts").where("title", "k1").update({ views: 9 });
    return trx("posts").where("title", "k1").first("views");
  }));
  out("knex join", await knex("posts as p").join("users as u", "u.id", "p.user_id").whereIn("p.title", ["k1", "k2"])
    .select("p.title", "u.email").orderBy("p.title"));
  out("knex aggregate", await knex("posts").whereIn("title", ["k1", "k2"]).sum({ v: "views" }).count({ n: "*" }).first());
  out("knex upsert", await knex("users").insert({ id: 1, email: "a-knex@example.com" }).onConflict("id").merge(["name"]).returning("email"));
  out("knex delete", await knex("posts").whereIn("title", ["k1", "k2"]).del());
  // Knex's schema builder, as its migrations use it: serial keys (numbers,
  // not strings, as integer columns), unique and foreign-key constraints
  // added by ALTER TABLE, defaults, alterations.
  await knex.schema.createTable("kx_lists", (t) => {
    t.increments("id"); t.string("name", 80).notNullable().unique(); t.boolean("archived").defaultTo(false);
    t.timestamps(true, true);
  });
  await knex.schema.createTable("kx_items", (t) => {
    t.bigIncrements("id"); t.integer("list_id").references("kx_lists.id").onDelete("CASCADE"); t.text("body");
    t.decimal("qty", 8, 2); t.jsonb("meta"); t.uuid("ref").defaultTo(knex.raw("gen_random_uuid()")); t.index(["list_id", "body"]);
  });
  out("knex has", await knex.schema.hasTable("kx_items"), await knex.schema.hasColumn("kx_items", "qty"));
  await knex.schema.alterTable("kx_items", (t) => { t.string("note"); });
  const [list] = await knex("kx_lists").insert({ name: "L" }).returning("*");
  out("knex list", list.id, list.name, list.archived, list.created_at instanceof Date);
  await knex("kx_items").insert([{ list_id: list.id, body: "a", qty: "1.25", meta: { a: 1 } }, { list_id: list.id, body: "b" }]);
  out("knex items", await knex("kx_items").select("list_id", "body", "qty", "meta", "note").orderBy("body"));
  try { await knex("kx_lists").insert({ name: "L" }); } catch (e) { out("knex unique", e.code, e.constraint); }
  try { await knex("kx_items").insert({ list_id: 999, body: "x" }); } catch (e) { out("knex foreign key", e.code); }
  await knex.schema.alterTable("kx_items", (t) => { t.renameColumn("note", "remark"); });
  await knex.schema.alterTable("kx_items", (t) => { t.dropColumn("remark"); });
  out("knex columns", Object.keys(await knex("kx_items").columnInfo()).sort());
  await knex("kx_lists").del();
  out("knex cascade", await knex("kx_items").count({ n: "*" }).first());
  await knex.schema.dropTable("kx_items");
  await knex.schema.dropTable("kx_lists");
  out("knex dropped", await knex.schema.hasTable("kx_lists"));
  await knex.destroy();
})().catch((e) => { console.error(e); process.exit(1); });
