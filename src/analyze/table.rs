//! The text tables of `fapool analyze`: per category every strategy's
//! latency medians with their 95 % confidence intervals, throughput (per
//! GPU too), goodput, the improvement over the baseline and whether the
//! point is stable; its communication breakdown and the planner's
//! predictions; then one summary table of the stored summaries, which
//! `scripts/results_summary.py` prints identically from h5py.
//!
//! Formatting only: the figures come from [`super::figures`].

use super::figures::{CategoryFigures, RunFigures};
use super::slo::Slo;
use super::stats::{Interval, CV_LIMIT, MIN_BATCHES};
use crate::comm::Category;
use crate::results::StoredSummary;
use std::io::{self, Write};

/// Plain-number formatting with about four significant digits.
pub(crate) fn num(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        "n/a".into()
    } else if a == 0.0 {
        "0".into()
    // Thresholds sit just below the powers of ten so that a value which
    // rounds up to one (0.99996 → "1.00") takes the wider branch.
    } else if a >= 999.95 {
        format!("{x:.0}")
    } else if a >= 99.995 {
        format!("{x:.1}")
    } else if a >= 0.99995 {
        format!("{x:.2}")
    } else if a < 9.9995e-4 {
        format!("{x:.2e}")
    } else {
        let decimals = (2.0 - a.log10().floor()).clamp(0.0, 12.0) as usize;
        format!("{x:.decimals$}")
    }
}

pub(crate) fn ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_finite() => format!("{r:.2}×"),
        Some(_) => "n/a".into(),
        None => "-".into(),
    }
}

/// "lo–hi" in milliseconds.
fn ci_ms(ci: &Interval) -> String {
    format!("{}–{}", num(ci.lo * 1e3), num(ci.hi * 1e3))
}

/// A plain-text table: the first `left` columns left-aligned (names), the
/// rest right-aligned (numbers).
pub(crate) struct Table {
    header: Vec<String>,
    left: usize,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str], left: usize) -> Self {
        Self { header: header.iter().map(|h| h.to_string()).collect(), left, rows: Vec::new() }
    }

    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| -> String {
            let padded: Vec<String> = cells.iter().zip(&widths).enumerate().map(|(i, (c, &w))| if i < self.left { format!("{c:<w$}") } else { format!("{c:>w$}") }).collect();
            padded.join("  ").trim_end().to_string()
        };
        writeln!(out, "{}", line(&self.header))?;
        let total = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        writeln!(out, "{}", "-".repeat(total))?;
        for row in &self.rows {
            writeln!(out, "{}", line(row))?;
        }
        Ok(())
    }
}

fn label(name: &str, c: &CategoryFigures) -> String {
    if c.partial {
        format!("{name}*")
    } else {
        name.to_string()
    }
}

/// Every table of one run.
pub fn write_run(f: &RunFigures, slo: Option<&Slo>, out: &mut dyn Write) -> io::Result<()> {
    let (run, p) = (f.run, &f.run.provenance);
    writeln!(out, "== {} ==", run.path.display())?;
    let status = run.status.map_or("unknown".to_string(), |s| s.to_string());
    writeln!(out, "status {status}; started {}{}; fapool {} ({})", p.started_utc, run.ended_utc.as_ref().map_or(String::new(), |e| format!(", ended {e}")), p.tool_version, p.git_commit)?;
    let mut hosts = p.hosts.clone();
    hosts.sort();
    hosts.dedup();
    writeln!(out, "job {}; {} ranks on {} host(s); {}; backend {}, transport {}, dtype {}", f.meta.job, p.world_size, hosts.len(), f.meta.device, p.backend, p.transport, f.meta.dtype)?;
    if let Some(slo) = slo {
        writeln!(out, "goodput: share of sequences meeting {slo}")?;
    }

    let mut any_partial = false;
    for category in run.category_order() {
        let entries: Vec<(&str, &str, &CategoryFigures)> = f.strategies.iter().filter_map(|s| Some((s.info.name.as_str(), s.info.kind.as_str(), s.category(&category)?))).collect();
        if entries.is_empty() {
            continue;
        }
        let lengths: Vec<u32> = entries.iter().flat_map(|e| e.2.data.batches.iter().map(|b| b.seq_len)).collect();
        let range = match (lengths.iter().min(), lengths.iter().max()) {
            (Some(lo), Some(hi)) if lo == hi => format!("sequence length {lo}"),
            (Some(lo), Some(hi)) => format!("sequence lengths {lo}–{hi}"),
            _ => String::new(),
        };
        writeln!(out)?;
        writeln!(out, "-- {category}: {range} --")?;
        any_partial |= entries.iter().any(|e| e.2.partial);
        write_comparison(&entries, slo.is_some(), out)?;
        writeln!(out)?;
        writeln!(out, "communication ({category})")?;
        write_communication(&entries, out)?;
        writeln!(out)?;
        writeln!(out, "where the time goes ({category})")?;
        write_idle(&entries, out)?;
        write_routing(&entries, &category, out)?;
        write_targets(f, &category, out)?;
        write_predictions(&entries, &category, out)?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "medians over batches with a bootstrap 95 % CI; trust: `ok`, or why the point is unstable (fewer than {MIN_BATCHES} batches, or a coefficient of variation above {:.0} %)",
        CV_LIMIT * 100.0
    )?;
    if any_partial {
        writeln!(out, "* no stored summary (the run stopped before the category ended): figures from the recorded")?;
        writeln!(out, "  batches, with the category's wall time taken as the sum of their end-to-end times")?;
    }
    writeln!(out)?;
    writeln!(out, "summary")?;
    write_summary(f, out)?;
    writeln!(out)?;
    Ok(())
}

