// Test support: real marketcast servers against a real Postgres.
//
// DATABASE_URL names a cluster we may CREATE DATABASE on (`make ts-test`
// starts a throwaway one with bin/pg-dev). Each test gets its own database
// and its own writer and broadcaster processes (target/debug/marketcast, or
// MARKETCAST_BIN), on port 0 or a port it names; every wait has a timeout.

import { spawn, execFile } from "node:child_process";
import { createHmac } from "node:crypto";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const BIN = process.env.MARKETCAST_BIN || path.join(ROOT, "target/debug/marketcast");
/**
 * The WebSocket the tests give the client through its `WebSocket` option:
 * the runtime's (Node 22, Node 20 with --experimental-websocket), else
 * undici's (a devDependency, for Node 18).
 */
export const WebSocket = globalThis.WebSocket ?? (await import("undici")).WebSocket;
/** Bound on every single wait. */
export const STEP_MS = 20_000;
/** HS256 secret of the token tests (at least 32 bytes). */
export const SECRET = "marketcast-ts-client-test-secret-0123456789";

export function withTimeout(p, ms, what) {
  let t;
  const timer = new Promise((_, rej) => {
    t = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([p, timer]).finally(() => clearTimeout(t));
}

/** Resolve once `cond()` is truthy (checked every 20 ms), or fail after `ms`. */
export async function until(cond, what, ms = STEP_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export function psql(url, sql) {
  return new Promise((resolve, reject) => {
    execFile("psql", [url, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql], { timeout: STEP_MS }, (err, stdout, stderr) => {
      if (err) reject(new Error(`psql failed: ${sql}\n${stderr || err.message}`));
      else resolve(stdout.trim());
    });
  });
}

function run(args) {
  return new Promise((resolve, reject) => {
    execFile(BIN, args, { timeout: STEP_MS }, (err, stdout, stderr) => {
      if (err) reject(new Error(`marketcast ${args[0]} failed: ${stderr || err.message}`));
      else resolve(stdout);
    });
  });
}

/**
 * A fresh migrated database for one test; `t.after` drops it. Returns its URL.
 */
export async function freshDatabase(t, name) {
  const base = process.env.DATABASE_URL;
  if (!base) throw new Error("DATABASE_URL is not set (make ts-test provides one)");
  const db = `mc_ts_${name}_${process.pid}`;
  await psql(base, `DROP DATABASE IF EXISTS ${db}`);
  await psql(base, `CREATE DATABASE ${db}`);
  t.after(() => psql(base, `DROP DATABASE IF EXISTS ${db} WITH (FORCE)`));
  const u = new URL(base);
  u.pathname = "/" + db;
  const url = u.toString();
  await run(["migrate", "--database-url", url]);
  return url;
}

/**
 * Start `marketcast <role>`; resolves once it printed `listening on HOST:PORT`.
 * `t.after` kills whatever is still running.
 */
export async function startServer(t, role, url, { listen = "127.0.0.1:0", args = [] } = {}) {
  const child = spawn(BIN, [role, "--database-url", url, "--listen", listen, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn", NO_COLOR: "1" },
  });
  const server = { child, stderr: "", exit: null };
  server.exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve((server.exit = { code, signal }))));
  child.stderr.on("data", (d) => {
    server.stderr += d;
  });
  t.after(async () => {
    if (server.exit === null) {
      child.kill("SIGKILL");
      await server.exited;
    }
  });
  let out = "";
  const addr = await withTimeout(
    new Promise((resolve, reject) => {
      child.on("error", reject);
      child.stdout.on("data", (d) => {
        out += d;
        const m = /^listening on (\S+)$/m.exec(out);
        if (m) resolve(m[1]);
      });
      server.exited.then((e) => reject(new Error(`${role} exited early (${JSON.stringify(e)}): ${server.stderr}`)));
    }),
    STEP_MS,
    `${role} startup`,
  );
  server.addr = addr;
  server.stop = async (signal) => {
    if (server.exit === null) child.kill(signal);
    return withTimeout(server.exited, STEP_MS, `${role} exit after ${signal}`);
  };
  return server;
}

/**
 * Start a broadcaster on `listen`, retrying while the port is still held by a
 * process that just died (its socket goes away with it, but not at once).
 */
export async function startBroadcaster(t, url, opts = {}) {
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    try {
      return await startServer(t, "broadcaster", url, opts);
    } catch (e) {
      if (Date.now() > deadline || !/exited early/.test(String(e))) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/** The writer's HTTP API. */
export function writerApi(writer) {
  const base = `http://${writer.addr}`;
  const post = async (p, body) => {
    const r = await fetch(base + p, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    const j = await r.json();
    if (r.status !== 201) throw new Error(`POST ${p}: ${r.status} ${JSON.stringify(j)}`);
    return j;
  };
  return {
    createMarket: (id) => post("/v1/markets", { id }),
    trade: (market, side = "yes", price = "0.5000", qty = 1) => post(`/v1/markets/${encodeURIComponent(market)}/trades`, { side, price, qty }),
  };
}

/** An HS256 JWT (RFC 7519) signed with SECRET. */
export function signToken(claims, secret = SECRET) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64(claims);
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** `[from, from + 1, ..., to]`. */
export function range(from, to) {
  return Array.from({ length: Math.max(0, to - from + 1) }, (_, i) => from + i);
}

/**
 * Record what a feed reports: every state it went through and every error
 * and resync event.
 */
export function record(feed) {
  const seen = { states: [feed.state], errors: [], resyncs: [] };
  feed.on("state", (s) => seen.states.push(s));
  feed.on("error", (e) => seen.errors.push(e));
  feed.on("resync", (r) => seen.resyncs.push(r));
  return seen;
}
