// What a correct server never sends, so only a scripted one can: the client's
// own checks (duplicates dropped, a gap or a lying head resynced from the
// position, never delivered out of order), and the ops it sends. The feed
// runs on an injected WebSocket constructor; no network.

import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, Position, backoffDelay, tokenExp } from "../dist/index.js";
import { signToken, until } from "./support.mjs";

/** A scripted server end: every socket the feed opens, what it sent, and a way to answer. */
function fakeServer() {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.push(this);
      setTimeout(() => {
        this.readyState = 1;
        this.onopen?.({});
      }, 0);
    }
    send(data) {
      this.sent.push(JSON.parse(data));
    }
    close() {
      this.readyState = 3;
    }
    /** Deliver a server frame. */
    push(msg) {
      this.onmessage?.({ data: JSON.stringify(msg) });
    }
    /** Close from the server side. */
    drop(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    subscribed(market, extra = {}) {
      const op = this.sent.findLast((o) => o.op === "subscribe" && (o.market === market || o.markets?.some((e) => e.market === market)));
      this.push({ type: "subscribed", id: op.id, market, epoch: "e1", head_seq: 0, last_price: null, volume: 0, mode: "trades", protocol: "1.1", ...extra });
    }
  }
  return { sockets, WebSocket: FakeSocket, last: () => sockets.at(-1) };
}

const trade = (market, seq) => ({ type: "trade", market, seq, trade_id: seq, side: "yes", price: "0.5000", qty: 1, ts: "2026-01-01T00:00:00.000000Z" });
const OPTS = { minBackoffMs: 1, maxBackoffMs: 5 };

test("Position: deliver position + 1, drop at or below it, a gap above it", () => {
  const p = new Position(null);
  assert.equal(p.trade(1), "gap", "nothing before the start is known");
  assert.equal(p.started(10), "deliver");
  assert.equal(p.trade(10), "duplicate");
  assert.equal(p.trade(11), "deliver");
  assert.equal(p.trade(13), "gap");
  assert.equal(p.seq, 11, "a gap does not move the position");
  assert.equal(p.started(11), "duplicate", "a resume from the position");
  assert.equal(p.started(12), "gap", "a resume above the position skips 12");
  assert.equal(p.span(12, 15), "deliver");
  assert.equal(p.span(14, 16), "gap", "a span straddling the position cannot be split");
  assert.equal(p.span(13, 15), "duplicate");
  assert.equal(p.head(15), "deliver");
  assert.equal(p.head(16), "gap");
});

test("backoff doubles from the minimum to the maximum, jittered within its upper half", () => {
  assert.equal(backoffDelay(0, 100, 1000, () => 0), 50);
  assert.equal(backoffDelay(0, 100, 1000, () => 1), 100);
  assert.equal(backoffDelay(3, 100, 1000, () => 1), 800);
  assert.equal(backoffDelay(10, 100, 1000, () => 0), 500);
  assert.equal(backoffDelay(10, 100, 1000, () => 1), 1000);
});

test("tokenExp reads a JWT's exp and nothing else", () => {
  assert.equal(tokenExp(signToken({ exp: 1796000000.7 })), 1796000000);
  assert.equal(tokenExp("opaque"), null);
  assert.equal(tokenExp("a.b.c"), null);
  assert.equal(tokenExp(signToken({ sub: "x" })), null);
});

test("duplicates are dropped, a gap drops the socket and resumes from the last delivered seq", async (t) => {
  const srv = fakeServer();
  const feed = connect("ws://fake/ws", { ...OPTS, WebSocket: srv.WebSocket });
  t.after(() => feed.close());
  const seqs = [];
  const resyncs = [];
  feed.on("resync", (r) => resyncs.push(r));
  feed.subscribe("A", { fromSeq: 0, onTrade: (tr) => seqs.push(tr.seq) });
  await until(() => srv.last()?.sent.length === 1, "subscribe");
  const s1 = srv.last();
  assert.deepEqual(s1.sent[0], { op: "subscribe", market: "A", from_seq: 0, id: s1.sent[0].id });
  s1.subscribed("A", { from_seq: 0 });
  for (const seq of [1, 2, 2, 1, 3, 5, 4]) s1.push(trade("A", seq));
  assert.deepEqual(seqs, [1, 2, 3], "5 is a gap: nothing after it on this socket is taken");
  assert.equal(resyncs[0]?.reason, "gap");
  assert.equal(s1.readyState, 3, "the socket was closed");

  await until(() => srv.sockets.length === 2 && srv.last().sent.length === 1, "a new socket and its subscribe");
  const s2 = srv.last();
  assert.equal(s2.sent[0].from_seq, 3, "resumed from the last delivered seq");
  assert.equal(s2.sent[0].epoch, "e1", "with the epoch it saw");
  s2.subscribed("A", { from_seq: 3, head_seq: 5 });
  assert.equal(feed.state, "replaying");
  for (const seq of [3, 4, 5]) s2.push(trade("A", seq));
  assert.deepEqual(seqs, [1, 2, 3, 4, 5]);
  assert.equal(feed.state, "live");
});

