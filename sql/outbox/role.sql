-- A least-privilege role for the daemon with [postgres] source = "outbox".
-- Run as the owner of the watched tables, after `pg-cache-invalidator setup`
-- (which installs schema cache_invalidator, its outbox, and the triggers).
-- Replace the password, or use your own authentication.
--
--   psql "$DATABASE_URL" -v password="'...'" -f sql/outbox/role.sql
--
-- The capture trigger functions are SECURITY DEFINER: the application's
-- roles need no rights on the outbox. The daemon only locks, reads and
-- deletes outbox rows (SELECT ... FOR UPDATE needs the UPDATE privilege),
-- marks itself waiting for a wake-up, reads the catalog (public), and
-- LISTENs.

CREATE ROLE cache_invalidator LOGIN PASSWORD :password;
GRANT USAGE ON SCHEMA cache_invalidator TO cache_invalidator;
GRANT SELECT, UPDATE, DELETE ON cache_invalidator.outbox TO cache_invalidator;
GRANT SELECT ON cache_invalidator.captures TO cache_invalidator;
GRANT SELECT, INSERT, DELETE ON cache_invalidator.waiting TO cache_invalidator;

-- Only for refresh rules with a `query`: the tables the queries read.
-- GRANT USAGE ON SCHEMA public TO cache_invalidator;
-- GRANT SELECT ON public.user_tokens TO cache_invalidator;
