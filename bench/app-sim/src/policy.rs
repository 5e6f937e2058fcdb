//! The ways the app can cache, and how each one reads a page and
//! follows its own writes.

use pgci_client::{AfterPolicy, Cache, CacheOptions, Source, WriteToken, L1};
use redis::aio::ConnectionManager;
use tokio_postgres::{Client, Statement};

use crate::workload::{Page, PAGES};

/// A caching policy under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// (1) Every read goes to PostgreSQL.
    NoCache,
    /// (2) The plan as written: cache-aside with TTLs (1 h profiles,
    /// 5 min balances and journeys), and the app deletes the keys of its
    /// own writes.
    TtlPlan,
    /// (3) The daemon deletes keys; app fills live 24 h.
    DaemonDelete,
    /// (4) The daemon writes the new page; app fills live 24 h.
    DaemonRefresh,
    /// (5) As (3), with lease-protected fills and read-your-writes tokens
    /// (the crate's client; a read ahead of the daemon goes to the
    /// database: `AfterPolicy::Bypass`).
    DaemonLeases,
    /// (6) As (5), a read ahead of the daemon waiting up to 50 ms for it
    /// first (`AfterPolicy::Wait`).
    DaemonLeasesWait,
    /// (7) As (5), with an in-process cache (`pgci_client::L1`) shared by
    /// the app server's request loops in front of Redis.
    DaemonLeasesL1,
    /// (8) The money path: as (5), every write committed with synchronous
    /// invalidation (the daemon a synchronous standby, the writers'
    /// sessions `synchronous_commit = remote_apply`), so a commit returns
    /// only once its keys are gone, for every reader; no write tokens; the
    /// daemon fences the keys until the commit shows
    /// (`redis.fence_until_visible`).
    DaemonSync,
    /// (9) As (8) without the fences: a reader that misses between the
    /// daemon's deletion and the commit showing fills the old row.
    DaemonSyncUnfenced,
}

impl Policy {
    /// Every policy, in the order.
    pub const ALL: [Policy; 9] = [
        Policy::NoCache,
        Policy::TtlPlan,
        Policy::DaemonDelete,
        Policy::DaemonRefresh,
        Policy::DaemonLeases,
        Policy::DaemonLeasesWait,
        Policy::DaemonLeasesL1,
        Policy::DaemonSync,
        Policy::DaemonSyncUnfenced,
    ];

    /// The name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Policy::NoCache => "no-cache",
            Policy::TtlPlan => "ttl-plan",
            Policy::DaemonDelete => "daemon-delete",
            Policy::DaemonRefresh => "daemon-refresh",
            Policy::DaemonLeases => "daemon-leases",
            Policy::DaemonLeasesWait => "daemon-leases-wait",
            Policy::DaemonLeasesL1 => "daemon-leases-l1",
            Policy::DaemonSync => "daemon-sync",
            Policy::DaemonSyncUnfenced => "daemon-sync-unfenced",
        }
    }

    /// The policy named `name`.
    pub fn parse(name: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether the daemon runs, and whether it refreshes.
    pub fn daemon(self) -> Option<bool> {
        match self {
            Policy::NoCache | Policy::TtlPlan => None,
            Policy::DaemonDelete
            | Policy::DaemonLeases
            | Policy::DaemonLeasesWait
            | Policy::DaemonLeasesL1
            | Policy::DaemonSync
            | Policy::DaemonSyncUnfenced => Some(false),
            Policy::DaemonRefresh => Some(true),
        }
    }

    /// How long an app fill of `page` lives.
    pub fn ttl_secs(self, page: Page) -> u64 {
        match (self, page) {
            (Policy::TtlPlan, Page::Profile) => 3600,
            (Policy::TtlPlan, _) => 300,
            _ => 24 * 3600,
        }
    }

    /// Whether the app deletes the keys of its own writes.
    pub fn app_deletes(self) -> bool {
        self == Policy::TtlPlan
    }

    /// Whether reads after the app's own writes carry a write token.
    pub fn tokens(self) -> bool {
        matches!(
            self,
            Policy::DaemonLeases | Policy::DaemonLeasesWait | Policy::DaemonLeasesL1
        )
    }

    /// Whether every write commits with synchronous invalidation.
    pub fn synchronous(self) -> bool {
        matches!(self, Policy::DaemonSync | Policy::DaemonSyncUnfenced)
    }

    /// Whether the daemon fences deleted keys until their commits show.
    pub fn fences(self) -> bool {
        self == Policy::DaemonSync
    }

    /// Whether the app server keeps an in-process cache.
    pub fn l1(self) -> bool {
        self == Policy::DaemonLeasesL1
    }

    /// The client's options under this policy.
    fn cache_options(self) -> CacheOptions {
        let after = match self {
            Policy::DaemonLeasesWait => AfterPolicy::Wait(std::time::Duration::from_millis(50)),
            _ => AfterPolicy::Bypass,
        };
        CacheOptions {
            after,
            ..CacheOptions::default()
        }
    }
}

