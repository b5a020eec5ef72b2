-- marketcast migration 0003: close two ways in which a SQL user holding only
-- marketcast_writer could break the log's guarantees.
--
-- # 1. The SECURITY DEFINER functions could be pointed at the caller's tables
--
-- The trigger functions of 0001/0002 run with the owner's rights and
-- `search_path = pg_catalog, public`. For tables, PostgreSQL searches the
-- session's temporary schema *before* everything else unless the path names
-- pg_temp explicitly, and every role may create temporary tables by default.
-- So a writer could run
--     CREATE TEMP TABLE markets (id text, status text, shard int, last_seq bigint, ...);
--     INSERT INTO markets VALUES ('M', 'open', 3, 1000, ...);
--     INSERT INTO public.trades (market_id, side, price, qty) VALUES ('M', 'yes', 0.5, 1);
-- and the seq trigger read (and the COMMIT trigger updated) the temporary
-- table instead of public.markets. Measured before this migration: seq 1001
-- committed right after seq 1, a hole every subscriber is told is pruned
-- history, with markets.last_seq left at 1 and the doorbell sent on whatever
-- shard the temporary row named. A temporary `marketcast_config` likewise
-- chose a new market's shard.
--
-- The functions are redefined with every table schema-qualified and
-- `search_path = pg_catalog, pg_temp`, as the PostgreSQL manual prescribes
-- ("Writing SECURITY DEFINER Functions Safely"): pg_temp named last is never
-- searched before pg_catalog, and never for functions or operators. Schema
-- public is left out of the path as well, so even a role allowed to CREATE in
-- it (the default before PostgreSQL 15) cannot plant a function or operator
-- that a trigger would pick over the built-in one. The bodies are otherwise
-- those of 0002 (seq, totals) and 0001 (market init, lock, prune).
--
-- # 2. A writer could choose trade_id
--
-- INSERT on every column of trades let a writer say OVERRIDING SYSTEM VALUE
-- and give trade_id any value, e.g. another trade's (trade_id is unique by
-- construction, not by a constraint, and clients may key on it).
-- marketcast_writer now holds INSERT on the columns a writer supplies. seq and
-- created_at stay insertable because the contract says a supplied seq is
-- ignored (the trigger overwrites both), not refused.
--
-- What stays as it was, on purpose: UPDATE, DELETE and TRUNCATE were never
-- granted to either group (and triggers refuse them even to the owner);
-- marketcast_prune is not executable by PUBLIC; setting the
-- `marketcast.pruning` flag by hand grants nothing to a role without DELETE.

CREATE OR REPLACE FUNCTION marketcast_market_init() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
BEGIN
    SELECT shard_count INTO n FROM public.marketcast_config;
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

CREATE OR REPLACE FUNCTION marketcast_trade_assign() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m_status text;
    m_shard  int;
    m_last   bigint;
    log_max  bigint;
BEGIN
    SELECT status, shard, last_seq INTO m_status, m_shard, m_last
      FROM public.markets WHERE id = NEW.market_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown market %', NEW.market_id
            USING ERRCODE = 'no_data_found', HINT = 'create it first: INSERT INTO markets (id) VALUES (...)';
    END IF;
    IF m_status <> 'open' THEN
        RAISE EXCEPTION 'market % is %, trades are accepted only while it is open', NEW.market_id, m_status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- See 0001: a retried client_order_id must fail here, under the lock,
    -- rather than be skipped by ON CONFLICT after a seq was taken.
    IF NEW.client_order_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM public.trades WHERE market_id = NEW.market_id AND client_order_id = NEW.client_order_id
    ) THEN
        RAISE EXCEPTION 'duplicate client_order_id % for market %', NEW.client_order_id, NEW.market_id
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'trades_client_order_id';
    END IF;
    SELECT max(seq) INTO log_max FROM public.trades WHERE market_id = NEW.market_id;
    NEW.seq := greatest(coalesce(log_max, 0), m_last) + 1;
    NEW.created_at := clock_timestamp();
    PERFORM pg_notify('marketcast_shard_' || m_shard,
                      json_build_object('m', NEW.market_id, 's', NEW.seq)::text);
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION marketcast_market_totals() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE public.markets m
       SET last_seq   = t.seq,
           last_price = CASE WHEN t.side = 'no' THEN 1 - t.price ELSE t.price END,
           volume     = m.volume + (SELECT coalesce(sum(qty), 0) FROM public.trades
                                     WHERE market_id = NEW.market_id AND seq > m.last_seq)
      FROM (SELECT seq, side, price FROM public.trades
             WHERE market_id = NEW.market_id ORDER BY seq DESC LIMIT 1) t
     WHERE m.id = NEW.market_id AND m.last_seq < t.seq;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION marketcast_lock_markets(ids text[]) RETURNS TABLE (id text, status text)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT m.id, m.status FROM public.markets m WHERE m.id = ANY (ids) ORDER BY m.id FOR UPDATE
$$;

-- Not SECURITY DEFINER (only the owner or a superuser may run it), but pinned
-- the same way so that no session's temporary table can stand in for trades.
CREATE OR REPLACE FUNCTION marketcast_prune(older_than timestamptz) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    removed bigint;
BEGIN
    PERFORM set_config('marketcast.pruning', 'on', true);
    DELETE FROM public.trades t
     USING public.markets m
     WHERE t.market_id = m.id
       AND t.created_at < older_than
       AND t.seq < m.last_seq;
    GET DIAGNOSTICS removed = ROW_COUNT;
    PERFORM set_config('marketcast.pruning', 'off', true);
    RETURN removed;
END $$;

REVOKE INSERT ON trades FROM marketcast_writer;
GRANT INSERT (market_id, seq, side, price, qty, trader, client_order_id, created_at)
    ON trades TO marketcast_writer;
