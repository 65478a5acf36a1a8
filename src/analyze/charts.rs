//! Which plots `fapool analyze --plots DIR` draws, and from which figures:
//! each chart is built from [`RunFigures`] and written as PNG and SVG;
//! a chart whose data the files do not hold (energy on the CPU backend, no
//! planner predictions, no busy/idle split, no FA Pool strategy) is skipped
//! with the reason.
//!
//! No file reading here: the busy/idle split comes in as read by the caller.

use super::figures::{LengthFigures, RunFigures, StrategyFigures};
use super::plot::{band_note, color, write_chart, Heading, LegendEntry, LengthChart, Mark, Point, Series};
use super::plot_bars::{BarRow, HBarChart, Panel, StackedPanels};
use super::plot_points::{ScatterPanel, ScatterPanels, ScatterPoint};
use super::stats::{Stat, CV_LIMIT, MIN_BATCHES};
use crate::comm::Category;
use crate::results::RankTimeSplit;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What [`write_plots`] did.
#[derive(Debug, Default)]
pub struct PlotReport {
    pub written: Vec<PathBuf>,
    /// (chart name, why it was not drawn).
    pub skipped: Vec<(String, String)>,
}

/// The busy/idle split of one run: (strategy, its rank rows of all categories).
pub type RunSplits = Vec<(String, Vec<RankTimeSplit>)>;

struct Plotter<'r, 'a> {
    runs: &'r [RunFigures<'a>],
    dir: &'r Path,
    caption: String,
    report: PlotReport,
}

