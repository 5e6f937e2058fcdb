//! The demo schema's users and the keys the demo rules render for them,
//! for tests that write as the app does and look at what was removed.

use crate::env::TestEnv;
use crate::redis_server::preset;

/// A seeded user with both token balances and journeys.
pub struct User {
    /// `auth.users.id` (= `profiles.id`).
    pub id: String,
    /// Its `user_tokens.token_id`s, sorted.
    pub tokens: Vec<String>,
}

/// The first `n` seeded users (by id) with their tokens.
pub async fn users(env: &TestEnv, n: i64) -> Vec<User> {
    let client = env.pg.client().await;
    let rows = client
        .query(
            "select p.id::text, array_agg(ut.token_id::text order by ut.token_id) \
               from public.profiles p join public.user_tokens ut on ut.user_id = p.id \
              group by p.id order by p.id limit $1",
            &[&n],
        )
        .await
        .expect("users");
    rows.iter()
        .map(|r| User {
            id: r.get(0),
            tokens: r.get(1),
        })
        .collect()
}

/// The first seeded profile's id (by id).
pub async fn first_profile_id(client: &tokio_postgres::Client) -> String {
    client
        .query_one(
            "select id::text from public.profiles order by id limit 1",
            &[],
        )
        .await
        .expect("a profile")
        .get(0)
}

fn all_keys(u: &User) -> Vec<String> {
    let mut keys = vec![
        format!("profile:user:{}", u.id),
        format!("balance:user:{}", u.id),
        format!("journey:user:{}", u.id),
    ];
    keys.extend(
        u.tokens
            .iter()
            .map(|t| format!("balance:user:{}:token:{t}", u.id)),
    );
    keys
}

/// Presets every key of `users`, runs `sql`, waits until the daemon caught
/// up, and returns the keys that were removed.
pub async fn removed_by(env: &TestEnv, users: &[User], extra: &[String], sql: &str) -> Vec<String> {
    let mut redis = env.redis.conn().await;
    let mut keys: Vec<String> = users.iter().flat_map(all_keys).collect();
    keys.extend_from_slice(extra);
    preset(&mut redis, &keys).await;
    env.pg
        .client()
        .await
        .batch_execute(sql)
        .await
        .expect("write");
    env.sync().await;
    let mut removed = Vec::new();
    for key in keys {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .expect("exists");
        if !exists {
            removed.push(key);
        }
    }
    removed.sort();
    removed
}
