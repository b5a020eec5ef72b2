// A real browser's EventSource against a real broadcaster's SSE route
// (contract 1.1 section 3.2), across a broadcaster killed with SIGKILL.
//
// Needs DATABASE_URL (a cluster we may CREATE DATABASE on; `make
// browser-test` provides one), a built target/debug/marketcast,
// /usr/bin/chromium and `npm ci` in this directory.
//
// It creates a fresh database, starts a broadcaster, opens
// `new EventSource(".../v1/markets/M/stream?from_seq=0")` in headless
// Chromium, commits trades 1..10 by SQL, kills the broadcaster with SIGKILL,
// commits 11..20 while it is down, starts a new broadcaster on the same
// port, and checks that the browser's own reconnect (with Last-Event-ID,
// which the page never sets itself) delivered exactly 1..20: no gap, no
// duplicate. The last line is `1 passed, 0 failed` or `0 passed, 1 failed`.

import { spawn, execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.MARKETCAST_BIN || path.join(ROOT, "target/debug/marketcast");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const STEP_MS = 20_000;
const OVERALL_MS = 120_000;
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

const log = (...a) => console.log("sse-test:", ...a);
const check = (cond, msg) => { if (!cond) throw new Error(msg); };

function withTimeout(p, ms, what) {
  let t;
  const timer = new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms); });
  return Promise.race([p, timer]).finally(() => clearTimeout(t));
}

function run(cmd, args) {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: STEP_MS }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(" ")} failed:\n${stderr || err.message}`));
      else resolve(stdout.trim());
    });
  });
}

const psql = (url, sql) => run("psql", [url, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql]);

function withDatabase(url, name) {
  const u = new URL(url);
  u.pathname = "/" + name;
  return u.toString();
}

/** Start a broadcaster on `listen`; resolves to its address once it listens. */
function startBroadcaster(url, listen) {
  const child = spawn(BIN, ["broadcaster", "--database-url", url, "--listen", listen], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, NO_COLOR: "1" },
  });
  let out = "";
  let err = "";
  child.stderr.on("data", (d) => { err += d; });
  const ready = new Promise((resolve, reject) => {
    child.on("error", reject);
    child.on("exit", (code) => reject(new Error(`broadcaster exited early (${code}): ${err}`)));
    child.stdout.on("data", (d) => {
      out += d;
      const m = /^listening on (\S+)$/m.exec(out);
      if (m) resolve(m[1]);
    });
  });
  return { child, ready: withTimeout(ready, STEP_MS, "broadcaster startup") };
}

async function healthy(addr) {
  const until = Date.now() + STEP_MS;
  while (Date.now() < until) {
    try {
      const r = await fetch(`http://${addr}/healthz`);
      if (r.status === 200) return;
    } catch { /* not up yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`broadcaster at ${addr} never became healthy`);
}

async function insertTrades(url, market, n) {
  for (let i = 0; i < n; i++) {
    await psql(url, `INSERT INTO trades (market_id, side, price, qty) VALUES ('${market}', 'yes', 0.5, ${i + 1})`);
  }
}

async function seqsIn(page) {
  return page.evaluate(() => window.__seqs.slice());
}

async function waitForSeq(page, seq) {
  await page.waitForFunction((s) => window.__seqs.length && window.__seqs[window.__seqs.length - 1] >= s, seq, { timeout: STEP_MS });
}

async function main(ctx) {
  const base = process.env.DATABASE_URL || (() => { throw new Error("DATABASE_URL is not set"); })();
  const dbName = `mc_sse_${process.pid}`;
  await psql(base, `DROP DATABASE IF EXISTS ${dbName}`);
  await psql(base, `CREATE DATABASE ${dbName}`);
  ctx.cleanups.push(() => psql(base, `DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`));
  const url = withDatabase(base, dbName);
  await run(BIN, ["migrate", "--database-url", url]);
  await psql(url, "INSERT INTO markets (id) VALUES ('SSE1')");

  let b = startBroadcaster(url, "127.0.0.1:0");
  ctx.children.push(b.child);
  const addr = await b.ready;
  await healthy(addr);
  log(`broadcaster at ${addr}`);

  const profile = mkdtempSync(path.join(tmpdir(), "mc-chromium-sse-"));
  ctx.cleanups.push(() => rmSync(profile, { recursive: true, force: true }));
  const browser = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  ctx.cleanups.push(() => browser.close());
  const page = await browser.newPage();
  // A page of the broadcaster's own origin (its /healthz JSON): the stream
  // is then same-origin, as a page served next to the feed would have it.
  await page.goto(`http://${addr}/healthz`);
  const streamUrl = `http://${addr}/v1/markets/SSE1/stream?from_seq=0`;
  await page.evaluate((u) => {
    window.__seqs = [];
    window.__subscribed = [];
    window.__opens = 0;
    const es = new EventSource(u);
    es.onopen = () => { window.__opens += 1; };
    es.addEventListener("subscribed", (e) => window.__subscribed.push(JSON.parse(e.data).from_seq));
    es.addEventListener("trade", (e) => {
      const t = JSON.parse(e.data);
      if (String(t.seq) !== e.lastEventId) throw new Error(`id ${e.lastEventId} is not seq ${t.seq}`);
      window.__seqs.push(t.seq);
    });
    window.__es = es;
  }, streamUrl);

  await insertTrades(url, "SSE1", 10);
  await waitForSeq(page, 10);
  log("trades 1..10 arrived through EventSource");

  b.child.kill("SIGKILL");
  await new Promise((r) => b.child.once("exit", r));
  log("broadcaster killed with SIGKILL");
  await insertTrades(url, "SSE1", 10);
  b = startBroadcaster(url, addr);
  ctx.children.push(b.child);
  await b.ready;
  await healthy(addr);
  log("a new broadcaster listens on the same address");

  await waitForSeq(page, 20);
  const seqs = await seqsIn(page);
  const want = Array.from({ length: 20 }, (_, i) => i + 1);
  check(JSON.stringify(seqs) === JSON.stringify(want), `EventSource saw ${JSON.stringify(seqs)}, want 1..20 exactly`);
  const subscribed = await page.evaluate(() => window.__subscribed.slice());
  check(subscribed.length === 2 && subscribed[0] === 0 && subscribed[1] === 10,
    `the reconnect resumed from Last-Event-ID 10: subscribed from_seq ${JSON.stringify(subscribed)}`);
  log("the browser's reconnect (Last-Event-ID 10) delivered exactly 11..20");
}

const ctx = { cleanups: [], children: [] };
let ok = false;
try {
  await withTimeout(main(ctx), OVERALL_MS, "the whole test");
  ok = true;
} catch (e) {
  console.error("sse-test: FAILED:", e.message);
} finally {
  for (const c of ctx.children) { try { c.kill("SIGKILL"); } catch { /* gone */ } }
  for (const f of ctx.cleanups.reverse()) { try { await f(); } catch { /* best effort */ } }
}
console.log(ok ? "1 passed, 0 failed" : "0 passed, 1 failed");
process.exit(ok ? 0 : 1);
