-- pgci_write_token(): a read-your-writes token for apps that reach the
-- database through supabase-js / PostgREST rather than a SQL connection.
--
-- After a write has COMMITTED, the app calls
--     const { data: after } = await supabase.rpc("pgci_write_token");
-- and passes `after` to its next reads (getOrLoad(..., { after })): the
-- cache is trusted for them only once pg-cache-invalidator has applied the
-- WAL up to this position, which is past that commit.
--
-- Take it in its own call, after the write returned. Inside the writing
-- transaction the position is before that transaction's commit record, so
-- a read could be served the old value; the function refuses to answer
-- there (a transaction that has written has a transaction id).
--
-- Run once as the database owner (Supabase: the SQL editor, or a
-- migration). Idempotent. It is SECURITY DEFINER so it works whatever the
-- platform grants on the WAL functions to `authenticated`; it reveals only
-- the server's current WAL position, and only `authenticated` may call it
-- (anonymous visitors do not write). Requires PostgreSQL 13 or later.

create or replace function public.pgci_write_token()
  returns text
  language plpgsql
  volatile
  security definer
  set search_path = ''
as $$
begin
  if pg_catalog.pg_current_xact_id_if_assigned() is not null then
    raise exception 'pgci_write_token() was called inside a transaction that wrote: call it after the write committed (its own rpc or statement)'
      using errcode = '25001', hint = 'a token taken before the commit record lets the next read return the old value';
  end if;
  return pg_catalog.pg_current_wal_insert_lsn()::text;
end
$$;

comment on function public.pgci_write_token() is
  'pg-cache-invalidator read-your-writes token: call after a write committed and pass it as { after } to the next reads';

revoke all on function public.pgci_write_token() from public;
do $$
begin
  if exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
    revoke all on function public.pgci_write_token() from anon;
  end if;
  if exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
    grant execute on function public.pgci_write_token() to authenticated;
  else
    raise notice 'no role "authenticated" (not a Supabase database): grant execute on function public.pgci_write_token() to the role your app uses';
  end if;
end
$$;
