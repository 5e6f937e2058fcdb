//! The status page at `/`: one server-rendered HTML page, no scripts and
//! no external assets (it must work in a locked-down cluster), refreshed
//! by the browser every few seconds.
//!
//! It is drawn from what the daemon already exports: every
//! [`SAMPLE_EVERY`] the board reads the rendered metrics and keeps the
//! last [`SAMPLES`] readings (apply rate, commit-to-apply p50 and p99 from
//! the histogram's buckets), so the page shows the last minutes as small
//! inline SVG charts; the events come from the pub/sub channel like any
//! subscriber's; health from [`Health`].

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;

/// How often the board samples the metrics.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept: ten minutes.
const SAMPLES: usize = 300;
/// Events kept for the page.
const EVENTS: usize = 20;
/// Most characters of one event's key column kept for the page: with
/// [`EVENTS`], the page stays small whatever the events hold.
const EVENT_TEXT: usize = 512;

/// What the page shows, besides health.
pub struct Board {
    /// The slot (or outbox schema) and the rules' tables, for the header.
    source: String,
    tables: Vec<String>,
    /// Whether the page lists events' keys (`http.show_keys`): keys hold
    /// row values (usernames, ids), and the page has no authentication.
    show_keys: bool,
    state: Mutex<State>,
}

/// What the page shows of one event, cut to [`EVENT_TEXT`].
struct Shown {
    commit_time: String,
    table: String,
    op: String,
    keys: String,
}

#[derive(Default)]
struct State {
    samples: VecDeque<Sample>,
    /// The last reading of the counters, for rates.
    last: Option<Reading>,
    events: VecDeque<Shown>,
    /// The newest reading, for the figures.
    now: Reading,
}

