// marketcast-client: one WebSocket to a marketcast broadcaster, any number of
// market subscriptions on it, each resumed after any disconnect from the last
// seq it delivered, each trade handed to the application exactly once and in
// order. Contract: docs/PROTOCOL.md (v1 and the 1.1 WebSocket read side).
//
// How the promise is kept:
// - Every subscription has a Position (core.ts): the last seq delivered to
//   its callback. A frame at or below it is a duplicate and dropped; one
//   above position + 1 is a gap the server must never produce, so the socket
//   is dropped and every subscription resumes from its position.
// - On every (re)connect all live subscriptions go out in `markets` ops with
//   `from_seq` = their position (and the epoch they first saw, so a reset log
//   answers `epoch_mismatch` instead of a wrong resume).
// - What no retry can fix ends that subscription with a typed error
//   (`epoch_changed`, `history_unavailable`, `forbidden`, `unknown_market`,
//   ...), given to its `onError` and to the feed's "error" listeners. What a
//   retry can fix (a drop, `unavailable`, `rate_limited`, 1001, 4000, 4001
//   with a token function) is retried with jittered exponential backoff.
// - A token function is called on every connect and again ahead of the
//   token's `exp`, and the fresh token is sent with the `auth` op, so the
//   connection outlives each token. A fixed token string cannot be renewed:
//   its expiry (close 4001, or an `exp` already past at a reconnect) ends the
//   feed with `invalid_token`.

import { Position, backoffDelay, tokenExp } from "./core.js";

export { Position, backoffDelay, tokenExp } from "./core.js";
export type { Verdict } from "./core.js";

// ------------------------------------------------------------------ wire types

/** A `trade` message, exactly as the server sends it. */
export interface Trade {
  type: "trade";
  market: string;
  seq: number;
  trade_id: number;
  side: "yes" | "no";
  /** The price of the side bought, 4 decimal places. */
  price: string;
  qty: number;
  /** RFC 3339 UTC, six fraction digits. */
  ts: string;
}

/** A `ticker` frame (contract 1.1 §2.6): the trades `from_seq..=to_seq` folded. */
export interface Ticker {
  type: "ticker";
  market: string;
  from_seq: number;
  to_seq: number;
  count: number;
  qty: number;
  volume: number;
  open: string;
  high: string;
  low: string;
  last_price: string;
  ts: string;
}

/** A `head` (contract 1.1 §2.7): the subscription is caught up at `head_seq`. */
export interface Head {
  type: "head";
  market: string;
  head_seq: number;
  ts: string;
}

/** The server's `subscribed` answer, once per (re)subscribe. */
export interface Subscribed {
  type: "subscribed";
  /** The subscribe op's `id`, when it had one. */
  id?: OpId;
  market: string;
  epoch: string;
  head_seq: number;
  last_price: string | null;
  volume: number;
  /** 1.1: the first trade owed is `from_seq + 1` (absent from a v1 server). */
  from_seq?: number;
  mode?: "trades" | "ticker";
  interval_ms?: number;
  heads?: boolean;
  head_interval_ms?: number;
  protocol?: string;
}

/** An op's `id`, echoed in its direct answer. This client sends strings (`c1`, `c2`, ...). */
export type OpId = number | string;

/** The answer to an `unsubscribe`. */
export interface Unsubscribed {
  type: "unsubscribed";
  id?: OpId;
  market: string;
}

/** The answer to a `ping`. */
export interface Pong {
  type: "pong";
  id?: OpId;
}

/** The answer to an `auth`: the new token's `exp` (whole seconds) and `sub`. */
export interface Authed {
  type: "authed";
  id?: OpId;
  exp: number;
  sub?: string;
}

/** The `code` of an `error` message. */
export type ServerErrorCode =
  | "bad_request"
  | "unknown_op"
  | "already_subscribed"
  | "too_many_subscriptions"
  | "forbidden"
  | "invalid_token"
  | "unavailable"
  | "unknown_market"
  | "wrong_shard"
  | "epoch_mismatch"
  | "history_unavailable"
  | "not_subscribed"
  | "rate_limited";