fn write_comparison(entries: &[(&str, &str, &CategoryFigures)], goodput: bool, out: &mut dyn Write) -> io::Result<()> {
    let mut header = vec!["strategy", "kind", "batches", "TTFT p50 ms", "95% CI", "TPOT p50 ms", "95% CI", "TPOT p90", "TPOT p99", "TPS", "tok/s/GPU", "tok/s/seq"];
    if goodput {
        header.push("goodput %");
    }
    header.extend(["TPOT ×", "TPS ×", "trust"]);
    let mut t = Table::new(&header, 2);
    for (name, kind, c) in entries {
        let mut row = vec![
            label(name, c),
            kind.to_string(),
            c.tpot.n.to_string(),
            num(c.ttft.p50 * 1e3),
            ci_ms(&c.ttft.p50_ci),
            num(c.tpot.p50 * 1e3),
            ci_ms(&c.tpot.p50_ci),
            num(c.tpot.p90 * 1e3),
            num(c.tpot.p99 * 1e3),
            num(c.stored.summary.tps),
            num(c.tps_per_gpu),
            num(c.tokens_per_s_per_sequence),
        ];
        if goodput {
            row.push(c.goodput.map_or("n/a".into(), |g| format!("{:.1}", g * 100.0)));
        }
        row.extend([ratio(c.tpot_x), ratio(c.tps_x), c.unstable.clone().unwrap_or_else(|| "ok".into())]);
        t.rows.push(row);
    }
    t.write(out)
}

fn write_communication(entries: &[(&str, &str, &CategoryFigures)], out: &mut dyn Write) -> io::Result<()> {
    let mut t = Table::new(&["strategy", "category", "rank-s", "busiest s", "GB", "calls", "GB/s", "% wall"], 2);
    for (name, _, c) in entries {
        let a = &c.stored.aggregates;
        let mut any = false;
        for cat in Category::ALL {
            let Some(agg) = a.comm_of(cat).filter(|g| g.calls > 0) else {
                continue;
            };
            any = true;
            let share = if a.active_wall_s > 0.0 { agg.seconds_sum / a.active_wall_s * 100.0 } else { 0.0 };
            t.rows.push(vec![
                label(name, c),
                cat.name().to_string(),
                num(agg.seconds_sum),
                num(agg.seconds_max_rank),
                num(agg.bytes as f64 / 1e9),
                agg.calls.to_string(),
                agg.gb_per_s().map_or("n/a".into(), num),
                format!("{share:.1}"),
            ]);
        }
        if !any {
            t.rows.push(vec![label(name, c), "(none)".into()]);
        }
    }
    t.write(out)
}

/// A role's family: the role without its indices (`base1` → `base`,
/// `stage0-tp1` → `stage-tp`).
pub(crate) fn role_family(role: &str) -> String {
    role.chars().filter(|c| !c.is_ascii_digit()).collect()
}

/// Per role family: the rank rows' compute and waiting time and idle share
/// (mean and worst over ranks and batches; a rank outside the batch counts
/// as wholly idle).
pub(crate) fn idle_by_role(ranks: &[crate::metrics::RankRecord]) -> Vec<(String, usize, f64, f64, f64, f64)> {
    let mut by: std::collections::BTreeMap<String, Vec<&crate::metrics::RankRecord>> = std::collections::BTreeMap::new();
    for r in ranks {
        by.entry(role_family(&r.role)).or_default().push(r);
    }
    by.into_iter()
        .map(|(family, rows)| {
            let n = rows.len() as f64;
            let shares: Vec<f64> = rows.iter().map(|r| r.idle_share()).collect();
            let ranks: std::collections::BTreeSet<u32> = rows.iter().map(|r| r.world_rank).collect();
            (family, ranks.len(), rows.iter().map(|r| r.compute_s).sum(), rows.iter().map(|r| r.wait_s).sum(), shares.iter().sum::<f64>() / n, shares.iter().copied().fold(0.0, f64::max))
        })
        .collect()
}

