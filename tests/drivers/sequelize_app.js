// One Sequelize 6 app (node-postgres underneath) over the fixture's users
// and posts, printed as JSON lines, so a run against cutover's SQLite
// engine can be compared line for line with a run against the converted
// PostgreSQL. Sequelize's connect sends `SET TIME ZONE INTERVAL '+00:00'
// HOUR TO MINUTE` and joins pg_range to pg_type; its models use
// include (JOIN), bulkCreate, increment, upsert and managed transactions.
//
// usage: node sequelize_app.js DSN

const { Sequelize, DataTypes, Op } = require("sequelize");

const s = new Sequelize(process.argv[2], { logging: false });
const User = s.define("User", {
  email: { type: DataTypes.TEXT, unique: true },
  name: DataTypes.TEXT,
  is_admin: { type: DataTypes.BOOLEAN, defaultValue: false },
  created_at: DataTypes.DATE,
  prefs: DataTypes.JSONB,
}, { tableName: "users", timestamps: false });
const Post = s.define("Post", {
  title: DataTypes.TEXT,
  views: { type: DataTypes.INTEGER, defaultValue: 0 },
  price: DataTypes.DECIMAL(10, 2),
}, { tableName: "posts", timestamps: false });
User.hasMany(Post, { foreignKey: "user_id" });
Post.belongsTo(User, { foreignKey: "user_id" });

const out = (...parts) => console.log(JSON.stringify(parts));

(async () => {
  await s.authenticate();
  out("findAll", (await User.findAll({ include: Post, where: { id: { [Op.lte]: 3 } }, order: [["id", "ASC"], [Post, "id", "ASC"]] }))
    .map((u) => [u.id, u.email, u.is_admin, u.created_at && u.created_at.toISOString(), u.Posts.map((p) => [p.id, p.price])]));
  const u = await User.create({ email: "sequelize@example.com", name: "S", prefs: { a: 1 },
    created_at: new Date("2025-06-15T15:06:40Z") });
  const made = await Post.bulkCreate([{ user_id: u.id, title: "s1" }, { user_id: u.id, title: "s2", price: "1.25" }]);
  out("bulkCreate", made.map((p) => Number(p.id) - Number(made[0].id)));
  out("count", await Post.count({ where: { user_id: u.id } }));
  out("update", await Post.update({ views: 5 }, { where: { user_id: u.id } }));
  await Post.increment("views", { by: 2, where: { user_id: u.id } });
  out("views", (await Post.findAll({ where: { user_id: u.id }, order: [["id", "ASC"]], raw: true })).map((p) => [p.title, p.views, p.price]));
  out("tx", await s.transaction(async (t) => {
    await Post.create({ user_id: u.id, title: "tx" }, { transaction: t });
    return Post.count({ where: { user_id: u.id }, transaction: t });
  }));
  try {
    await s.transaction(async (t) => {
      await Post.create({ user_id: u.id, title: "rolled back" }, { transaction: t });
      await User.create({ email: u.email }, { transaction: t });
    });
  } catch (e) {
    out("rollback", e.name, e.parent && e.parent.code);
  }
  out("after rollback", await Post.count({ where: { user_id: u.id, title: "rolled back" } }));
  out("json", (await User.findAll({ where: { prefs: { a: 1 } }, attributes: ["email"], raw: true })).map((r) => r.email));
  out("ilike", await User.count({ where: { email: { [Op.iLike]: "%SEQUELIZE%" } } }));
  out("agg", await Post.findAll({ attributes: ["user_id", [s.fn("COUNT", s.col("id")), "n"], [s.fn("SUM", s.col("views")), "v"]],
    where: { user_id: { [Op.in]: [1, 2, u.id] } }, group: ["user_id"], order: [["user_id", "ASC"]], raw: true }));
  out("upsert", (await User.upsert({ id: u.id, email: u.email, name: "S2" }))[0].name);
  out("destroy", await Post.destroy({ where: { user_id: u.id } }));
  await u.destroy();
  await s.close();
})().catch((e) => { console.error(e); process.exit(1); });
