//! The cost model: seconds for every node of a DAG.
//!
//! Compute: `Get_Time(m, k, n)` for every GEMM and a cost for every other
//! kernel, from a calibration file when one is given, else from a roofline
//! of the cluster's GPU with efficiency curves: time = max(FLOPs / (peak ·
//! efficiency), bytes / (bandwidth · efficiency)) + launch. A GEMM's
//! efficiency is the table's ceiling × its wave quantisation (128×128 output
//! tiles over the SMs) × k / (k + 128) (prologue and epilogue of short
//! reductions); prefill attention's the ceiling × the wave quantisation of
//! its 128-query blocks × skv / (skv + 256); bandwidth-bound kernels reach
//! the ceiling × bytes / (bytes + 1 MiB) (small copies cannot fill the HBM
//! pipes). Launches cost the table's eager figure, or its graph figure
//! inside decode steps replayed as CUDA graphs.
//!
//! Links: alpha-beta per link class — inside a node (NVLink, or PCIe
//! without it) and between nodes (InfiniBand) — with the cluster file's
//! bandwidths × link efficiency, or the calibrated fits inside a node.
//! Collectives cost their algorithm's steps (see [`calibration::steps`]);
//! a collective spanning nodes runs at the inter-node rate of the fewest
//! members any node holds (one ring per NIC), capped by the intra-node rate.

use super::calibration::{self, Calibration, CommFit, LogGrid};
use super::cluster::ClusterSpec;
use super::dag::CommNode;
use crate::backend::shape::{OpDims, OpKind, OpRecord};
use crate::backend::Dtype;
use crate::comm::sim_transport::MessageKind;
use std::collections::BTreeMap;

/// Calibrated throughput tables.
#[derive(Clone, Debug, Default)]
pub(super) struct Tables {
    gemm: LogGrid,
    prefill: LogGrid,
    decode: LogGrid,
    bandwidth: BTreeMap<String, LogGrid>,
    comm: BTreeMap<String, CommFit>,
    sequence_overhead_s_per_byte: f64,
    step_overhead_s: f64,
    record_s: f64,
    record_per_op_s: f64,
}

impl Tables {
    pub(super) fn from(c: &Calibration) -> Self {
        let gemm: Vec<(Vec<f64>, f64)> = c.gemm.iter().map(|r| (vec![r[0], r[1], r[2]], 2.0 * r[0] * r[1] * r[2] / r[3])).collect();
        let prefill: Vec<(Vec<f64>, f64)> = c.prefill.iter().map(|r| (vec![r[0], r[1]], r[2] / r[3])).collect();
        let decode: Vec<(Vec<f64>, f64)> = c.decode.iter().map(|r| (vec![r[0], r[1]], r[2] / r[3])).collect();
        let bandwidth = c.bandwidth.iter().map(|(k, rows)| (k.clone(), LogGrid::of_bandwidth(rows))).collect();
        let comm = c.comm.iter().filter_map(|(k, rows)| calibration::fit(k, rows).map(|f| (k.clone(), f))).collect();
        Self {
            gemm: LogGrid::new(&gemm),
            prefill: LogGrid::new(&prefill),
            decode: LogGrid::new(&decode),
            bandwidth,
            comm,
            sequence_overhead_s_per_byte: c.sequence_overhead_s_per_byte,
            step_overhead_s: c.step_overhead_s,
            record_s: c.record_s,
            record_per_op_s: c.record_per_op_s,
        }
    }

