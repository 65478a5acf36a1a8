//! What a simulated batch means in the suite's metrics: TTFT, TPOT, E2E,
//! TPS and the paper's TPOT as `docs/results-schema.md` defines them, read
//! off the leader exactly where the runner reads its clock; per-GPU busy,
//! communication, waiting and idle time; communication share; memory; the
//! critical path.
//!
//! TTFT runs from the end of the leader's batch set-up to the end of its
//! prefill; each inter-token latency from the end of one step's sampling to
//! the next's. When fewer decode steps were simulated than the batch has,
//! TPOT is the mean of a straight line fitted through the simulated steps'
//! latencies over steps 1..out−1 (attention grows linearly with the context;
//! everything else is the same at every step); with every step simulated it
//! is their mean.

use super::dag::{Dag, NodeId, NodeKind, Phase};
use super::timeline::Timeline;
use crate::strategy::{BatchSetup, BatchShape};
use std::collections::BTreeMap;

/// Seconds of one GPU in a window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GpuUse {
    /// Kernels running.
    pub compute_s: f64,
    /// Messages and collectives moving data.
    pub comm_s: f64,
    /// Inside a message or collective, waiting for a peer.
    pub wait_s: f64,
    /// Nothing to do.
    pub idle_s: f64,
}

impl GpuUse {
    fn add(&mut self, o: &GpuUse) {
        self.compute_s += o.compute_s;
        self.comm_s += o.comm_s;
        self.wait_s += o.wait_s;
        self.idle_s += o.idle_s;
    }
}

/// One stretch of a critical path: what ran and how long the path spent on it.
#[derive(Clone, Debug, PartialEq)]
pub struct PathPart {
    pub what: String,
    pub seconds: f64,
}

/// The prediction for one strategy at one batch shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub shape: BatchShape,
    pub setup: BatchSetup,
    pub ttft_s: f64,
    pub tpot_s: f64,
    pub e2e_s: f64,
    pub paper_tpot_s: f64,
    pub tps: f64,
    /// Latencies of the simulated decode steps.
    pub itl_s: Vec<f64>,
    /// Communication (moving and waiting) over wall time, active ranks together.
    pub comm_share: f64,
    /// Per world rank: prefill, and one decode step (mean of the simulated ones).
    pub prefill_use: Vec<GpuUse>,
    pub decode_use: Vec<GpuUse>,
    /// Critical paths of the prefill and of the last simulated decode step, by what ran.
    pub prefill_path: Vec<PathPart>,
    pub decode_path: Vec<PathPart>,
    /// Ranks the prefill's critical path crosses.
    pub prefill_path_ranks: usize,
    pub active: Vec<bool>,
}

/// The leader's last finish among its nodes of `phase` (`None`: none there).
fn leader_end(dag: &Dag, tl: &Timeline, phase: Phase) -> Option<(f64, NodeId)> {
    dag.programs[dag.leader].iter().filter(|&&i| dag.nodes[i].phase == phase).map(|&i| (tl.finish[i], i)).fold(None, |a, b| if a.is_none_or(|a: (f64, NodeId)| b.0 >= a.0) { Some(b) } else { a })
}

/// The mean over steps 1..=n of a line fitted through `(k, itl_k)`.
pub fn mean_step_latency(itl: &[f64], n: usize) -> f64 {
    if itl.is_empty() || n == 0 {
        return 0.0;
    }
    if itl.len() >= n || itl.len() == 1 {
        let k = itl.len().min(n);
        return itl[..k].iter().sum::<f64>() / k as f64;
    }
    let m = itl.len() as f64;
    let xs: Vec<f64> = (1..=itl.len()).map(|k| k as f64).collect();
    let (mx, my) = (xs.iter().sum::<f64>() / m, itl.iter().sum::<f64>() / m);
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let sxy: f64 = xs.iter().zip(itl).map(|(x, y)| (x - mx) * (y - my)).sum();
    let b = sxy / sxx;
    let a = my - b * mx;
    a + b * (n as f64 + 1.0) / 2.0
}