impl<'a> Plotter<'_, 'a> {
    fn label(&self, run: &RunFigures, s: &StrategyFigures) -> String {
        if self.runs.len() > 1 {
            format!("{}: {}", run.label, s.info.name)
        } else {
            s.info.name.clone()
        }
    }

    fn heading(&self, title: &str, note: Option<String>) -> Heading {
        Heading { title: title.to_string(), caption: self.caption.clone(), note }
    }

    /// Every (run, strategy) in order with its colour index.
    fn strategies(&self) -> Vec<(&RunFigures<'a>, &StrategyFigures<'a>, usize)> {
        self.runs.iter().flat_map(|r| r.strategies.iter().map(move |s| (r, s))).enumerate().map(|(i, (r, s))| (r, s, i)).collect()
    }

    fn write(&mut self, chart: &impl super::plot::Chart) -> Result<(), String> {
        self.report.written.extend(write_chart(self.dir, chart)?);
        Ok(())
    }

    fn skip(&mut self, name: &str, why: &str) {
        self.report.skipped.push((name.to_string(), why.to_string()));
    }

    fn length_chart(&mut self, name: &str, title: &str, y_desc: &str, pick: impl Fn(&LengthFigures) -> Option<(&Stat, f64)>) -> Result<(), String> {
        let mut series = Vec::new();
        for (run, s, i) in self.strategies() {
            let points: Vec<Point> = s
                .lengths
                .iter()
                .filter_map(|l| pick(l).map(|(st, scale)| (l.seq_len, st, scale)))
                .map(|(len, st, k)| Point { x: len as f64, y: st.p50 * k, lo: st.p10 * k, hi: st.p90 * k, unstable: st.unstable.is_some() })
                .collect();
            if !points.is_empty() {
                series.push(Series { label: self.label(run, s), color: color(i), dashed: false, points });
            }
        }
        if series.is_empty() {
            self.skip(name, "no batches");
            return Ok(());
        }
        let chart = LengthChart { name: name.into(), heading: self.heading(title, Some(band_note(MIN_BATCHES, CV_LIMIT))), y_desc: y_desc.into(), series, reference: None, from_zero: false };
        self.write(&chart)
    }

    fn improvement(&mut self) -> Result<(), String> {
        let mut series = Vec::new();
        let mut baselines = Vec::new();
        for (run, s, i) in self.strategies() {
            let Some(base) = run.baseline().filter(|_| s.info.kind == "fapool") else { continue };
            baselines.push(base.info.name.clone());
            let pairs: Vec<(&LengthFigures, &LengthFigures)> = s.lengths.iter().filter_map(|l| Some((l, base.lengths.iter().find(|b| b.seq_len == l.seq_len)?))).collect();
            let point = |y: f64, a: &Stat, b: &Stat, x: u32| Point { x: x as f64, y, lo: y, hi: y, unstable: a.unstable.is_some() || b.unstable.is_some() };
            let tpot = pairs.iter().map(|(l, b)| point(b.tpot.p50 / l.tpot.p50, &l.tpot, &b.tpot, l.seq_len)).collect();
            let tps = pairs.iter().map(|(l, b)| point(l.tps.p50 / b.tps.p50, &l.tps, &b.tps, l.seq_len)).collect();
            series.push(Series { label: format!("{}: TPOT × (baseline TPOT / this)", self.label(run, s)), color: color(i), dashed: false, points: tpot });
            series.push(Series { label: format!("{}: TPS × (this / baseline)", self.label(run, s)), color: color(i), dashed: true, points: tps });
        }
        if series.is_empty() {
            self.skip("improvement_vs_length", "no FA Pool strategy beside a baseline");
            return Ok(());
        }
        baselines.dedup();
        let note = format!("medians per length; above 1× FA Pool is better; hollow marker: either side unstable (fewer than {MIN_BATCHES} batches, or CV above {:.0} %)", CV_LIMIT * 100.0);
        let chart = LengthChart {
            name: "improvement_vs_length".into(),
            heading: self.heading("Improvement of each FA Pool strategy over the baseline", Some(note)),
            y_desc: "improvement (×)".into(),
            series,
            reference: Some((1.0, format!("1× = baseline ({})", baselines.join(", ")))),
            from_zero: true,
        };
        self.write(&chart)
    }

    fn communication(&mut self) -> Result<(), String> {
        let used: Vec<Category> =
            Category::ALL.into_iter().filter(|c| self.runs.iter().flat_map(|r| &r.strategies).flat_map(|s| &s.lengths).any(|l| l.comm_share.iter().any(|(k, v)| k == c && *v > 0.0))).collect();
        if used.is_empty() {
            self.skip("comm_breakdown", "no communication recorded");
            return Ok(());
        }
        let legend = used.iter().enumerate().map(|(i, c)| LegendEntry { label: c.name().to_string(), color: color(i), mark: Mark::Block }).collect();
        let panels = self
            .strategies()
            .into_iter()
            .map(|(run, s, _)| Panel {
                title: self.label(run, s),
                columns: s
                    .lengths
                    .iter()
                    .map(|l| (l.seq_len.to_string(), used.iter().enumerate().map(|(i, c)| (i, l.comm_share.iter().find(|x| x.0 == *c).map_or(0.0, |x| x.1 * 100.0))).collect()))
                    .collect(),
            })
            .collect();
        let note = "per strategy and sequence length: each category's time summed over the active ranks, over their wall time; the number on a column is the total".to_string();
        let chart = StackedPanels {
            name: "comm_breakdown".into(),
            heading: self.heading("Communication breakdown per strategy and sequence length", Some(note)),
            x_desc: "sequence length (tokens)".into(),
            y_desc: "% of active ranks' time".into(),
            legend,
            panels,
        };
        self.write(&chart)
    }

    fn memory(&mut self) -> Result<(), String> {
        let mut rows = Vec::new();
        let mut cpu = false;
        for (run, s, _) in self.strategies() {
            cpu |= run.run.provenance.backend == "cpu";
            let mut by_role: BTreeMap<(u32, String), (Option<u64>, u64)> = BTreeMap::new();
            for r in s.categories.iter().flat_map(|c| &c.data.ranks) {
                let entry = by_role.entry((r.world_rank, r.role.clone())).or_insert((None, 0));
                entry.0 = match (entry.0, r.peak_memory_bytes) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                entry.1 = entry.1.max(r.memory_estimate_bytes);
            }
            for ((rank, role), (peak, estimate)) in by_role {
                let mut segments = vec![(1, estimate as f64 / 1e9)];
                if let Some(p) = peak {
                    segments.insert(0, (0, p as f64 / 1e9));
                }
                rows.push(BarRow { label: format!("{} · rank {rank} {role}", self.label(run, s)), segments });
            }
        }
        if rows.is_empty() {
            self.skip("memory_by_role", "no rank rows");
            return Ok(());
        }
        let legend = vec![
            LegendEntry { label: if cpu { "measured peak (CPU: process RSS)".into() } else { "measured peak".into() }, color: color(0), mark: Mark::Block },
            LegendEntry { label: "analytical estimate".into(), color: color(3), mark: Mark::Block },
        ];
        let note = "largest value over all batches of the run; a rank without a measured bar did not measure memory".to_string();
        let chart = HBarChart {
            name: "memory_by_role".into(),
            heading: self.heading("Peak memory per rank role against its estimate", Some(note)),
            x_desc: "memory (GB, 10⁹ bytes)".into(),
            legend,
            rows,
            stacked: false,
            x_max: None,
        };
        self.write(&chart)
    }

    fn pool_size(&mut self) -> Result<(), String> {
        let mut series = Vec::new();
        for (run, s, i) in self.strategies().into_iter().filter(|x| x.1.info.kind == "fapool") {
            let point = |l: &LengthFigures, st: &Stat| Point { x: l.seq_len as f64, y: st.p50, lo: st.p10, hi: st.p90, unstable: false };
            series.push(Series { label: format!("{}: effective", self.label(run, s)), color: color(i), dashed: false, points: s.lengths.iter().map(|l| point(l, &l.pool_effective)).collect() });
            series.push(Series {
                label: format!("{}: requested by the policy", self.label(run, s)),
                color: color(i),
                dashed: true,
                points: s.lengths.iter().map(|l| point(l, &l.pool_requested)).collect(),
            });
        }
        if series.is_empty() {
            self.skip("pool_size_vs_length", "no FA Pool strategy");
            return Ok(());
        }
        let note = "requested: the activation policy's size; effective: after capping by the launched pool ranks (0 = pool inactive)".to_string();
        let chart = LengthChart {
            name: "pool_size_vs_length".into(),
            heading: self.heading("Attention-pool size chosen per sequence length", Some(note)),
            y_desc: "attention-pool GPUs".into(),
            series,
            reference: None,
            from_zero: true,
        };
        self.write(&chart)
    }

    fn predictions(&mut self) -> Result<(), String> {
        let quantities = [("ttft_s", "TTFT", "ms", 1e3), ("tpot_s", "TPOT", "ms", 1e3), ("tps", "TPS", "tokens/s", 1.0)];
        let mut legend = Vec::new();
        let mut panels: Vec<ScatterPanel> = quantities
            .iter()
            .map(|(_, q, unit, _)| ScatterPanel {
                title: q.to_string(),
                x_desc: format!("measured mean {q} ({unit})"),
                y_desc: format!("predicted {q} ({unit})"),
                points: Vec::new(),
                log_with_diagonal: true,
            })
            .collect();
        for (run, s, i) in self.strategies() {
            let entry = legend.len();
            let mut any = false;
            for c in &s.categories {
                for (panel, (key, _, _, k)) in panels.iter_mut().zip(quantities) {
                    let (Some(&predicted), Some(measured)) = (c.data.predictions.get(key), super::table::measured_value(key, &c.stored)) else { continue };
                    panel.points.push(ScatterPoint { x: measured * k, y: predicted * k, entry, note: format!(" {}", c.data.name), hollow: false });
                    any = true;
                }
            }
            if any {
                legend.push(LegendEntry { label: self.label(run, s), color: color(i), mark: Mark::Block });
            }
        }
        if legend.is_empty() {
            self.skip("predicted_vs_measured", "no planner predictions (ttft_s, tpot_s, tps) stored in the `prediction` groups");
            return Ok(());
        }
        let note = "one point per (strategy, category); dashed: prediction = measurement".to_string();
        let chart = ScatterPanels { name: "predicted_vs_measured".into(), heading: self.heading("Planner prediction against measurement", Some(note)), legend, panels, columns: 3 };
        self.write(&chart)
    }

    fn busy_idle(&mut self, splits: &[RunSplits]) -> Result<(), String> {
        // Wall time splits into computing and waiting for messages (the
        // compute timeline's own record) and idle (outside the batch's work);
        // messages themselves run beside compute on a GPU's own streams, so
        // their time is not a slice of the bar but given in the label.
        let parts = ["compute", "waiting for messages", "idle"];
        let mut rows = Vec::new();
        for (run, run_splits) in self.runs.iter().zip(splits) {
            for (strategy, rows_of) in run_splits {
                let mut per_rank: BTreeMap<u32, [f64; 4]> = BTreeMap::new();
                for r in rows_of {
                    let t = per_rank.entry(r.world_rank).or_default();
                    t[0] += r.compute_s;
                    t[1] += r.comm_s;
                    t[2] += r.wait_s;
                    t[3] += r.wall_s;
                }
                let name = if self.runs.len() > 1 { format!("{}: {strategy}", run.label) } else { strategy.clone() };
                for (rank, [compute, comm, wait, wall]) in per_rank {
                    let wall = wall.max(compute + wait).max(1e-30);
                    let shares = [compute, wait, wall - compute - wait].map(|v| v / wall * 100.0);
                    let label = format!("{name} · rank {rank} (messages {:.0} %)", comm / wall * 100.0);
                    rows.push(BarRow { label, segments: shares.into_iter().enumerate().collect() });
                }
            }
        }
        if rows.is_empty() {
            self.skip("busy_idle_by_rank", "the rank rows record no busy/idle split (columns compute_s, comm_s, wait_s)");
            return Ok(());
        }
        let legend = parts.iter().enumerate().map(|(i, p)| LegendEntry { label: p.to_string(), color: [color(0), color(4), color(7)][i], mark: Mark::Block }).collect();
        let chart = HBarChart {
            name: "busy_idle_by_rank".into(),
            heading: self.heading("Per-rank busy and idle share of wall time", Some("over every batch of the run; waiting: the compute timeline held for a message; idle: the rank outside the batch's work; (messages N %): time with a message of the rank in flight, which overlaps compute on a GPU".into())),
            x_desc: "% of the rank's wall time".into(),
            legend,
            rows,
            stacked: true,
            x_max: Some(100.0),
        };
        self.write(&chart)
    }

    fn pareto(&mut self) -> Result<(), String> {
        let mut names: Vec<String> = Vec::new();
        for r in self.runs {
            for c in r.run.category_order() {
                if !names.contains(&c) {
                    names.push(c);
                }
            }
        }
        let mut legend = Vec::new();
        let mut panels: Vec<ScatterPanel> =
            names.iter().map(|n| ScatterPanel { title: n.clone(), x_desc: "tokens/s per GPU".into(), y_desc: "tokens/s per sequence".into(), points: Vec::new(), log_with_diagonal: false }).collect();
        for (run, s, i) in self.strategies() {
            let entry = legend.len();
            legend.push(LegendEntry { label: self.label(run, s), color: color(i), mark: Mark::Block });
            for c in &s.categories {
                let panel = names.iter().position(|n| *n == c.data.name).expect("every category is named");
                panels[panel].points.push(ScatterPoint { x: c.tps_per_gpu, y: c.tokens_per_s_per_sequence, entry, note: String::new(), hollow: c.unstable.is_some() });
            }
        }
        let note = "per category: tokens/s per GPU = TPS / GPUs of the strategy; tokens/s per sequence = 1 / median TPOT; dashed: Pareto frontier; hollow: unstable".to_string();
        let columns = if panels.len() > 2 { 2 } else { panels.len() };
        let chart = ScatterPanels { name: "pareto".into(), heading: self.heading("Pareto: tokens/s per sequence against tokens/s per GPU", Some(note)), legend, panels, columns };
        self.write(&chart)
    }
}

