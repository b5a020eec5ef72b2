-- marketcast migration 0001: markets, the append-only trade log, seq assignment,
-- same-transaction NOTIFY, append-only enforcement, pruning and the two group roles.
--
-- Applied by `marketcast migrate` inside one transaction that holds an advisory
-- lock, so two concurrent migrations serialise and the second sees version 1
-- already recorded and does nothing. `:shard_count` style parameters do not
-- exist here: the shard count is inserted by the Rust side right after this
-- script runs (see src/db.rs), only when the config row is absent.
--
-- # Why seq is assigned by locking the market row
--
-- A client resumes with "everything after seq N", so seq must be gapless per
-- market and increase in *commit* order: a reader that has seen seq N must never
-- later find a newly committed N-1. A plain sequence (serial, identity) gives
-- neither: nextval() is not transactional, so a rolled-back insert leaves a hole
-- that a client would read as lost data, and two transactions that draw 41 and 42
-- can commit as 42 then 41, so a reader that already moved past 42 never sees 41
-- (measured on this machine: thousands of such inversions per half a million
-- inserts). Instead the BEFORE INSERT trigger runs
--     UPDATE markets SET last_seq = last_seq + 1 ... RETURNING last_seq
-- which takes the market's row lock and holds it until commit. The next writer on
-- that market blocks on the lock, and under READ COMMITTED re-reads the row after
-- the holder commits (so it gets N+1) or aborts (so it gets N again: no gap).
-- Postgres makes a commit visible before it releases locks, so every snapshot
-- that sees N+1 also sees N. The same UPDATE maintains last_price and volume.
-- Writers must use READ COMMITTED (under REPEATABLE READ the waiter fails with a
-- serialization error and must retry). A transaction that inserts into several
-- markets locks their rows in insertion order; two transactions that do so in
-- opposite orders can deadlock, and Postgres aborts one (retry it). The writer
-- role sorts by market id to avoid this.
--
-- (Migration 0002 keeps this design but takes the same row lock with
-- SELECT ... FOR UPDATE and writes the market row once per transaction at
-- COMMIT: the per-row UPDATE made bulk inserts quadratic. See its header.)
--
-- # Why the notification is a doorbell, not the trade
--
-- The same trigger calls pg_notify('marketcast_shard_<k>', '{"m":"<id>","s":<seq>}')
-- in the inserting transaction, so the notification is sent exactly when the
-- trade commits and never for a rolled-back one. Any database user can NOTIFY
-- any channel, so the broadcaster never treats a payload as a trade: it is a
-- doorbell meaning "market m may have trades up to seq s". The broadcaster
-- reads `seq > <last broadcast>` from this table and sends exactly what the log
-- holds. A forged or garbled doorbell therefore costs at most one indexed read
-- and can never put a trade in front of a client. Because the payload is only a
-- market id (<= 64 bytes) and a number, it is always far below NOTIFY's
-- 8000-byte limit, whatever the size of the trade row: the "reference the
-- broadcaster resolves from the log" fallback is the only format, which also
-- keeps each NOTIFY queue entry around 60 bytes.
--
-- # Append-only
--
-- UPDATE, DELETE and TRUNCATE on trades are refused by triggers, which bind
-- every role including the owner. The one exception is marketcast_prune(),
-- which sets a transaction-local flag the DELETE trigger honours and never
-- deletes a market's newest trade.

CREATE TABLE IF NOT EXISTS marketcast_config (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    shard_count int NOT NULL CHECK (shard_count BETWEEN 1 AND 4096)
);

CREATE TABLE markets (
    id         text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    title      text NOT NULL DEFAULT '',
    status     text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed', 'resolved')),
    epoch      text NOT NULL DEFAULT substr(md5(gen_random_uuid()::text), 1, 12),
    shard      int NOT NULL DEFAULT 0,
    last_seq   bigint NOT NULL DEFAULT 0,
    last_price numeric(5,4) NULL,
    volume     bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50); -- room for HOT updates: the row is rewritten by every trade

CREATE TABLE trades (
    trade_id        bigint GENERATED ALWAYS AS IDENTITY,
    market_id       text NOT NULL REFERENCES markets (id),
    seq             bigint NOT NULL,
    side            text NOT NULL CHECK (side IN ('yes', 'no')),
    price           numeric(5,4) NOT NULL CHECK (price BETWEEN 0.0001 AND 0.9999),
    qty             bigint NOT NULL CHECK (qty BETWEEN 1 AND 1000000000),
    trader          text NULL,
    client_order_id text NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (market_id, seq)
);

CREATE UNIQUE INDEX trades_client_order_id
    ON trades (market_id, client_order_id) WHERE client_order_id IS NOT NULL;
CREATE INDEX trades_created_at ON trades (created_at);

