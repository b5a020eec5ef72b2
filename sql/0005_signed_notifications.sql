-- marketcast migration 0005: authenticated full-payload notifications.
--
-- Until now every notification was a doorbell `{"m":market,"s":seq}`, and the
-- broadcaster read each announced trade back from the log before publishing
-- it: one round trip and one indexed read per trade, for a row the trigger
-- had in hand. The contract (section 1, "notification channels") allows a
-- payload that carries the trade if the broadcaster can verify that the
-- trigger wrote it: any database user can NOTIFY any channel.
--
-- # The payload
--
-- The trigger now sends
--     {"m" : "<market>", "s" : <seq>, "e" : "<epoch>", "i" : <trade_id>,
--      "d" : "<side>", "p" : "<price>", "q" : <qty>, "c" : <created_at>,
--      "k" : <key id>,"h":"<mac>"}
-- (one line; json_build_object's spacing). `p` is price::text, numeric's own
-- form, exactly what the log read selects; `c` is created_at in microseconds
-- since 1970-01-01 UTC, the integer the log read computes from the binary
-- timestamp. So a trade built from a verified payload encodes to the very
-- bytes the log row would. `h` is HMAC-SHA256, in lowercase hex, over the
-- UTF-8 bytes of everything before `,"h":"` (the "body"), with key `k`: the
-- broadcaster verifies the bytes it received, no canonical re-encoding. The
-- object still has "m" and "s", so a broadcaster from before this migration
-- reads it as a doorbell (it ignores other fields) during a rolling upgrade.
--
-- The epoch is in the MAC so that a valid payload captured before a market's
-- log was reset (same id, new epoch, seqs from 1 again) is not taken for the
-- new log's trade of the same seq. Within one epoch a replayed payload is the
-- trade the log holds at that seq: NOTIFY is sent only when the inserting
-- transaction commits (never for a rollback, a rolled-back savepoint or a
-- failed statement), and the row's broadcast fields are final when this
-- BEFORE trigger computes them (column coercions run before it, later
-- triggers are the owner's). The broadcaster publishes a payload only as the
-- next seq of a market it follows, so a replay finds its seq already
-- published and is dropped (docs/GUARANTEES.md).
--
-- A payload that would reach 8000 bytes (Postgres's NOTIFY limit) falls back
-- to the plain doorbell, which the broadcaster resolves from the log (the
-- contract's "reference"). The broadcast fields are bounded except the epoch,
-- which the creator of a market chooses.
--
-- # Why HMAC by hand, and what it costs
--
-- HMAC(K, m) = sha256((K xor opad) || sha256((K xor ipad) || m)), with the
-- two padded keys stored precomputed, so the trigger needs only the built-in
-- sha256(bytea) (PostgreSQL 11+) and no extension: pgcrypto would have to be
-- installed by a superuser or the database owner on every deployment.
-- Measured on the development machine (2 cores, shared; 10,000 one-row
-- INSERTs into one market inside one DO block, this trigger and 0003's
-- alternated, medians of 5 and of 5 more): 65.9 -> 83.2 us per row and
-- 67.4 -> 95.4 us, so about 17-28 us added, of which building the body is
-- ~4.5 us and the two sha256 ~2.9 us; the rest is the key lookup and
-- plpgsql. Folding the key lookup into the market's locking SELECT (a LEFT
-- JOIN) measured the same (81.8 us), so it stays a separate, plainer query.
-- One trade per transaction (pgbench, 1 connection, 5 s x 5): 2,041 vs
-- 2,029 tps, within noise: the commit dominates. docs/BENCHMARKS.md
-- ("Signed notifications") has the broadcaster side.
--
-- # The key
--
-- marketcast_notify_keys holds 32-byte keys drawn from gen_random_uuid()
-- (pg_strong_random, a CSPRNG; random() is not one): two UUIDs give 244
-- random bits. Only the owner (hence the SECURITY DEFINER trigger) and
-- marketcast_broadcaster may read it; marketcast_writer and PUBLIC get
-- 42501. One row is the signing key; rotation adds a new signing key and
-- keeps the old ones for verification until marketcast_prune_notify_keys()
-- (docs/SECURITY.md, "Notification keys"). Both functions are the owner's.

CREATE TABLE public.marketcast_notify_keys (
    id         int PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
    key        bytea NOT NULL CHECK (octet_length(key) = 32),
    -- key || 32 zero bytes, xor 0x36 (ipad) and xor 0x5c (opad): RFC 2104.
    ipad       bytea NOT NULL CHECK (octet_length(ipad) = 64),
    opad       bytea NOT NULL CHECK (octet_length(opad) = 64),
    signing    boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- At most one signing key.
CREATE UNIQUE INDEX marketcast_notify_keys_signing
    ON public.marketcast_notify_keys (signing) WHERE signing;
REVOKE ALL ON public.marketcast_notify_keys FROM PUBLIC;
GRANT SELECT (id, key, signing, created_at) ON public.marketcast_notify_keys TO marketcast_broadcaster;

-- A new signing key; the previous ones stay valid for verification. Returns
-- its id. The table lock serialises two rotations (the second then sees the
-- first's key and demotes it); it does not block the trigger's reads.
CREATE FUNCTION public.marketcast_rotate_notify_key() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k      bytea;
    ipad   bytea := decode(repeat('36', 64), 'hex');
    opad   bytea := decode(repeat('5c', 64), 'hex');
    new_id int;
BEGIN
    LOCK TABLE public.marketcast_notify_keys IN SHARE ROW EXCLUSIVE MODE;
    k := decode(replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', ''), 'hex');
    FOR i IN 0..31 LOOP
        ipad := set_byte(ipad, i, get_byte(k, i) # 54);  -- 0x36
        opad := set_byte(opad, i, get_byte(k, i) # 92);  -- 0x5c
    END LOOP;
    UPDATE public.marketcast_notify_keys SET signing = false WHERE signing;
    INSERT INTO public.marketcast_notify_keys (key, ipad, opad, signing)
         VALUES (k, ipad, opad, true)
      RETURNING id INTO new_id;
    RETURN new_id;
END $$;
REVOKE ALL ON FUNCTION public.marketcast_rotate_notify_key() FROM PUBLIC;

-- Drop every key but the signing one; returns how many. A payload signed
-- with a dropped key is read from the log like a doorbell: never lost.
CREATE FUNCTION public.marketcast_prune_notify_keys() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    removed bigint;
BEGIN
    LOCK TABLE public.marketcast_notify_keys IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM public.marketcast_notify_keys WHERE NOT signing;
    GET DIAGNOSTICS removed = ROW_COUNT;
    RETURN removed;
END $$;
REVOKE ALL ON FUNCTION public.marketcast_prune_notify_keys() FROM PUBLIC;

SELECT public.marketcast_rotate_notify_key();

-- The body of 0003 (pinned search_path, schema-qualified tables), with the
-- market's epoch read under the same lock and the signed payload.
CREATE OR REPLACE FUNCTION public.marketcast_trade_assign() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m_status text;
    m_shard  int;
    m_last   bigint;
    m_epoch  text;
    log_max  bigint;
    k_id     int;
    k_ipad   bytea;
    k_opad   bytea;
    body     text;
    payload  text;
BEGIN
    SELECT status, shard, last_seq, epoch INTO m_status, m_shard, m_last, m_epoch
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
    -- rather than be skipped by ON CONFLICT after a seq was taken. With a
    -- signed payload this matters twice: a notification for a row that was
    -- then skipped would carry a trade the log does not hold.
    IF NEW.client_order_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM public.trades WHERE market_id = NEW.market_id AND client_order_id = NEW.client_order_id
    ) THEN
        RAISE EXCEPTION 'duplicate client_order_id % for market %', NEW.client_order_id, NEW.market_id
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'trades_client_order_id';
    END IF;
    SELECT max(seq) INTO log_max FROM public.trades WHERE market_id = NEW.market_id;
    NEW.seq := greatest(coalesce(log_max, 0), m_last) + 1;
    NEW.created_at := clock_timestamp();
    SELECT id, ipad, opad INTO k_id, k_ipad, k_opad
      FROM public.marketcast_notify_keys WHERE signing;
    IF FOUND THEN
        body := json_build_object(
            'm', NEW.market_id, 's', NEW.seq, 'e', m_epoch, 'i', NEW.trade_id,
            'd', NEW.side, 'p', NEW.price::text, 'q', NEW.qty,
            'c', (extract(epoch FROM NEW.created_at) * 1000000)::bigint,
            'k', k_id)::text;
        body := left(body, -1);  -- without the closing brace
        payload := body || ',"h":"'
            || encode(sha256(k_opad || sha256(k_ipad || convert_to(body, 'UTF8'))), 'hex')
            || '"}';
    END IF;
    IF payload IS NULL OR octet_length(payload) > 7999 THEN
        payload := json_build_object('m', NEW.market_id, 's', NEW.seq)::text;
    END IF;
    PERFORM pg_notify('marketcast_shard_' || m_shard, payload);
    RETURN NEW;
END $$;
