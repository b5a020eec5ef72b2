export { Position, backoffDelay, tokenExp } from "./core.js";
export type { Verdict } from "./core.js";
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
export type ServerErrorCode = "bad_request" | "unknown_op" | "already_subscribed" | "too_many_subscriptions" | "forbidden" | "invalid_token" | "unavailable" | "unknown_market" | "wrong_shard" | "epoch_mismatch" | "history_unavailable" | "not_subscribed" | "rate_limited";
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
export type FeedState = 
/** The first connection is being opened. */
"connecting"
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
{
    code: "epoch_changed";
    market: string;
    epoch: string;
    message: string;
}
/** Trades after the position were pruned; resume knowingly with `fromSeq >= earliestSeq - 1`, or use `recent`. */
 | {
    code: "history_unavailable";
    market: string;
    earliestSeq: number;
    position: number | null;
    message: string;
}
/** The token does not grant the market (at subscribe, or after an `auth` narrowed it). */
 | {
    code: "forbidden";
    market: string;
    message: string;
} | {
    code: "unknown_market";
    market: string;
    message: string;
}
/** This broadcaster does not serve the market's shard; `url`, when the server knows it, does. */
 | {
    code: "wrong_shard";
    market: string;
    shard?: number;
    url?: string;
    message: string;
}
/** A ticker subscription on a server that answered in trades mode (contract v1). */
 | {
    code: "unsupported";
    market: string;
    message: string;
}
/** Any other refusal of a subscribe (`bad_request`, `too_many_subscriptions`, ...): `serverCode` says which. */
 | {
    code: "refused";
    market: string;
    serverCode: string;
    message: string;
}
/**
 * The token was refused. `expired`: a fixed token ran out (close 4001, or
 * its `exp` had passed at a reconnect); the feed is closed. `rejected`: an
 * `auth` with a fresh token was answered `invalid_token`; the connection
 * keeps its previous token and the refresh is retried.
 */
 | {
    code: "invalid_token";
    market?: undefined;
    reason: "expired" | "rejected";
    message: string;
}
/** The token function threw or returned no string; retried with backoff. */
 | {
    code: "token_unavailable";
    market?: undefined;
    message: string;
};
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
    onmessage: ((ev: {
        data: unknown;
    }) => void) | null;
    onclose: ((ev: {
        code: number;
        reason: string;
    }) => void) | null;
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
export declare function connect(url: string, options?: ConnectOptions): Feed;
