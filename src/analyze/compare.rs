//! `fapool analyze --compare A.h5 B.h5`: lines up the strategies and
//! categories of two runs by name and prints, per metric, the relative
//! change from A to B with a bootstrap 95 % confidence interval, flagging
//! changes larger than the noise (an interval that excludes zero).
//!
//! Batches pair up when both runs hold the same batches (same indices,
//! lengths and sequence counts: the same workload seed); the bootstrap then
//! resamples pairs, which removes the spread between lengths from the
//! noise. Otherwise each run is resampled on its own. Runs of different
//! models or dtypes are refused unless forced: their difference is not a
//! measurement of the code.

use super::figures::{RunFigures, RunMeta};
use super::stats::{bootstrap_indices, bootstrap_two, quantile, Interval, BOOTSTRAP_RESAMPLES};
use super::table::{num, Table};
use crate::metrics::BatchRecord;
use std::io::{self, Write};

/// A metric: name, unit, scale to that unit, and its value over batches.
struct Metric {
    name: &'static str,
    unit: &'static str,
    scale: f64,
    of: fn(&[&BatchRecord]) -> f64,
}

fn column(b: &[&BatchRecord], f: fn(&BatchRecord) -> f64) -> Vec<f64> {
    b.iter().map(|x| f(x)).collect()
}

const METRICS: [Metric; 5] = [
    Metric { name: "TTFT p50", unit: "ms", scale: 1e3, of: |b| quantile(&column(b, |x| x.ttft_s), 0.5) },
    Metric { name: "TPOT p50", unit: "ms", scale: 1e3, of: |b| quantile(&column(b, |x| x.tpot_s()), 0.5) },
    Metric { name: "TPOT p90", unit: "ms", scale: 1e3, of: |b| quantile(&column(b, |x| x.tpot_s()), 0.9) },
    Metric { name: "E2E p50", unit: "ms", scale: 1e3, of: |b| quantile(&column(b, |x| x.e2e_s), 0.5) },
    Metric {
        name: "TPS",
        unit: "tokens/s",
        scale: 1.0,
        of: |b| {
            let wall: f64 = b.iter().map(|x| x.e2e_s).sum();
            b.iter().map(|x| x.total_tokens()).sum::<u64>() as f64 / wall
        },
    },
];

/// Why two runs may not be compared, if they may not.
pub fn unlike(a: &RunMeta, b: &RunMeta) -> Option<String> {
    let shape = |m: &RunMeta| {
        m.model.clone().map(|mut c| {
            // The weights' seed changes no timing.
            c.weights_seed = 0;
            c
        })
    };
    match (shape(a), shape(b)) {
        (Some(x), Some(y)) if x != y => return Some(format!("different models: {x:?} against {y:?}")),
        _ => {}
    }
    (a.dtype != b.dtype).then(|| format!("different dtypes: {} against {}", a.dtype, b.dtype))
}

/// The two runs' batches paired by index, when they are the same batches.
fn paired<'x>(a: &'x [BatchRecord], b: &'x [BatchRecord]) -> Option<(Vec<&'x BatchRecord>, Vec<&'x BatchRecord>)> {
    if a.len() != b.len() {
        return None;
    }
    let mut pa: Vec<&BatchRecord> = a.iter().collect();
    let mut pb: Vec<&BatchRecord> = b.iter().collect();
    pa.sort_by_key(|x| x.batch_index);
    pb.sort_by_key(|x| x.batch_index);
    pa.iter().zip(&pb).all(|(x, y)| (x.batch_index, x.seq_len, x.num_sequences) == (y.batch_index, y.seq_len, y.num_sequences)).then_some((pa, pb))
}

/// One metric's change.
#[derive(Clone, Debug)]
pub struct Change {
    pub strategy: String,
    pub category: String,
    pub metric: &'static str,
    pub a: f64,
    pub b: f64,
    /// B / A − 1.
    pub change: f64,
    pub ci: Interval,
    pub paired: bool,
}

impl Change {
    /// Larger than the noise: the 95 % interval excludes zero.
    pub fn significant(&self) -> bool {
        self.ci.lo > 0.0 || self.ci.hi < 0.0
    }
}

