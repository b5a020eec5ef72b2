// The delivery rule, without sockets or timers: events in, verdicts out.
//
// A subscription's *position* is the last seq handed to the application (in
// ticker mode the last `to_seq`), or the `from_seq` it started from before
// any. The server promises (contract v1, "delivery guarantee") that the next
// trade is position + 1. The client checks that promise instead of trusting
// it: what is at or below the position was already delivered and is dropped;
// what is above position + 1 means a trade went missing, which the contract
// forbids, so the connection is dropped and the subscription resumes from the
// position. Nothing is ever delivered out of order.
/**
 * The position of one subscription across connections. `null` until the
 * first `subscribed` says where the stream starts.
 */
export class Position {
    constructor(start) {
        this.seq = start;
    }
    /**
     * A `subscribed` answered: the server starts after `fromSeq`. On the first
     * subscribe this fixes the start; on a resume it must be the position
     * itself (we asked for it). A server starting above the position would
     * skip trades: a gap. One starting below only repeats what we dropped.
     */
    started(fromSeq) {
        if (this.seq === null) {
            this.seq = fromSeq;
            return "deliver";
        }
        return fromSeq > this.seq ? "gap" : "duplicate";
    }
    /** One `trade` frame. */
    trade(seq) {
        if (this.seq === null)
            return "gap";
        if (seq <= this.seq)
            return "duplicate";
        if (seq !== this.seq + 1)
            return "gap";
        this.seq = seq;
        return "deliver";
    }
    /**
     * One `ticker` frame folding `fromSeq..=toSeq`. A span cannot be split, so
     * one that straddles the position is as wrong as one that skips past it.
     */
    span(fromSeq, toSeq) {
        if (this.seq === null || toSeq < fromSeq)
            return "gap";
        if (toSeq <= this.seq)
            return "duplicate";
        if (fromSeq !== this.seq + 1)
            return "gap";
        this.seq = toSeq;
        return "deliver";
    }
    /**
     * One `head`: the newest seq the server knows for a subscription it says
     * is caught up. Above the position it names a trade we never got.
     */
    head(headSeq) {
        if (this.seq === null)
            return "gap";
        return headSeq > this.seq ? "gap" : "deliver";
    }
}
/**
 * Reconnect delay for the given attempt (0 for the first retry): exponential
 * from `minMs` to `maxMs`, with "equal jitter" (half fixed, half random) so a
 * fleet of clients dropped together does not come back together.
 */
export function backoffDelay(attempt, minMs, maxMs, random = Math.random) {
    const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
    return Math.round(ceiling / 2 + (ceiling / 2) * random());
}
/**
 * The `exp` claim of a JWT (seconds), read without verifying it, or null if
 * the token is not a readable JWT. Only used to schedule a refresh; the
 * server's `authed` answer, when there is one, takes precedence.
 */
export function tokenExp(token) {
    const parts = token.split(".");
    if (parts.length !== 3)
        return null;
    try {
        const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
        const json = atob(b64 + "===".slice((b64.length + 3) % 4));
        const claims = JSON.parse(json);
        if (claims && typeof claims === "object" && typeof claims.exp === "number") {
            return Math.floor(claims.exp);
        }
    }
    catch {
        // Not base64url JSON: an opaque token.
    }
    return null;
}
