//! TLS to PostgreSQL (both the replication and the regular connection) and
//! to Redis (`rediss://`), with certificates the harness generates.

use crate::support::{preset, surviving, Certs, TestEnv, RULES_TOML};

/// Writes a config that reaches both servers by TLS with `sslmode` and
/// `root_cert`, using host `host` for Postgres.
fn write_tls_config(env: &TestEnv, certs: &Certs, host: &str, sslmode: &str, root_cert: &str) {
    let root = if root_cert.is_empty() {
        String::new()
    } else {
        format!("ssl_root_cert = \"{}\"\n", certs.path(root_cert).display())
    };
    let text = format!(
        "[postgres]\nurl = \"postgres://postgres@{host}:{}/postgres?sslmode={sslmode}\"\n{root}\n\
         [redis]\nurl = \"{}\"\nca_cert = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{}\"\n\n{RULES_TOML}\n\
         [[rules]]\ntable = \"public.pillars\"\nkeys = [\"sentinel:pillar:{{id}}\"]\n",
        env.pg.port,
        env.redis.url(),
        certs.path("ca.pem").display(),
        env.http_port,
    );
    std::fs::write(&env.config, text).expect("config");
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// verify-full with the CA file: setup and the daemon work over TLS to
/// Postgres (the walsender session is encrypted) and to Redis.
#[tokio::test(flavor = "multi_thread")]
async fn verify_full_to_postgres_and_rediss_to_redis() {
    let certs = Certs::generate();
    let mut env = TestEnv::start_with(5, Some(&certs)).await;
    write_tls_config(&env, &certs, "localhost", "verify-full", "ca.pem");
    env.setup();
    let _daemon = env.daemon().await;
    let client = env.pg.client().await;
    let encrypted: bool = client
        .query_one(
            "select coalesce(bool_and(s.ssl), false) from pg_stat_ssl s join pg_stat_activity a using (pid) \
              where a.backend_type = 'walsender'",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    let rows = client
        .query("select a.backend_type, a.application_name, s.ssl::text from pg_stat_ssl s join pg_stat_activity a using (pid)", &[])
        .await
        .expect("rows");
    let rows: Vec<(Option<String>, Option<String>, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        encrypted,
        "the replication session is not encrypted: {rows:?}\n{}",
        env.pg.log()
    );

    let user: String = client
        .query_one("select id::text from public.profiles limit 1", &[])
        .await
        .expect("user")
        .get(0);
    let key = format!("profile:user:{user}");
    let mut redis = env.redis.conn().await;
    preset(&mut redis, std::slice::from_ref(&key)).await;
    client
        .execute(
            "update public.profiles set bio = 'tls' where id = $1::text::uuid",
            &[&user],
        )
        .await
        .expect("update");
    env.sync().await;
    assert_eq!(surviving(&mut redis, &[key]).await, 0);
}

/// The server's certificate is checked as each sslmode promises: a wrong
/// CA fails verify-full and verify-ca; a host name the certificate does not
/// name fails verify-full but passes verify-ca; require encrypts without
/// checking. Each failure is one line.
#[tokio::test(flavor = "multi_thread")]
async fn sslmodes_check_what_they_promise() {
    let certs = Certs::generate();
    let env = TestEnv::start_with(1, Some(&certs)).await;
    let check = |host: &str, mode: &str, root: &str| {
        write_tls_config(&env, &certs, host, mode, root);
        env.cli(&["setup", "--print"])
    };

    let out = check("localhost", "verify-full", "other-ca.pem");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));

    let out = check("localhost", "verify-ca", "other-ca.pem");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let out = check("127.0.0.1", "verify-full", "ca.pem");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));

    let out = check("127.0.0.1", "verify-ca", "ca.pem");
    assert!(out.status.success(), "{}", stderr(&out));

    let out = check("127.0.0.1", "require", "");
    assert!(out.status.success(), "{}", stderr(&out));

    let out = check("localhost", "verify-ca", "");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("ssl_root_cert"), "{}", stderr(&out));
}