/** An `error` message, exactly as the server sends it (the client turns the ones it cannot fix into a `FeedError`). */
export interface ServerError {
  type: "error";
  id?: OpId;
  code: ServerErrorCode;
  message: string;
  market?: string;
  /** `wrong_shard`. */
  shard?: number;
  /** `wrong_shard`, when the server knows it. */
  url?: string;
  /** `wrong_shard`: the live broadcasters serving the shard. */
  broadcasters?: string[];
  /** `epoch_mismatch`: the market's current epoch. */
  epoch?: string;
  /** `history_unavailable`: the lowest seq retained. */
  earliest_seq?: number;
}

/** Any WebSocket message of the server. */
export type ServerMessage = Subscribed | Trade | Ticker | Head | Unsubscribed | Pong | Authed | ServerError;

/** The per-market fields of a subscribe, as this client sends them (it never sends `null`s). */
export interface SubscribeEntry {
  market: string;
  from_seq?: number;
  recent?: number;
  epoch?: string;
  mode?: "trades" | "ticker";
  interval_ms?: number;
  heads?: boolean;
}

/** A subscribe of one market (the v1 form). */
export interface SubscribeOp extends SubscribeEntry {
  op: "subscribe";
  id?: string;
}

/** A subscribe of several markets in one op (contract 1.1). */
export interface SubscribeMarketsOp {
  op: "subscribe";
  id?: string;
  markets: [SubscribeEntry, ...SubscribeEntry[]];
}

export interface UnsubscribeOp {
  op: "unsubscribe";
  market: string;
  id?: string;
}

/** A fresh token for the open connection. */
export interface AuthOp {
  op: "auth";
  token: string;
  id?: string;
}

/** Every message this client sends. */
export type ClientOp = SubscribeOp | SubscribeMarketsOp | UnsubscribeOp | AuthOp;

// ------------------------------------------------------------------ API types

export type FeedState =
  /** The first connection is being opened. */
  | "connecting"
  /** Connected; some subscription is waiting for `subscribed` or replaying up to the head it was subscribed at. */
  | "replaying"
  /** Connected and every subscription caught up. */
  | "live"
  /** The connection dropped; a new one is being opened (backoff). */
  | "reconnecting"
  /** `close()` was called, or the feed hit something it cannot fix (an expired fixed token). */
  | "closed";

/**
 * Something the client cannot fix by itself. Those naming a `market` ended
 * that subscription (subscribe again to start over); the others concern the
 * feed.
 */
export type FeedError =
  /** The market's log was reset: the positions held belong to an old history. */
  | { code: "epoch_changed"; market: string; epoch: string; message: string }
  /** Trades after the position were pruned; resume knowingly with `fromSeq >= earliestSeq - 1`, or use `recent`. */
  | { code: "history_unavailable"; market: string; earliestSeq: number; position: number | null; message: string }
  /** The token does not grant the market (at subscribe, or after an `auth` narrowed it). */
  | { code: "forbidden"; market: string; message: string }
  | { code: "unknown_market"; market: string; message: string }
  /** This broadcaster does not serve the market's shard; `url`, when the server knows it, does. */
  | { code: "wrong_shard"; market: string; shard?: number; url?: string; message: string }
  /** A ticker subscription on a server that answered in trades mode (contract v1). */
  | { code: "unsupported"; market: string; message: string }
  /** Any other refusal of a subscribe (`bad_request`, `too_many_subscriptions`, ...): `serverCode` says which. */
  | { code: "refused"; market: string; serverCode: string; message: string }
  /**
   * The token was refused. `expired`: a fixed token ran out (close 4001, or
   * its `exp` had passed at a reconnect); the feed is closed. `rejected`: an
   * `auth` with a fresh token was answered `invalid_token`; the connection
   * keeps its previous token and the refresh is retried.
   */
  | { code: "invalid_token"; market?: undefined; reason: "expired" | "rejected"; message: string }
  /** The token function threw or returned no string; retried with backoff. */
  | { code: "token_unavailable"; market?: undefined; message: string };

