// Real-browser test of the demo's market page.
//
// Needs DATABASE_URL (any database of a cluster we may CREATE DATABASE on;
// `make browser-test` and `make test` provide one), a built
// target/debug/marketcast, /usr/bin/chromium and `npm ci` in this directory.
//
// One test, several steps, each waiting with a timeout (never a sleep that
// hopes): it creates a fresh database, starts `marketcast demo` on port 0,
// loads the page in headless Chromium (its WebSocket client is
// marketcast-client, served by the demo at /client/) and checks that
//   1. a trade committed by plain SQL reaches the tape and the price;
//   2. Buy YES is answered 201 by the writer and that very trade (same seq)
//      comes back through the broadcaster; the market's ticker row shows the
//      frame that folds it, exactly; an invalid order shows the error;
//   3. after the WebSocket drops, the client resumes with from_seq and a trade
//      committed meanwhile arrives, with no gap reported;
//   4. a reload replays the history into the tape and the chart;
//   5. the page fits a phone's width, and its gap check fires on a forged gap;
//   6. SIGINT stops the demo with exit code 0.
// Screenshots go to artifacts/. The last line is `1 passed, 0 failed` or
// `0 passed, 1 failed` (exit 1).

import { spawn, execFile } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.MARKETCAST_BIN || path.join(ROOT, "target/debug/marketcast");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = path.join(ROOT, "artifacts");
// Bound on every single wait; the whole test has OVERALL.
const STEP_MS = 20_000;
const OVERALL_MS = 180_000;
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

const log = (...a) => console.log("browser-test:", ...a);

function fail(msg) {
  throw new Error(msg);
}

function check(cond, msg) {
  if (!cond) fail(msg);
}

function withTimeout(p, ms, what) {
  let t;
  const timer = new Promise((_, rej) => {
    t = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([p, timer]).finally(() => clearTimeout(t));
}

/** Run one SQL statement with psql; resolves to its unaligned output. */
function psql(url, sql) {
  return new Promise((resolve, reject) => {
    execFile("psql", [url, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql], { timeout: STEP_MS }, (err, stdout, stderr) => {
      if (err) reject(new Error(`psql failed: ${sql}\n${stderr || err.message}`));
      else resolve(stdout.trim());
    });
  });
}

function withDatabase(url, name) {
  const u = new URL(url);
  u.pathname = "/" + name;
  return u.toString();
}

/** Start the demo; resolves once it printed its page and ws lines. */
function startDemo(url) {
  const args = ["demo", "--database-url", url, "--listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--rate", "0"];
  const child = spawn(BIN, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "info", NO_COLOR: "1" },
  });
  const demo = { child, stdout: "", stderr: "", exit: null };
  demo.exited = new Promise((resolve) => {
    child.on("exit", (code, signal) => {
      demo.exit = { code, signal };
      resolve(demo.exit);
    });
  });
  child.stderr.on("data", (d) => { demo.stderr += d; });
  const ready = new Promise((resolve, reject) => {
    child.on("error", reject);
    child.stdout.on("data", (d) => {
      demo.stdout += d;
      const page = /^page: (\S+)$/m.exec(demo.stdout);
      const ws = /^ws: (\S+)$/m.exec(demo.stdout);
      if (page && ws) resolve({ page: page[1], ws: ws[1] });
    });
    demo.exited.then((e) => reject(new Error(`demo exited early (${JSON.stringify(e)})`)));
  });
  demo.ready = withTimeout(ready, 60_000, "demo startup");
  return demo;
}

async function insertTrade(url, market, side, price, qty) {
  const seq = await psql(url, `INSERT INTO trades (market_id, side, price, qty) VALUES ('${market}', '${side}', ${price}, ${qty}) RETURNING seq`);
  check(/^\d+$/.test(seq), `INSERT returned ${JSON.stringify(seq)}`);
  return Number(seq);
}

const row = (market, seq) => `#tape tr[data-market="${market}"][data-seq="${seq}"]`;
const tickerRow = (market) => `[data-testid="ticker-row"][data-market="${market}"]`;

async function waitLive(page) {
  await page.waitForSelector('#conn-state[data-state="live"]', { timeout: STEP_MS });
}

async function cellTexts(page, selector) {
  return page.$eval(selector, (tr) => Array.from(tr.cells, (c) => c.textContent));
}

