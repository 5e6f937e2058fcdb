//! The results: one summary line per policy, a Markdown table against the
//! plan's three targets, and a PNG of hit rate and stale reads over time.

use std::path::Path;

use plotters::prelude::*;

use crate::policy::Policy;
use crate::sim::{Series, Tally};

/// One policy's figures.
pub struct Outcome {
    /// The policy.
    pub policy: Policy,
    /// What its reads saw.
    pub tally: Tally,
    /// Per second, for the plot.
    pub series: std::sync::Arc<Series>,
    /// Seconds it ran.
    pub seconds: u64,
    /// The policy whose run these readers shared (`--beside`): half the
    /// request loops read this way, beside the other policy's.
    pub beside: Option<Policy>,
}

impl Outcome {
    /// The policy's name, and whose run it shared.
    pub fn name(&self) -> String {
        match self.beside {
            Some(other) => format!("{}(beside-{})", self.policy.name(), other.name()),
            None => self.policy.name().to_string(),
        }
    }

    fn pct(&self, n: u64) -> f64 {
        100.0 * n as f64 / self.tally.requests.max(1) as f64
    }

    /// Share of reads served from the cache, %.
    pub fn hit_rate(&self) -> f64 {
        self.pct(self.tally.hits)
    }

    /// Database queries per read.
    pub fn db_per_request(&self) -> f64 {
        self.tally.db_queries as f64 / self.tally.requests.max(1) as f64
    }

    /// Stale reads, %.
    pub fn stale_pct(&self) -> f64 {
        self.pct(self.tally.stale)
    }

    /// Stale own reads (right after the reader's write), %.
    pub fn own_stale_pct(&self) -> f64 {
        100.0 * self.tally.own_stale as f64 / self.tally.own_reads.max(1) as f64
    }

    /// Own reads that queried PostgreSQL, %.
    pub fn own_queried_pct(&self) -> f64 {
        100.0 * self.tally.own_queried as f64 / self.tally.own_reads.max(1) as f64
    }

    /// An own read's mean latency, ms.
    pub fn own_mean_ms(&self) -> f64 {
        self.tally.own_latency_us as f64 / 1000.0 / self.tally.own_reads.max(1) as f64
    }

    /// Mean latency, ms.
    pub fn mean_ms(&self) -> f64 {
        let l = &self.tally.latencies_us;
        l.iter().map(|&u| f64::from(u)).sum::<f64>() / l.len().max(1) as f64 / 1000.0
    }

    /// The `p` quantile of latency, ms.
    pub fn quantile_ms(&self, sorted: &[u32], p: f64) -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let i = ((sorted.len() - 1) as f64 * p).round() as usize;
        f64::from(sorted[i]) / 1000.0
    }

    /// The app's writes' latency (statement and commit): p50 and p99, ms.
    pub fn write_ms(&self) -> (f64, f64) {
        let mut sorted = self.tally.commit_latencies_us.clone();
        sorted.sort_unstable();
        (
            self.quantile_ms(&sorted, 0.50),
            self.quantile_ms(&sorted, 0.99),
        )
    }

    /// The one-line summary.
    pub fn line(&self) -> String {
        let mut sorted = self.tally.latencies_us.clone();
        sorted.sort_unstable();
        let (write_p50, write_p99) = self.write_ms();
        format!(
            "policy={} hit_rate={:.1}% l1_hit_rate={:.1}% db_queries_per_request={:.3} p50_ms={:.3} p95_ms={:.3} p99_ms={:.3} stale_read_pct={:.3}% worst_stale_s={:.3} own_read_stale_pct={:.2}% own_read_db_pct={:.1}% own_read_mean_ms={:.3} own_reads={} requests={} rps={:.0} write_p50_ms={:.3} write_p99_ms={:.3}",
            self.name(),
            self.hit_rate(),
            self.pct(self.tally.l1_hits),
            self.db_per_request(),
            self.quantile_ms(&sorted, 0.50),
            self.quantile_ms(&sorted, 0.95),
            self.quantile_ms(&sorted, 0.99),
            self.stale_pct(),
            self.tally.worst_stale.as_secs_f64(),
            self.own_stale_pct(),
            self.own_queried_pct(),
            self.own_mean_ms(),
            self.tally.own_reads,
            self.tally.requests,
            self.tally.requests as f64 / self.seconds.max(1) as f64,
            write_p50,
            write_p99,
        ) + &self.stale_line()
            + &self.cut_line()
    }

    /// When there were stale reads: how many L1 answered, and how long
    /// their pages had been superseded (p50, p99, max).
    fn stale_line(&self) -> String {
        let t = &self.tally;
        if t.stale_ages_us.is_empty() {
            return String::new();
        }
        let mut ages = t.stale_ages_us.clone();
        ages.sort_unstable();
        format!(
            " stale_from_l1={} stale_age_p50_ms={:.3} stale_age_p99_ms={:.3} stale_age_max_ms={:.3}",
            t.stale_from_l1,
            self.quantile_ms(&ages, 0.50),
            self.quantile_ms(&ages, 0.99),
            f64::from(*ages.last().unwrap_or(&0)) / 1000.0,
        )
    }

    /// The reads right after a cut of L1's connection, when there were any.
    fn cut_line(&self) -> String {
        let t = &self.tally;
        if t.cut_reads == 0 {
            return String::new();
        }
        format!(
            " reads_after_l1_cuts={} of_them_from_l1={} of_them_stale={}",
            t.cut_reads, t.cut_l1_hits, t.cut_stale
        )
    }
}

