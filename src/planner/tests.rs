//! DAG validation on the tiny model: the strategies' own DAGs pass every
//! rule, and each rule catches a DAG broken on purpose.

use super::dag::{Dag, EdgeKind, Node, NodeKind, Phase};
use super::execute::{record, Execution};
use super::validate::{validate, MemoryLimit};
use super::*;
use crate::backend::shape::{BufRef, OpDims, OpKind, OpRecord};
use crate::spec::parse_job;
use std::collections::HashSet;

const JOB: &str = r#"
[run]
backend = "cpu"
[model]
preset = "tiny"
[workload]
output_tokens = 3
[[workload.category]]
name = "c"
lengths = [40]
[[strategy]]
kind = "baseline"
tp = 2
pp = 2
[[strategy]]
kind = "fapool"
base = 2
pool_max = 2
threshold = 16
tokens_per_pool_gpu = 16
partition = "zigzag"
micro_batches = 2
"#;

/// The DAG of strategy `i` of the job for 2 sequences of 40 tokens.
fn dag(i: usize) -> (Dag, usize) {
    let job = parse_job(JOB, &[]).unwrap();
    let cfg = job.model.resolve().unwrap();
    let shape = BatchShape { nseq: 2, seq_len: 40, out_tokens: 3 };
    let x = Execution { spec: &job.strategies[i], cfg: &cfg, world: 4, shape, micro_batch_cap: 2, dtype: Dtype::Fp32, cuda_graphs: false, messages_block_compute: true, routing: Default::default() };
    (Dag::build(record(&x).unwrap()), cfg.layers)
}

fn rule(dag: &Dag, layers: usize) -> &'static str {
    validate(dag, layers, None).expect_err("a broken DAG").rule
}

/// The first node of `kind` on `rank` in `phase`.
fn find(dag: &Dag, rank: usize, phase: Phase, kind: OpKind) -> usize {
    dag.programs[rank].iter().copied().find(|&i| dag.nodes[i].phase == phase && dag.nodes[i].op().is_some_and(|o| o.kind == kind)).expect("such a node")
}

#[test]
fn the_strategies_own_dags_pass_every_rule() {
    for i in 0..2 {
        let (d, layers) = dag(i);
        assert!(validate(&d, layers, None).is_ok(), "strategy {i}: {:?}", validate(&d, layers, None));
        assert!(d.decode_steps() == 2 && !d.sampled(Phase::Prefill).is_empty());
    }
}

#[test]
fn a_cycle_is_caught() {
    let (mut d, layers) = dag(0);
    let (a, b) = (d.programs[0][3], d.programs[0][9]);
    d.edges.push(super::dag::Edge { from: b, to: a, kind: EdgeKind::Data { rank: 0, buf: 0 } });
    assert_eq!(rule(&d, layers), "dag-acyclic");
}

#[test]
fn a_receive_expecting_other_bytes_than_its_send_is_caught() {
    let (mut d, layers) = dag(0);
    let e = d.edges.iter_mut().find(|e| matches!(e.kind, EdgeKind::Message { .. })).expect("a message");
    if let EdgeKind::Message { bytes, .. } = &mut e.kind {
        *bytes += 4;
    }
    assert_eq!(rule(&d, layers), "message-bytes-match");
}

#[test]
fn a_receive_without_its_send_is_caught() {
    let (mut d, layers) = dag(1);
    let at = d.edges.iter().position(|e| matches!(e.kind, EdgeKind::Message { .. })).expect("a message");
    d.edges.remove(at);
    assert_eq!(rule(&d, layers), "message-bytes-match");
}

#[test]
fn a_gemm_whose_k_is_not_its_inputs_width_is_caught() {
    let (mut d, layers) = dag(0);
    let id = find(&d, 0, Phase::Prefill, OpKind::Matmul);
    if let NodeKind::Compute(op) = &mut d.nodes[id].kind {
        if let OpDims::Gemm { k, .. } = &mut op.dims {
            *k += 1;
        }
    }
    let v = validate(&d, layers, None).unwrap_err();
    assert_eq!((v.rule, v.node), ("edge-shapes-match", Some(id)));
}

#[test]
fn a_buffer_read_at_another_length_than_written_is_caught() {
    let (mut d, layers) = dag(0);
    let e = *d.edges.iter().find(|e| matches!(e.kind, EdgeKind::Data { .. })).unwrap();
    let EdgeKind::Data { buf, .. } = e.kind else { unreachable!() };
    let input = d.nodes[e.to].inputs[0].iter_mut().find(|b| b.id == buf).unwrap();
    input.len += 1;
    assert_eq!(rule(&d, layers), "edge-shapes-match");
}

#[test]
fn work_that_reaches_no_output_is_caught() {
    let (mut d, layers) = dag(0);
    let out = BufRef { id: 1 << 40, len: 8, cols: Some(8) };
    let op = OpRecord { kind: OpKind::MergePartials, dims: OpDims::Rows { rows: 1, cols: 8 }, flops: 1.0, bytes_read: 0, bytes_written: 32, inputs: vec![], outputs: vec![out], stream: 0 };
    let id = d.nodes.len();
    d.nodes.push(Node { kind: NodeKind::Compute(op), phase: Phase::Prefill, ranks: vec![1], stream: 0, inputs: vec![vec![]], outputs: vec![vec![out]] });
    d.programs[1].insert(2, id);
    d.creators[1].insert(out.id, id);
    let v = validate(&d, layers, None).unwrap_err();
    assert_eq!((v.rule, v.node), ("reaches-output", Some(id)));
}