fn uses(dag: &Dag, tl: &Timeline, keep: impl Fn(Phase) -> bool, window: f64) -> Vec<GpuUse> {
    let mut out = vec![GpuUse::default(); dag.programs.len()];
    for s in &tl.spans {
        if !keep(dag.nodes[s.node].phase) {
            continue;
        }
        let u = &mut out[s.rank];
        match dag.nodes[s.node].kind {
            NodeKind::Compute(_) => u.compute_s += s.finish - s.start,
            NodeKind::Comm(_) => {
                u.comm_s += s.finish - s.start;
                u.wait_s += s.start - s.ready;
            }
        }
    }
    for (r, u) in out.iter_mut().enumerate() {
        if dag.active[r] {
            u.idle_s = (window - u.compute_s - u.comm_s - u.wait_s).max(0.0);
        }
    }
    out
}

/// Per world rank: the fraction of the simulated batch it spent computing.
pub fn busy_shares(dag: &Dag, tl: &Timeline) -> Vec<f64> {
    let end = tl.finish.iter().copied().fold(0.0, f64::max);
    let mut busy = vec![0.0; dag.programs.len()];
    for s in &tl.spans {
        if dag.nodes[s.node].op().is_some() {
            busy[s.rank] += s.finish - s.start;
        }
    }
    busy.iter().map(|b| if end > 0.0 { b / end } else { 0.0 }).collect()
}

/// Adds `seconds` of `what` to a path, joining the part before it when it is the same.
fn push_part(parts: &mut Vec<PathPart>, what: String, seconds: f64) {
    match parts.last_mut() {
        Some(p) if p.what == what => p.seconds += seconds,
        _ => parts.push(PathPart { what, seconds }),
    }
}

/// The critical path ending at `end`, by what ran (in path order).
fn path_parts(dag: &Dag, tl: &Timeline, end: NodeId, from: f64) -> (Vec<PathPart>, usize) {
    let path = tl.critical_path(end);
    let mut parts: Vec<PathPart> = Vec::new();
    let mut ranks = std::collections::BTreeSet::new();
    let mut at = from;
    for id in path {
        let n = &dag.nodes[id];
        let f = tl.finish[id];
        if f <= at || n.phase == Phase::Setup {
            continue;
        }
        ranks.extend(n.ranks.iter().copied());
        // The host's turn before a decode step is the host's, not the step's first operation's.
        let turn = tl.host_turn.get(id).copied().unwrap_or(0.0).min(f - at);
        if turn > 0.0 {
            push_part(&mut parts, format!("host turn (rank {})", n.ranks[0]), turn);
        }
        let what = match &n.kind {
            NodeKind::Compute(op) => format!("{} (rank {})", op.kind.name(), n.ranks[0]),
            NodeKind::Comm(c) => c.category_name().to_string(),
        };
        push_part(&mut parts, what, f - at - turn);
        at = f;
    }
    (parts, ranks.len())
}