#[derive(Clone, Copy, Default)]
struct Sample {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// What one metrics text says.
#[derive(Clone, Default)]
struct Reading {
    changes: f64,
    per_table: BTreeMap<String, f64>,
    /// Cumulative latency buckets (upper bound in seconds, count).
    buckets: Vec<(f64, f64)>,
    gauges: BTreeMap<String, f64>,
}

impl Board {
    /// A board for `source` (what the daemon reads) and `tables`.
    pub fn new(source: String, tables: Vec<String>, show_keys: bool) -> Arc<Board> {
        Arc::new(Board {
            source,
            tables,
            show_keys,
            state: Mutex::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a sample from the rendered metrics text.
    pub fn sample(&self, metrics_text: &str) {
        let reading = Reading::parse(metrics_text);
        let mut state = self.state();
        if let Some(last) = &state.last {
            let secs = SAMPLE_EVERY.as_secs_f64();
            let deltas: Vec<(f64, f64)> = reading
                .buckets
                .iter()
                .map(|&(le, n)| {
                    let before = last
                        .buckets
                        .iter()
                        .find(|(l, _)| *l == le)
                        .map_or(0.0, |(_, c)| *c);
                    (le, (n - before).max(0.0))
                })
                .collect();
            let sample = Sample {
                rate: ((reading.changes - last.changes) / secs).max(0.0),
                p50_ms: quantile(&deltas, 0.5) * 1000.0,
                p99_ms: quantile(&deltas, 0.99) * 1000.0,
            };
            state.samples.push_back(sample);
            if state.samples.len() > SAMPLES {
                state.samples.pop_front();
            }
        }
        state.last = Some(reading.clone());
        state.now = reading;
    }

    /// Keeps what the page shows of an event (its JSON): the keys only
    /// when `show_keys`, else how many; flush patterns (the rules' own
    /// text) always.
    pub fn event(&self, payload: &str) {
        let event: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
        let text = |name: &str| cut(event[name].as_str().unwrap_or("–"));
        let list = |name: &str| -> Vec<&str> {
            event[name]
                .as_array()
                .map(|a| a.iter().filter_map(|k| k.as_str()).collect())
                .unwrap_or_default()
        };
        let (keys, patterns) = (list("keys"), list("patterns"));
        let omitted = event["keys_omitted"].as_u64().unwrap_or(0);
        let keys = if !patterns.is_empty() {
            cut(&format!("flush {}", patterns.join(" ")))
        } else if self.show_keys {
            let more = if omitted > 0 {
                format!(" (+{omitted} more)")
            } else {
                String::new()
            };
            cut(&format!("{}{more}", keys.join(" ")))
        } else {
            let n = keys.len() as u64 + omitted;
            format!("{n} key{}", if n == 1 { "" } else { "s" })
        };
        let shown = Shown {
            commit_time: text("commit_time"),
            table: text("table"),
            op: text("op"),
            keys,
        };
        let mut state = self.state();
        state.events.push_front(shown);
        state.events.truncate(EVENTS);
    }

    /// The page.
    pub fn render(&self, health: &Health) -> String {
        let state = self.state();
        let gauge = |name: &str| state.now.gauges.get(name).copied();
        let bytes = |v: Option<f64>| v.map_or_else(|| "–".to_string(), human_bytes);
        let mut html = String::with_capacity(16 << 10);
        let _ = write!(
            html,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"5\">\
             <title>pg-cache-invalidator · {source}</title><style>{STYLE}</style></head><body>\
             <h1>pg-cache-invalidator <small>{version}</small></h1>",
            source = escape(&self.source),
            version = escape(m::VERSION),
        );
        let flag = |ok: bool, yes: &str, no: &str| {
            format!(
                "<span class=\"{}\">{}</span>",
                if ok { "ok" } else { "bad" },
                if ok { yes } else { no }
            )
        };
        // The time lag is how old the newest commit applied is, and only
        // while WAL is behind: idle, the last heartbeat ages between
        // heartbeats although nothing is waiting.
        let newest_applied = gauge(m::LAST_HEARTBEAT_TIMESTAMP_SECONDS)
            .into_iter()
            .chain(gauge(m::LAST_APPLIED_COMMIT_TIMESTAMP_SECONDS))
            .reduce(f64::max)
            .map(|t| (unix_now() - t).max(0.0));
        let lag = match (gauge(m::REPLICATION_LAG_BYTES), newest_applied) {
            (Some(b), _) if b <= 0.0 => "<span class=\"ok\">caught up</span>".to_string(),
            (Some(b), Some(age)) => {
                format!(
                    "{} behind · newest commit applied {age:.1} s ago",
                    human_bytes(b)
                )
            }
            (Some(b), None) => format!("{} behind", human_bytes(b)),
            (None, Some(age)) => format!("newest commit applied {age:.1} s ago"),
            (None, None) => "–".to_string(),
        };
        let redis_warnings = health.redis_warnings();
        let redis = match (health.redis_ok(), redis_warnings.len()) {
            (false, _) if health.redis_failing() => format!(
                "<span class=\"bad\">failing: {}</span>",
                escape(&health.redis_reason())
            ),
            (false, _) => flag(false, "", "not answering yet"),
            (true, 0) => flag(true, "answering", ""),
            (true, n) => format!(
                "<span class=\"warn\">answering, {n} setting{} to fix</span>",
                if n == 1 { "" } else { "s" }
            ),
        };
        let redis_settings: String = redis_warnings
            .iter()
            .map(|w| {
                format!(
                    "<tr><th></th><td class=\"warn redis-warning\">{}</td></tr>",
                    escape(w)
                )
            })
            .collect();
        let _ = write!(
            html,
            "<section id=\"source\"><h2>Source</h2><table>\
             <tr><th>reads</th><td id=\"slot\">{source}</td></tr>\
             <tr><th>postgres</th><td>{streaming}</td></tr>\
             <tr><th>redis</th><td id=\"redis\">{redis}</td></tr>{redis_settings}{targets}\
             <tr><th>ready</th><td>{ready}</td></tr>\
             <tr><th>confirmed</th><td>{confirmed}</td></tr>\
             <tr><th>lag</th><td id=\"lag\">{lag}</td></tr>\
             {fresh}\
             <tr><th>retained WAL</th><td>{retained}</td></tr>\
             <tr><th>WAL before the slot is lost</th><td>{safe}</td></tr>\
             </table></section>",
            source = escape(&self.source),
            streaming = flag(health.streaming(), "streaming", "not streaming"),
            fresh = freshness_row(health.freshness()),
            targets = target_rows(&health.targets()),
            ready = flag(health.ready(), "ready", "not ready"),
            confirmed = gauge(m::CONFIRMED_LSN_BYTES)
                .map_or_else(|| "–".to_string(), |b| format_lsn(b as u64)),
            retained = bytes(gauge(m::SLOT_RETAINED_WAL_BYTES)),
            safe =
                gauge(m::SLOT_SAFE_WAL_BYTES).map_or_else(|| "unlimited".to_string(), human_bytes),
        );
        let rates: Vec<f64> = state.samples.iter().map(|s| s.rate).collect();
        let p50: Vec<f64> = state.samples.iter().map(|s| s.p50_ms).collect();
        let p99: Vec<f64> = state.samples.iter().map(|s| s.p99_ms).collect();
        let last = state.samples.back().copied().unwrap_or_default();
        let peak = |values: &[f64]| values.iter().copied().fold(0.0_f64, f64::max);
        let _ = write!(
            html,
            "<section id=\"charts\"><h2>Last {minutes} minutes</h2>\
             <figure><figcaption>changes applied/s: {rate:.0} now · peak {rate_peak:.0}</figcaption>{rate_chart}</figure>\
             <figure><figcaption>commit to Redis ack, p50 {p50_now:.1} ms · <span class=\"p99\">p99 {p99_now:.1} ms</span> now · peak p99 {p99_peak:.1} ms</figcaption>{latency_chart}</figure>\
             </section>",
            minutes = SAMPLES as u64 * SAMPLE_EVERY.as_secs() / 60,
            rate = last.rate,
            rate_peak = peak(&rates),
            rate_chart = chart(&[(&rates, "rate")], "/s"),
            p50_now = last.p50_ms,
            p99_now = last.p99_ms,
            p99_peak = peak(&p99),
            latency_chart = chart(&[(&p50, "p50"), (&p99, "p99")], " ms"),
        );
        html.push_str("<section id=\"rules\"><h2>Tables watched</h2><table><tr><th>table</th><th>changes applied</th></tr>");
        for table in &self.tables {
            let n = state.now.per_table.get(table).copied().unwrap_or(0.0);
            let _ = write!(
                html,
                "<tr><td class=\"table\">{}</td><td>{n:.0}</td></tr>",
                escape(table)
            );
        }
        html.push_str("</table></section><section id=\"events\"><h2>Recent events</h2><table><tr><th>commit</th><th>table</th><th>op</th><th>keys</th></tr>");
        for shown in &state.events {
            let _ = write!(
                html,
                "<tr class=\"event\"><td>{}</td><td>{}</td><td>{}</td><td class=\"keys\">{}</td></tr>",
                escape(&shown.commit_time),
                escape(&shown.table),
                escape(&shown.op),
                escape(&shown.keys),
            );
        }
        html.push_str("</table></section></body></html>\n");
        html
    }
}

/// `text` cut to [`EVENT_TEXT`] characters, with an ellipsis when cut.
fn cut(text: &str) -> String {
    match text.char_indices().nth(EVENT_TEXT) {
        None => text.to_string(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

impl Reading {
    fn parse(text: &str) -> Reading {
        let mut reading = Reading::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let label = |key: &str| {
                labels.split(',').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    (k == key).then(|| v.trim_matches('"').to_string())
                })
            };
            if name == m::CHANGES_TOTAL {
                reading.changes += value;
                if let Some(table) = label("table") {
                    *reading.per_table.entry(table).or_default() += value;
                }
            } else if name == format!("{}_bucket", m::APPLY_LATENCY_SECONDS) {
                let le = label("le").and_then(|l| {
                    if l == "+Inf" {
                        Some(f64::INFINITY)
                    } else {
                        l.parse().ok()
                    }
                });
                if let Some(le) = le {
                    reading.buckets.push((le, value));
                }
            } else if labels.is_empty() {
                reading.gauges.insert(name.to_string(), value);
            }
        }
        reading.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        reading
    }
}

/// The `q` quantile of cumulative buckets (upper bound of the bucket it
/// falls in; the last finite bound for +Inf); 0 without observations.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total <= 0.0 {
        return 0.0;
    }
    let finite = buckets
        .iter()
        .rev()
        .find(|b| b.0.is_finite())
        .map_or(0.0, |b| b.0);
    buckets
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(finite, |(le, _)| if le.is_finite() { *le } else { finite })
}

/// A small line chart of `series` (same length), scaled to their maximum,
/// which the top of the chart names (in `unit`); its bottom is 0.
fn chart(series: &[(&Vec<f64>, &str)], unit: &str) -> String {
    const W: f64 = 420.0;
    const H: f64 = 80.0;
    let peak = series
        .iter()
        .flat_map(|(s, _)| s.iter().copied())
        .fold(0.0_f64, f64::max);
    let max = peak.max(1e-9);
    let scale = if peak >= 10.0 {
        format!("{peak:.0}")
    } else {
        format!("{peak:.1}")
    };
    let mut svg = format!(
        "<svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\"><rect width=\"{W}\" height=\"{H}\" class=\"bg\"/>\
         <text x=\"4\" y=\"12\" class=\"scale\">{scale}{unit}</text><text x=\"4\" y=\"{bottom}\" class=\"scale\">0</text>",
        unit = escape(unit),
        bottom = H - 4.0,
    );
    for (values, class) in series {
        if values.len() < 2 {
            continue;
        }
        let step = W / (SAMPLES - 1) as f64;
        let start = W - step * (values.len() - 1) as f64;
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!(
                    "{:.1},{:.1}",
                    start + step * i as f64,
                    H - 2.0 - (v / max) * (H - 4.0)
                )
            })
            .collect();
        let _ = write!(
            svg,
            "<polyline class=\"{class}\" fill=\"none\" points=\"{}\"/>",
            points.join(" ")
        );
    }
    svg.push_str("</svg>");
    svg
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b;
    let mut unit = 0;
    while v.abs() >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        // Whole bytes: "0 B", "512 B" (not "0.0 B").
        return format!("{v:.0} B");
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn format_lsn(bytes: u64) -> String {
    format!("{:X}/{:X}", bytes >> 32, bytes & 0xFFFF_FFFF)
}

/// One row per Redis target when there are several (`[[targets]]`).
/// The freshness sampler's line: what share of the keys it checked in
/// the last hour held the database's value (nothing when it is off).
fn freshness_row(counts: Option<(u64, u64)>) -> String {
    let Some((checked, stale)) = counts else {
        return String::new();
    };
    let text = if checked == 0 {
        "<span class=\"warn\">no cached key checked in the last hour</span>".to_string()
    } else {
        let fresh = 100.0 * (checked - stale.min(checked)) as f64 / checked as f64;
        format!(
            "<span class=\"{}\">{fresh:.3} % of {checked} keys checked in the last hour ({stale} stale)</span>",
            if stale == 0 { "ok" } else { "bad" }
        )
    };
    format!("<tr><th>fresh</th><td id=\"fresh\">{text}</td></tr>")
}

fn target_rows(targets: &[(String, bool, String)]) -> String {
    if targets.len() < 2 {
        return String::new();
    }
    targets
        .iter()
        .map(|(name, ok, reason)| {
            let state = if *ok {
                "<span class=\"ok\">answering</span>".to_string()
            } else if reason.is_empty() {
                "<span class=\"bad\">not answering</span>".to_string()
            } else {
                format!("<span class=\"bad\">{}</span>", escape(reason))
            };
            format!(
                "<tr><th>target {}</th><td class=\"target\">{state}</td></tr>",
                escape(name)
            )
        })
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// HTML text escaping.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}\
h1{font-size:20px}h1 small{color:#6b7280;font-weight:normal}h2{font-size:15px;margin:18px 0 6px}\
table{border-collapse:collapse}th,td{text-align:left;padding:3px 12px 3px 0;vertical-align:top}\
th{color:#6b7280;font-weight:normal}.ok{color:#0a7d38}.bad{color:#b42318;font-weight:bold}.warn{color:#b45309}\
svg .scale{font-size:10px;fill:#6b7280}\
figure{display:inline-block;margin:0 24px 0 0}figcaption{color:#374151;margin-bottom:4px}\
svg .bg{fill:#fff;stroke:#d1d5db}polyline{stroke-width:1.5}.rate,.p50{stroke:#2563eb}.p99,span.p99{stroke:#d97706;color:#b45309}\
td{white-space:nowrap}.keys{white-space:normal;font-family:ui-monospace,monospace;font-size:12px}.table{font-family:ui-monospace,monospace}";

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE pgci_changes_total counter\n\
pgci_changes_total{table=\"public.profiles\",op=\"update\"} 10\n\
pgci_changes_total{table=\"public.user_tokens\",op=\"update\"} 5\n\
pgci_apply_latency_seconds_bucket{le=\"0.001\"} 5\n\
pgci_apply_latency_seconds_bucket{le=\"0.01\"} 14\n\
pgci_apply_latency_seconds_bucket{le=\"+Inf\"} 15\n\
pgci_slot_retained_wal_bytes 2048\n";

    #[test]
    fn readings_give_rates_percentiles_and_counts() {
        let r = Reading::parse(TEXT);
        assert_eq!(r.changes, 15.0);
        assert_eq!(r.per_table.get("public.profiles"), Some(&10.0));
        assert_eq!(quantile(&r.buckets, 0.5), 0.01);
        assert_eq!(
            quantile(&r.buckets, 0.99),
            0.01,
            "+Inf reads as the last bound"
        );
        assert_eq!(quantile(&r.buckets, 0.2), 0.001);
        assert_eq!(r.gauges.get("pgci_slot_retained_wal_bytes"), Some(&2048.0));
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn the_page_escapes_what_it_shows() {
        let board = Board::new(
            "slot <x>".into(),
            vec!["public.profiles".into(), "public.user_tokens".into()],
            true,
        );
        board.sample(TEXT);
        board.sample(&TEXT.replace("} 10\n", "} 30\n"));
        board.event(r#"{"table":"public.profiles","op":"update","keys":["profile:user:<1>"],"commit_time":"t"}"#);
        let html = board.render(&Health::default());
        assert!(html.contains("slot &lt;x&gt;"));
        assert!(html.contains("profile:user:&lt;1&gt;"));
        assert!(html.contains("changes applied/s: 10"), "{html}");
        assert!(html.contains("<polyline") || html.contains("<svg"));
        assert!(html.contains("<td class=\"table\">public.user_tokens</td><td>5</td>"));
    }

    /// Lag reads "caught up" when no WAL is behind (an idle stream's last
    /// heartbeat ages between heartbeats: that is not lag), bytes and the
    /// newest applied commit's age when some is; sizes print whole bytes.
    #[test]
    fn lag_is_caught_up_when_nothing_is_behind() {
        let board = Board::new("s".into(), vec![], false);
        let old = unix_now() - 9.0;
        board.sample(&format!(
            "{} 0\n{} {old}\n",
            m::REPLICATION_LAG_BYTES,
            m::LAST_HEARTBEAT_TIMESTAMP_SECONDS
        ));
        let html = board.render(&Health::default());
        assert!(
            html.contains("<td id=\"lag\"><span class=\"ok\">caught up</span></td>"),
            "{html}"
        );
        board.sample(&format!(
            "{} 2048\n{} {old}\n",
            m::REPLICATION_LAG_BYTES,
            m::LAST_HEARTBEAT_TIMESTAMP_SECONDS
        ));
        let html = board.render(&Health::default());
        assert!(
            html.contains("2.0 kB behind · newest commit applied 9."),
            "{html}"
        );
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1500.0), "1.5 kB");
    }

    /// What `status` warns about Redis's settings, the page shows too
    /// (amber, not green), and clears once the setting is fixed.
    #[test]
    fn redis_settings_to_fix_are_on_the_page() {
        let board = Board::new("s".into(), vec![], false);
        let health = Arc::new(Health::default());
        health.add_target("redis").ok();
        let html = board.render(&health);
        assert!(
            html.contains("<td id=\"redis\"><span class=\"ok\">answering</span>"),
            "{html}"
        );
        health.set_redis_warnings("127.0.0.1:6379", vec!["no maxmemory: <set it>".into()]);
        let html = board.render(&health);
        assert!(html.contains("answering, 1 setting to fix"), "{html}");
        assert!(html.contains("no maxmemory: &lt;set it&gt;"), "{html}");
        health.set_redis_warnings("127.0.0.1:6379", Vec::new());
        assert!(!board.render(&health).contains("to fix"));
        // Failing, the page says why, as /readyz does.
        let failing = Arc::new(Health::default());
        failing
            .add_target("redis")
            .failing("redis is not answering (connection refused)");
        let html = board.render(&failing);
        assert!(
            html.contains("failing: redis is not answering (connection refused)"),
            "{html}"
        );
    }

    /// Each chart names its scale (the peak at the top, 0 at the bottom)
    /// and the caption the peak over the window.
    #[test]
    fn charts_name_their_scale_and_peak() {
        let board = Board::new("s".into(), vec![], false);
        board.sample(TEXT);
        board.sample(&TEXT.replace("} 10\n", "} 690\n"));
        board.sample(&TEXT.replace("} 10\n", "} 700\n"));
        let html = board.render(&Health::default());
        assert!(
            html.contains("changes applied/s: 5 now · peak 340"),
            "{html}"
        );
        assert!(html.contains("class=\"scale\">340/s</text>"), "{html}");
    }

    /// By default the page shows how many keys an event touched, not the
    /// keys (they hold row values and the page has no authentication);
    /// shown or not, a huge event keeps the page small.
    #[test]
    fn keys_are_hidden_by_default_and_events_are_cut() {
        let hidden = Board::new("s".into(), vec![], false);
        hidden.event(r#"{"table":"public.profiles","op":"update","keys":["profile:username:alice","b"],"commit_time":"t"}"#);
        let html = hidden.render(&Health::default());
        assert!(!html.contains("alice"), "{html}");
        assert!(html.contains(">2 keys<"), "{html}");
        let shown = Board::new("s".into(), vec![], true);
        let huge = format!(
            r#"{{"table":"t","op":"update","keys":["{}"],"keys_omitted":3,"commit_time":"t"}}"#,
            "x".repeat(1 << 20)
        );
        for _ in 0..EVENTS + 5 {
            shown.event(&huge);
        }
        let html = shown.render(&Health::default());
        assert!(html.len() < 64 << 10, "{}", html.len());
        assert!(html.contains("…"), "cut");
    }
}