#[test]
fn a_missing_residual_addition_is_caught() {
    let (mut d, layers) = dag(1);
    // The base's first residual addition of the prefill into each
    // micro-batch's stream (on both base ranks, which hold a share of every
    // micro-batch's rows) becomes a plain copy: the sampled rows then went
    // through one addition fewer.
    for rank in [0, 1] {
        let mut targets = HashSet::new();
        let adds: Vec<usize> = d.programs[rank].iter().copied().filter(|&i| d.nodes[i].phase == Phase::Prefill && d.nodes[i].op().is_some_and(|o| o.kind == OpKind::Add)).collect();
        for id in adds {
            let target = d.nodes[id].inputs[0][0].id;
            if targets.insert(target) {
                if let NodeKind::Compute(op) = &mut d.nodes[id].kind {
                    op.kind = OpKind::CopyRows;
                }
            }
        }
    }
    let v = validate(&d, layers, None).unwrap_err();
    assert_eq!(v.rule, "residual-per-sub-layer");
    assert!(v.detail.contains("went through 3 residual additions per element; 2 layers need 4"), "{v}");
}

#[test]
fn a_gpu_over_its_memory_is_caught() {
    let (d, layers) = dag(0);
    let peak = d.peak_bytes.iter().copied().max().unwrap();
    let v = validate(&d, layers, Some(&MemoryLimit { capacity: peak - 1, model_estimate: 0 })).unwrap_err();
    assert_eq!(v.rule, "memory-within-capacity");
    let v = validate(&d, layers, Some(&MemoryLimit { capacity: peak, model_estimate: peak + 1 })).unwrap_err();
    assert!(v.rule == "memory-within-capacity" && v.at.contains("memory model"), "{v}");
}

#[test]
fn a_pipeline_of_two_stages_overlaps_its_micro_batches() {
    // Baseline TP=2 x PP=2 with two micro-batches: stage 1 works on the first
    // while stage 0 works on the second, so the prefill takes less than the
    // sum of both stages' busy time.
    let (d, _) = dag(0);
    let cost = CostModel::roofline(cluster::ClusterSpec::default_for(gpus::by_key("h200").unwrap(), 4), Dtype::Fp32, false);
    let tl = timeline::simulate(&d, &cost).unwrap();
    let p = report::predict(&d, &tl, d.shape);
    let busy: f64 = [0, 2].iter().map(|&r| p.prefill_use[r].compute_s + p.prefill_use[r].comm_s).sum();
    assert!(p.ttft_s < busy, "TTFT {} vs busy {busy}", p.ttft_s);
    // The bubble: stage 1 waits in its receive for stage 0's first micro-batch.
    assert!(p.prefill_use[2].wait_s > 0.0, "{:?}", p.prefill_use[2]);
}

/// The single-rank prediction of the tiny model for 2 sequences of 40
/// tokens and 5 output tokens under `cal` (steps replayed as graphs or not).
fn one_rank_prediction(cal: &calibration::Calibration, graphs: bool) -> (report::Prediction, Dag) {
    one_rank_plan(cal, graphs, 5, 0)
}

/// The same with `out` output tokens, `steps` decode steps simulated (0: all).
fn one_rank_plan(cal: &calibration::Calibration, graphs: bool, out: usize, steps: usize) -> (report::Prediction, Dag) {
    let job = parse_job(&JOB.replace("tp = 2\npp = 2", "tp = 1\npp = 1"), &[]).unwrap();
    let cfg = job.model.resolve().unwrap();
    let cost = CostModel::calibrated(cluster::ClusterSpec::default_for(gpus::cpu(), 1), cal, graphs);
    let planner = Planner { job: &job, cfg: &cfg, cost: &cost, world: 1, decode_steps: steps };
    let p = planner.point(&job.strategies[0], BatchShape { nseq: 2, seq_len: 40, out_tokens: out }).unwrap();
    (p.prediction, p.dag)
}

