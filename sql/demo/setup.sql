-- What `pg-cache-invalidator setup --print` prints for the demo rules
-- (sql/demo/avolve_config.toml) on a fresh database holding the demo schema
-- (sql/demo/avolve_schema.sql). A DBA may run it by hand with
--   psql "$DATABASE_URL" -f sql/demo/setup.sql
-- instead of letting the daemon's `setup` do it. The integration tests check
-- that it matches what `setup --print` prints. On PostgreSQL 17 and later
-- the slot is a failover slot (see the README's "Failover and upgrades"):
--   SELECT pg_create_logical_replication_slot('pg_cache_invalidator', 'pgoutput', false, false, true);

-- public.user_tokens: unique index user_tokens_user_id_token_id_key over NOT NULL columns carries the key columns
ALTER TABLE "public"."user_tokens" REPLICA IDENTITY USING INDEX "user_tokens_user_id_token_id_key";

-- public.user_journeys: no primary key or unique NOT NULL index covers the key columns, so DELETEs must log the whole row
ALTER TABLE "public"."user_journeys" REPLICA IDENTITY FULL;

-- publication pg_cache_invalidator lists the watched tables
CREATE PUBLICATION "pg_cache_invalidator" FOR TABLE "public"."profiles", "public"."user_tokens", "public"."user_journeys" WITH (publish = 'insert, update, delete, truncate');

-- replication slot pg_cache_invalidator keeps the changes the daemon has not confirmed
SELECT pg_create_logical_replication_slot('pg_cache_invalidator', 'pgoutput');

