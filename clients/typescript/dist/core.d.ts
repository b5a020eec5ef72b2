/** What to do with one frame. */
export type Verdict = 
/** Hand it to the application; the position moves to its end. */
"deliver"
/** Already delivered (a replay overlapping what was seen): drop it. */
 | "duplicate"
/** Something between the position and this frame is missing: resync. */
 | "gap";
/**
 * The position of one subscription across connections. `null` until the
 * first `subscribed` says where the stream starts.
 */
export declare class Position {
    /** Last seq (trades) or `to_seq` (ticker) delivered, or the start. */
    seq: number | null;
    constructor(start: number | null);
    /**
     * A `subscribed` answered: the server starts after `fromSeq`. On the first
     * subscribe this fixes the start; on a resume it must be the position
     * itself (we asked for it). A server starting above the position would
     * skip trades: a gap. One starting below only repeats what we dropped.
     */
    started(fromSeq: number): Verdict;
    /** One `trade` frame. */
    trade(seq: number): Verdict;
    /**
     * One `ticker` frame folding `fromSeq..=toSeq`. A span cannot be split, so
     * one that straddles the position is as wrong as one that skips past it.
     */
    span(fromSeq: number, toSeq: number): Verdict;
    /**
     * One `head`: the newest seq the server knows for a subscription it says
     * is caught up. Above the position it names a trade we never got.
     */
    head(headSeq: number): Verdict;
}
/**
 * Reconnect delay for the given attempt (0 for the first retry): exponential
 * from `minMs` to `maxMs`, with "equal jitter" (half fixed, half random) so a
 * fleet of clients dropped together does not come back together.
 */
export declare function backoffDelay(attempt: number, minMs: number, maxMs: number, random?: () => number): number;
/**
 * The `exp` claim of a JWT (seconds), read without verifying it, or null if
 * the token is not a readable JWT. Only used to schedule a refresh; the
 * server's `authed` answer, when there is one, takes precedence.
 */
export declare function tokenExp(token: string): number | null;
