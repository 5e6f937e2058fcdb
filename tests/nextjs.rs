//! The Next.js example end to end: the harness builds `examples/nextjs`
//! (pinned `next` from npm, the client installed from the repository),
//! starts it with `next start` on the test's PostgreSQL and Redis, and
//! reads its pages in headless Chromium while the daemon runs.

use std::path::{Path, PathBuf};
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

/// `examples/nextjs`, installed and built once per test run.
fn build_example() -> &'static Path {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
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
        example
    })
}

/// The example served by `next start` on `env`'s servers (its log in the
/// environment's `next.log`), and its port, once it answers.
async fn start_example(env: &TestEnv) -> (NextServer, u16) {
    let example = build_example();
    let port = free_port();
    let log = std::fs::File::create(env.path("next.log")).expect("next.log");
    let next = NextServer(
        Command::new(example.join("node_modules/.bin/next"))
            .args(["start", "-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(example)
            .env("DATABASE_URL", env.pg.url())
            .env("REDIS_URL", env.redis.url())
            .env("NEXT_TELEMETRY_DISABLED", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("next start"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(port, "/")
        .await
        .is_none_or(|(status, _)| status != 200)
    {
        assert!(
            Instant::now() < deadline,
            "next start: {}",
            std::fs::read_to_string(env.path("next.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (next, port)
}

/// The DOM of `url` in Chromium, once it holds `needle` (streamed parts
/// may arrive after a first dump). `profile` is the browser's profile
/// directory: its cookies persist from one load to the next.
fn dom_with(profile: &Path, url: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = chromium(profile, &["--dump-dom".to_string(), url.to_string()]);
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        if dom.contains(needle) {
            return dom;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle} in {url}: {dom}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The text of the first element `<tag …attribute…>…</tag>` in `dom`.
fn element(dom: &str, tag: &str, attribute: &str) -> Option<String> {
    let start = dom.find(&format!("<{tag} {attribute}"))?;
    let text = &dom[start..];
    let text = &text[text.find('>')? + 1..];
    Some(text[..text.find(&format!("</{tag}>"))?].to_string())
}

/// What a profile page shows: its bio and when its cached part rendered.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    bio: String,
    rendered: String,
}

/// Loads `/<page>/<id>` (`profile`: 'use cache'; `legacy`: unstable_cache).
fn load(profile: &Path, port: u16, page: &str, id: &str) -> Shown {
    let url = format!("http://127.0.0.1:{port}/{page}/{id}");
    let dom = dom_with(profile, &url, "id=\"rendered\"");
    Shown {
        bio: element(&dom, "p", "id=\"bio\"").unwrap_or_default(),
        rendered: element(&dom, "time", "id=\"rendered\"").unwrap_or_default(),
    }
}

/// Loads until two loads in a row show the same rendering: the page is
/// then served from the cache (the first page stored after a tag's mark
/// was created renders once more, see the client's next.ts).
fn load_cached(profile: &Path, port: u16, page: &str, id: &str) -> Shown {
    let mut last = load(profile, port, page, id);
    for _ in 0..5 {
        let now = load(profile, port, page, id);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("/{page}/{id} never came from the cache: {last:?}");
}

/// What the balance page of `user` shows for `token`, and where the page
/// came from (`hit`, `filled`, `bypassed`).
fn balance(profile: &Path, port: u16, user: &str, token: &str) -> (f64, String) {
    let url = format!("http://127.0.0.1:{port}/balance/{user}");
    let dom = dom_with(profile, &url, "id=\"source\"");
    let row = dom
        .find(&format!("data-token=\"{token}\""))
        .map(|at| &dom[at..])
        .unwrap_or_else(|| panic!("no row for {token}: {dom}"));
    let shown = element(row, "span", "class=\"balance\"").unwrap_or_default();
    let shown: f64 = shown
        .parse()
        .unwrap_or_else(|_| panic!("not a balance {shown:?}: {dom}"));
    let source = element(&dom, "span", "id=\"source\"").unwrap_or_default();
    (shown, source)
}

/// A page tagged `profile:<id>` shows a change made by plain SQL on the
/// next load, without any app code calling revalidateTag; a page for
/// another user stays cached (its rendering time does not change). Both
/// caches: 'use cache' (`/profile`, the cacheHandlers handler) and
/// unstable_cache (`/legacy`, the incremental cacheHandler).
#[tokio::test(flavor = "multi_thread")]
async fn a_tagged_next_page_shows_a_sql_change_on_the_next_load() {
    let mut env = TestEnv::start(2).await;
    env.write_config(NEXT_TAG_RULE);
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 2).await;
    let (mine, other) = (&u[0].id, &u[1].id);
    let (_next, port) = start_example(&env).await;
    let next_log = || std::fs::read_to_string(env.path("next.log")).unwrap_or_default();

    let profile = env.path("chromium");
    let db = env.pg.client().await;
    let mut redis = env.redis.conn().await;
    for (round, page) in ["profile", "legacy"].into_iter().enumerate() {
        let before = load_cached(&profile, port, page, mine);
        let other_before = load_cached(&profile, port, page, other);
        // The cache handler keeps the page in Redis (not only in this process).
        let stored: Vec<String> = redis::cmd("KEYS")
            .arg("pgci:next:*")
            .query_async(&mut redis)
            .await
            .expect("KEYS");
        assert!(!stored.is_empty(), "no entry in Redis: {}", next_log());

        // Plain SQL, no app code: the daemon deletes the tag's mark.
        let bio = format!("changed by SQL {round}");
        db.execute(
            "update public.profiles set bio = $2 where id = $1::text::uuid",
            &[mine, &bio],
        )
        .await
        .expect("update");
        env.sync().await;
        let after = load(&profile, port, page, mine);
        assert_eq!(
            after.bio,
            bio,
            "/{page} still shows {before:?}: {}",
            next_log()
        );
        let other_after = load(&profile, port, page, other);
        assert_eq!(
            other_after, other_before,
            "another user's /{page} rendered again"
        );
    }
}

/// The plan's transfer → reload flow in a browser: the user's transfer
/// sets a write-token cookie, and the balance page it lands on shows the
/// new balance even while the daemon is stopped and Redis still holds the
/// old one (which another browser, without the token, is shown); once the
/// daemon runs again everyone sees the new balance.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_transfer_the_balance_page_shows_the_new_balance() {
    let mut env = TestEnv::start(2).await;
    env.setup();
    let daemon = env.daemon().await;
    let u = users(&env, 2).await;
    let (from, to, token) = (&u[0].id, &u[1].id, &u[0].tokens[0]);
    let (_next, port) = start_example(&env).await;
    let next_log = || std::fs::read_to_string(env.path("next.log")).unwrap_or_default();
    let (me, someone) = (env.path("chromium-me"), env.path("chromium-someone"));

    let (start, _) = balance(&me, port, from, token);
    let (cached, source) = balance(&someone, port, from, token);
    assert_eq!((cached, source.as_str()), (start, "hit"), "{}", next_log());

    // The daemon stopped: Redis keeps the old balance page.
    let pid = daemon.pid().expect("pid").to_string();
    let signal = |name: &str| {
        Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill")
    };
    signal("STOP");
    let transfer =
        format!("http://127.0.0.1:{port}/transfer?from={from}&to={to}&token={token}&amount=1");
    let landed = dom_with(&me, &transfer, "id=\"source\"");
    let (mine, my_source) = balance(&me, port, from, token);
    let (theirs, their_source) = balance(&someone, port, from, token);
    signal("CONT");
    assert_eq!(
        (mine, my_source.as_str()),
        (start - 1.0, "bypassed"),
        "the user's own reload after the transfer (landed on {landed})\n{}",
        next_log()
    );
    assert_eq!(
        (theirs, their_source.as_str()),
        (start, "hit"),
        "without the token, the cached page while the daemon is stopped"
    );
    env.sync().await;
    let (theirs, _) = balance(&someone, port, from, token);
    assert_eq!(theirs, start - 1.0, "once the daemon ran again");
}
