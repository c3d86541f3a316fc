// A Sequelize 6 app that makes its own tables, as apps do at boot:
// sync({ force: true }) (DROP … CASCADE, CREATE TABLE with SERIAL keys,
// a UNIQUE column, a foreign key, a model index, reading indexes back from
// pg_index with array_agg and pg_get_indexdef), then sync() again over the
// tables that exist (nothing to do, no error), then the ORM over them and
// the query interface's introspection. Printed as JSON lines, so a run
// against cutover's SQLite engine can be compared with PostgreSQL.
//
// usage: node sequelize_sync.js DSN

const { Sequelize, DataTypes } = require("sequelize");

const s = new Sequelize(process.argv[2], { logging: false });
const Thing = s.define("Thing", {
  name: { type: DataTypes.STRING, unique: true },
  n: DataTypes.INTEGER,
  at: DataTypes.DATE,
}, { tableName: "sq_things", indexes: [{ fields: ["n"] }, { unique: true, fields: ["n", "at"], name: "sq_things_n_at" }] });
const Part = s.define("Part", { label: DataTypes.TEXT }, { tableName: "sq_parts" });
Thing.hasMany(Part);
Part.belongsTo(Thing);

const out = (...parts) => console.log(JSON.stringify(parts));

(async () => {
  await s.sync({ force: true });
  await s.sync();
  const t = await Thing.create({ name: "a", n: 1 });
  await Part.create({ label: "p", ThingId: t.id });
  out("created", t.id, typeof t.id);
  out("include", (await Thing.findAll({ include: Part })).map((x) => [x.name, x.Parts.map((p) => p.label)]));
  const qi = s.getQueryInterface();
  const indexes = (await qi.showIndex("sq_things")).map((i) => [i.name, i.primary, i.unique, i.fields.map((f) => f.attribute)]);
  for (const i of indexes.sort((a, b) => (a[0] < b[0] ? -1 : 1))) out("index", ...i);
  const described = await qi.describeTable("sq_things");
  for (const k of Object.keys(described).sort()) {
    out("column", k, described[k].type, described[k].allowNull, described[k].primaryKey);
  }
  out("tables", (await qi.showAllTables()).filter((n) => n.startsWith("sq_")).sort());
  try {
    await Thing.create({ name: "a", n: 2 });
  } catch (e) {
    out("unique", e.name, e.parent && e.parent.code);
  }
  await s.drop();
  out("dropped", (await qi.showAllTables()).filter((n) => n.startsWith("sq_")));
  await s.close();
})().catch((e) => { console.error(e); process.exit(1); });
