-- What `pg-cache-invalidator setup --print` prints with [postgres] source =
-- "outbox" for the demo rules (sql/demo/avolve_config.toml) on a fresh
-- database holding the demo schema (sql/demo/avolve_schema.sql). Every
-- statement is idempotent; a DBA may run it by hand with
--   psql "$DATABASE_URL" -f sql/outbox/setup.sql
-- The integration tests check that it matches what `setup --print` prints.

-- schema cache_invalidator holds the outbox and its trigger functions
CREATE SCHEMA IF NOT EXISTS "cache_invalidator";

-- one row per changed row, written in the writer's transaction
CREATE TABLE IF NOT EXISTS "cache_invalidator".outbox (
  id bigserial PRIMARY KEY,
  lsn pg_lsn NOT NULL DEFAULT pg_current_wal_insert_lsn(),
  created_at timestamptz NOT NULL DEFAULT now(),
  relation text NOT NULL,
  op text NOT NULL,
  old_row text,
  new_row text
);

-- which columns each table's trigger captures, in order
CREATE TABLE IF NOT EXISTS "cache_invalidator".captures (relation text PRIMARY KEY, columns text[] NOT NULL);

-- drainers waiting for a wake-up: writers NOTIFY only while one waits
CREATE TABLE IF NOT EXISTS "cache_invalidator".waiting (pid int PRIMARY KEY, since timestamptz NOT NULL DEFAULT now());

-- public.profiles: capture columns id into the outbox
CREATE OR REPLACE FUNCTION "cache_invalidator"."capture_public_profiles"() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO "cache_invalidator".outbox (relation, op) VALUES ('public.profiles', 'truncate');
  ELSE
    INSERT INTO "cache_invalidator".outbox (relation, op, old_row, new_row) VALUES ('public.profiles', lower(TG_OP),
      CASE WHEN TG_OP <> 'INSERT' THEN ROW(OLD."id")::text END,
      CASE WHEN TG_OP <> 'DELETE' THEN ROW(NEW."id")::text END);
  END IF;
  -- Wake a drainer only if one waits: NOTIFY takes a
  -- cluster-wide lock at commit (PostgreSQL folds repeats).
  IF EXISTS (SELECT 1 FROM "cache_invalidator".waiting) THEN
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
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO "cache_invalidator".outbox (relation, op) VALUES ('public.user_tokens', 'truncate');
  ELSE
    INSERT INTO "cache_invalidator".outbox (relation, op, old_row, new_row) VALUES ('public.user_tokens', lower(TG_OP),
      CASE WHEN TG_OP <> 'INSERT' THEN ROW(OLD."user_id", OLD."token_id")::text END,
      CASE WHEN TG_OP <> 'DELETE' THEN ROW(NEW."user_id", NEW."token_id")::text END);
  END IF;
  -- Wake a drainer only if one waits: NOTIFY takes a
  -- cluster-wide lock at commit (PostgreSQL folds repeats).
  IF EXISTS (SELECT 1 FROM "cache_invalidator".waiting) THEN
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
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO "cache_invalidator".outbox (relation, op) VALUES ('public.user_journeys', 'truncate');
  ELSE
    INSERT INTO "cache_invalidator".outbox (relation, op, old_row, new_row) VALUES ('public.user_journeys', lower(TG_OP),
      CASE WHEN TG_OP <> 'INSERT' THEN ROW(OLD."user_id")::text END,
      CASE WHEN TG_OP <> 'DELETE' THEN ROW(NEW."user_id")::text END);
  END IF;
  -- Wake a drainer only if one waits: NOTIFY takes a
  -- cluster-wide lock at commit (PostgreSQL folds repeats).
  IF EXISTS (SELECT 1 FROM "cache_invalidator".waiting) THEN
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

