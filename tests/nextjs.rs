//! The Next.js cache kept true by the daemon, end to end: the harness
//! builds `examples/nextjs` (pinned `next` from npm, `'use cache'` through
//! the client's Redis cache handler), starts it with `next start`, and
//! reads its pages in headless Chromium while the daemon runs a rule with
//! `tags = ["profile:{id}"]`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::clients::{typescript_package, NEXT_TAG_RULE};
use crate::status_page::chromium;
use crate::support::{free_port, http_get, users, TestEnv};

/// `next start`, killed when dropped.
struct NextServer(Child);

impl Drop for NextServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `script` with sh in `dir` under the client package's build lock
/// (the client tests rebuild its dist/, which the example links).
fn locked_sh(dir: &Path, script: &str) {
    let lock = typescript_package().join("node_modules/.pgci-npm-test.lock");
    let out = Command::new("flock")
        .arg(&lock)
        .args(["sh", "-c", script])
        .current_dir(dir)
        .env("NEXT_TELEMETRY_DISABLED", "1")
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{script}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a profile page shows: its bio and when its cached part rendered.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    bio: String,
    rendered: String,
}

/// The text of the element `<tag id="id">…</tag>` in `dom`.
fn element(dom: &str, tag: &str, id: &str) -> Option<String> {
    let open = format!("<{tag} id=\"{id}\"");
    let start = dom.find(&open)?;
    let text = &dom[start..];
    let text = &text[text.find('>')? + 1..];
    Some(text[..text.find(&format!("</{tag}>"))?].to_string())
}

/// Loads `/profile/<id>` in Chromium.
fn load(profile: &Path, port: u16, id: &str) -> Shown {
    let url = format!("http://127.0.0.1:{port}/profile/{id}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = chromium(profile, &["--dump-dom".to_string(), url.clone()]);
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        if let (Some(bio), Some(rendered)) =
            (element(&dom, "p", "bio"), element(&dom, "time", "rendered"))
        {
            return Shown { bio, rendered };
        }
        assert!(
            Instant::now() < deadline,
            "no profile in {url}: {dom}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Loads until two loads in a row show the same rendering: the page is
/// then served from the cache (the first page stored after a tag's mark
/// was created renders once more, see the client's next.ts).
fn load_cached(profile: &Path, port: u16, id: &str) -> Shown {
    let mut last = load(profile, port, id);
    for _ in 0..5 {
        let now = load(profile, port, id);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("/profile/{id} never came from the cache: {last:?}");
}

/// A page tagged `profile:<id>` shows a change made by plain SQL on the
/// next load, without any app code calling revalidateTag; a page for
/// another user stays cached (its rendering time does not change).
#[tokio::test(flavor = "multi_thread")]
async fn a_tagged_next_page_shows_a_sql_change_on_the_next_load() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nextjs");
    let started = Instant::now();
    locked_sh(
        &example,
        "npm ci --no-audit --no-fund --loglevel=error && node_modules/.bin/next build",
    );
    eprintln!(
        "npm ci and next build: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut env = TestEnv::start(2).await;
    env.write_config(NEXT_TAG_RULE);
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 2).await;
    let (mine, other) = (&u[0].id, &u[1].id);

    let port = free_port();
    let log = std::fs::File::create(env.path("next.log")).expect("next.log");
    let _next = NextServer(
        Command::new(example.join("node_modules/.bin/next"))
            .args(["start", "-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(&example)
            .env("DATABASE_URL", env.pg.url())
            .env("REDIS_URL", env.redis.url())
            .env("NEXT_TELEMETRY_DISABLED", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("next start"),
    );
    let next_log = || std::fs::read_to_string(env.path("next.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(port, "/")
        .await
        .is_none_or(|(status, _)| status != 200)
    {
        assert!(Instant::now() < deadline, "next start: {}", next_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let profile = env.path("chromium");
    let before = load_cached(&profile, port, mine);
    let other_before = load_cached(&profile, port, other);
    // The cache handler keeps the page in Redis (not only in this process).
    let mut redis = env.redis.conn().await;
    let stored: Vec<String> = redis::cmd("KEYS")
        .arg("pgci:next:*")
        .query_async(&mut redis)
        .await
        .expect("KEYS");
    assert!(!stored.is_empty(), "no entry in Redis: {}", next_log());

    // Plain SQL, no app code: the daemon deletes the tag's mark.
    let db = env.pg.client().await;
    db.execute(
        "update public.profiles set bio = 'changed by SQL' where id = $1::text::uuid",
        &[mine],
    )
    .await
    .expect("update");
    env.sync().await;
    let after = load(&profile, port, mine);
    assert_eq!(
        after.bio,
        "changed by SQL",
        "the page still shows {before:?}: {}",
        next_log()
    );
    let other_after = load(&profile, port, other);
    assert_eq!(
        other_after, other_before,
        "another user's page rendered again"
    );
}