/// What one read returned.
pub struct Read {
    /// The page's JSON (`None`: no such user).
    pub json: Option<String>,
    /// Whether it came from the cache.
    pub hit: bool,
    /// Whether it came from the in-process cache.
    pub near: bool,
    /// Whether it cost a database query.
    pub queried: bool,
}

/// One app server's connections, reading pages under a policy.
pub struct Reader {
    policy: Policy,
    pg: Client,
    statements: Vec<Statement>,
    redis: ConnectionManager,
    cache: Cache<ConnectionManager>,
}

impl Reader {
    /// A reader on its own PostgreSQL session and a shared Redis
    /// connection (and the app server's shared L1, if any).
    pub async fn new(
        policy: Policy,
        pg: Client,
        redis: ConnectionManager,
        l1: Option<L1>,
    ) -> Reader {
        let mut statements = Vec::new();
        for page in PAGES {
            let sql = page.query().replace("$1", "$1::text::uuid");
            statements.push(pg.prepare(&sql).await.expect("prepare page query"));
        }
        let cache = Cache::new(redis.clone(), policy.cache_options());
        let cache = match l1 {
            Some(l1) => cache.with_l1(l1),
            None => cache,
        };
        Reader {
            policy,
            pg,
            statements,
            redis,
            cache,
        }
    }

    /// The PostgreSQL session (for the app's writes).
    pub fn pg(&self) -> &Client {
        &self.pg
    }

    /// Deletes keys (the plan's app-side invalidation).
    pub async fn delete(&mut self, keys: &[String]) {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut self.redis)
            .await
            .expect("DEL");
    }

    /// Reads `page` of user `id`; `after` is the token of the reader's
    /// own write, when the policy uses tokens.
    pub async fn read(&mut self, page: Page, id: &str, after: Option<WriteToken>) -> Read {
        let statement = &self.statements[page.index()];
        let pg = &self.pg;
        let load = || async move {
            pg.query_opt(statement, &[&id])
                .await
                .map(|row| row.and_then(|r| r.get::<_, Option<String>>(0)))
        };
        let key = page.key(id);
        match self.policy {
            Policy::NoCache => Read {
                json: load().await.expect("page query"),
                hit: false,
                near: false,
                queried: true,
            },
            Policy::DaemonLeases
            | Policy::DaemonLeasesWait
            | Policy::DaemonLeasesL1
            | Policy::DaemonSync
            | Policy::DaemonSyncUnfenced => {
                let (json, source) = match self
                    .cache
                    .get_or_load(&key, self.policy.ttl_secs(page), load, after)
                    .await
                {
                    Ok(read) => read,
                    // Redis is restarting: the page comes from the
                    // database, as an app serves it when its cache fails.
                    Err(pgci_client::ClientError::Redis(_)) => {
                        (load().await.expect("page query"), Source::Bypassed)
                    }
                    Err(e) => panic!("cache read: {e}"),
                };
                let hit = matches!(source, Source::Hit | Source::L1);
                Read {
                    json,
                    hit,
                    near: source == Source::L1,
                    queried: !hit,
                }
            }
            Policy::TtlPlan | Policy::DaemonDelete | Policy::DaemonRefresh => {
                // The plan's cache-aside: GET, on a miss query and SET EX.
                let cached: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut self.redis)
                    .await
                    .expect("GET");
                if let Some(json) = cached {
                    return Read {
                        json: Some(json),
                        hit: true,
                        near: false,
                        queried: false,
                    };
                }
                let json = load().await.expect("page query");
                if let Some(json) = &json {
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(json)
                        .arg("EX")
                        .arg(self.policy.ttl_secs(page))
                        .query_async(&mut self.redis)
                        .await
                        .expect("SET");
                }
                Read {
                    json,
                    hit: false,
                    near: false,
                    queried: true,
                }
            }
        }
    }
}
