-- A least-privilege role for the daemon with [postgres] source = "outbox".
-- Run as the owner of the watched tables, after `pg-cache-invalidator setup`
-- (which installs schema cache_invalidator, its outbox, and the triggers).
-- Replace the password, or use your own authentication.
--
--   psql "$DATABASE_URL" -v password="'...'" -f sql/outbox/role.sql
--
-- The capture trigger functions are SECURITY DEFINER: the application's
-- roles need no rights on the outbox. The daemon reads outbox rows, records
-- how far it got, switches writers between the two partitions and empties
-- a drained one with TRUNCATE, asks writers for wake-ups, reads the catalog
-- (public), and LISTENs.

CREATE ROLE cache_invalidator LOGIN PASSWORD :password;
GRANT USAGE ON SCHEMA cache_invalidator TO cache_invalidator;
GRANT SELECT ON cache_invalidator.outbox TO cache_invalidator;
GRANT SELECT, TRUNCATE ON cache_invalidator.outbox_0, cache_invalidator.outbox_1 TO cache_invalidator;
GRANT SELECT ON cache_invalidator.captures TO cache_invalidator;
GRANT SELECT, UPDATE ON cache_invalidator.state, cache_invalidator.drained TO cache_invalidator;

-- Only for refresh rules with a `query`: the tables the queries read.
-- GRANT USAGE ON SCHEMA public TO cache_invalidator;
-- GRANT SELECT ON public.user_tokens TO cache_invalidator;
