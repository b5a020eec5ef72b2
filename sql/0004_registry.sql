-- marketcast migration 0004: the broadcaster registry (contract 1.1 section 5.1).
--
-- A broadcaster started with --advertise-url keeps one row here while it runs:
-- the URL clients should use, the shards it serves, and a heartbeat. The view
-- `broadcasters` is the contract's surface; the table behind it is not.
--
-- # Who may do what
--
-- No group role holds any privilege on the table. Both may SELECT the view
-- (a view runs with its owner's rights, so that is all they need to read).
-- Changes go through four SECURITY DEFINER functions, pinned like those of
-- 0003 (every table schema-qualified, `search_path = pg_catalog, pg_temp`),
-- which only marketcast_broadcaster may execute:
--
-- - marketcast_registry_register(url, shards, every) -> id: a new entry. The
--   id is drawn by the database (122 random bits) and the clocks are the
--   database's, so a broadcaster can neither pick another run's id nor date
--   its heartbeats.
-- - marketcast_registry_heartbeat(id) -> found: heartbeat_at := now().
-- - marketcast_registry_leave(id) -> found: the entry is deleted (shutdown).
-- - marketcast_registry_purge_stale() -> count: entries stale for more than
--   1 hour are deleted (stale: heartbeat_at + 3 * heartbeat_interval passed).
--
-- marketcast_writer executes none of them and holds nothing on the table, so
-- it cannot change the registry by any means. A broadcaster login can delete
-- any entry whose id it reads from the view: the role is trusted with the
-- whole registry (clients are sent to the URLs it registers), and must be
-- granted only to broadcasters (docs/SECURITY.md).

CREATE TABLE IF NOT EXISTS public.marketcast_registry (
    id                 text PRIMARY KEY,
    url                text NOT NULL
        CHECK (url ~ '^wss?://[^/?#[:space:]]+(/[^?#[:space:]]*)?/ws$'),
    shards             int[] NOT NULL,
    started_at         timestamptz NOT NULL DEFAULT now(),
    heartbeat_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_interval interval NOT NULL CHECK (heartbeat_interval > interval '0')
);
REVOKE ALL ON public.marketcast_registry FROM PUBLIC;

CREATE OR REPLACE VIEW public.broadcasters AS
SELECT id, url, shards, started_at, heartbeat_at, heartbeat_interval,
       heartbeat_at > now() - 3 * heartbeat_interval AS live
  FROM public.marketcast_registry;
REVOKE ALL ON public.broadcasters FROM PUBLIC;
GRANT SELECT ON public.broadcasters TO marketcast_writer, marketcast_broadcaster;

CREATE OR REPLACE FUNCTION marketcast_registry_register(advertise_url text, served int[], every interval)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id text := replace(gen_random_uuid()::text, '-', '');
BEGIN
    INSERT INTO public.marketcast_registry (id, url, shards, heartbeat_interval)
    VALUES (new_id, advertise_url,
            (SELECT coalesce(array_agg(DISTINCT s ORDER BY s), '{}') FROM unnest(served) s),
            every);
    RETURN new_id;
END $$;

CREATE OR REPLACE FUNCTION marketcast_registry_heartbeat(entry text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE public.marketcast_registry SET heartbeat_at = now() WHERE id = entry;
    RETURN FOUND;
END $$;

CREATE OR REPLACE FUNCTION marketcast_registry_leave(entry text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM public.marketcast_registry WHERE id = entry;
    RETURN FOUND;
END $$;

CREATE OR REPLACE FUNCTION marketcast_registry_purge_stale() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    removed bigint;
BEGIN
    DELETE FROM public.marketcast_registry
     WHERE heartbeat_at + 3 * heartbeat_interval < now() - interval '1 hour';
    GET DIAGNOSTICS removed = ROW_COUNT;
    RETURN removed;
END $$;

REVOKE ALL ON FUNCTION marketcast_registry_register(text, int[], interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION marketcast_registry_heartbeat(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION marketcast_registry_leave(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION marketcast_registry_purge_stale() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION marketcast_registry_register(text, int[], interval) TO marketcast_broadcaster;
GRANT EXECUTE ON FUNCTION marketcast_registry_heartbeat(text) TO marketcast_broadcaster;
GRANT EXECUTE ON FUNCTION marketcast_registry_leave(text) TO marketcast_broadcaster;
GRANT EXECUTE ON FUNCTION marketcast_registry_purge_stale() TO marketcast_broadcaster;