/// Every metric's change from `a` to `b` for the strategies and categories both hold.
pub fn changes(a: &RunFigures, b: &RunFigures) -> (Vec<Change>, Vec<String>) {
    let mut out = Vec::new();
    let mut unmatched = Vec::new();
    for sa in &a.strategies {
        let Some(sb) = b.strategies.iter().find(|s| s.info.name == sa.info.name) else {
            unmatched.push(format!("strategy {} only in {}", sa.info.name, a.label));
            continue;
        };
        for ca in &sa.categories {
            let Some(cb) = sb.category(&ca.data.name) else {
                unmatched.push(format!("{}/{} only in {}", sa.info.name, ca.data.name, a.label));
                continue;
            };
            let (xa, xb) = (&ca.data.batches, &cb.data.batches);
            let pairs = paired(xa, xb);
            for m in &METRICS {
                let all_a: Vec<&BatchRecord> = xa.iter().collect();
                let all_b: Vec<&BatchRecord> = xb.iter().collect();
                let (va, vb) = ((m.of)(&all_a), (m.of)(&all_b));
                let ci = match &pairs {
                    Some((pa, pb)) => bootstrap_indices(pa.len(), |idx| {
                        let ra: Vec<&BatchRecord> = idx.iter().map(|&i| pa[i]).collect();
                        let rb: Vec<&BatchRecord> = idx.iter().map(|&i| pb[i]).collect();
                        (m.of)(&rb) / (m.of)(&ra) - 1.0
                    }),
                    None => bootstrap_two(xa.len(), xb.len(), |ia, ib| {
                        let ra: Vec<&BatchRecord> = ia.iter().map(|&i| &xa[i]).collect();
                        let rb: Vec<&BatchRecord> = ib.iter().map(|&i| &xb[i]).collect();
                        (m.of)(&rb) / (m.of)(&ra) - 1.0
                    }),
                };
                out.push(Change {
                    strategy: sa.info.name.clone(),
                    category: ca.data.name.clone(),
                    metric: m.name,
                    a: va * m.scale,
                    b: vb * m.scale,
                    change: vb / va - 1.0,
                    ci,
                    paired: pairs.is_some(),
                });
            }
        }
    }
    for sb in &b.strategies {
        if a.strategies.iter().all(|s| s.info.name != sb.info.name) {
            unmatched.push(format!("strategy {} only in {}", sb.info.name, b.label));
        }
    }
    (out, unmatched)
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:+.1}", x * 100.0)
    } else {
        "n/a".into()
    }
}

/// Prints the comparison of `a` and `b`; returns how many changes were
/// larger than the noise.
pub fn write_comparison(a: &RunFigures, b: &RunFigures, out: &mut dyn Write) -> io::Result<usize> {
    writeln!(out, "== compare A = {} with B = {} ==", a.run.path.display(), b.run.path.display())?;
    writeln!(out, "A: {}; dtype {}", a.meta.caption(), a.meta.dtype)?;
    writeln!(out, "B: {}; dtype {}", b.meta.caption(), b.meta.dtype)?;
    let (changes, unmatched) = changes(a, b);
    let mut t = Table::new(&["strategy", "category", "metric", "unit", "A", "B", "change %", "95% CI %", "batches", "flag"], 4);
    let unit = |name: &str| METRICS.iter().find(|m| m.name == name).map_or("", |m| m.unit);
    for c in &changes {
        t.rows.push(vec![
            c.strategy.clone(),
            c.category.clone(),
            c.metric.to_string(),
            unit(c.metric).to_string(),
            num(c.a),
            num(c.b),
            pct(c.change),
            format!("{} … {}", pct(c.ci.lo), pct(c.ci.hi)),
            if c.paired { "paired".into() } else { "unpaired".into() },
            if c.significant() { "CHANGED".into() } else { String::new() },
        ]);
    }
    t.write(out)?;
    for u in &unmatched {
        writeln!(out, "not compared: {u}")?;
    }
    let flagged = changes.iter().filter(|c| c.significant()).count();
    writeln!(out)?;
    writeln!(out, "{flagged} of {} changes larger than the noise (CHANGED: the bootstrap 95 % CI of B / A − 1, {BOOTSTRAP_RESAMPLES} resamples, excludes 0)", changes.len())?;
    Ok(flagged)
}