fn write_idle(entries: &[(&str, &str, &CategoryFigures)], out: &mut dyn Write) -> io::Result<()> {
    let mut t = Table::new(&["strategy", "role", "ranks", "compute s", "waiting s", "idle %", "worst idle %"], 2);
    for (name, _, c) in entries {
        for (family, ranks, compute, wait, mean, worst) in idle_by_role(&c.data.ranks) {
            t.rows.push(vec![label(name, c), family, ranks.to_string(), num(compute), num(wait), format!("{:.1}", mean * 100.0), format!("{:.1}", worst * 100.0)]);
        }
    }
    t.write(out)
}

/// Per layer and phase of every strategy with experts: the assignments,
/// the share dropped by capacity, and the busiest expert and rank against
/// the mean (1.00× is an even load).
fn write_routing(entries: &[(&str, &str, &CategoryFigures)], category: &str, out: &mut dyn Write) -> io::Result<()> {
    let mut t = Table::new(&["strategy", "layer", "phase", "assignments", "dropped %", "expert max", "expert mean", "expert imb", "rank max", "rank mean", "rank imb"], 3);
    for (name, _, c) in entries {
        for r in &c.routing {
            let dropped = if r.assignments > 0 { r.dropped as f64 / r.assignments as f64 * 100.0 } else { 0.0 };
            t.rows.push(vec![
                label(name, c),
                r.layer.to_string(),
                (if r.decode { "decode" } else { "prefill" }).to_string(),
                r.assignments.to_string(),
                format!("{dropped:.2}"),
                num(r.expert_max),
                num(r.expert_mean),
                ratio(Some(r.expert_imbalance())),
                num(r.rank_max),
                num(r.rank_mean),
                ratio(Some(r.rank_imbalance())),
            ]);
        }
    }
    if !t.rows.is_empty() {
        writeln!(out)?;
        writeln!(out, "expert routing ({category}): rows per expert and per rank holding experts, summed over batches")?;
        t.write(out)?;
    }
    Ok(())
}

/// A strategy's plan targets against the measurement: input plus output
/// tokens per ms per GPU (the category's TPS over its GPUs) and the
/// largest TTFT of any batch against the TTFT limit.
fn write_targets(f: &RunFigures, category: &str, out: &mut dyn Write) -> io::Result<()> {
    let mut t = Table::new(&["strategy", "target", "plan", "measured", "outcome"], 2);
    for s in f.strategies.iter().filter(|s| s.targets.any()) {
        let Some(c) = s.category(category) else { continue };
        let verdict = |met: bool| if met { "met" } else { "missed" }.to_string();
        if let Some(target) = s.targets.tokens_per_ms_per_gpu {
            let measured = c.tps_per_gpu / 1e3;
            t.rows.push(vec![label(&s.info.name, c), "tokens/ms/GPU ≥".into(), num(target), num(measured), verdict(measured >= target)]);
        }
        if let Some(limit) = s.targets.ttft_limit_s {
            let worst = c.data.batches.iter().map(|b| b.ttft_s).fold(0.0, f64::max);
            t.rows.push(vec![label(&s.info.name, c), "TTFT (worst batch) ≤ s".into(), num(limit), num(worst), verdict(worst <= limit)]);
        }
    }
    if !t.rows.is_empty() {
        writeln!(out)?;
        writeln!(out, "plan targets ({category})")?;
        t.write(out)?;
    }
    Ok(())
}

/// The measured value a prediction of this name is compared with.
pub(crate) fn measured_value(name: &str, s: &StoredSummary) -> Option<f64> {
    let m = &s.summary;
    match name {
        "ttft_s" => Some(m.ttft.mean),
        "tpot_s" => Some(m.tpot.mean),
        "e2e_s" => Some(m.e2e.mean),
        "paper_tpot_s" => Some(m.paper_tpot_mean),
        "tps" => Some(m.tps),
        "peak_memory_bytes" => s.aggregates.peak_memory_max_bytes.map(|b| b as f64),
        _ => None,
    }
}