-- A market's shard is derived from its id at creation, from the stored shard
-- count, and never changes: it is the routing key broadcasters LISTEN by.
-- Counters start at zero whatever the INSERT says.
CREATE FUNCTION marketcast_market_init() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    n int;
BEGIN
    SELECT shard_count INTO n FROM marketcast_config;
    IF n IS NULL THEN
        RAISE EXCEPTION 'marketcast is not configured: run marketcast migrate';
    END IF;
    -- ((h % n) + n) % n rather than abs(h) % n: abs() overflows on the minimum bigint.
    NEW.shard := (((hashtextextended(NEW.id, 0) % n) + n) % n)::int;
    NEW.last_seq := 0;
    NEW.last_price := NULL;
    NEW.volume := 0;
    IF NEW.epoch IS NULL OR NEW.epoch = '' THEN
        NEW.epoch := substr(md5(gen_random_uuid()::text), 1, 12);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER markets_init BEFORE INSERT ON markets
    FOR EACH ROW EXECUTE FUNCTION marketcast_market_init();

-- seq assignment, market row update and the doorbell, all in the inserting
-- transaction (see the header). SECURITY DEFINER because marketcast_writer may
-- not UPDATE markets itself.
CREATE FUNCTION marketcast_trade_assign() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    m_status text;
    m_shard  int;
BEGIN
    UPDATE markets
       SET last_seq   = last_seq + 1,
           last_price = CASE WHEN NEW.side = 'no' THEN 1 - NEW.price ELSE NEW.price END,
           volume     = volume + NEW.qty
     WHERE id = NEW.market_id AND status = 'open'
    RETURNING last_seq, shard INTO NEW.seq, m_shard;
    IF NOT FOUND THEN
        SELECT status INTO m_status FROM markets WHERE id = NEW.market_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown market %', NEW.market_id
                USING ERRCODE = 'no_data_found', HINT = 'create it first: INSERT INTO markets (id) VALUES (...)';
        END IF;
        RAISE EXCEPTION 'market % is %, trades are accepted only while it is open', NEW.market_id, m_status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- A retry with the same client_order_id must fail *here*, while the market
    -- update above can still be rolled back with the statement. Left to the
    -- unique index alone, INSERT ... ON CONFLICT DO NOTHING would skip the row
    -- after this trigger ran and leave last_seq one ahead of the log: a gap.
    IF NEW.client_order_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM trades WHERE market_id = NEW.market_id AND client_order_id = NEW.client_order_id
    ) THEN
        RAISE EXCEPTION 'duplicate client_order_id % for market %', NEW.client_order_id, NEW.market_id
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'trades_client_order_id';
    END IF;
    NEW.created_at := clock_timestamp();
    PERFORM pg_notify('marketcast_shard_' || m_shard,
                      json_build_object('m', NEW.market_id, 's', NEW.seq)::text);
    RETURN NEW;
END $$;

CREATE TRIGGER trades_assign BEFORE INSERT ON trades
    FOR EACH ROW EXECUTE FUNCTION marketcast_trade_assign();

CREATE FUNCTION marketcast_trades_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('marketcast.pruning', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'trades is append-only: % is refused (use marketcast prune to drop old trades)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER trades_append_only BEFORE UPDATE OR DELETE ON trades
    FOR EACH ROW EXECUTE FUNCTION marketcast_trades_append_only();
CREATE TRIGGER trades_no_truncate BEFORE TRUNCATE ON trades
    FOR EACH STATEMENT EXECUTE FUNCTION marketcast_trades_append_only();

-- The one deletion path: trades created before `older_than`, except each
-- market's newest trade (so last_seq always names a row that exists and a
-- resume from the head needs no history). Returns the number of rows removed.
CREATE FUNCTION marketcast_prune(older_than timestamptz) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
    removed bigint;
BEGIN
    PERFORM set_config('marketcast.pruning', 'on', true);
    DELETE FROM trades t
     USING markets m
     WHERE t.market_id = m.id
       AND t.created_at < older_than
       AND t.seq < m.last_seq;
    GET DIAGNOSTICS removed = ROW_COUNT;
    PERFORM set_config('marketcast.pruning', 'off', true);
    RETURN removed;
END $$;
REVOKE ALL ON FUNCTION marketcast_prune(timestamptz) FROM PUBLIC;

-- The writer's batch path locks every market of a batch in id order before its
-- one INSERT (see src/writer.rs). SELECT ... FOR UPDATE needs UPDATE privilege,
-- which marketcast_writer must not have, so a writer connected as a login role
-- holding only that group failed every batch (42501) and fell back to one
-- transaction per trade. The lock is taken here instead, with the owner's rights;
-- it gives the writer nothing it could not already do by inserting a trade.
CREATE FUNCTION marketcast_lock_markets(ids text[]) RETURNS TABLE (id text, status text)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT m.id, m.status FROM markets m WHERE m.id = ANY (ids) ORDER BY m.id FOR UPDATE
$$;
REVOKE ALL ON FUNCTION marketcast_lock_markets(text[]) FROM PUBLIC;

-- Group roles (cluster-wide, so they may already exist from another database).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'marketcast_writer') THEN
        CREATE ROLE marketcast_writer NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; -- created concurrently by another database's migrate
END $$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'marketcast_broadcaster') THEN
        CREATE ROLE marketcast_broadcaster NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

REVOKE ALL ON markets, trades, marketcast_config FROM PUBLIC;
GRANT SELECT ON marketcast_config TO marketcast_writer, marketcast_broadcaster;
GRANT SELECT, INSERT ON markets, trades TO marketcast_writer;
GRANT SELECT ON markets, trades TO marketcast_broadcaster;
GRANT EXECUTE ON FUNCTION marketcast_lock_markets(text[]) TO marketcast_writer;