/// The Markdown table, with each cached policy against no cache and the
/// plan's targets (50 % fewer queries, 40 % faster, 80 % hits).
pub fn table(outcomes: &[Outcome]) -> String {
    let base = outcomes.iter().find(|o| o.policy == Policy::NoCache);
    let mut out = String::from(
        "| policy | hit rate | DB queries / request (vs no cache) | mean ms (vs no cache) | p50 / p95 / p99 ms | stale reads | worst staleness | stale own reads | app writes p50 / p99 ms | targets met (queries −50 %, latency −40 %, hits ≥ 80 %) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let mut sorted = o.tally.latencies_us.clone();
        sorted.sort_unstable();
        let (queries_vs, latency_vs, targets) = match base {
            Some(b) if o.policy != Policy::NoCache => {
                let q = 1.0 - o.db_per_request() / b.db_per_request().max(f64::MIN_POSITIVE);
                let l = 1.0 - o.mean_ms() / b.mean_ms().max(f64::MIN_POSITIVE);
                let met = |ok: bool| if ok { "yes" } else { "no" };
                (
                    format!(" ({:+.0} %)", -100.0 * q),
                    format!(" ({:+.0} %)", -100.0 * l),
                    format!(
                        "{} / {} / {}",
                        met(q >= 0.5),
                        met(l >= 0.4),
                        met(o.hit_rate() >= 80.0)
                    ),
                )
            }
            _ => (String::new(), String::new(), "baseline".to_string()),
        };
        out.push_str(&format!(
            "| {} | {} | {:.3}{} | {:.3}{} | {:.3} / {:.3} / {:.3} | {:.3} % ({} of {}) | {:.3} s | {:.2} % ({} of {}) | {:.2} / {:.2} | {} |\n",
            o.name(),
            match o.tally.l1_hits {
                0 => format!("{:.1} %", o.hit_rate()),
                _ => format!("{:.1} % (L1 {:.1} %)", o.hit_rate(), o.pct(o.tally.l1_hits)),
            },
            o.db_per_request(),
            queries_vs,
            o.mean_ms(),
            latency_vs,
            o.quantile_ms(&sorted, 0.50),
            o.quantile_ms(&sorted, 0.95),
            o.quantile_ms(&sorted, 0.99),
            o.stale_pct(),
            o.tally.stale,
            o.tally.requests,
            o.tally.worst_stale.as_secs_f64(),
            o.own_stale_pct(),
            o.tally.own_stale,
            o.tally.own_reads,
            o.write_ms().0,
            o.write_ms().1,
            targets,
        ));
    }
    out
}

const COLORS: [RGBColor; 5] = [
    RGBColor(120, 120, 120),
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Draws hit rate (top) and stale reads (bottom) per second, one line per
/// policy, into `path`; `font` is a TrueType file for the labels.
pub fn plot(outcomes: &[Outcome], path: &Path, font: &Path) -> Result<(), String> {
    let bytes = std::fs::read(font).map_err(|e| format!("font {}: {e}", font.display()))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| format!("font {}: not a TrueType font", font.display()))?;
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(450);
    let seconds = outcomes.iter().map(|o| o.seconds).max().unwrap_or(1) as f64;
    let (hits, stale) = (top, bottom);
    let mut hit_chart = ChartBuilder::on(&hits)
        .caption("hit rate per second, %", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..seconds, 0.0..100.0)
        .map_err(|e| e.to_string())?;
    hit_chart
        .configure_mesh()
        .x_desc("seconds since the policy started")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    // Stale reads span four orders of magnitude between policies: a log
    // scale, with seconds without a stale read drawn at its floor.
    let floor = 0.001;
    let mut stale_chart = ChartBuilder::on(&stale)
        .caption(
            "stale reads per second, % of reads (log scale; none drawn at 0.001)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..seconds, (floor..100.0).log_scale())
        .map_err(|e| e.to_string())?;
    stale_chart
        .configure_mesh()
        .x_desc("seconds since the policy started")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, o) in outcomes.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = o.series.points(o.seconds);
        let legend = move |(x, y): (i32, i32)| {
            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
        };
        hit_chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(t, hit, _)| (t, hit)),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(o.name())
            .legend(legend);
        stale_chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(t, _, stale)| (t, stale.max(floor))),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(o.name())
            .legend(legend);
    }
    hit_chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;
    stale_chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
