//! The status page at `/`, checked in a real browser: headless Chromium
//! (Debian's `chromium`) renders it from a running daemon; the DOM shows
//! the slot, a rule's table and a recent event, and a screenshot is
//! written (`target/status-page.png`; the README shows a copy).

use std::process::Command;
use std::time::Duration;

use crate::support::users;
use crate::support::{http_get, wait_for, TestEnv};

pub(crate) fn chromium(dir: &std::path::Path, args: &[String]) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1100,1300",
        ])
        .arg(format!("--user-data-dir={}", dir.display()))
        .args(args)
        .output()
        .expect("chromium (scripts/test.sh installs Debian's chromium package)")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_renders_in_a_browser() {
    let mut env = TestEnv::start(10).await;
    // Keys are listed only when asked for (they hold row values).
    env.write_config(&format!(
        "[replication]\nheartbeat_interval = \"1s\"\n[http]\nlisten = \"127.0.0.1:{}\"\nshow_keys = true\n",
        env.http_port
    ));
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 3).await;
    let db = env.pg.client().await;
    for round in 0..5 {
        db.batch_execute(&format!(
            "update public.profiles set bio = 'status {round}' where id = '{}'; \
             update public.user_tokens set balance = balance + 1 where user_id = '{}'",
            u[0].id, u[1].id
        ))
        .await
        .expect("writes");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    env.sync().await;
    let port = env.http_port;
    let key = format!("profile:user:{}", u[0].id);
    // Two samples (rates need a previous reading), and the event arrived.
    wait_for(
        "the page to show the writes",
        Duration::from_secs(20),
        || {
            let key = key.clone();
            async move {
                http_get(port, "/").await.is_some_and(|(status, body)| {
                    status == 200 && body.contains(&key) && body.contains("<polyline")
                })
            }
        },
    )
    .await;

    let url = format!("http://127.0.0.1:{port}/");
    let profile = env.path("chromium");
    let out = chromium(&profile, &["--dump-dom".to_string(), url.clone()]);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dom.contains("<td id=\"slot\">slot pg_cache_invalidator</td>"),
        "{dom}"
    );
    assert!(
        dom.contains("<td class=\"table\">public.profiles</td>"),
        "{dom}"
    );
    assert!(dom.contains(&key), "no recent event for {key}: {dom}");
    assert!(dom.contains("<span class=\"ok\">streaming</span>"), "{dom}");
    assert!(!dom.contains("<script"), "the page runs scripts");
    // The test's Redis has no maxmemory and no persistence: the page says
    // so (as `status` does) instead of showing Redis green.
    assert!(dom.contains("setting") && dom.contains("to fix"), "{dom}");
    assert!(dom.contains("no maxmemory"), "{dom}");
    // Idle after the writes: nothing behind.
    assert!(dom.contains("caught up"), "{dom}");
    assert!(dom.contains("class=\"scale\""), "{dom}");

    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(&profile, &[format!("--screenshot={}", shot.display()), url]);
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
