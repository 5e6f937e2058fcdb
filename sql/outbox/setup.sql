-- What `pg-cache-invalidator setup --print` prints with [postgres] source =
-- "outbox" for the demo rules (sql/demo/avolve_config.toml) on a fresh
-- database holding the demo schema (sql/demo/avolve_schema.sql). Every
-- statement is idempotent; a DBA may run it by hand with
--   psql "$DATABASE_URL" -f sql/outbox/setup.sql
-- The integration tests check that it matches what `setup --print` prints.

-- schema cache_invalidator holds the outbox and its trigger functions
CREATE SCHEMA IF NOT EXISTS "cache_invalidator";

-- one row per changed row, written in the writer's transaction into the partition writers currently fill; the drain reads rows by the writer's transaction id, and empties a drained partition with TRUNCATE
CREATE TABLE IF NOT EXISTS "cache_invalidator".outbox (
  part smallint NOT NULL,
  xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
  id bigserial,
  lsn pg_lsn NOT NULL DEFAULT pg_current_wal_insert_lsn(),
  created_at timestamptz NOT NULL DEFAULT now(),
  relation text NOT NULL,
  op text NOT NULL,
  old_row text,
  new_row text
) PARTITION BY LIST (part);
CREATE TABLE IF NOT EXISTS "cache_invalidator".outbox_0 PARTITION OF "cache_invalidator".outbox FOR VALUES IN (0);
CREATE TABLE IF NOT EXISTS "cache_invalidator".outbox_1 PARTITION OF "cache_invalidator".outbox FOR VALUES IN (1);
CREATE INDEX IF NOT EXISTS outbox_xid_id ON "cache_invalidator".outbox (xid, id);

-- which columns each table's trigger captures, in order
CREATE TABLE IF NOT EXISTS "cache_invalidator".captures (relation text PRIMARY KEY, columns text[] NOT NULL);