#[test]
fn every_decode_step_pays_the_host_turn_and_the_first_also_its_recording() {
    let plain = calibration::Calibration { dtype: Dtype::Fp32, gemm: vec![[16.0, 64.0, 64.0, 1e-5]], ..Default::default() };
    let looped = calibration::Calibration { step_overhead_s: 1e-3, record_s: 5e-3, record_per_op_s: 1e-4, ..plain.clone() };
    let (base, dag) = one_rank_prediction(&plain, true);
    let ops = dag.programs[0].iter().filter(|&&i| dag.nodes[i].phase == Phase::Decode(1) && dag.nodes[i].op().is_some_and(|o| o.kind != OpKind::Alloc)).count();
    assert!(ops > 10, "a decode step of the tiny model issues {ops} operations");
    for (graphs, first) in [(true, 1e-3 + 5e-3 + 1e-4 * ops as f64), (false, 1e-3)] {
        let (with, _) = one_rank_prediction(&looped, graphs);
        assert_eq!(with.itl_s.len(), 4);
        let extra: Vec<f64> = with.itl_s.iter().zip(&base.itl_s).map(|(a, b)| a - b).collect();
        assert!((extra[0] - first).abs() < 1e-9, "graphs {graphs}: the first step pays {first} s more, got {}", extra[0]);
        assert!(extra[1..].iter().all(|e| (e - 1e-3).abs() < 1e-9), "graphs {graphs}: later steps pay the host turn only: {extra:?}");
        assert!((with.ttft_s - base.ttft_s).abs() < 1e-12, "the prefill pays none");
        let turn: f64 = with.decode_path.iter().filter(|p| p.what == "host turn (rank 0)").map(|p| p.seconds).sum();
        assert!((turn - 1e-3).abs() < 1e-9, "the critical path names the host's turn, not the step's first operation: {:?}", with.decode_path);
    }
    // With 2 of 32 steps simulated, TPOT is the line through the steady
    // steps plus the recording spread over all 32.
    let (short, _) = one_rank_plan(&plain, true, 33, 2);
    let (long, _) = one_rank_plan(&looped, true, 33, 2);
    let want = 1e-3 + (5e-3 + 1e-4 * ops as f64) / 32.0;
    assert!((long.tpot_s - short.tpot_s - want).abs() < 1e-9, "TPOT {} s more, want {want}", long.tpot_s - short.tpot_s);
    let roofline = CostModel::roofline(cluster::ClusterSpec::default_for(gpus::by_key("h200").unwrap(), 1), Dtype::Bf16, true);
    assert_eq!(roofline.step_gap(1, 100), 0.0, "the roofline charges no host turn");
}

/// Two ranks whose exchanges send to each other and receive from each
/// other (an all-to-all's pattern), each after a compute node on its rank;
/// with `feedback`, rank 1's compute node reads what rank 0's exchange
/// received, so rank 1 sends only after rank 0 has received from it.
fn crossed_exchanges(feedback: bool) -> Dag {
    use super::dag::{CommNode, Edge};
    use crate::comm::sim_transport::{MessageKind, Part};
    let part = |peer, message| Part { peer, message, bytes: 8, sent_bytes: 8, cols: None };
    let compute = |rank| {
        let op = OpRecord { kind: OpKind::CopyRows, dims: OpDims::Rows { rows: 1, cols: 2 }, flops: 0.0, bytes_read: 8, bytes_written: 8, inputs: vec![], outputs: vec![], stream: 0 };
        Node { kind: NodeKind::Compute(op), phase: Phase::Prefill, ranks: vec![rank], stream: 0, inputs: vec![vec![]], outputs: vec![vec![]] }
    };
    let exchange = |rank: usize, sent, received| {
        let c = CommNode {
            kind: MessageKind::Exchange,
            category: None,
            group: "pair".into(),
            group_ranks: vec![0, 1].into(),
            bytes: 16,
            sends: vec![part(1 - rank, sent)],
            recvs: vec![part(1 - rank, received)],
        };
        Node { kind: NodeKind::Comm(c), phase: Phase::Prefill, ranks: vec![rank], stream: 0, inputs: vec![vec![]], outputs: vec![vec![]] }
    };
    let message = |from, to, message| Edge { from, to, kind: EdgeKind::Message { message, bytes: 8, sent_bytes: 8 } };
    // Nodes: 0 compute and 1 exchange on rank 0, 2 compute and 3 exchange on rank 1.
    let mut edges = vec![message(1, 3, 1), message(3, 1, 2)];
    if feedback {
        edges.push(Edge { from: 1, to: 2, kind: EdgeKind::Data { rank: 1, buf: 7 } });
    }
    let (d, _) = dag(0);
    Dag { nodes: vec![compute(0), exchange(0, 1, 2), compute(1), exchange(1, 2, 1)], edges, programs: vec![vec![0, 1], vec![2, 3]], creators: vec![Default::default(); 2], ..d }
}

#[test]
fn exchanges_that_send_to_each_other_are_no_cycle() {
    assert!(super::validate::topological_order(&crossed_exchanges(false)).is_ok());
}

#[test]
fn a_send_that_waits_for_its_own_receive_is_a_cycle() {
    assert!(super::validate::topological_order(&crossed_exchanges(true)).is_err());
}

#[test]
fn a_buffer_one_call_reads_several_times_is_one_data_edge() {
    let (d, _) = dag(1);
    // FA Pool's hand-off sends its parts of one buffer to every pool rank.
    assert!(d.nodes.iter().any(|n| n.inputs.iter().any(|ins| ins.iter().map(|b| b.id).collect::<HashSet<_>>().len() < ins.len())), "a call reads one buffer twice");
    let mut seen = HashSet::new();
    for e in &d.edges {
        if let EdgeKind::Data { rank, buf } = e.kind {
            assert!(seen.insert((e.from, e.to, rank, buf)), "{e:?} twice");
        }
    }
}