    /// Seconds of `op` by the tables alone (no sequence overhead), as every
    /// calibrated price starts; None where no table covers it.
    pub(super) fn seconds(&self, op: &OpRecord) -> Option<f64> {
        let bytes = (op.bytes_read + op.bytes_written) as f64;
        let from = |grid: &LogGrid, x: &[f64], work: f64| grid.eval(x).map(|thr| work / thr);
        match (op.kind, op.dims) {
            (OpKind::Matmul, OpDims::Gemm { m, k, n }) => from(&self.gemm, &[m as f64, k as f64, n as f64], op.flops),
            (OpKind::GroupedMatmul, OpDims::Grouped { groups, m, k, n }) => {
                let (g, rows) = (groups.max(1) as f64, m.div_ceil(groups.max(1)) as f64);
                from(&self.gemm, &[rows, k as f64, n as f64], 2.0 * rows * (k * n) as f64).map(|s| g * s)
            }
            (OpKind::AttentionPrefill, OpDims::Prefill(s)) => from(&self.prefill, &[s.sq as f64, s.q_offset as f64], op.flops),
            (OpKind::AttentionDecode, OpDims::Decode(s)) => from(&self.decode, &[s.nseq as f64, s.len as f64], op.bytes_read as f64),
            (OpKind::RmsNorm, _) => self.bandwidth.get("rmsnorm").and_then(|g| from(g, &[bytes], bytes)),
            (OpKind::Zeros, _) => self.bandwidth.get("zeros").and_then(|g| from(g, &[bytes], bytes)),
            // SiLU's gated product moves what GELU's does (measured as GELU's table).
            (OpKind::Gelu | OpKind::GeluMul | OpKind::SiluMul, _) => self.bandwidth.get("gelu").and_then(|g| from(g, &[bytes], bytes)),
            (OpKind::Embed, _) => self.bandwidth.get("embed").and_then(|g| from(g, &[bytes], bytes)),
            (OpKind::Add | OpKind::MergePartials | OpKind::Argmax | OpKind::RouterTopK | OpKind::ExpertSlots, _) => self.bandwidth.get("elementwise").and_then(|g| from(g, &[bytes], bytes)),
            _ => self.bandwidth.get("copy").and_then(|g| from(g, &[bytes], bytes)),
        }
    }
}

/// Seconds for every node of a DAG on a cluster.
#[derive(Clone, Debug)]
pub struct CostModel {
    pub cluster: ClusterSpec,
    pub dtype: Dtype,
    /// Decode steps replayed as CUDA graphs (the job's `run.cuda_graphs` on a GPU).
    pub graphs: bool,
    /// Where compute times come from, for reports.
    pub source: String,
    tables: Option<Tables>,
    /// Calibrated slowdown per class when every calibrated rank computes at once.
    contention: BTreeMap<String, f64>,
    contention_ranks: usize,
    /// Per world rank: how busy the other ranks of its node are (0..1), from
    /// a first simulation; empty: no contention applied.
    neighbours: Vec<f64>,
}

/// Wave quantisation: the fraction of SM slots `tiles` blocks keep busy.
fn waves(tiles: f64, sms: usize) -> f64 {
    if tiles <= 0.0 {
        return 1.0;
    }
    let sms = sms.max(1) as f64;
    tiles / ((tiles / sms).ceil() * sms)
}

impl CostModel {
    /// The roofline of the cluster's GPU.
    pub fn roofline(cluster: ClusterSpec, dtype: Dtype, graphs: bool) -> Self {
        let source = format!("roofline of {}", cluster.gpu.key);
        Self { cluster, dtype, graphs, source, tables: None, contention: BTreeMap::new(), contention_ranks: 0, neighbours: Vec::new() }
    }

    /// Compute from a calibration file, links from the cluster (and the
    /// calibration's fits inside a node, where it has them).
    pub fn calibrated(cluster: ClusterSpec, calibration: &Calibration, graphs: bool) -> Self {
        let source = format!("calibration of {} ({}, {})", calibration.device, calibration.backend, calibration.created_utc);
        Self {
            cluster,
            dtype: calibration.dtype,
            graphs,
            source,
            tables: Some(Tables::from(calibration)),
            contention: calibration.contention.clone(),
            contention_ranks: calibration.ranks,
            neighbours: Vec::new(),
        }
    }