fn write_predictions(entries: &[(&str, &str, &CategoryFigures)], category: &str, out: &mut dyn Write) -> io::Result<()> {
    let mut t = Table::new(&["strategy", "quantity", "predicted", "measured", "error %"], 2);
    for (name, _, c) in entries {
        for (quantity, &predicted) in &c.data.predictions {
            let actual = measured_value(quantity, &c.stored);
            let error = actual.filter(|a| *a != 0.0).map(|a| format!("{:+.1}", (predicted - a) / a * 100.0));
            t.rows.push(vec![name.to_string(), quantity.clone(), num(predicted), actual.map_or("-".into(), num), error.unwrap_or_else(|| "-".into())]);
        }
    }
    if !t.rows.is_empty() {
        writeln!(out)?;
        writeln!(out, "planner prediction vs measurement ({category})")?;
        t.write(out)?;
        // What the figures rest on (the cost model's source, assumed routing).
        for (name, _, c) in entries {
            let notes: Vec<String> = c.data.prediction_notes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            if !notes.is_empty() {
                writeln!(out, "  {name}: {}", notes.join("; "))?;
            }
        }
    }
    Ok(())
}

/// The stored summaries of every (strategy, category), one row each. This
/// table is the contract of `scripts/results_summary.py`: change both together.
fn write_summary(f: &RunFigures, out: &mut dyn Write) -> io::Result<()> {
    let mut t = Table::new(&["strategy", "category", "batches", "TTFT ms", "TPOT ms", "TPOT p50", "TPOT p99", "TPS", "tok/s/GPU", "peak GB", "est GB", "comm %", "J/token"], 2);
    for s in &f.strategies {
        for c in s.categories.iter().filter(|c| !c.partial) {
            let (m, a) = (&c.stored.summary, &c.stored.aggregates);
            t.rows.push(vec![
                s.info.name.clone(),
                c.data.name.clone(),
                m.batches.to_string(),
                num(m.ttft.mean * 1e3),
                num(m.tpot.mean * 1e3),
                num(m.tpot.p50 * 1e3),
                num(m.tpot.p99 * 1e3),
                num(m.tps),
                num(m.tps / s.gpus.max(1) as f64),
                a.peak_memory_max_gb().map_or("n/m".into(), num),
                num(a.memory_estimate_max_bytes as f64 / 1e9),
                format!("{:.1}", a.comm_share() * 100.0),
                a.energy_j_per_token(m.total_tokens).map_or("n/m".into(), num),
            ]);
        }
    }
    t.write(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_share_is_summed_per_role_family() {
        use crate::metrics::RankRecord;
        let row = |rank: u32, role: &str, active: bool, compute_s: f64, wait_s: f64| RankRecord {
            world_rank: rank,
            role: role.into(),
            active,
            wall_s: compute_s + wait_s,
            compute_s,
            wait_s,
            ..Default::default()
        };
        let ranks = [row(0, "base0", true, 3.0, 1.0), row(1, "base1", true, 1.0, 3.0), row(2, "pool0", true, 2.0, 2.0), row(3, "pool1", false, 0.0, 4.0), row(0, "base0", true, 4.0, 0.0)];
        let got = idle_by_role(&ranks);
        assert_eq!(got.len(), 2);
        let (family, n, compute, wait, mean, worst) = got[0].clone();
        assert_eq!((family.as_str(), n, compute, wait), ("base", 2, 8.0, 4.0));
        assert!((mean - (0.25 + 0.75 + 0.0) / 3.0).abs() < 1e-12 && worst == 0.75);
        // The inactive pool rank is wholly idle.
        assert_eq!((got[1].0.as_str(), got[1].1, got[1].4, got[1].5), ("pool", 2, 0.75, 1.0));
        assert_eq!(role_family("stage0-tp1"), "stage-tp");
    }

    #[test]
    fn numbers_keep_about_four_significant_digits() {
        assert_eq!(num(12.3456), "12.35");
        assert_eq!(num(0.012345), "0.0123");
        assert_eq!(num(4567.8), "4568");
        assert_eq!(num(0.9999999999999998), "1.00");
        assert_eq!(num(8e-6), "8.00e-6");
        assert_eq!(num(f64::NAN), "n/a");
    }

    #[test]
    fn columns_align_names_left_and_numbers_right() {
        let mut t = Table::new(&["name", "value"], 1);
        t.rows.push(vec!["a".into(), "1".into()]);
        t.rows.push(vec!["long name".into(), "12.5".into()]);
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().nth(2), Some("a              1"));
        assert_eq!(text.lines().nth(3), Some("long name   12.5"));
    }
}