-- what writers read: the partition they fill, and whether the drainer waits for a wake-up (writers NOTIFY only then)
CREATE TABLE IF NOT EXISTS "cache_invalidator".state (
  one boolean PRIMARY KEY DEFAULT true CHECK (one),
  current smallint NOT NULL DEFAULT 0 CHECK (current IN (0, 1)),
  wake boolean NOT NULL DEFAULT false,
  rotated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO "cache_invalidator".state DEFAULT VALUES ON CONFLICT DO NOTHING;

-- how far the drain got: every row of a transaction visible in `snapshot` is applied (taken before any trigger exists, so no row predates it)
CREATE TABLE IF NOT EXISTS "cache_invalidator".drained (
  one boolean PRIMARY KEY DEFAULT true CHECK (one),
  snapshot pg_snapshot NOT NULL,
  batch pg_snapshot,
  after_xid xid8,
  after_id int8,
  at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO "cache_invalidator".drained (snapshot) VALUES (pg_current_snapshot()) ON CONFLICT DO NOTHING;

-- public.profiles: capture columns id into the outbox
CREATE OR REPLACE FUNCTION "cache_invalidator"."capture_public_profiles"() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  s record;
BEGIN
  SELECT current, wake INTO s FROM "cache_invalidator".state;
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO "cache_invalidator".outbox (part, relation, op) VALUES (coalesce(s.current, 0), 'public.profiles', 'truncate');
  ELSE
    INSERT INTO "cache_invalidator".outbox (part, relation, op, old_row, new_row) VALUES (coalesce(s.current, 0), 'public.profiles', lower(TG_OP),
      CASE WHEN TG_OP <> 'INSERT' THEN ROW(OLD."id")::text END,
      CASE WHEN TG_OP <> 'DELETE' THEN ROW(NEW."id")::text END);
  END IF;
  -- Wake the drainer only while it waits: NOTIFY takes a
  -- cluster-wide lock at commit (PostgreSQL folds repeats).
  IF s.wake THEN
    PERFORM pg_notify('cache_invalidator', '');
  END IF;
  RETURN NULL;
END
$fn$;

-- public.profiles: row and TRUNCATE triggers
CREATE OR REPLACE TRIGGER pgci_capture AFTER INSERT OR UPDATE OR DELETE ON "public"."profiles" FOR EACH ROW EXECUTE FUNCTION "cache_invalidator"."capture_public_profiles"();
CREATE OR REPLACE TRIGGER pgci_capture_truncate AFTER TRUNCATE ON "public"."profiles" FOR EACH STATEMENT EXECUTE FUNCTION "cache_invalidator"."capture_public_profiles"();

-- public.profiles: record the captured columns
INSERT INTO "cache_invalidator".captures VALUES ('public.profiles', ARRAY['id']::text[]) ON CONFLICT (relation) DO UPDATE SET columns = excluded.columns;

-- public.user_tokens: capture columns user_id, token_id into the outbox
CREATE OR REPLACE FUNCTION "cache_invalidator"."capture_public_user_tokens"() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  s record;
BEGIN
  SELECT current, wake INTO s FROM "cache_invalidator".state;
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO "cache_invalidator".outbox (part, relation, op) VALUES (coalesce(s.current, 0), 'public.user_tokens', 'truncate');
  ELSE
    INSERT INTO "cache_invalidator".outbox (part, relation, op, old_row, new_row) VALUES (coalesce(s.current, 0), 'public.user_tokens', lower(TG_OP),
      CASE WHEN TG_OP <> 'INSERT' THEN ROW(OLD."user_id", OLD."token_id")::text END,
      CASE WHEN TG_OP <> 'DELETE' THEN ROW(NEW."user_id", NEW."token_id")::text END);
  END IF;
  -- Wake the drainer only while it waits: NOTIFY takes a
  -- cluster-wide lock at commit (PostgreSQL folds repeats).
  IF s.wake THEN
    PERFORM pg_notify('cache_invalidator', '');
  END IF;
  RETURN NULL;
END
$fn$;

-- public.user_tokens: row and TRUNCATE triggers
CREATE OR REPLACE TRIGGER pgci_capture AFTER INSERT OR UPDATE OR DELETE ON "public"."user_tokens" FOR EACH ROW EXECUTE FUNCTION "cache_invalidator"."capture_public_user_tokens"();
CREATE OR REPLACE TRIGGER pgci_capture_truncate AFTER TRUNCATE ON "public"."user_tokens" FOR EACH STATEMENT EXECUTE FUNCTION "cache_invalidator"."capture_public_user_tokens"();

-- public.user_tokens: record the captured columns
INSERT INTO "cache_invalidator".captures VALUES ('public.user_tokens', ARRAY['user_id', 'token_id']::text[]) ON CONFLICT (relation) DO UPDATE SET columns = excluded.columns;

-- public.user_journeys: capture columns user_id into the outbox
CREATE OR REPLACE FUNCTION "cache_invalidator"."capture_public_user_journeys"() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  s record;
BEGIN
  SELECT current, wake INTO s FROM "cache_invalidator".state;
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO "cache_invalidator".outbox (part, relation, op) VALUES (coalesce(s.current, 0), 'public.user_journeys', 'truncate');
  ELSE
    INSERT INTO "cache_invalidator".outbox (part, relation, op, old_row, new_row) VALUES (coalesce(s.current, 0), 'public.user_journeys', lower(TG_OP),
      CASE WHEN TG_OP <> 'INSERT' THEN ROW(OLD."user_id")::text END,
      CASE WHEN TG_OP <> 'DELETE' THEN ROW(NEW."user_id")::text END);
  END IF;
  -- Wake the drainer only while it waits: NOTIFY takes a
  -- cluster-wide lock at commit (PostgreSQL folds repeats).
  IF s.wake THEN
    PERFORM pg_notify('cache_invalidator', '');
  END IF;
  RETURN NULL;
END
$fn$;

-- public.user_journeys: row and TRUNCATE triggers
CREATE OR REPLACE TRIGGER pgci_capture AFTER INSERT OR UPDATE OR DELETE ON "public"."user_journeys" FOR EACH ROW EXECUTE FUNCTION "cache_invalidator"."capture_public_user_journeys"();
CREATE OR REPLACE TRIGGER pgci_capture_truncate AFTER TRUNCATE ON "public"."user_journeys" FOR EACH STATEMENT EXECUTE FUNCTION "cache_invalidator"."capture_public_user_journeys"();

-- public.user_journeys: record the captured columns
INSERT INTO "cache_invalidator".captures VALUES ('public.user_journeys', ARRAY['user_id']::text[]) ON CONFLICT (relation) DO UPDATE SET columns = excluded.columns;