    pub fn is_calibrated(&self) -> bool {
        self.tables.is_some()
    }

    /// Whether ranks sharing a node were measured to slow each other.
    pub fn has_contention(&self) -> bool {
        self.contention.values().any(|&f| f > 1.0) && self.contention_ranks > 1
    }

    /// This model with each rank's compute slowed by how busy the other
    /// ranks of its node are (`busy`: per world rank, the fraction of the
    /// batch it spends computing): time × (1 + (slowdown − 1) × u), where u
    /// is the others' busy time over what the calibration's other ranks had
    /// (all of it), at most 1.
    pub fn contended(&self, busy: &[f64]) -> Self {
        let c = &self.cluster;
        let others = (self.contention_ranks.max(2) - 1) as f64;
        let neighbours = (0..busy.len())
            .map(|r| {
                let node = c.node_of(r);
                let sum: f64 = (0..busy.len()).filter(|&o| o != r && c.node_of(o) == node).map(|o| busy[o]).sum();
                (sum / others).min(1.0)
            })
            .collect();
        Self { neighbours, ..self.clone() }
    }

    /// The slowdown of `op` on `rank` from its node's other busy ranks.
    fn contention_of(&self, op: &OpRecord, rank: usize) -> f64 {
        let Some(&u) = self.neighbours.get(rank) else { return 1.0 };
        let class = match op.kind {
            OpKind::Matmul => "gemm",
            OpKind::AttentionPrefill => "attention_prefill",
            OpKind::AttentionDecode => "attention_decode",
            _ => "bandwidth",
        };
        1.0 + (self.contention.get(class).copied().unwrap_or(1.0) - 1.0) * u
    }

    /// Seconds of a compute node on `rank`, contention included.
    pub fn op_seconds_on(&self, op: &OpRecord, in_graph: bool, rank: usize) -> f64 {
        self.op_seconds(op, in_graph) * self.contention_of(op, rank)
    }

    /// The host's turn before decode step `k` on a rank whose first step
    /// issues `ops` device operations (calibrated; the roofline charges
    /// none): the step overhead, and at the first step, where steps replay
    /// as CUDA graphs, recording it (`record_s + record_per_op_s · ops`).
    pub fn step_gap(&self, k: usize, ops: usize) -> f64 {
        let turn = self.tables.as_ref().map_or(0.0, |t| t.step_overhead_s);
        turn + if k == 1 { self.recording(ops) } else { 0.0 }
    }

    /// Recording a decode step of `ops` device operations as a CUDA graph
    /// (calibrated, where steps replay as graphs; else 0).
    pub fn recording(&self, ops: usize) -> f64 {
        match &self.tables {
            Some(t) if self.graphs => t.record_s + t.record_per_op_s * ops as f64,
            _ => 0.0,
        }
    }

    /// What `op` costs beyond its table time in a run's sequence of
    /// different operations (calibrated, per byte it moves).
    fn sequence_overhead(&self, op: &OpRecord) -> f64 {
        // Measured on a chain of norms, GEMMs and element-wise ops; attention
        // is not in it, and its tables already stream cold K/V caches (one
        // copy per layer), so its cache bytes carry no such overhead.
        if matches!(op.kind, OpKind::AttentionDecode | OpKind::AttentionPrefill) {
            return 0.0;
        }
        self.tables.as_ref().map_or(0.0, |t| t.sequence_overhead_s_per_byte * (op.bytes_read + op.bytes_written) as f64)
    }

    fn peak(&self) -> f64 {
        let g = &self.cluster.gpu;
        1e12 * if self.dtype == Dtype::Fp32 { g.tflops_32 } else { g.tflops_16 }
    }

    fn hbm(&self) -> f64 {
        self.cluster.gpu.hbm_tbs * 1e12
    }

