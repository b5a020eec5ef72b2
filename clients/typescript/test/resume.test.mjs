// The client against a real broadcaster that dies, restarts and prunes:
// every callback sees each seq exactly once, in order, across it all, and
// what cannot be resumed is reported, never skipped.

import { test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "../dist/index.js";
import { freshDatabase, startServer, startBroadcaster, writerApi, psql, until, range, record, WebSocket } from "./support.mjs";

const FAST = { minBackoffMs: 50, maxBackoffMs: 500, WebSocket };

/** Subscribe from the start and collect what the callback is given. */
function follow(feed, market, opts = {}) {
  const got = { seqs: [], spans: [], subscribed: 0, errors: [] };
  feed.subscribe(market, {
    fromSeq: 0,
    ...opts,
    onTrade: (t) => got.seqs.push(t.seq),
    onTicker: (f) => got.spans.push([f.from_seq, f.to_seq]),
    onSubscribed: () => got.subscribed++,
    onError: (e) => got.errors.push(e),
  });
  return got;
}

/** Spans tile 1..n: the first starts at 1, each starts right after the previous, the last ends at n. */
function assertTiles(spans, n) {
  assert.ok(spans.length > 0, "no ticker frame");
  let next = 1;
  for (const [from, to] of spans) {
    assert.equal(from, next, `spans ${JSON.stringify(spans)}`);
    assert.ok(to >= from, `spans ${JSON.stringify(spans)}`);
    next = to + 1;
  }
  assert.equal(next - 1, n, `spans ${JSON.stringify(spans)}`);
}

/**
 * Trades go into A, B and T (ticker) in turn while the broadcaster is
 * replaced by `restart` once A's callback has 20 trades.
 */
async function restartMidStream(t, name, restart) {
  const url = await freshDatabase(t, name);
  const writer = await startServer(t, "writer", url);
  const api = writerApi(writer);
  let bc = await startBroadcaster(t, url);
  const addr = bc.addr;
  for (const m of ["A", "B", "T"]) await api.createMarket(m);

  const feed = connect(`ws://${addr}/ws`, FAST);
  t.after(() => feed.close());
  const seen = record(feed);
  const a = follow(feed, "A");
  const b = follow(feed, "B");
  const tk = follow(feed, "T", { mode: "ticker", intervalMs: 100 });
  await until(() => feed.state === "live", "live");

  const N = 60;
  const produce = (async () => {
    for (let i = 0; i < N; i++) {
      await api.trade("A", "yes", "0.5000", 1);
      await api.trade("B", "no", "0.4000", 2);
      await api.trade("T", i % 2 ? "yes" : "no", "0.3000", 3);
    }
  })();
  await until(() => a.seqs.length >= 20, "20 trades of A before the restart");
  bc = await restart(bc, addr, url);
  await produce;
  await until(() => a.seqs.length >= N && b.seqs.length >= N && tk.spans.at(-1)?.[1] >= N, "every trade after the restart");
  // Anything more would be a duplicate: give it a moment to show.
  await new Promise((r) => setTimeout(r, 300));

  assert.deepEqual(a.seqs, range(1, N));
  assert.deepEqual(b.seqs, range(1, N));
  assertTiles(tk.spans, N);
  assert.ok(a.subscribed >= 2 && b.subscribed >= 2 && tk.subscribed >= 2, "every subscription was resumed");
  assert.ok(seen.states.includes("reconnecting"), `states ${seen.states}`);
  assert.equal(feed.state, "live");
  assert.deepEqual(seen.errors, []);
  assert.deepEqual(seen.resyncs, []);
  return bc;
}

test("SIGKILL of the broadcaster mid-stream: a new one on the same port, every callback sees 1..N once", async (t) => {
  await restartMidStream(t, "kill", async (bc, addr, url) => {
    await bc.stop("SIGKILL");
    return startBroadcaster(t, url, { listen: addr });
  });
});

test("graceful restart (close 1001) mid-stream: every callback sees 1..N once", async (t) => {
  await restartMidStream(t, "term", async (bc, addr, url) => {
    const exit = await bc.stop("SIGTERM");
    assert.equal(exit.code, 0, `broadcaster exit after SIGTERM: ${JSON.stringify(exit)}`);
    return startBroadcaster(t, url, { listen: addr });
  });
});

test("history pruned while the client is away: history_unavailable with earliest_seq, the other market goes on", async (t) => {
  const url = await freshDatabase(t, "prune");
  const writer = await startServer(t, "writer", url);
  const api = writerApi(writer);
  let bc = await startBroadcaster(t, url);
  const addr = bc.addr;
  await api.createMarket("P");
  await api.createMarket("Q");

  const feed = connect(`ws://${addr}/ws`, FAST);
  t.after(() => feed.close());
  const seen = record(feed);
  const p = follow(feed, "P");
  const q = follow(feed, "Q");
  await until(() => feed.state === "live", "live");
  for (let i = 0; i < 5; i++) await api.trade("P");
  await api.trade("Q");
  await until(() => p.seqs.length === 5 && q.seqs.length === 1, "P 1..5 and Q 1");

  await bc.stop("SIGKILL");
  for (let i = 0; i < 10; i++) await api.trade("P");
  await api.trade("Q");
  // As the schema owner: trades older than now, except each market's newest.
  const removed = await psql(url, "SELECT marketcast_prune(now())");
  assert.equal(removed, "15", "P keeps only seq 15, Q only seq 2");
  bc = await startBroadcaster(t, url, { listen: addr });

  const err = await until(() => seen.errors.find((e) => e.market === "P"), "P's history_unavailable").catch((e) => {
    throw new Error(`${e.message}; seen ${JSON.stringify(seen)} P ${JSON.stringify(p)} Q ${JSON.stringify(q)}`);
  });
  assert.equal(err.code, "history_unavailable");
  assert.equal(err.earliestSeq, 15);
  assert.equal(err.position, 5);
  await until(() => q.seqs.length === 2, "Q's trade 2 after the restart");
  assert.deepEqual(p.seqs, range(1, 5));
  assert.deepEqual(q.seqs, [1, 2]);
  assert.equal(feed.position("P"), undefined, "P's subscription ended");
  assert.equal(feed.position("Q"), 2);
  assert.deepEqual(seen.errors.map((e) => e.code), ["history_unavailable"]);
  assert.equal(feed.state, "live");
  assert.deepEqual(p.errors, [err], "P's onError got it too");
});