async function run(ctx) {
  const base = process.env.DATABASE_URL || fail("DATABASE_URL is not set (make browser-test provides one)");
  const dbName = `mc_browser_${process.pid}`;
  await psql(base, `DROP DATABASE IF EXISTS ${dbName}`);
  await psql(base, `CREATE DATABASE ${dbName}`);
  ctx.cleanups.push(() => psql(base, `DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`));
  const url = withDatabase(base, dbName);

  const demo = startDemo(url);
  ctx.demo = demo;
  const { page: pageUrl, ws } = await demo.ready;
  log(`demo up: page ${pageUrl}, ws ${ws}`);

  const profile = mkdtempSync(path.join(tmpdir(), "mc-chromium-"));
  ctx.cleanups.push(() => rmSync(profile, { recursive: true, force: true }));
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1280, height: 900 },
    timeout: STEP_MS,
  });
  ctx.cleanups.unshift(() => browser.close());
  const page = browser.pages()[0] || (await browser.newPage());
  page.setDefaultTimeout(STEP_MS);
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  // HTTP error statuses are logged by Chromium as console errors too; the
  // refused order below is one on purpose, so only script errors count.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) pageErrors.push(m.text());
  });

  await page.goto(pageUrl);
  await waitLive(page);
  const cards = await page.$$eval('[data-testid="market-card"]', (cs) => cs.map((c) => c.dataset.market));
  check(cards.length >= 5, `expected the 5 demo markets, got ${JSON.stringify(cards)}`);
  const market = "RAIN-NYC";
  check(cards.includes(market), `${market} is not listed: ${JSON.stringify(cards)}`);
  await page.click(`[data-testid="market-card"][data-market="${market}"]`);
  await page.waitForSelector(`#detail[data-market="${market}"]`);
  // The ticker subscription starts live: it must be in place before the trades below.
  await page.waitForSelector(`${tickerRow(market)}[data-state="live"]`);
  log(`page live with ${cards.length} markets`);

  // 1. A trade committed by plain SQL: buying NO at 0.37 moves YES to 0.6300.
  const seq1 = await insertTrade(url, market, "no", "0.3700", 7);
  check(seq1 === 1, `first trade in a fresh database should be seq 1, got ${seq1}`);
  await page.waitForSelector(row(market, seq1));
  const cells1 = await cellTexts(page, row(market, seq1));
  check(JSON.stringify(cells1.slice(1)) === JSON.stringify([market, "#1", "NO", "0.3700", "7"]), `tape row for the SQL trade: ${JSON.stringify(cells1)}`);
  await page.waitForFunction(
    ([m]) => document.querySelector(`[data-testid="market-card"][data-market="${m}"] [data-testid="market-price"]`).textContent.startsWith("0.6300"),
    [market],
  );
  await page.waitForFunction(() => document.getElementById("detail-price").textContent.startsWith("0.6300"));
  log(`SQL trade seq ${seq1} reached the tape and the price (YES 0.6300)`);

  // 2. Buy YES through the page: the HTTP answer's seq comes back over the WebSocket.
  await page.fill("#qty", "25");
  await page.fill("#price", "0.6600");
  await page.click("#buy-yes");
  await page.waitForSelector('#order-result[data-status]:not([data-status=""])');
  const answer = await page.$eval("#order-result", (e) => ({ status: e.dataset.status, seq: e.dataset.seq, text: e.textContent }));
  check(answer.status === "201", `Buy YES answered ${JSON.stringify(answer)}`);
  const seq2 = Number(answer.seq);
  check(seq2 === seq1 + 1, `Buy YES got seq ${answer.seq}, expected ${seq1 + 1}`);
  await page.waitForSelector(`${row(market, seq2)}.mine`);
  const cells2 = await cellTexts(page, row(market, seq2));
  check(JSON.stringify(cells2.slice(1)) === JSON.stringify([market, `#${seq2}`, "YES", "0.6600", "25"]), `tape row for Buy YES: ${JSON.stringify(cells2)}`);
  await page.waitForFunction(() => document.getElementById("detail-price").textContent.startsWith("0.6600"));
  log(`Buy YES answered 201 seq ${seq2}; the broadcaster delivered it`);

  // The ticker row shows the 1 s frame that ends at seq2: it folds seq1 too
  // (YES 0.6300, qty 7) when both came within one interval, else seq2 alone.
  await page.waitForSelector(`${tickerRow(market)}[data-to-seq="${seq2}"]`);
  const tick = await page.$eval(tickerRow(market), (tr) => ({
    from: Number(tr.dataset.fromSeq),
    cells: Object.fromEntries(Array.from(tr.querySelectorAll("[data-testid^=ticker-]"), (c) => [c.dataset.testid.slice(7), c.textContent])),
  }));
  const both = tick.from === seq1;
  check(both || tick.from === seq2, `ticker span ${tick.from}..${seq2} after a span ending at ${seq1 - 1}`);
  const wantTick = both
    ? { count: "2", volume: "32", open: "0.6300", high: "0.6600", low: "0.6300", last: "0.6600" }
    : { count: "1", volume: "32", open: "0.6600", high: "0.6600", low: "0.6600", last: "0.6600" };
  check(JSON.stringify(tick.cells) === JSON.stringify(wantTick), `ticker row ${JSON.stringify(tick)}, expected ${JSON.stringify(wantTick)}`);
  log(`the ticker row shows the frame ${tick.from}..${seq2}`);

  // An order the writer refuses shows the writer's error.
  await page.fill("#price", "1.5");
  await page.click("#buy-no");
  await page.waitForSelector('#order-result[data-status="422"]');
  const refused = await page.textContent("#order-result");
  check(/^422 \w+: /.test(refused), `refused order shows ${JSON.stringify(refused)}`);
  log(`invalid order shown as: ${refused}`);

  // 3. Drop the WebSocket; a trade committed while it is down must arrive after
  //    the page resubscribes with from_seq.
  const closed = page.waitForSelector('#conn-state[data-state="reconnecting"]');
  await page.evaluate(() => window.marketcastPage.S.feed.reconnect());
  await closed;
  const seq3 = await insertTrade(url, market, "yes", "0.7000", 3);
  await page.waitForSelector(row(market, seq3));
  await waitLive(page);
  check((await page.$$('[data-testid="gap-error"]')).length === 0, "the page reported a gap");
  log(`after a reconnect the page resumed and got seq ${seq3}`);

  mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, "page.png"), fullPage: true });

  // 4. A reload replays the market's history into the tape and the chart.
  await page.reload();
  await waitLive(page);
  await page.waitForSelector(row(market, seq3));
  const replayed = await page.$$eval(`#tape tr[data-market="${market}"]`, (rs) => rs.map((r) => Number(r.dataset.seq)));
  check(JSON.stringify(replayed) === JSON.stringify([seq3, seq2, seq1]), `replayed tape ${JSON.stringify(replayed)}`);
  const points = await page.$eval('[data-testid="chart-line"]', (l) => l.dataset.points);
  check(points === "3", `chart after reload has ${points} points, expected 3`);
  const stats = await page.textContent("#detail-stats");
  check(stats.includes(`seq ${seq3} `) && stats.includes("volume 35 "), `market stats after reload: ${JSON.stringify(stats)}`);
  log("a reload replayed the history into the tape and the chart");

  // 5. A phone: nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `page is ${overflow}px wider than a 390px phone`);
  await page.screenshot({ path: path.join(ARTIFACTS, "page-phone.png"), fullPage: true });

  check((await page.$$('[data-testid="gap-error"]')).length === 0, "the page reported a gap");
  check(pageErrors.length === 0, `page errors: ${pageErrors.join("; ")}`);

  // The gap check above is real: a trade that skips a seq is reported. (The
  // client never hands one over, clients/typescript/test/feed.test.mjs: this
  // is the page's own check of what it is given.)
  await page.evaluate(([m]) => {
    const { S, onTrade } = window.marketcastPage;
    const last = S.markets.get(m).lastSeq;
    onTrade({ type: "trade", market: m, seq: last + 2, trade_id: 0, side: "yes", price: "0.5000", qty: 1, ts: "" });
  }, [market]);
  const gap = await page.textContent('[data-testid="gap-error"]');
  check(gap.includes(`expected seq ${seq3 + 1}, got ${seq3 + 2}`), `gap report: ${JSON.stringify(gap)}`);

  // 6. SIGINT: everything stops, exit code 0.
  await browser.close();
  ctx.demo.child.kill("SIGINT");
  const exit = await withTimeout(demo.exited, STEP_MS, "demo exit after SIGINT");
  check(exit.code === 0, `demo exited with ${JSON.stringify(exit)} after SIGINT`);
  log("demo exited 0 after SIGINT");
}

async function main() {
  const ctx = { cleanups: [], demo: null };
  let ok = false;
  try {
    await withTimeout(run(ctx), OVERALL_MS, "the whole browser test");
    ok = true;
  } catch (e) {
    console.error(`browser-test: FAILED: ${e.stack || e}`);
    if (ctx.demo) console.error(`--- demo stderr (tail) ---\n${ctx.demo.stderr.split("\n").slice(-40).join("\n")}`);
  }
  if (ctx.demo && ctx.demo.exit === null) {
    ctx.demo.child.kill("SIGKILL");
    await withTimeout(ctx.demo.exited, 5000, "demo kill").catch(() => {});
  }
  for (const c of ctx.cleanups) {
    try {
      await c();
    } catch (e) {
      console.error(`browser-test: cleanup: ${e.message || e}`);
    }
  }
  console.log(ok ? "1 passed, 0 failed" : "0 passed, 1 failed");
  process.exit(ok ? 0 : 1);
}

main();