    /// Bandwidth-bound time of `bytes` at `eff` of the HBM bandwidth.
    fn stream(&self, bytes: f64, eff: f64) -> f64 {
        let half = if self.cluster.gpu.key == "cpu" { 0.0 } else { (1u64 << 20) as f64 };
        let sat = if bytes > 0.0 { bytes / (bytes + half) } else { 1.0 };
        bytes / (self.hbm() * eff * sat)
    }

    fn launch(&self, in_graph: bool) -> f64 {
        if in_graph && self.graphs {
            self.cluster.gpu.graph_launch_s
        } else {
            self.cluster.gpu.launch_s
        }
    }

    /// The roofline's seconds of one GEMM `[m,k]·[k,n]` moving `bytes`.
    fn gemm_roofline(&self, m: usize, k: usize, n: usize, bytes: f64) -> f64 {
        let g = &self.cluster.gpu;
        let tiles = (m.div_ceil(128) * n.div_ceil(128)) as f64;
        let eff = g.gemm_eff * waves(tiles, g.sms) * k as f64 / (k as f64 + 128.0);
        (2.0 * (m * k * n) as f64 / (self.peak() * eff)).max(self.stream(bytes, g.copy_bw_eff))
    }

    /// The roofline's seconds for `op` (launch included).
    pub fn roofline_seconds(&self, op: &OpRecord, in_graph: bool) -> f64 {
        let g = &self.cluster.gpu;
        let bytes = (op.bytes_read + op.bytes_written) as f64;
        let t = match (op.kind, op.dims) {
            // Nothing runs for a buffer its user overwrites.
            (OpKind::Alloc, _) => return 0.0,
            (OpKind::Matmul, OpDims::Gemm { m, k, n }) => self.gemm_roofline(m, k, n, bytes),
            // One GEMM per expert with rows (cuBLAS per expert), each of an equal share of the rows.
            (OpKind::GroupedMatmul, OpDims::Grouped { groups, m, k, n }) => {
                let g = groups.max(1);
                return g as f64 * (self.gemm_roofline(m.div_ceil(g), k, n, bytes / g as f64) + self.launch(in_graph));
            }
            (OpKind::AttentionPrefill, OpDims::Prefill(s)) => {
                let blocks = (s.nseq * s.heads * s.sq.div_ceil(128)) as f64;
                let eff = g.attention_eff * waves(blocks, g.sms) * s.skv as f64 / (s.skv as f64 + 256.0);
                (op.flops / (self.peak() * eff)).max(self.stream(bytes, g.copy_bw_eff))
            }
            (OpKind::AttentionDecode, _) => self.stream(bytes, g.decode_bw_eff),
            _ => self.stream(bytes, g.copy_bw_eff),
        };
        t + self.launch(in_graph)
    }

    /// Seconds of a compute node (`in_graph`: inside a replayed decode step).
    pub fn op_seconds(&self, op: &OpRecord, in_graph: bool) -> f64 {
        let Some(t) = &self.tables else { return self.roofline_seconds(op, in_graph) };
        if op.kind == OpKind::Alloc {
            return 0.0;
        }
        t.seconds(op).map(|m| m + self.sequence_overhead(op)).unwrap_or_else(|| self.roofline_seconds(op, in_graph))
    }

    /// Link latency and bandwidth (bytes/s) between two world ranks.
    pub fn link(&self, a: usize, b: usize, kind: &str) -> (f64, f64) {
        let c = &self.cluster;
        if c.node_of(a) != c.node_of(b) {
            return (c.inter_latency_s, c.inter_gbs * 1e9 * c.link_efficiency);
        }
        if let Some(f) = self.tables.as_ref().and_then(|t| t.comm.get(kind)) {
            return (f.alpha_s, f.bandwidth);
        }
        (c.intra_latency_s, c.intra_gbs * 1e9 * c.link_efficiency)
    }

