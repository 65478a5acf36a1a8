//! `fapool plan --check PLAN.toml`: arithmetic over a deployment plan
//! written by people (the MoE plan of `jobs/moe-plan.toml`): the GPU count
//! its parallel degrees imply, divisibility of heads, experts, layers,
//! batch and sequences, the real parameter count, memory per GPU, and its
//! stated targets against a roofline prediction on the plan's own GPU
//! figures. Every inconsistency is reported with its numbers.
//!
//! The suite's convention: world = TP × PP × DP. Expert parallelism is drawn
//! from the data- and tensor-parallel ranks of a stage (EP divides DP × TP:
//! each stage's DP × TP ranks form DP × TP / EP expert groups), and sequence
//! parallelism runs inside the TP group (SP = TP: the same ranks split the
//! sequence where they do not split the weights), so neither adds GPUs.
//! Other readings of the same degrees are listed with the count each gives.
//!
//! No MoE strategy runs here: the prediction is arithmetic over the plan's
//! dimensions (FLOPs and bytes), not a simulated DAG; its assumptions are
//! printed with it.

use super::PlanError;
use crate::rules::violation;
use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    pub plan: PlanInfo,
    pub model: MoeModel,
    pub gpu: GpuFigures,
    pub workload: PlanWorkload,
    pub targets: Targets,
    pub parallel: Degrees,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanInfo {
    pub name: String,
    pub claimed_gpus: usize,
    pub claimed_params: Option<f64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeModel {
    pub layers: usize,
    pub d_model: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    pub expert_hidden: usize,
    pub vocab: usize,
    /// Bytes per value (FP16: 2).
    pub bytes_per_value: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuFigures {
    pub peak_tflops: f64,
    pub mfu: f64,
    pub hbm_tbs: f64,
    pub hbm_utilization: f64,
    pub memory_gb: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanWorkload {
    pub batch: usize,
    pub seq_min: usize,
    pub seq_max: usize,
    pub output_tokens: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    pub ttft_max_s: f64,
    pub tokens_per_ms_per_gpu_min: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Degrees {
    pub ep: usize,
    pub tp: usize,
    pub pp: usize,
    pub sp: usize,
    pub dp: usize,
}

/// One line of the check.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// Consistent (`true`) or an inconsistency.
    pub ok: bool,
    pub topic: &'static str,
    pub text: String,
}

fn f(ok: bool, topic: &'static str, text: String) -> Finding {
    Finding { ok, topic, text }
}

/// Parameters: per layer (attention, router, experts, norms) and in all.
fn params(m: &MoeModel) -> (f64, f64, f64) {
    let (d, a, e, h) = (m.d_model as f64, (m.heads * m.head_dim) as f64, m.experts as f64, m.expert_hidden as f64);
    let attention = 4.0 * d * a;
    let layer = attention + d * e + e * 2.0 * d * h + 2.0 * d;
    let total = m.layers as f64 * layer + 2.0 * m.vocab as f64 * d + d;
    // Active per token: attention, the router and top-k experts.
    let active = m.layers as f64 * (attention + d * e + m.top_k as f64 * 2.0 * d * h);
    (layer, total, active)
}

/// Checks a plan; every finding, consistent or not.
pub fn check(p: &PlanFile) -> Vec<Finding> {
    let (m, g, w, t, x) = (&p.model, &p.gpu, &p.workload, &p.targets, &p.parallel);
    let mut out = Vec::new();
    // GPU arithmetic.
    let world = x.tp * x.pp * x.dp;
    out.push(f(world == p.plan.claimed_gpus, "gpus", format!("convention world = TP x PP x DP = {} x {} x {} = {world}; the plan says {} GPUs", x.tp, x.pp, x.dp, p.plan.claimed_gpus)));
    let stage = x.dp * x.tp;
    out.push(f(stage % x.ep == 0, "gpus", format!("EP = {} is drawn from the DP x TP = {stage} ranks of a stage: {} expert groups per stage", x.ep, stage as f64 / x.ep as f64)));
    out.push(f(x.sp == x.tp, "gpus", format!("SP = {} runs inside the TP group of {} (SP = TP: no GPUs of its own)", x.sp, x.tp)));
    let readings = [
        ("EP x TP x PP x SP x DP (every degree its own GPUs)", x.ep * x.tp * x.pp * x.sp * x.dp),
        ("EP x TP x PP x DP (EP beside DP, SP inside TP)", x.ep * x.tp * x.pp * x.dp),
        ("TP x SP x PP x DP (SP beside TP, EP inside DP x TP)", x.tp * x.sp * x.pp * x.dp),
        ("TP x PP x EP (EP as the only data-parallel degree: DP = EP)", x.tp * x.pp * x.ep),
        ("EP x TP x SP (one stage, no DP)", x.ep * x.tp * x.sp),
        ("PP x DP (TP, SP and EP inside)", x.pp * x.dp),
    ];
    for (what, n) in readings {
        let note = if n == p.plan.claimed_gpus { format!(" = the plan's {} GPUs", p.plan.claimed_gpus) } else { String::new() };
        out.push(f(true, "other reading", format!("{what}: {n}{note}")));
    }
    // Divisibility.
    let div = |a: usize, b: usize| b > 0 && a % b == 0;
    out.push(f(div(m.heads, x.tp), "divisibility", format!("heads {} / TP {} = {:.2}", m.heads, x.tp, m.heads as f64 / x.tp as f64)));
    out.push(f(div(m.layers, x.pp), "divisibility", format!("layers {} / PP {} = {:.2} per stage", m.layers, x.pp, m.layers as f64 / x.pp as f64)));
    out.push(f(div(m.experts, x.ep), "divisibility", format!("experts {} / EP {} = {:.2} per rank", m.experts, x.ep, m.experts as f64 / x.ep as f64)));
    out.push(f(m.top_k <= m.experts, "divisibility", format!("top-{} routing over {} experts", m.top_k, m.experts)));
    out.push(f(div(m.d_model, x.tp), "divisibility", format!("d_model {} / TP {}", m.d_model, x.tp)));
    out.push(f(div(w.batch, x.dp), "divisibility", format!("batch {} / DP {} = {:.2} sequences per replica", w.batch, x.dp, w.batch as f64 / x.dp as f64)));
    let seq_ok = div(w.seq_min, x.sp) && div(w.seq_max, x.sp);
    out.push(f(seq_ok, "divisibility", format!("sequences {}..={} split SP = {} ways: lengths not a multiple of {} are padded", w.seq_min, w.seq_max, x.sp, x.sp)));
    // Parameters.
    let (layer, total, active) = params(m);
    let claim = p.plan.claimed_params.map(|c| format!("; the plan says {:.3e}", c)).unwrap_or_default();
    out.push(f(
        p.plan.claimed_params.is_none_or(|c| (c - total).abs() / total < 0.1),
        "parameters",
        format!("{total:.4e} parameters ({layer:.4e} per layer, vocab {}), {active:.4e} active per token{claim}", m.vocab),
    ));
    // Memory per GPU (the busiest: a stage with embedding or head).
    let b = m.bytes_per_value as f64;
    let per_replica = (w.batch / x.dp.max(1)).max(1) as f64;
    let stage_layers = m.layers as f64 / x.pp as f64;
    let a = (m.heads * m.head_dim) as f64;
    let (d, h, e) = (m.d_model as f64, m.expert_hidden as f64, m.experts as f64);
    let weights = stage_layers * (4.0 * d * a / x.tp as f64 + d * e + e / x.ep as f64 * 2.0 * d * h + 2.0 * d) + m.vocab as f64 * d;
    let ctx = (w.seq_max + w.output_tokens) as f64;
    let kv = per_replica * ctx * 2.0 * stage_layers * a / x.tp as f64;
    let act = per_replica * w.seq_max as f64 / x.sp as f64 * (4.0 * d + 3.0 * a / x.tp as f64 + m.top_k as f64 * h);
    let mem = (weights + kv + act) * b;
    out.push(f(
        mem <= g.memory_gb * 1e9,
        "memory",
        format!("busiest GPU {:.2} GB (weights {:.2}, KV cache at {} tokens {:.2}, activations {:.2}) of {} GB", mem / 1e9, weights * b / 1e9, ctx, kv * b / 1e9, act * b / 1e9, g.memory_gb),
    ));
    // Targets on the plan's GPU figures.
    let flops_rate = g.peak_tflops * 1e12 * g.mfu;
    let bw = g.hbm_tbs * 1e12 * g.hbm_utilization;
    // Causal attention: 4·L²·a/2 per layer and sequence.
    let prefill_flops_at = |l: f64| per_replica * (2.0 * l * active + 2.0 * l * l * a * m.layers as f64);
    let prefill_flops = prefill_flops_at(w.seq_max as f64);
    let replica_gpus = (x.tp * x.pp) as f64;
    let micro = per_replica.max(1.0);
    let ttft = prefill_flops / (replica_gpus * flops_rate) * (micro + x.pp as f64 - 1.0) / micro;
    out.push(f(ttft <= t.ttft_max_s, "targets", format!("TTFT of {per_replica} sequences of {} tokens per replica: {ttft:.3} s (limit {} s)", w.seq_max, t.ttft_max_s)));
    let mean_ctx = (w.seq_min + w.seq_max) as f64 / 2.0 + w.output_tokens as f64 / 2.0;
    let step = x.pp as f64 * (weights - m.vocab as f64 * d + per_replica * mean_ctx * 2.0 * stage_layers * a / x.tp as f64) * b / bw;
    let decode_rate = per_replica / (step * 1e3) / replica_gpus;
    let mean_s = (w.seq_min + w.seq_max) as f64 / 2.0;
    let e2e = prefill_flops_at(mean_s) / (replica_gpus * flops_rate) * (micro + x.pp as f64 - 1.0) / micro + step * (w.output_tokens.saturating_sub(1)) as f64;
    let overall = per_replica * (mean_s + w.output_tokens as f64) / (e2e * 1e3) / replica_gpus;
    let target = t.tokens_per_ms_per_gpu_min;
    out.push(f(decode_rate >= target, "targets", format!("decode: {decode_rate:.2} generated tokens per ms per GPU (step {:.3} ms at mean context {mean_ctx:.0}; target >= {target})", step * 1e3)));
    out.push(f(overall >= target, "targets", format!("input + output tokens per ms per GPU over a batch of mean length {mean_s:.0}: {overall:.2} (target >= {target})")));
    out
}

/// Reads, checks and prints a plan; inconsistencies end with exit 2.
pub fn run(path: &Path) -> Result<(), PlanError> {
    let text = std::fs::read_to_string(path).map_err(|e| violation("plan-file-readable", format!("{}: {e}", path.display())))?;
    let plan: PlanFile = toml::from_str(&text).map_err(|e| violation("plan-file-valid", format!("{}: {}", path.display(), e.message())))?;
    let findings = check(&plan);
    println!("plan check: {} ({})", plan.plan.name, path.display());
    println!("convention: world = TP x PP x DP; EP drawn from the DP x TP ranks of a stage; SP inside the TP group");
    for x in &findings {
        let tag = match (x.ok, x.topic) {
            (_, "other reading") => "  --  ",
            (true, _) => "  ok  ",
            (false, _) => "BROKEN",
        };
        println!("  [{tag}] {:<13} {}", x.topic, x.text);
    }
    println!("assumptions: prefill at the plan's MFU with a PP fill/drain bubble of one sequence per micro-batch; decode steps read each stage's weights and KV cache once at the plan's HBM utilisation and pass the stages one after another; all-to-all, TP and PP traffic left out (a lower bound on time)");
    let bad = findings.iter().filter(|x| !x.ok).count();
    if bad > 0 {
        return Err(violation("plan-consistent", format!("{bad} inconsistencies in {}", path.display())).into());
    }
    Ok(())
}