test("on reconnect every subscription goes out in one markets op; a head above the position is a gap", async (t) => {
  const srv = fakeServer();
  const feed = connect("ws://fake/ws", { ...OPTS, WebSocket: srv.WebSocket });
  t.after(() => feed.close());
  const spans = [];
  feed.subscribe("A", { fromSeq: 7 });
  feed.subscribe("B", { recent: 50, heads: true });
  feed.subscribe("C", { mode: "ticker", intervalMs: 250, onTicker: (f) => spans.push([f.from_seq, f.to_seq]) });
  await until(() => srv.last()?.sent.length === 1, "one op for the three");
  const s1 = srv.last();
  assert.deepEqual(s1.sent[0].markets, [
    { market: "A", from_seq: 7 },
    { market: "B", recent: 50, heads: true },
    { market: "C", mode: "ticker", interval_ms: 250 },
  ]);
  s1.subscribed("A", { from_seq: 7, head_seq: 7 });
  s1.subscribed("B", { from_seq: 40, head_seq: 90, heads: true, head_interval_ms: 5000 });
  s1.subscribed("C", { from_seq: 20, head_seq: 20, mode: "ticker", interval_ms: 250 });
  s1.push({ type: "ticker", market: "C", from_seq: 21, to_seq: 24 });
  s1.push({ type: "head", market: "B", head_seq: 91, ts: "" });
  assert.equal(s1.readyState, 3, "head 91 above B's position 40: resync");

  await until(() => srv.sockets.length === 2 && srv.last().sent.length === 1, "one op on the new socket");
  const op = srv.last().sent[0];
  assert.deepEqual(op, {
    op: "subscribe",
    id: op.id,
    markets: [
      { market: "A", from_seq: 7, epoch: "e1" },
      { market: "B", from_seq: 40, epoch: "e1", heads: true },
      { market: "C", from_seq: 24, epoch: "e1", mode: "ticker", interval_ms: 250 },
    ],
  });
  assert.deepEqual(spans, [[21, 24]]);
});

test("errors no retry fixes end that subscription with a typed event; unavailable is retried", async (t) => {
  const srv = fakeServer();
  const feed = connect("ws://fake/ws", { ...OPTS, WebSocket: srv.WebSocket });
  t.after(() => feed.close());
  const errors = [];
  feed.on("error", (e) => errors.push(e));
  await until(() => feed.state === "live", "open, nothing subscribed");
  for (const m of ["E", "H", "F", "U", "R"]) feed.subscribe(m, { fromSeq: 3, epoch: "old" });
  await until(() => srv.last()?.sent.length === 5, "five subscribes");
  const s = srv.last();
  const idOf = (m) => s.sent.find((o) => o.market === m).id;
  s.push({ type: "error", id: idOf("E"), market: "E", code: "epoch_mismatch", epoch: "new", message: "" });
  s.push({ type: "error", id: idOf("H"), market: "H", code: "history_unavailable", earliest_seq: 9, message: "" });
  s.push({ type: "error", id: idOf("F"), market: "F", code: "forbidden", message: "" });
  s.push({ type: "error", id: idOf("U"), market: "U", code: "unknown_market", message: "" });
  s.push({ type: "error", id: idOf("R"), market: "R", code: "unavailable", message: "" });
  assert.deepEqual(
    errors.map(({ message: _, ...e }) => e),
    [
      { code: "epoch_changed", market: "E", epoch: "new" },
      { code: "history_unavailable", market: "H", earliestSeq: 9, position: 3 },
      { code: "forbidden", market: "F" },
      { code: "unknown_market", market: "U" },
    ],
  );
  await until(() => s.sent.length === 6, "R asked again");
  assert.equal(s.sent[5].market, "R");
  assert.equal(s.sent[5].from_seq, 3);
  assert.equal(feed.position("E"), undefined);
  assert.equal(feed.position("R"), 3);
});