    /// Latency and bandwidth of a collective's ring over `ranks`.
    fn ring(&self, ranks: &[usize], kind: &str) -> (f64, f64) {
        let c = &self.cluster;
        let mut per_node: BTreeMap<usize, usize> = BTreeMap::new();
        for &r in ranks {
            *per_node.entry(c.node_of(r)).or_default() += 1;
        }
        let (intra_a, intra_bw) = self.link(ranks[0], ranks[0], kind);
        if per_node.len() <= 1 {
            return (intra_a, intra_bw);
        }
        let fewest = per_node.values().copied().min().unwrap_or(1) as f64;
        let inter = c.inter_gbs * 1e9 * c.link_efficiency * fewest;
        (c.inter_latency_s.max(intra_a), inter.min(intra_bw))
    }

    /// Seconds of a collective node, and its algorithm's latency steps.
    pub fn collective_seconds(&self, c: &CommNode) -> (f64, f64) {
        let n = c.group_ranks.len();
        if n <= 1 {
            return (0.0, 0.0);
        }
        let kind = match c.kind {
            MessageKind::AllReduce => "all_reduce",
            MessageKind::AllGather => "all_gather",
            MessageKind::Broadcast { .. } => "broadcast",
            MessageKind::ReduceScatter => "reduce_scatter",
            _ => "host",
        };
        let (alpha, bw) = self.ring(&c.group_ranks, kind);
        let (steps, factor) = calibration::steps(kind, n);
        (steps * alpha + factor * c.bytes as f64 / bw, steps)
    }

