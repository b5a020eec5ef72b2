-- The Node bridge's trigger (issue 14; see server.js): every trade committed
-- into `trades` is NOTIFYed on the channel `marketcast_bench_bridge` as the
-- exact `trade` JSON marketcast sends (src/protocol/trade.rs): the same keys
-- in the same order, `price` as Postgres prints numeric(5,4) (four places),
-- `ts` as RFC 3339 UTC with six fraction digits. marketcast-bench installs it
-- for the bridge's rounds only (and checks the frame against marketcast's
-- encoder first), then drops it:
--     DROP TRIGGER IF EXISTS marketcast_bench_bridge ON trades;
-- By hand: psql "$DATABASE_URL" -f bench/bridge/trigger.sql
-- marketcast's own doorbell trigger keeps firing beside it.

CREATE OR REPLACE FUNCTION marketcast_bench_bridge_frame(
    market text, seq bigint, trade_id bigint, side text, price numeric, qty bigint,
    ts timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT '{"type":"trade","market":' || to_json(market)::text
        || ',"seq":' || seq
        || ',"trade_id":' || trade_id
        || ',"side":' || to_json(side)::text
        || ',"price":"' || price::text
        || '","qty":' || qty
        || ',"ts":"' || to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
        || '"}'
$$;

CREATE OR REPLACE FUNCTION marketcast_bench_bridge_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('marketcast_bench_bridge', marketcast_bench_bridge_frame(
        NEW.market_id, NEW.seq, NEW.trade_id, NEW.side, NEW.price, NEW.qty, NEW.created_at));
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS marketcast_bench_bridge ON trades;
CREATE TRIGGER marketcast_bench_bridge AFTER INSERT ON trades
    FOR EACH ROW EXECUTE FUNCTION marketcast_bench_bridge_notify();