/// The prediction of a batch of `shape` (with `out_tokens` the real count)
/// from its simulated DAG and timeline.
pub fn predict(dag: &Dag, tl: &Timeline, shape: BatchShape) -> Prediction {
    let t0 = leader_end(dag, tl, Phase::Setup).map_or(0.0, |e| e.0);
    let (prefill_end, prefill_last) = leader_end(dag, tl, Phase::Prefill).unwrap_or((t0, 0));
    let steps = dag.decode_steps();
    let mut ends = vec![prefill_end];
    let mut last = prefill_last;
    for k in 1..=steps {
        if let Some((e, id)) = leader_end(dag, tl, Phase::Decode(k)) {
            ends.push(e);
            last = id;
        }
    }
    let itl: Vec<f64> = ends.windows(2).map(|w| w[1] - w[0]).collect();
    let ttft = prefill_end - t0;
    let out = shape.out_tokens;
    // Recording the first step happens once a batch: it stays out of the
    // line through the steps and is spread over the batch's steps.
    let recording = tl.recording.iter().copied().fold(0.0, f64::max);
    let mut steady = itl.clone();
    if let Some(first) = steady.first_mut() {
        *first -= recording;
    }
    let tpot = if out > 1 { mean_step_latency(&steady, out - 1) + if itl.is_empty() { 0.0 } else { recording / (out - 1) as f64 } } else { 0.0 };
    let e2e = ttft + tpot * out.saturating_sub(1) as f64;
    let tokens = (shape.nseq * (shape.seq_len + out)) as f64;
    let prefill_use = uses(dag, tl, |p| p == Phase::Prefill, ttft);
    let decode_window = ends.last().copied().unwrap_or(prefill_end) - prefill_end;
    let mut decode_use = uses(dag, tl, |p| matches!(p, Phase::Decode(_)), decode_window);
    if !itl.is_empty() {
        for u in &mut decode_use {
            let k = itl.len() as f64;
            *u = GpuUse { compute_s: u.compute_s / k, comm_s: u.comm_s / k, wait_s: u.wait_s / k, idle_s: u.idle_s / k };
        }
    }
    let (mut comm, mut wall) = (0.0, 0.0);
    for (r, (p, d)) in prefill_use.iter().zip(&decode_use).enumerate() {
        if dag.active[r] {
            let mut u = *p;
            u.add(&GpuUse { compute_s: d.compute_s * itl.len() as f64, comm_s: d.comm_s * itl.len() as f64, wait_s: d.wait_s * itl.len() as f64, idle_s: d.idle_s * itl.len() as f64 });
            comm += u.comm_s + u.wait_s;
            wall += u.compute_s + u.comm_s + u.wait_s + u.idle_s;
        }
    }
    let (prefill_path, prefill_path_ranks) = path_parts(dag, tl, prefill_last, t0);
    let decode_path = if steps > 0 { path_parts(dag, tl, last, ends[ends.len() - 2]).0 } else { Vec::new() };
    Prediction {
        shape,
        setup: dag.setup.clone(),
        ttft_s: ttft,
        tpot_s: tpot,
        e2e_s: e2e,
        paper_tpot_s: if out > 0 { e2e / out as f64 } else { 0.0 },
        tps: if e2e > 0.0 { tokens / e2e } else { 0.0 },
        itl_s: itl,
        comm_share: if wall > 0.0 { comm / wall } else { 0.0 },
        prefill_use,
        decode_use,
        prefill_path,
        decode_path,
        prefill_path_ranks,
        active: dag.active.clone(),
    }
}

/// Milliseconds with as many decimals as the figure needs.
pub fn ms(s: f64) -> String {
    if s >= 1.0 {
        format!("{:.0}", s * 1e3)
    } else if s >= 0.01 {
        format!("{:.2}", s * 1e3)
    } else {
        format!("{:.4}", s * 1e3)
    }
}

/// The top `n` parts of a path by time, as "what 45%".
pub fn path_summary(parts: &[PathPart], n: usize) -> String {
    let total: f64 = parts.iter().map(|p| p.seconds).sum();
    let mut by: BTreeMap<&str, f64> = BTreeMap::new();
    for p in parts {
        *by.entry(p.what.as_str()).or_default() += p.seconds;
    }
    let mut v: Vec<(&str, f64)> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.iter().take(n).map(|(w, s)| format!("{w} {:.0}%", 100.0 * s / total.max(1e-30))).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpot_is_the_mean_of_the_simulated_steps_or_of_their_line() {
        assert_eq!(mean_step_latency(&[2.0, 4.0], 2), 3.0);
        // itl_k = 1 + k: the mean over k = 1..=9 is 1 + 5.
        assert!((mean_step_latency(&[2.0, 3.0, 4.0], 9) - 6.0).abs() < 1e-12);
        assert_eq!(mean_step_latency(&[5.0], 100), 5.0);
    }
}
