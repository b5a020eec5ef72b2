// Tokens against a real broadcaster (HS256 secret, no leeway, so a token's
// exp is the second the server closes with 4001): a token function keeps one
// connection alive through `auth`; a fixed token's expiry is reported and
// ends the feed; a refresh that comes too late costs a reconnect, not a trade.

import { test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "../dist/index.js";
import { freshDatabase, startServer, startBroadcaster, writerApi, signToken, SECRET, until, range, record, WebSocket } from "./support.mjs";

const FAST = { minBackoffMs: 50, maxBackoffMs: 500, WebSocket };
const JWT_ARGS = ["--jwt-hs256-secret", SECRET, "--jwt-leeway", "0s"];
const nowS = () => Math.floor(Date.now() / 1000);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function setup(t, name) {
  const url = await freshDatabase(t, name);
  const writer = await startServer(t, "writer", url);
  const api = writerApi(writer);
  const bc = await startBroadcaster(t, url, { args: JWT_ARGS });
  await api.createMarket("M");
  return { api, ws: `ws://${bc.addr}/ws` };
}

/** Post a trade every `everyMs` until `ms` have passed; resolves to how many. */
async function tradeFor(api, ms, everyMs = 50) {
  const end = Date.now() + ms;
  let n = 0;
  while (Date.now() < end) {
    await api.trade("M");
    n++;
    await sleep(everyMs);
  }
  return n;
}

test("a token function refreshes through auth before each exp: one connection, 1..N past several expiries", async (t) => {
  const { api, ws } = await setup(t, "refresh");
  const issued = [];
  const feed = connect(ws, {
    ...FAST,
    token: async () => {
      const exp = nowS() + 3;
      issued.push(exp);
      return signToken({ sub: "ts-test", exp, markets: ["*"] });
    },
  });
  t.after(() => feed.close());
  const seen = record(feed);
  const seqs = [];
  feed.subscribe("M", { fromSeq: 0, onTrade: (tr) => seqs.push(tr.seq) });
  await until(() => feed.state === "live", "live");

  // Three times a token's life: the first token is long expired at the end.
  const n = await tradeFor(api, 8000);
  await until(() => seqs.length >= n, `${n} trades`);
  assert.ok(nowS() > issued[0] + 2, "the stream outlived the first token");
  assert.deepEqual(seqs, range(1, n));
  assert.ok(issued.length >= 3, `the token function was called ${issued.length} times`);
  assert.deepEqual(seen.states, ["connecting", "replaying", "live"], "never reconnected");
  assert.deepEqual(seen.errors, []);
});

test("a fixed token that expires: close 4001 is reported as invalid_token (expired) and the feed closes", async (t) => {
  const { api, ws } = await setup(t, "fixed");
  const exp = nowS() + 2;
  const feed = connect(ws, { ...FAST, token: signToken({ exp, markets: ["M"] }) });
  t.after(() => feed.close());
  const seen = record(feed);
  const seqs = [];
  const subErrors = [];
  feed.subscribe("M", { fromSeq: 0, onTrade: (tr) => seqs.push(tr.seq), onError: (e) => subErrors.push(e) });
  await until(() => feed.state === "live", "live");
  for (let i = 0; i < 5; i++) await api.trade("M");
  await until(() => seqs.length === 5, "5 trades");

  const err = await until(() => seen.errors[0], "invalid_token", 5000);
  assert.equal(err.code, "invalid_token");
  assert.equal(err.reason, "expired");
  assert.ok(nowS() >= exp, "not before the token's exp");
  assert.equal(feed.state, "closed");
  assert.deepEqual(seen.states, ["connecting", "replaying", "live", "closed"], "no reconnect with a token that cannot be renewed");
  assert.deepEqual(seqs, range(1, 5));
  assert.deepEqual(subErrors, [], "a feed error, not one market's");
  assert.equal(seen.errors.length, 1);
});

test("a refresh that comes too late: 4001, then a reconnect with the fresh token resumes gapless", async (t) => {
  const { api, ws } = await setup(t, "late");
  const issued = [];
  const feed = connect(ws, {
    ...FAST,
    token: async () => {
      issued.push(Date.now());
      if (issued.length === 1) return signToken({ exp: nowS() + 2, markets: ["*"] });
      // The second token (the refresh) arrives after the first one expired.
      await sleep(3500);
      return signToken({ exp: nowS() + 60, markets: ["*"] });
    },
  });
  t.after(() => feed.close());
  const seen = record(feed);
  const seqs = [];
  feed.subscribe("M", { fromSeq: 0, onTrade: (tr) => seqs.push(tr.seq) });
  await until(() => feed.state === "live", "live");

  const n = await tradeFor(api, 7000);
  await until(() => seqs.length >= n && feed.state === "live", `${n} trades, live again`);
  assert.deepEqual(seqs, range(1, n));
  assert.ok(seen.states.includes("reconnecting"), `states ${seen.states}: the 4001 cost a reconnect`);
  assert.equal(issued.length, 2, "the reconnect waited for the refresh already under way");
  assert.deepEqual(seen.errors, []);
});