/** The feed dropped its connection on purpose and resumes every subscription. */
export interface Resync {
  market?: string;
  /** `gap` (a frame skipped a seq), `stale` (no head in time), `protocol` (an answer that contradicts the contract), `requested` (`reconnect()`). */
  reason: "gap" | "stale" | "protocol" | "requested";
  message: string;
}

/** The part of the WebSocket API the client uses (browsers, Node >= 22, undici, `ws`). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export type TokenSource = string | (() => string | Promise<string>);

export interface ConnectOptions {
  /**
   * A JWT sent as `?token=` on every connect. A function is called on every
   * connect and ahead of each token's `exp` (the fresh token goes out in an
   * `auth` op), so the connection survives expiry; a string cannot be renewed.
   */
  token?: TokenSource;
  /** Defaults to `globalThis.WebSocket` (browsers, Node >= 22, Node 20 with `--experimental-websocket`). */
  WebSocket?: WebSocketConstructor;
  /** First reconnect delay bound (ms); doubled per failed attempt, with jitter. Default 250. */
  minBackoffMs?: number;
  /** Largest reconnect delay (ms). Default 10000. */
  maxBackoffMs?: number;
  /** Refresh a function token this long before its `exp` (ms), or at half its remaining life if that is sooner. Default 30000. */
  refreshLeadMs?: number;
  /** Give up on a connect that has not opened after this long (ms) and retry. Default 10000. */
  connectTimeoutMs?: number;
}

export interface SubscribeOptions {
  /** Start after this seq (deliver `fromSeq + 1` onwards). Default: live from the head. */
  fromSeq?: number;
  /** Start with the newest N trades (first subscribe only; resumes use the position). Not with `fromSeq`. */
  recent?: number;
  /** Expected epoch; default: the one the first `subscribed` reports. */
  epoch?: string;
  /** `ticker`: folded frames to `onTicker` instead of trades. Default `trades`. */
  mode?: "trades" | "ticker";
  /** Ticker frame interval (ms), 100..60000 by default on the server. */
  intervalMs?: number;
  /** Ask for `head` messages: `onHead` proves a quiet market is quiet, and a missing head is treated as a stale feed. */
  heads?: boolean;
  onTrade?: (trade: Trade) => void;
  onTicker?: (ticker: Ticker) => void;
  onHead?: (head: Head) => void;
  /** Every `subscribed`, the first and each resume. */
  onSubscribed?: (subscribed: Subscribed) => void;
  /** The subscription ended on something no retry fixes. */
  onError?: (error: FeedError) => void;
}

export interface FeedEvents {
  state: (state: FeedState) => void;
  error: (error: FeedError) => void;
  resync: (resync: Resync) => void;
}

export interface Feed {
  readonly state: FeedState;
  /** Follow a market; returns the function that stops following it. One subscription per market. */
  subscribe(market: string, options: SubscribeOptions): () => void;
  /** The last seq (trades) or `to_seq` (ticker) delivered for the market, or where it starts. */
  position(market: string): number | null | undefined;
  on<K extends keyof FeedEvents>(event: K, listener: FeedEvents[K]): () => void;
  /** Drop the connection now and resume every subscription on a new one. */
  reconnect(): void;
  close(): void;
}

/** Open a feed. It connects at once and keeps reconnecting until `close()`. */
export function connect(url: string, options: ConnectOptions = {}): Feed {
  return new FeedImpl(url, options);
}

// ------------------------------------------------------------------ the feed

const OPEN = 1;
/** Entries per `markets` op: 20 entries with from_seq and epoch stay far below the default 4096-byte message limit. */
const OPS_CHUNK = 20;
/** Retry delay bounds (ms) for a subscribe answered `unavailable` or `rate_limited`. */
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 5000;

type SubStatus =
  /** Not sent on the current connection (none open, or waiting to retry). */
  | "idle"
  /** Subscribe sent, no answer yet. */
  | "pending"
  /** `subscribed` received on the current connection. */
  | "active";