    /// Seconds of one point-to-point message of `bytes` from `src` to `dst`.
    pub fn message_seconds(&self, src: usize, dst: usize, bytes: u64, host: bool) -> f64 {
        let (alpha, bw) = self.link(src, dst, if host { "host" } else { "send_recv" });
        alpha + bytes as f64 / bw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::shape::BufRef;
    use crate::planner::gpus;

    fn gemm(m: usize, k: usize, n: usize) -> OpRecord {
        OpRecord {
            kind: OpKind::Matmul,
            dims: OpDims::Gemm { m, k, n },
            flops: 2.0 * (m * k * n) as f64,
            bytes_read: (2 * (m * k + k * n)) as u64,
            bytes_written: (2 * m * n) as u64,
            inputs: Vec::<BufRef>::new(),
            outputs: vec![],
            stream: 0,
        }
    }

    fn h200() -> CostModel {
        CostModel::roofline(ClusterSpec::default_for(gpus::by_key("h200").unwrap(), 8), Dtype::Bf16, true)
    }

    #[test]
    fn a_large_gemm_costs_its_flops_at_the_efficiency_curve() {
        // 8192³ bf16 on an H200: 64 x 64 = 4096 tiles over 132 SMs fill
        // 4096 / (32 · 132) of the waves; k / (k + 128) = 8192 / 8320.
        let m = h200();
        let eff = 0.77 * (4096.0 / (32.0 * 132.0)) * (8192.0 / 8320.0);
        let want = 2.0 * 8192f64.powi(3) / (989e12 * eff) + 4e-6;
        let got = m.op_seconds(&gemm(8192, 8192, 8192), false);
        assert!((got / want - 1.0).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn a_decode_gemm_is_bound_by_reading_its_weights() {
        // m = 1: 4096 x 12288 bf16 weights (100.7 MB) at 0.86 x 4.8 TB/s.
        let m = h200();
        let bytes = 2.0 * (4096.0 + 4096.0 * 12288.0 + 12288.0);
        let want = bytes / (4.8e12 * 0.86 * bytes / (bytes + 1048576.0)) + 1.5e-6;
        let got = m.op_seconds(&gemm(1, 4096, 12288), true);
        assert!((got / want - 1.0).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn ranks_sharing_a_node_slow_each_other_by_how_busy_the_others_are() {
        let cal = Calibration { dtype: Dtype::Fp32, ranks: 2, gemm: vec![[64.0, 64.0, 64.0, 1e-3]], contention: [("gemm".to_string(), 2.0)].into(), ..Default::default() };
        let cpu = CostModel::calibrated(ClusterSpec::default_for(gpus::cpu(), 2), &cal, false);
        let op = gemm(64, 64, 64);
        let alone = cpu.op_seconds_on(&op, false, 0);
        assert!((alone - 1e-3).abs() < 1e-12, "without a first pass nothing is slowed: {alone}");
        // The other rank computes half the time: 1 + (2 - 1) * 0.5.
        let shared = cpu.contended(&[0.9, 0.5]);
        assert!((shared.op_seconds_on(&op, false, 0) / alone - 1.5).abs() < 1e-9);
        assert!((shared.op_seconds_on(&op, false, 1) / alone - 1.9).abs() < 1e-9);
    }

    #[test]
    fn transfers_cost_latency_plus_bytes_over_the_link() {
        let text = "name = \"t\"\ngpu = \"a100-80gb-sxm\"\nnodes = 2\ngpus_per_node = 8\nnvlink_gbs = 600\nib_gbs = 25\n";
        let m = CostModel::roofline(ClusterSpec::parse(text, "t").unwrap(), Dtype::Bf16, true);
        // Inside a node: 4 us + 1 GB over 300 GB/s x 0.8; across nodes: 8 us + 1 GB over 25 GB/s x 0.8.
        assert!((m.message_seconds(0, 1, 1_000_000_000, false) - (4e-6 + 1e9 / 240e9)).abs() < 1e-12);
        assert!((m.message_seconds(0, 8, 1_000_000_000, false) - (8e-6 + 1e9 / 20e9)).abs() < 1e-12);
        // A ring all-reduce of 8 GPUs in a node: 14 steps of 4 us and 2·7/8 of the buffer.
        let c = CommNode { kind: MessageKind::AllReduce, category: None, group: "g".into(), group_ranks: (0..8).collect::<Vec<_>>().into(), bytes: 1 << 30, sends: vec![], recvs: vec![] };
        let (t, steps) = m.collective_seconds(&c);
        assert_eq!(steps, 14.0);
        assert!((t - (14.0 * 4e-6 + 1.75 * (1u64 << 30) as f64 / 240e9)).abs() < 1e-12);
    }

    #[test]
    fn the_sequence_overhead_is_charged_to_the_chains_ops_and_not_to_attention() {
        let shape = crate::backend::DecodeShape { nseq: 4, cap: 1024, len: 1024, heads: 4, kv_heads: 4, head_dim: 64 };
        let cache = (2 * 4 * 1024 * 256 * 4) as u64;
        let decode = OpRecord { kind: OpKind::AttentionDecode, dims: OpDims::Decode(shape), flops: 0.0, bytes_read: cache, bytes_written: 0, inputs: vec![], outputs: vec![], stream: 0 };
        let cal = |overhead| Calibration {
            dtype: Dtype::Fp32,
            ranks: 1,
            gemm: vec![[64.0, 64.0, 64.0, 1e-3]],
            decode: vec![[4.0, 1024.0, cache as f64, 1e-3]],
            sequence_overhead_s_per_byte: overhead,
            ..Default::default()
        };
        let plain = CostModel::calibrated(ClusterSpec::default_for(gpus::cpu(), 1), &cal(0.0), false);
        let chained = CostModel::calibrated(ClusterSpec::default_for(gpus::cpu(), 1), &cal(1e-9), false);
        // The decode table streams cold caches already: the same time with or without the overhead.
        assert_eq!(chained.op_seconds(&decode, true), plain.op_seconds(&decode, true));
        // A GEMM pays 1 ns per byte it moves beyond its table time.
        let op = gemm(64, 64, 64);
        let extra = chained.op_seconds(&op, false) - plain.op_seconds(&op, false);
        assert!((extra - 1e-9 * (op.bytes_read + op.bytes_written) as f64).abs() < 1e-12, "{extra}");
    }
}
