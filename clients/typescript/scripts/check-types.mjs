// Checks the client's wire types (src/index.ts) against the JSON Schemas of
// docs/asyncapi.yaml, the ones the Rust suite validates live traffic with.
// json-schema-to-typescript compiles components/schemas into a .d.ts in a
// temporary directory, a generated .ts assigns the schema's types to the
// client's and back, and tsc --noEmit judges it. Exits 1 on any drift.
//
//   node scripts/check-types.mjs [path/to/asyncapi.yaml]
//
// Each pair is checked in the directions that matter, plus field names both
// ways (assignability alone lets an optional field be added on either side):
// - server -> client messages: every message the schema allows must be a
//   value of the client's type (schema -> client); where the client's type
//   is exact, the reverse too.
// - client -> server ops: every op the client's type allows must be valid by
//   the schema (client -> schema). The client's ops are deliberately
//   narrower: it never sends `null` fields, its ids are strings, and it
//   never sends `ping` or a `markets` unsubscribe.
// What TypeScript cannot express (patterns, ranges, if/then, not) is left to
// the Rust suite's validation of the server.
import { compile } from "json-schema-to-typescript";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parse } from "yaml";

const started = Date.now();
const pkg = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const schemaFile = resolve(process.argv[2] ?? join(pkg, "../../docs/asyncapi.yaml"));

// [schema type, client type, directions, keys?, why]. Directions: "both",
// "s2c" (schema -> client), "c2s" (client -> schema). keys: compare field
// names both ways (object types only; a string naming another schema type
// compares against that one's fields).
const CHECKS = [
  // server -> client
  ["Trade", "Trade", "both", true],
  ["Ticker", "Ticker", "both", true],
  ["Head", "Head", "both", true],
  [
    "Subscribed",
    "Subscribed",
    "s2c",
    true,
    "wider on purpose: a v1 server's answer has no from_seq, mode, heads or protocol, and a later server may send another protocol string",
  ],
  ["Unsubscribed", "Unsubscribed", "both", true],
  ["Pong", "Pong", "both", true],
  ["Authed", "Authed", "both", true],
  ["Error", "ServerError", "both", true],
  ["ErrorCode", "ServerErrorCode", "both", false],
  ["ServerMessage", "ServerMessage", "s2c", false, "as wide as Subscribed; its `type`s are compared both ways below"],
  // client -> server
  ["SubscribeEntry", "SubscribeEntry", "c2s", "SubscribeFields", "no nulls"],
  ["SubscribeOp", "SubscribeOp", "c2s", true, "no nulls, string ids"],
  ["SubscribeMarketsOp", "SubscribeMarketsOp", "c2s", true, "string ids"],
  ["UnsubscribeOp", "UnsubscribeOp", "c2s", true, "string ids"],
  ["AuthOp", "AuthOp", "c2s", true, "string ids"],
  ["ClientOp", "ClientOp", "c2s", false, "no ping, no markets unsubscribe"],
];

const doc = parse(readFileSync(schemaFile, "utf8"));
const defs = JSON.parse(JSON.stringify(doc.components.schemas).replaceAll('"#/components/schemas/', '"#/definitions/'));
for (const [name, s] of Object.entries(defs)) s.title = name; // type names = schema names
// A bare `{required: [...]}` (as in SubscribeEntry's allOf) would compile to
// an index signature; as an object with those fields it makes them required.
(function bareRequired(node) {
  if (!node || typeof node !== "object") return;
  if (!Array.isArray(node) && Array.isArray(node.required) && !node.type && !node.properties && !node.$ref) {
    node.type = "object";
    node.properties = Object.fromEntries(node.required.map((k) => [k, {}]));
  }
  for (const v of Object.values(node)) bareRequired(v);
})(defs);
const dts = await compile({ title: "Schemas", type: "object", definitions: defs }, "Schemas", {
  additionalProperties: false, // the schemas leave it open; the client's types list every field
  unreachableDefinitions: true,
  bannerComment: "",
  format: false,
});

const lines = [
  `import type * as S from "./schemas.js";`,
  `import type * as C from ${JSON.stringify(join(pkg, "src/index.js"))};`,
  `type NoExtraFields<K extends never> = K;`,
];
const label = new Map(); // line number -> what it checks
const add = (what, line) => {
  lines.push(line);
  label.set(lines.length, what);
};
for (const [s, c, dir, keys, why] of CHECKS) {
  const id = `${s}_${c}`;
  if (why) lines.push(`// ${s} vs ${c}: ${dir} only: ${why}`);
  if (dir !== "c2s") add(`schema ${s} -> client ${c}`, `export const s2c_${id}: C.${c} = null as unknown as S.${s};`);
  if (dir !== "s2c") add(`client ${c} -> schema ${s}`, `export const c2s_${id}: S.${s} = null as unknown as C.${c};`);
  if (keys) {
    const ks = keys === true ? s : keys;
    add(`fields of schema ${ks} missing from client ${c}`, `export type k1_${id} = NoExtraFields<Exclude<keyof S.${ks}, keyof C.${c}>>;`);
    add(`fields of client ${c} missing from schema ${ks}`, `export type k2_${id} = NoExtraFields<Exclude<keyof C.${c}, keyof S.${ks}>>;`);
  }
}
add(`message types of schema ServerMessage missing from client ServerMessage`, `export type t1 = NoExtraFields<Exclude<S.ServerMessage["type"], C.ServerMessage["type"]>>;`);
add(`message types of client ServerMessage missing from schema ServerMessage`, `export type t2 = NoExtraFields<Exclude<C.ServerMessage["type"], S.ServerMessage["type"]>>;`);

const dir = mkdtempSync(join(tmpdir(), "marketcast-check-types-"));
let result;
try {
  writeFileSync(join(dir, "schemas.d.ts"), dts);
  writeFileSync(join(dir, "check.ts"), lines.join("\n") + "\n");
  writeFileSync(
    join(dir, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: {
        target: "es2020",
        module: "es2020",
        moduleResolution: "bundler",
        lib: ["es2020", "dom"],
        strict: true,
        noEmit: true,
        types: [],
        skipLibCheck: false,
      },
      files: ["check.ts"],
    }),
  );
  const tsc = createRequire(join(pkg, "package.json")).resolve("typescript/bin/tsc");
  result = spawnSync(process.execPath, [tsc, "-p", join(dir, "tsconfig.json"), "--pretty", "false"], { encoding: "utf8" });
} finally {
  rmSync(dir, { recursive: true, force: true });
}

const secs = ((Date.now() - started) / 1000).toFixed(1);
if (result.status === 0) {
  console.log(`check-types: the client's wire types match ${schemaFile} (${CHECKS.length + 1} pairs, ${secs} s)`);
} else {
  const out = (result.stdout + result.stderr).trim();
  // Name the pair of each error (its line in the generated check.ts).
  const named = out
    .replace(/^\S*check\.ts\((\d+),\d+\): /gm, (m, n) => `[${label.get(Number(n)) ?? "check.ts:" + n}] `)
    .replace(/import\("[^"]*\/schemas"\)/g, "schema")
    .replace(/import\("[^"]*\/src\/index"\)/g, "client");
  console.error(named);
  console.error(`check-types: the client's wire types (src/index.ts) drifted from ${schemaFile}: fix one or the other`);
  process.exit(1);
}
