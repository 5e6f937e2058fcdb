//! What the simulated app reads and writes: three cached pages per user
//! (profile, balance page, journey progress), their queries, the version
//! counters that make staleness exact, and the writes — the app's own and
//! those that bypass it.

use rand::Rng;
use rand_distr::{Distribution, Zipf};

/// A cached page of one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// `profile:user:{id}`: the profile row.
    Profile,
    /// `balance:user:{user_id}`: every token balance of the user.
    Balance,
    /// `journey:user:{user_id}`: the user's journey progress.
    Journey,
}

/// Every page, in entity order.
pub const PAGES: [Page; 3] = [Page::Profile, Page::Balance, Page::Journey];

impl Page {
    /// The cache key of user `id`'s page.
    pub fn key(self, id: &str) -> String {
        match self {
            Page::Profile => format!("profile:user:{id}"),
            Page::Balance => format!("balance:user:{id}"),
            Page::Journey => format!("journey:user:{id}"),
        }
    }

    /// The query whose answer is cached: JSON with the page's version in
    /// `v` (the row's version, or the sum of the user's rows' versions,
    /// which grows with every committed change). `$1` is the user's id;
    /// the daemon's refresh rules run the same statement.
    pub fn query(self) -> &'static str {
        match self {
            Page::Profile => {
                "select json_build_object('v', version, 'username', username, 'full_name', full_name, 'bio', bio)::text \
                   from public.profiles where id = $1"
            }
            Page::Balance => {
                "select json_build_object('v', sum(version), 'balances', json_agg(json_build_object('token_id', token_id, 'balance', balance) order by token_id))::text \
                   from public.user_tokens where user_id = $1"
            }
            Page::Journey => {
                "select json_build_object('v', sum(version), 'journeys', json_agg(json_build_object('pillar_id', pillar_id, 'progress', progress, 'status', status) order by pillar_id))::text \
                   from public.user_journeys where user_id = $1"
            }
        }
    }

    /// The table whose rows make the page, and the column naming the user.
    pub fn table(self) -> (&'static str, &'static str) {
        match self {
            Page::Profile => ("public.profiles", "id"),
            Page::Balance => ("public.user_tokens", "user_id"),
            Page::Journey => ("public.user_journeys", "user_id"),
        }
    }

    /// The page's current version per user, for every user at once.
    pub fn versions_sql(self) -> String {
        let (table, user) = self.table();
        format!("select {user}::text, sum(version)::int8 from {table} group by {user}")
    }

    /// The current versions of some users' pages (`$1`: uuid text array).
    pub fn versions_of_sql(self) -> String {
        let (table, user) = self.table();
        format!(
            "select {user}::text, sum(version)::int8 from {table} where {user} = any($1::text[]::uuid[]) group by {user}"
        )
    }

    /// Its name: `profile`, `balance`, `journey`.
    pub fn name(self) -> &'static str {
        match self {
            Page::Profile => "profile",
            Page::Balance => "balance",
            Page::Journey => "journey",
        }
    }

    /// The page's position in [`PAGES`].
    pub fn index(self) -> usize {
        match self {
            Page::Profile => 0,
            Page::Balance => 1,
            Page::Journey => 2,
        }
    }
}

/// Version counters on the three tables, bumped by every UPDATE, and a
/// function that changes balances without the app knowing (a payout job,
/// a webhook handler written in SQL).
pub const SCHEMA_SQL: &str = "
alter table public.profiles add column if not exists version int8 not null default 1;
alter table public.user_tokens add column if not exists version int8 not null default 1;
alter table public.user_journeys add column if not exists version int8 not null default 1;
create or replace function public.sim_bump_version() returns trigger language plpgsql as $$
begin new.version := old.version + 1; return new; end $$;
drop trigger if exists sim_version on public.profiles;
drop trigger if exists sim_version on public.user_tokens;
drop trigger if exists sim_version on public.user_journeys;
create trigger sim_version before update on public.profiles for each row execute function public.sim_bump_version();
create trigger sim_version before update on public.user_tokens for each row execute function public.sim_bump_version();
create trigger sim_version before update on public.user_journeys for each row execute function public.sim_bump_version();
create or replace function public.sim_daily_bonus(p_user uuid) returns void language sql as $$
  update public.user_tokens set balance = balance + 1, updated_at = now() where user_id = p_user $$;
";

/// The daemon's rules for the three pages: delete, or refresh with the
/// page's own query (so the daemon writes exactly what the app fills).
pub fn rules_toml(refresh: bool) -> String {
    PAGES.iter().map(|page| page.rule_toml(refresh)).collect()
}

impl Page {
    /// The daemon's rule for this page: delete, or refresh with the
    /// page's own query.
    pub fn rule_toml(self, refresh: bool) -> String {
        let (table, user) = self.table();
        let key = self.key(&format!("{{{user}}}"));
        if refresh {
            format!(
                "[[rules]]\ntable = \"{table}\"\nkeys = [\"{key}\"]\naction = \"refresh\"\nttl = \"24h\"\nquery = \"{}\"\nparams = [\"{user}\"]\n\n",
                self.query()
            )
        } else {
            format!("[[rules]]\ntable = \"{table}\"\nkeys = [\"{key}\"]\naction = \"delete\"\n\n")
        }
    }
}

/// Users drawn by popularity: rank 1 is the most active.
pub struct Users {
    /// Their ids, most popular first.
    pub ids: Vec<String>,
    zipf: Zipf<f64>,
}

impl Users {
    /// `ids` drawn with exponent `s`.
    pub fn new(ids: Vec<String>, s: f64) -> Users {
        let zipf = Zipf::new(ids.len() as f64, s).unwrap_or_else(|e| {
            eprintln!("error: --zipf {s}: {e}; give a positive exponent such as 1.1");
            std::process::exit(2)
        });
        Users { ids, zipf }
    }

    /// One user's index.
    pub fn draw(&self, rng: &mut impl Rng) -> usize {
        (self.zipf.sample(rng) as usize)
            .saturating_sub(1)
            .min(self.ids.len() - 1)
    }
}

/// What a request reads: half profiles, 30 % balance pages, 20 % journeys.
pub fn draw_page(rng: &mut impl Rng) -> Page {
    match rng.random_range(0..10) {
        0..=4 => Page::Profile,
        5..=7 => Page::Balance,
        _ => Page::Journey,
    }
}

/// The version in a page's JSON.
pub fn version_of(json: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()?
        .get("v")?
        .as_i64()
}