interface Sub {
  market: string;
  opts: SubscribeOptions;
  pos: Position;
  /** The epoch of the first `subscribed`, sent with every resume. */
  epoch: string | undefined;
  status: SubStatus;
  /** Id of the subscribe op in flight: its answers are this subscription's, older ones are not. */
  opId: string | undefined;
  /** `head_seq` of the latest `subscribed`: below it the subscription is replaying. */
  catchUpTo: number;
  /** Staleness bound (ms) when the server promised heads; 0 otherwise. */
  staleAfterMs: number;
  lastFrameAt: number;
  retries: number;
  retryTimer: ReturnType<typeof setTimeout> | undefined;
}

type Op = { kind: "subscribe"; markets: string[] } | { kind: "auth" };

interface Incoming {
  type?: unknown;
  market?: unknown;
  id?: unknown;
  [k: string]: unknown;
}

class FeedImpl implements Feed {
  state: FeedState = "connecting";
  private readonly url: string;
  private readonly tokenSource: TokenSource | undefined;
  private readonly Ctor: WebSocketConstructor;
  private readonly minBackoffMs: number;
  private readonly maxBackoffMs: number;
  private readonly refreshLeadMs: number;
  private readonly subs = new Map<string, Sub>();
  private readonly listeners: { [K in keyof FeedEvents]: Set<FeedEvents[K]> } = {
    state: new Set(),
    error: new Set(),
    resync: new Set(),
  };
  private ws: WebSocketLike | null = null;
  /** Bumped on every connect and drop: async steps of an older one stop. */
  private generation = 0;
  /** Failed connects since the last one that subscribed something. */
  private attempt = 0;
  private closed = false;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private readonly connectTimeoutMs: number;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private staleTimer: ReturnType<typeof setInterval> | undefined;
  /** The connection's token `exp` (Unix seconds), when known. */
  private tokenExpS: number | null = null;
  /** One token function call at a time; a connect during a refresh shares it. */
  private tokenFetch: Promise<string> | null = null;
  private nextId = 1;
  /** Ops awaiting an answer on the current connection, by id. */
  private ops = new Map<string, Op>();

