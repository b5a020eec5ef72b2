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
/** Open a feed. It connects at once and keeps reconnecting until `close()`. */
export function connect(url, options = {}) {
    return new FeedImpl(url, options);
}
// ------------------------------------------------------------------ the feed
const OPEN = 1;
/** Entries per `markets` op: 20 entries with from_seq and epoch stay far below the default 4096-byte message limit. */
const OPS_CHUNK = 20;
/** Retry delay bounds (ms) for a subscribe answered `unavailable` or `rate_limited`. */
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 5000;
class FeedImpl {
    constructor(url, options) {
        this.state = "connecting";
        this.subs = new Map();
        this.listeners = {
            state: new Set(),
            error: new Set(),
            resync: new Set(),
        };
        this.ws = null;
        /** Bumped on every connect and drop: async steps of an older one stop. */
        this.generation = 0;
        /** Failed connects since the last one that subscribed something. */
        this.attempt = 0;
        this.closed = false;
        /** The connection's token `exp` (Unix seconds), when known. */
        this.tokenExpS = null;
        /** One token function call at a time; a connect during a refresh shares it. */
        this.tokenFetch = null;
        this.nextId = 1;
        /** Ops awaiting an answer on the current connection, by id. */
        this.ops = new Map();
        // A malformed URL throws here, at the caller, not later in a timer.
        new URL(url);
        this.url = url;
        this.tokenSource = options.token;
        const Ctor = options.WebSocket ?? globalThis.WebSocket;
        if (!Ctor) {
            throw new Error("marketcast-client: no WebSocket here; pass options.WebSocket (Node 20: run with --experimental-websocket)");
        }
        this.Ctor = Ctor;
        this.minBackoffMs = options.minBackoffMs ?? 250;
        this.maxBackoffMs = options.maxBackoffMs ?? 10000;
        this.refreshLeadMs = options.refreshLeadMs ?? 30000;
        this.connectTimeoutMs = options.connectTimeoutMs ?? 10000;
        void this.open();
    }
    // -------------------------------------------------------------- public
    subscribe(market, opts) {
        if (this.closed)
            throw new Error("marketcast-client: the feed is closed");
        if (this.subs.has(market))
            throw new Error(`marketcast-client: already subscribed to ${market}`);
        if (opts.recent !== undefined && opts.fromSeq !== undefined) {
            throw new Error("marketcast-client: recent and fromSeq exclude each other");
        }
        const sub = {
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
        if (this.isOpen())
            this.sendSubscribe([sub]);
        this.updateState();
        return () => this.unsubscribe(sub);
    }
    position(market) {
        return this.subs.get(market)?.pos.seq;
    }
    on(event, listener) {
        const set = this.listeners[event];
        set.add(listener);
        return () => set.delete(listener);
    }
    reconnect() {
        if (this.closed)
            return;
        this.resync({ reason: "requested", message: "reconnect() called" });
    }
    close() {
        if (this.closed)
            return;
        this.closed = true;
        this.detach(1000, "client closed");
        clearTimeout(this.reconnectTimer);
        for (const sub of this.subs.values())
            clearTimeout(sub.retryTimer);
        this.subs.clear();
        this.setState("closed");
    }
    // -------------------------------------------------------------- connection
    isOpen() {
        return this.ws !== null && this.ws.readyState === OPEN;
    }
    async open() {
        const gen = ++this.generation;
        if (this.state !== "connecting")
            this.setState("reconnecting");
        let url = this.url;
        this.tokenExpS = null;
        if (this.tokenSource !== undefined) {
            let token;
            try {
                token = await this.freshToken();
            }
            catch (e) {
                if (gen !== this.generation || this.closed)
                    return;
                this.emitError({ code: "token_unavailable", message: `the token function failed: ${String(e)}` });
                this.scheduleReconnect();
                return;
            }
            if (gen !== this.generation || this.closed)
                return;
            this.tokenExpS = tokenExp(token);
            if (typeof this.tokenSource === "string" && this.tokenExpS !== null && this.tokenExpS * 1000 <= Date.now()) {
                this.expired("the token's exp has passed and a fixed token cannot be renewed");
                return;
            }
            const u = new URL(url);
            u.searchParams.set("token", token);
            url = u.toString();
        }
        let ws;
        try {
            ws = new this.Ctor(url);
        }
        catch (e) {
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
            if (ws !== this.ws)
                return;
            clearTimeout(this.connectTimer);
            const subs = [...this.subs.values()];
            if (subs.length === 0)
                this.attempt = 0;
            for (let i = 0; i < subs.length; i += OPS_CHUNK)
                this.sendSubscribe(subs.slice(i, i + OPS_CHUNK));
            if (typeof this.tokenSource === "function") {
                // An opaque token: ask the server when it expires.
                if (this.tokenExpS === null)
                    void this.refresh();
                else
                    this.scheduleRefresh();
            }
            this.updateState();
        };
        ws.onmessage = (ev) => {
            if (ws !== this.ws || typeof ev.data !== "string")
                return;
            let msg;
            try {
                msg = JSON.parse(ev.data);
            }
            catch {
                return this.resync({ reason: "protocol", message: "a frame that is not JSON" });
            }
            if (msg !== null && typeof msg === "object")
                this.onMessage(msg);
        };
        ws.onclose = (ev) => {
            if (ws !== this.ws)
                return;
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
            if (ws !== this.ws)
                return;
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
    detach(code, reason) {
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
            }
            catch {
                // Already closed.
            }
        }
    }
    scheduleReconnect() {
        if (this.closed)
            return;
        clearTimeout(this.reconnectTimer);
        const delay = backoffDelay(this.attempt, this.minBackoffMs, this.maxBackoffMs);
        this.attempt += 1;
        this.setState("reconnecting");
        this.reconnectTimer = setTimeout(() => void this.open(), delay);
    }
    /** Drop the connection on purpose; every subscription resumes from its position. */
    resync(r) {
        this.emit("resync", r);
        this.detach(1000, "resync");
        this.scheduleReconnect();
    }
    expired(message) {
        this.emitError({ code: "invalid_token", reason: "expired", message });
        this.close();
    }
    // -------------------------------------------------------------- tokens
    freshToken() {
        const src = this.tokenSource;
        if (typeof src === "string")
            return Promise.resolve(src);
        if (src === undefined)
            return Promise.reject(new Error("no token source"));
        if (!this.tokenFetch) {
            const p = Promise.resolve()
                .then(() => src())
                .then((t) => {
                if (typeof t !== "string" || t === "")
                    throw new Error("the token function returned no string");
                return t;
            });
            const clear = () => {
                if (this.tokenFetch === p)
                    this.tokenFetch = null;
            };
            p.then(clear, clear);
            this.tokenFetch = p;
        }
        return this.tokenFetch;
    }
    /** Plan the next `auth` ahead of the connection's `exp`. */
    scheduleRefresh() {
        clearTimeout(this.refreshTimer);
        if (typeof this.tokenSource !== "function" || this.tokenExpS === null || !this.isOpen())
            return;
        const msLeft = this.tokenExpS * 1000 - Date.now();
        const lead = Math.min(this.refreshLeadMs, msLeft / 2);
        this.refreshTimer = setTimeout(() => void this.refresh(), Math.max(0, msLeft - lead));
    }
    async refresh() {
        const gen = this.generation;
        let token;
        try {
            token = await this.freshToken();
        }
        catch (e) {
            if (gen !== this.generation || this.closed)
                return;
            this.emitError({ code: "token_unavailable", message: `the token function failed: ${String(e)}` });
            this.retryRefresh();
            return;
        }
        if (gen !== this.generation || !this.isOpen())
            return;
        this.send({ op: "auth", token }, { kind: "auth" });
    }
    /** A refresh failed: try again soon, while the connection's token lasts (after it, 4001 and a reconnect). */
    retryRefresh() {
        clearTimeout(this.refreshTimer);
        this.refreshTimer = setTimeout(() => void this.refresh(), 1000);
    }
    // -------------------------------------------------------------- ops
    /** Send one op; with `op`, give it a fresh id (returned) to match its answers. */
    send(msg, op) {
        if (!this.ws)
            return undefined;
        let id;
        if (op) {
            id = `c${this.nextId++}`;
            this.ops.set(id, op);
            msg.id = id;
        }
        this.ws.send(JSON.stringify(msg));
        return id;
    }
    sendSubscribe(subs) {
        const entries = subs.map((sub) => {
            sub.status = "pending";
            const e = { market: sub.market };
            if (sub.pos.seq !== null)
                e.from_seq = sub.pos.seq;
            else if (sub.opts.recent !== undefined)
                e.recent = sub.opts.recent;
            if (sub.epoch !== undefined)
                e.epoch = sub.epoch;
            if (sub.opts.mode === "ticker") {
                e.mode = "ticker";
                if (sub.opts.intervalMs !== undefined)
                    e.interval_ms = sub.opts.intervalMs;
            }
            if (sub.opts.heads)
                e.heads = true;
            return e;
        });
        const op = { kind: "subscribe", markets: subs.map((s) => s.market) };
        // One market in the v1 form, so a v1 server understands it.
        const id = entries.length === 1 ? this.send({ op: "subscribe", ...entries[0] }, op) : this.send({ op: "subscribe", markets: entries }, op);
        for (const sub of subs)
            sub.opId = id;
    }
    unsubscribe(sub) {
        if (this.subs.get(sub.market) !== sub)
            return;
        this.subs.delete(sub.market);
        clearTimeout(sub.retryTimer);
        if (this.isOpen() && sub.status !== "idle")
            this.send({ op: "unsubscribe", market: sub.market });
        this.updateState();
    }
    /** Ask again later for a subscription the server could not serve right now. */
    retrySubscribe(sub) {
        sub.status = "idle";
        clearTimeout(sub.retryTimer);
        const delay = backoffDelay(sub.retries++, RETRY_MIN_MS, RETRY_MAX_MS);
        sub.retryTimer = setTimeout(() => {
            sub.retryTimer = undefined;
            if (this.subs.get(sub.market) === sub && this.isOpen() && sub.status === "idle")
                this.sendSubscribe([sub]);
        }, delay);
        this.updateState();
    }
    /** End a subscription on an error no retry fixes. */
    end(sub, err) {
        if (this.subs.get(sub.market) === sub)
            this.subs.delete(sub.market);
        clearTimeout(sub.retryTimer);
        this.updateState();
        if (sub.opts.onError)
            this.call(sub.opts.onError, err);
        this.emit("error", err);
    }
    // -------------------------------------------------------------- messages
    onMessage(msg) {
        const sub = typeof msg.market === "string" ? this.subs.get(msg.market) : undefined;
        if (sub)
            sub.lastFrameAt = Date.now();
        switch (msg.type) {
            case "trade": {
                if (!sub || sub.status !== "active")
                    return;
                if (sub.opts.mode === "ticker")
                    return this.resync({ market: sub.market, reason: "protocol", message: "a trade on a ticker subscription" });
                const seq = msg.seq;
                const v = sub.pos.trade(seq);
                if (v === "gap")
                    return this.resync({ market: sub.market, reason: "gap", message: `expected seq ${(sub.pos.seq ?? 0) + 1}, got ${seq}` });
                if (v === "deliver") {
                    if (sub.opts.onTrade)
                        this.call(sub.opts.onTrade, msg);
                    if (seq >= sub.catchUpTo)
                        this.updateState();
                }
                return;
            }
            case "ticker": {
                if (!sub || sub.status !== "active")
                    return;
                const from = msg.from_seq;
                const to = msg.to_seq;
                const v = sub.pos.span(from, to);
                if (v === "gap") {
                    return this.resync({ market: sub.market, reason: "gap", message: `expected a span from ${(sub.pos.seq ?? 0) + 1}, got ${from}..${to}` });
                }
                if (v === "deliver") {
                    if (sub.opts.onTicker)
                        this.call(sub.opts.onTicker, msg);
                    if (to >= sub.catchUpTo)
                        this.updateState();
                }
                return;
            }
            case "head": {
                if (!sub || sub.status !== "active")
                    return;
                const headSeq = msg.head_seq;
                if (sub.pos.head(headSeq) === "gap") {
                    return this.resync({ market: sub.market, reason: "gap", message: `head_seq ${headSeq} is above the position ${sub.pos.seq}` });
                }
                if (sub.opts.onHead)
                    this.call(sub.opts.onHead, msg);
                return;
            }
            case "subscribed":
                if (sub && sub.status === "pending" && msg.id === sub.opId)
                    this.onSubscribed(sub, msg);
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
    onSubscribed(sub, s) {
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
        if (sub.epoch === undefined)
            sub.epoch = s.epoch;
        sub.catchUpTo = s.head_seq;
        sub.staleAfterMs = s.heads && s.head_interval_ms ? Math.max(2 * s.head_interval_ms, s.interval_ms ?? 0) + 1000 : 0;
        if (sub.staleAfterMs > 0)
            this.watchStale();
        if (sub.opts.onSubscribed)
            this.call(sub.opts.onSubscribed, s);
        this.updateState();
    }
    onError(msg, sub) {
        const code = String(msg.code);
        const message = typeof msg.message === "string" ? msg.message : code;
        const op = msg.id !== undefined && msg.id !== null ? this.ops.get(String(msg.id)) : undefined;
        if (typeof msg.market !== "string") {
            if (op?.kind === "auth") {
                if (code === "invalid_token")
                    this.emitError({ code: "invalid_token", reason: "rejected", message });
                this.retryRefresh();
            }
            else if (op?.kind === "subscribe") {
                // The whole op was refused before any entry was handled.
                for (const m of op.markets) {
                    const s = this.subs.get(m);
                    if (!s || s.status !== "pending")
                        continue;
                    if (code === "rate_limited" || code === "unavailable")
                        this.retrySubscribe(s);
                    else
                        this.end(s, { code: "refused", market: m, serverCode: code, message });
                }
            }
            return;
        }
        // An answer to an older op for this market (one unsubscribed since) is not this subscription's.
        if (!sub || (msg.id !== undefined && msg.id !== sub.opId))
            return;
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
                if (sub.status === "pending")
                    this.retrySubscribe(sub);
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
    updateState() {
        if (this.closed)
            return this.setState("closed");
        if (!this.isOpen())
            return;
        for (const sub of this.subs.values()) {
            if (sub.status !== "active" || (sub.pos.seq ?? 0) < sub.catchUpTo)
                return this.setState("replaying");
        }
        this.setState("live");
    }
    setState(s) {
        if (this.state === s)
            return;
        this.state = s;
        this.emit("state", s);
    }
    /**
     * With heads, a subscription hears from the server at least every
     * 2 x head interval (ticker: or its interval) while the broadcaster is
     * healthy. Longer means a stale feed: try another connection.
     */
    watchStale() {
        if (this.staleTimer !== undefined)
            return;
        this.staleTimer = setInterval(() => {
            const now = Date.now();
            for (const sub of this.subs.values()) {
                if (sub.status === "active" && sub.staleAfterMs > 0 && now - sub.lastFrameAt > sub.staleAfterMs) {
                    return this.resync({ market: sub.market, reason: "stale", message: `nothing for ${sub.market} in ${now - sub.lastFrameAt} ms` });
                }
            }
        }, 1000);
    }
    emitError(err) {
        this.emit("error", err);
    }
    emit(event, arg) {
        for (const l of [...this.listeners[event]])
            this.call(l, arg);
    }
    /** Run application code; its exception must not break the feed's state, so it is rethrown outside. */
    call(f, a) {
        try {
            f(a);
        }
        catch (e) {
            setTimeout(() => {
                throw e;
            }, 0);
        }
    }
}