/// Draws every chart of `runs` into `dir` (created if missing).
pub fn write_plots(dir: &Path, runs: &[RunFigures], splits: &[RunSplits]) -> Result<PlotReport, String> {
    std::fs::create_dir_all(dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let mut captions: Vec<String> = Vec::new();
    for r in runs {
        let c = r.meta.caption();
        if !captions.contains(&c) {
            captions.push(c);
        }
    }
    let mut p = Plotter { runs, dir, caption: captions.join("  |  "), report: PlotReport::default() };
    p.length_chart("tpot_vs_length", "TPOT against sequence length", "TPOT (ms)", |l| Some((&l.tpot, 1e3)))?;
    p.length_chart("ttft_vs_length", "TTFT against sequence length", "TTFT (ms)", |l| Some((&l.ttft, 1e3)))?;
    p.length_chart("tps_vs_length", "Throughput (TPS, input + output tokens) against sequence length", "TPS (tokens/s)", |l| Some((&l.tps, 1.0)))?;
    p.improvement()?;
    p.communication()?;
    p.memory()?;
    if runs.iter().flat_map(|r| &r.strategies).flat_map(|s| &s.lengths).any(|l| l.energy_j_per_token.is_some()) {
        p.length_chart("energy_per_token_vs_length", "Energy per token against sequence length", "energy (J/token, all ranks)", |l| l.energy_j_per_token.as_ref().map(|s| (s, 1.0)))?;
    } else {
        p.skip("energy_per_token_vs_length", "energy not measured (no NVML energy counter, e.g. the CPU backend)");
    }
    p.pool_size()?;
    p.predictions()?;
    p.busy_idle(splits)?;
    p.pareto()?;
    Ok(p.report)
}