  constructor(url: string, options: ConnectOptions) {
    // A malformed URL throws here, at the caller, not later in a timer.
    new URL(url);
    this.url = url;
    this.tokenSource = options.token;
    const Ctor = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) {
      throw new Error("marketcast-client: no WebSocket here; pass options.WebSocket (Node 20: run with --experimental-websocket)");
    }
    this.Ctor = Ctor;
    this.minBackoffMs = options.minBackoffMs ?? 250;
    this.maxBackoffMs = options.maxBackoffMs ?? 10_000;
    this.refreshLeadMs = options.refreshLeadMs ?? 30_000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    void this.open();
  }

  // -------------------------------------------------------------- public

  subscribe(market: string, opts: SubscribeOptions): () => void {
    if (this.closed) throw new Error("marketcast-client: the feed is closed");
    if (this.subs.has(market)) throw new Error(`marketcast-client: already subscribed to ${market}`);
    if (opts.recent !== undefined && opts.fromSeq !== undefined) {
      throw new Error("marketcast-client: recent and fromSeq exclude each other");
    }
    const sub: Sub = {
      market,
      opts,
      pos: new Position(opts.fromSeq ?? null),
      epoch: opts.epoch,
      status: "idle",
      opId: undefined,
      catchUpTo: 0,
      staleAfterMs: 0,
      lastFrameAt: 0,
      retries: 0,
      retryTimer: undefined,
    };
    this.subs.set(market, sub);
    if (this.isOpen()) this.sendSubscribe([sub]);
    this.updateState();
    return () => this.unsubscribe(sub);
  }

  position(market: string): number | null | undefined {
    return this.subs.get(market)?.pos.seq;
  }

  on<K extends keyof FeedEvents>(event: K, listener: FeedEvents[K]): () => void {
    const set = this.listeners[event] as Set<FeedEvents[K]>;
    set.add(listener);
    return () => set.delete(listener);
  }

  reconnect(): void {
    if (this.closed) return;
    this.resync({ reason: "requested", message: "reconnect() called" });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.detach(1000, "client closed");
    clearTimeout(this.reconnectTimer);
    for (const sub of this.subs.values()) clearTimeout(sub.retryTimer);
    this.subs.clear();
    this.setState("closed");
  }

  // -------------------------------------------------------------- connection

  private isOpen(): boolean {
    return this.ws !== null && this.ws.readyState === OPEN;
  }

  private async open(): Promise<void> {
    const gen = ++this.generation;
    if (this.state !== "connecting") this.setState("reconnecting");
    let url = this.url;
    this.tokenExpS = null;
    if (this.tokenSource !== undefined) {
      let token: string;
      try {
        token = await this.freshToken();
      } catch (e) {
        if (gen !== this.generation || this.closed) return;
        this.emitError({ code: "token_unavailable", message: `the token function failed: ${String(e)}` });
        this.scheduleReconnect();
        return;
      }
      if (gen !== this.generation || this.closed) return;
      this.tokenExpS = tokenExp(token);
      if (typeof this.tokenSource === "string" && this.tokenExpS !== null && this.tokenExpS * 1000 <= Date.now()) {
        this.expired("the token's exp has passed and a fixed token cannot be renewed");
        return;
      }
      const u = new URL(url);
      u.searchParams.set("token", token);
      url = u.toString();
    }
    let ws: WebSocketLike;
    try {
      ws = new this.Ctor(url);
    } catch (e) {
      // The constructor refused the URL (a scheme other than ws: or wss:): no retry fixes it.
      this.close();
      setTimeout(() => {
        throw e;
      }, 0);
      return;
    }
    this.ws = ws;
    this.ops = new Map();
    ws.onopen = () => {
      if (ws !== this.ws) return;
      clearTimeout(this.connectTimer);
      const subs = [...this.subs.values()];
      if (subs.length === 0) this.attempt = 0;
      for (let i = 0; i < subs.length; i += OPS_CHUNK) this.sendSubscribe(subs.slice(i, i + OPS_CHUNK));
      if (typeof this.tokenSource === "function") {
        // An opaque token: ask the server when it expires.
        if (this.tokenExpS === null) void this.refresh();
        else this.scheduleRefresh();
      }
      this.updateState();
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws || typeof ev.data !== "string") return;
      let msg: unknown;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return this.resync({ reason: "protocol", message: "a frame that is not JSON" });
      }
      if (msg !== null && typeof msg === "object") this.onMessage(msg as Incoming);
    };
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this.detach();
      if (ev.code === 4001 && typeof this.tokenSource !== "function") {
        this.expired("the server closed with 4001 (token expired)");
        return;
      }
      this.scheduleReconnect();
    };
    ws.onerror = () => {
      // Browsers follow an error with a close (1006), but Node 20's WebSocket
      // leaves a refused connect CONNECTING forever: an error is the end either way.
      if (ws !== this.ws) return;
      this.detach();
      this.scheduleReconnect();
    };
    clearTimeout(this.connectTimer);
    this.connectTimer = setTimeout(() => {
      if (ws === this.ws && ws.readyState !== OPEN) {
        this.detach();
        this.scheduleReconnect();
      }
    }, this.connectTimeoutMs);
  }

  /** Forget the current socket (closing it if open): its events are ignored from now on. */
  private detach(code?: number, reason?: string): void {
    this.generation++;
    clearTimeout(this.connectTimer);
    clearTimeout(this.refreshTimer);
    clearInterval(this.staleTimer);
    this.staleTimer = undefined;
    const ws = this.ws;
    this.ws = null;
    this.ops = new Map();
    for (const sub of this.subs.values()) {
      sub.status = "idle";
      clearTimeout(sub.retryTimer);
      sub.retryTimer = undefined;
    }
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code ?? 1000, reason ?? "");
      } catch {
        // Already closed.
      }
    }
  }

  private scheduleReconnect(): void {
    if (this.closed) return;
    clearTimeout(this.reconnectTimer);
    const delay = backoffDelay(this.attempt, this.minBackoffMs, this.maxBackoffMs);
    this.attempt += 1;
    this.setState("reconnecting");
    this.reconnectTimer = setTimeout(() => void this.open(), delay);
  }

  /** Drop the connection on purpose; every subscription resumes from its position. */
  private resync(r: Resync): void {
    this.emit("resync", r);
    this.detach(1000, "resync");
    this.scheduleReconnect();
  }

  private expired(message: string): void {
    this.emitError({ code: "invalid_token", reason: "expired", message });
    this.close();
  }

  // -------------------------------------------------------------- tokens

  private freshToken(): Promise<string> {
    const src = this.tokenSource;
    if (typeof src === "string") return Promise.resolve(src);
    if (src === undefined) return Promise.reject(new Error("no token source"));
    if (!this.tokenFetch) {
      const p = Promise.resolve()
        .then(() => src())
        .then((t) => {
          if (typeof t !== "string" || t === "") throw new Error("the token function returned no string");
          return t;
        });
      const clear = () => {
        if (this.tokenFetch === p) this.tokenFetch = null;
      };
      p.then(clear, clear);
      this.tokenFetch = p;
    }
    return this.tokenFetch;
  }

  /** Plan the next `auth` ahead of the connection's `exp`. */
  private scheduleRefresh(): void {
    clearTimeout(this.refreshTimer);
    if (typeof this.tokenSource !== "function" || this.tokenExpS === null || !this.isOpen()) return;
    const msLeft = this.tokenExpS * 1000 - Date.now();
    const lead = Math.min(this.refreshLeadMs, msLeft / 2);
    this.refreshTimer = setTimeout(() => void this.refresh(), Math.max(0, msLeft - lead));
  }

  private async refresh(): Promise<void> {
    const gen = this.generation;
    let token: string;
    try {
      token = await this.freshToken();
    } catch (e) {
      if (gen !== this.generation || this.closed) return;
      this.emitError({ code: "token_unavailable", message: `the token function failed: ${String(e)}` });
      this.retryRefresh();
      return;
    }
    if (gen !== this.generation || !this.isOpen()) return;
    this.send({ op: "auth", token }, { kind: "auth" });
  }

  /** A refresh failed: try again soon, while the connection's token lasts (after it, 4001 and a reconnect). */
  private retryRefresh(): void {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => void this.refresh(), 1000);
  }

  // -------------------------------------------------------------- ops

  /** Send one op; with `op`, give it a fresh id (returned) to match its answers. */
  private send(msg: ClientOp, op?: Op): string | undefined {
    if (!this.ws) return undefined;
    let id: string | undefined;
    if (op) {
      id = `c${this.nextId++}`;
      this.ops.set(id, op);
      msg.id = id;
    }
    this.ws.send(JSON.stringify(msg));
    return id;
  }

  private sendSubscribe(subs: Sub[]): void {
    const entries = subs.map((sub) => {
      sub.status = "pending";
      const e: SubscribeEntry = { market: sub.market };
      if (sub.pos.seq !== null) e.from_seq = sub.pos.seq;
      else if (sub.opts.recent !== undefined) e.recent = sub.opts.recent;
      if (sub.epoch !== undefined) e.epoch = sub.epoch;
      if (sub.opts.mode === "ticker") {
        e.mode = "ticker";
        if (sub.opts.intervalMs !== undefined) e.interval_ms = sub.opts.intervalMs;
      }
      if (sub.opts.heads) e.heads = true;
      return e;
    });
    const op: Op = { kind: "subscribe", markets: subs.map((s) => s.market) };
    // One market in the v1 form, so a v1 server understands it.
    const id = entries.length === 1 ? this.send({ op: "subscribe", ...entries[0] }, op) : this.send({ op: "subscribe", markets: entries as [SubscribeEntry, ...SubscribeEntry[]] }, op);
    for (const sub of subs) sub.opId = id;
  }

  private unsubscribe(sub: Sub): void {
    if (this.subs.get(sub.market) !== sub) return;
    this.subs.delete(sub.market);
    clearTimeout(sub.retryTimer);
    if (this.isOpen() && sub.status !== "idle") this.send({ op: "unsubscribe", market: sub.market });
    this.updateState();
  }

  /** Ask again later for a subscription the server could not serve right now. */
  private retrySubscribe(sub: Sub): void {
    sub.status = "idle";
    clearTimeout(sub.retryTimer);
    const delay = backoffDelay(sub.retries++, RETRY_MIN_MS, RETRY_MAX_MS);
    sub.retryTimer = setTimeout(() => {
      sub.retryTimer = undefined;
      if (this.subs.get(sub.market) === sub && this.isOpen() && sub.status === "idle") this.sendSubscribe([sub]);
    }, delay);
    this.updateState();
  }

  /** End a subscription on an error no retry fixes. */
  private end(sub: Sub, err: FeedError): void {
    if (this.subs.get(sub.market) === sub) this.subs.delete(sub.market);
    clearTimeout(sub.retryTimer);
    this.updateState();
    if (sub.opts.onError) this.call(sub.opts.onError, err);
    this.emit("error", err);
  }

  // -------------------------------------------------------------- messages

  private onMessage(msg: Incoming): void {
    const sub = typeof msg.market === "string" ? this.subs.get(msg.market) : undefined;
    if (sub) sub.lastFrameAt = Date.now();
    switch (msg.type) {
      case "trade": {
        if (!sub || sub.status !== "active") return;
        if (sub.opts.mode === "ticker") return this.resync({ market: sub.market, reason: "protocol", message: "a trade on a ticker subscription" });
        const seq = msg.seq as number;
        const v = sub.pos.trade(seq);
        if (v === "gap") return this.resync({ market: sub.market, reason: "gap", message: `expected seq ${(sub.pos.seq ?? 0) + 1}, got ${seq}` });
        if (v === "deliver") {
          if (sub.opts.onTrade) this.call(sub.opts.onTrade, msg as unknown as Trade);
          if (seq >= sub.catchUpTo) this.updateState();
        }
        return;
      }
      case "ticker": {
        if (!sub || sub.status !== "active") return;
        const from = msg.from_seq as number;
        const to = msg.to_seq as number;
        const v = sub.pos.span(from, to);
        if (v === "gap") {
          return this.resync({ market: sub.market, reason: "gap", message: `expected a span from ${(sub.pos.seq ?? 0) + 1}, got ${from}..${to}` });
        }
        if (v === "deliver") {
          if (sub.opts.onTicker) this.call(sub.opts.onTicker, msg as unknown as Ticker);
          if (to >= sub.catchUpTo) this.updateState();
        }
        return;
      }
      case "head": {
        if (!sub || sub.status !== "active") return;
        const headSeq = msg.head_seq as number;
        if (sub.pos.head(headSeq) === "gap") {
          return this.resync({ market: sub.market, reason: "gap", message: `head_seq ${headSeq} is above the position ${sub.pos.seq}` });
        }
        if (sub.opts.onHead) this.call(sub.opts.onHead, msg as unknown as Head);
        return;
      }
      case "subscribed":
        if (sub && sub.status === "pending" && msg.id === sub.opId) this.onSubscribed(sub, msg as unknown as Subscribed);
        return;
      case "authed":
        if (typeof msg.exp === "number") {
          this.tokenExpS = Math.floor(msg.exp);
          this.scheduleRefresh();
        }
        return;
      case "error":
        return this.onError(msg, sub);
      default:
        // `pong`, `unsubscribed`, and types of later versions.
        return;
    }
  }

  private onSubscribed(sub: Sub, s: Subscribed): void {
    if (sub.opts.mode === "ticker" && s.mode !== "ticker") {
      // A v1 server ignored the mode and would send every trade.
      this.send({ op: "unsubscribe", market: sub.market });
      return this.end(sub, { code: "unsupported", market: sub.market, message: "the server does not send tickers (contract 1.1)" });
    }
    const asked = sub.pos.seq;
    const from = typeof s.from_seq === "number" ? s.from_seq : (asked ?? s.head_seq);
    if (sub.pos.started(from) === "gap") {
      return this.resync({ market: sub.market, reason: "protocol", message: `asked from_seq ${asked}, the server starts at ${from}` });
    }
    sub.status = "active";
    sub.retries = 0;
    this.attempt = 0;
    if (sub.epoch === undefined) sub.epoch = s.epoch;
    sub.catchUpTo = s.head_seq;
    sub.staleAfterMs = s.heads && s.head_interval_ms ? Math.max(2 * s.head_interval_ms, s.interval_ms ?? 0) + 1000 : 0;
    if (sub.staleAfterMs > 0) this.watchStale();
    if (sub.opts.onSubscribed) this.call(sub.opts.onSubscribed, s);
    this.updateState();
  }

  private onError(msg: Incoming, sub: Sub | undefined): void {
    const code = String(msg.code);
    const message = typeof msg.message === "string" ? msg.message : code;
    const op = msg.id !== undefined && msg.id !== null ? this.ops.get(String(msg.id)) : undefined;
    if (typeof msg.market !== "string") {
      if (op?.kind === "auth") {
        if (code === "invalid_token") this.emitError({ code: "invalid_token", reason: "rejected", message });
        this.retryRefresh();
      } else if (op?.kind === "subscribe") {
        // The whole op was refused before any entry was handled.
        for (const m of op.markets) {
          const s = this.subs.get(m);
          if (!s || s.status !== "pending") continue;
          if (code === "rate_limited" || code === "unavailable") this.retrySubscribe(s);
          else this.end(s, { code: "refused", market: m, serverCode: code, message });
        }
      }
      return;
    }
    // An answer to an older op for this market (one unsubscribed since) is not this subscription's.
    if (!sub || (msg.id !== undefined && msg.id !== sub.opId)) return;
    const market = sub.market;
    switch (code) {
      case "epoch_mismatch":
        return this.end(sub, { code: "epoch_changed", market, epoch: String(msg.epoch), message });
      case "history_unavailable":
        return this.end(sub, { code: "history_unavailable", market, earliestSeq: Number(msg.earliest_seq), position: sub.pos.seq, message });
      case "forbidden":
      case "unknown_market":
        return this.end(sub, { code, market, message });
      case "wrong_shard":
        return this.end(sub, {
          code: "wrong_shard",
          market,
          shard: typeof msg.shard === "number" ? msg.shard : undefined,
          url: typeof msg.url === "string" ? msg.url : undefined,
          message,
        });
      case "unavailable":
      case "rate_limited":
        if (sub.status === "pending") this.retrySubscribe(sub);
        return;
      case "not_subscribed":
        return;
      case "already_subscribed":
        // Our bookkeeping and the server's disagree: start both afresh.
        return this.resync({ market, reason: "protocol", message });
      default:
        return this.end(sub, { code: "refused", market, serverCode: code, message });
    }
  }

  // -------------------------------------------------------------- state

  private updateState(): void {
    if (this.closed) return this.setState("closed");
    if (!this.isOpen()) return;
    for (const sub of this.subs.values()) {
      if (sub.status !== "active" || (sub.pos.seq ?? 0) < sub.catchUpTo) return this.setState("replaying");
    }
    this.setState("live");
  }

  private setState(s: FeedState): void {
    if (this.state === s) return;
    this.state = s;
    this.emit("state", s);
  }

  /**
   * With heads, a subscription hears from the server at least every
   * 2 x head interval (ticker: or its interval) while the broadcaster is
   * healthy. Longer means a stale feed: try another connection.
   */
  private watchStale(): void {
    if (this.staleTimer !== undefined) return;
    this.staleTimer = setInterval(() => {
      const now = Date.now();
      for (const sub of this.subs.values()) {
        if (sub.status === "active" && sub.staleAfterMs > 0 && now - sub.lastFrameAt > sub.staleAfterMs) {
          return this.resync({ market: sub.market, reason: "stale", message: `nothing for ${sub.market} in ${now - sub.lastFrameAt} ms` });
        }
      }
    }, 1000);
  }

  private emitError(err: FeedError): void {
    this.emit("error", err);
  }

  private emit<K extends keyof FeedEvents>(event: K, arg: Parameters<FeedEvents[K]>[0]): void {
    for (const l of [...this.listeners[event]]) this.call(l as (a: typeof arg) => void, arg);
  }

  /** Run application code; its exception must not break the feed's state, so it is rethrown outside. */
  private call<A>(f: (a: A) => void, a: A): void {
    try {
      f(a);
    } catch (e) {
      setTimeout(() => {
        throw e;
      }, 0);
    }
  }
}
