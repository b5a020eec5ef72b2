// The Node peer of marketcast-bench (issue 14): the minimal Postgres
// LISTEN/NOTIFY -> WebSocket bridge that people glue together today, with
// `ws` 8 and `pg` 8 (versions pinned in package.json and package-lock.json).
//
// What it is:
// - one pg.Client LISTENs on one channel (--channel, default
//   marketcast_bench_bridge). trigger.sql (which the bench installs for
//   bridge rounds only) NOTIFYs every trade inserted into `trades` there, as
//   the exact `trade` JSON marketcast sends; each payload is parsed once (its
//   market and seq) and sent unchanged, as one text frame, to every socket
//   subscribed to that market;
// - `GET /ws?market=ID` subscribes at connect time; the first message is
//   marketcast's `subscribed` frame, with head_seq = markets.last_seq read
//   with one SELECT (a small pg.Pool, not the LISTEN connection). Trades
//   notified before that answer are held and sent after it if their seq is
//   above head_seq, so the stream starts gapless and without duplicates;
// - a socket with more than --max-buffered bytes queued (default 256 KiB,
//   about marketcast's 1024-frame live queue) is closed 4000 "slow
//   consumer", as marketcast closes its slow consumers;
// - `GET /healthz`: 200 once LISTEN is up; stdout's first line is
//   `listening on HOST:PORT` (how the bench learns the address).
//
// What it is not: no replay (`from_seq` is ignored: a client that reconnects
// misses every trade committed meanwhile, and the bench counts them lost), no
// recovery of a lost LISTEN connection (it exits: the trades notified while
// it is down would be gone), no ops over the socket (no subscribe/unsubscribe
// messages, pings are answered by ws itself), no authentication, no origin
// checks, no metrics, one core (Node's event loop). Payloads over NOTIFY's
// 8000-byte limit cannot exist here: the trigger would fail the INSERT.
//
// Usage: psql "$DATABASE_URL" -f trigger.sql, then
//        DATABASE_URL=postgres://... node server.js [--port N] [--host H]
//        [--channel C] [--max-buffered BYTES]   (PORT, HOST, CHANNEL,
//        MAX_BUFFERED also read from the environment; port 0 = any free
//        port)
'use strict';

const http = require('http');
const pg = require('pg');
const { WebSocketServer } = require('ws');

function arg(name, env, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  if (i > 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  return process.env[env] || dflt;
}
const PORT = Number(arg('port', 'PORT', '0'));
const HOST = arg('host', 'HOST', '127.0.0.1');
const CHANNEL = arg('channel', 'CHANNEL', 'marketcast_bench_bridge');
const MAX_BUFFERED = Number(arg('max-buffered', 'MAX_BUFFERED', String(256 * 1024)));
const URL_ = process.env.DATABASE_URL;
if (!URL_) {
  console.error('bridge: DATABASE_URL is not set');
  process.exit(2);
}

// market id -> Set of subscribers { ws, head (null until `subscribed`), held }
const markets = new Map();
const TEXT = { binary: false };
let listening = false;

const listener = new pg.Client({ connectionString: URL_, application_name: 'marketcast-bridge-listen' });
const pool = new pg.Pool({ connectionString: URL_, application_name: 'marketcast-bridge-query', max: 4 });

function drop(market, sub) {
  const set = markets.get(market);
  if (set && set.delete(sub) && set.size === 0) markets.delete(market);
}

function send(market, sub, seq, frame) {
  if (seq <= sub.head) return; // committed before the subscriber's head
  if (sub.ws.bufferedAmount > MAX_BUFFERED) {
    drop(market, sub);
    sub.ws.close(4000, 'slow consumer');
    return;
  }
  sub.ws.send(frame, TEXT);
}

listener.on('notification', (msg) => {
  let t;
  try {
    t = JSON.parse(msg.payload);
  } catch (e) {
    return; // not ours
  }
  const set = markets.get(t.market);
  if (!set) return;
  const frame = Buffer.from(msg.payload); // encoded once, shared by every socket
  for (const sub of set) {
    if (sub.head === null) sub.held.push([t.seq, frame]);
    else send(t.market, sub, t.seq, frame);
  }
});

function subscribe(ws, market) {
  const sub = { ws, head: null, held: [] };
  if (!markets.has(market)) markets.set(market, new Set());
  markets.get(market).add(sub);
  ws.on('close', () => drop(market, sub));
  ws.on('error', () => drop(market, sub));
  pool
    .query('SELECT epoch, last_seq, last_price::text AS last_price, volume FROM markets WHERE id = $1', [market])
    .then((r) => {
      if (r.rowCount === 0) {
        drop(market, sub);
        ws.send(JSON.stringify({ type: 'error', code: 'unknown_market', message: `no market named ${market}` }));
        return;
      }
      const m = r.rows[0];
      sub.head = Number(m.last_seq);
      ws.send(JSON.stringify({
        type: 'subscribed', market, epoch: m.epoch, head_seq: sub.head,
        last_price: m.last_price, volume: Number(m.volume), from_seq: sub.head,
        mode: 'trades', heads: false, protocol: '1.1',
      }));
      const held = sub.held;
      sub.held = null;
      for (const [seq, frame] of held) send(market, sub, seq, frame);
    })
    .catch((e) => {
      drop(market, sub);
      ws.send(JSON.stringify({ type: 'error', code: 'unavailable', message: String(e.message) }));
    });
}

const server = http.createServer((req, res) => {
  if (req.url === '/healthz') {
    res.writeHead(listening ? 200 : 503, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ listening, connections: wss.clients.size }));
  } else {
    res.writeHead(404).end();
  }
});
const wss = new WebSocketServer({ server, path: '/ws' });
wss.on('connection', (ws, req) => {
  const market = new URL(req.url, 'http://x').searchParams.get('market');
  if (market) subscribe(ws, market);
});

listener.on('error', (e) => {
  console.error(`bridge: LISTEN connection failed: ${e.message}`);
  process.exit(1);
});
listener.on('end', () => {
  console.error('bridge: LISTEN connection ended');
  process.exit(1);
});

async function main() {
  await new Promise((ok, fail) => server.once('error', fail).listen(PORT, HOST, ok));
  const a = server.address();
  console.log(`listening on ${a.address}:${a.port}`);
  await listener.connect();
  await listener.query(`LISTEN ${pg.escapeIdentifier(CHANNEL)}`);
  listening = true;
}

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
main().catch((e) => {
  console.error(`bridge: ${e.message}`);
  process.exit(1);
});
