//! Strategies side by side across sequence lengths: each FA Pool-kind
//! strategy against the first baseline-kind one (as `analyze` compares
//! measurements), the improvement as baseline / FA Pool for latencies and
//! FA Pool / baseline for throughput, and the crossover: the shortest
//! sequence length from which FA Pool wins at every longer length planned.

use super::report::Prediction;

/// What "better" means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Objective {
    Tpot,
    Ttft,
    Tps,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Tpot => "TPOT",
            Objective::Ttft => "TTFT",
            Objective::Tps => "TPS",
        }
    }
    /// How much better `a` is than `b` (> 1: better).
    pub fn gain(self, a: &Prediction, b: &Prediction) -> f64 {
        match self {
            Objective::Tpot => b.tpot_s / a.tpot_s,
            Objective::Ttft => b.ttft_s / a.ttft_s,
            Objective::Tps => a.tps / b.tps,
        }
    }
    /// The figure to rank candidates by (smaller is better).
    pub fn cost(self, p: &Prediction) -> f64 {
        match self {
            Objective::Tpot => p.tpot_s,
            Objective::Ttft => p.ttft_s,
            Objective::Tps => -p.tps,
        }
    }
}

/// One planned point: strategy name and kind, and its prediction.
#[derive(Clone, Debug)]
pub struct Planned {
    pub strategy: String,
    pub kind: String,
    pub prediction: Prediction,
}

/// The shortest sequence length from which `challenger` beats `reference`
/// at every longer length in `points`; `None` if it never settles ahead.
pub fn crossover(points: &[Planned], reference: &str, challenger: &str, objective: Objective) -> Option<usize> {
    let mut lengths: Vec<usize> = points.iter().map(|p| p.prediction.shape.seq_len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let at = |name: &str, s: usize| points.iter().find(|p| p.strategy == name && p.prediction.shape.seq_len == s).map(|p| &p.prediction);
    let mut from = None;
    for &s in lengths.iter().rev() {
        match (at(challenger, s), at(reference, s)) {
            (Some(c), Some(r)) if objective.gain(c, r) > 1.0 => from = Some(s),
            (Some(_), Some(_)) => break,
            _ => {}
        }
    }
    from
}

/// The reference baseline and the FA Pool strategies to compare with it.
pub fn pairs(points: &[Planned]) -> Option<(String, Vec<String>)> {
    let reference = points.iter().find(|p| p.kind == "baseline")?.strategy.clone();
    let mut challengers: Vec<String> = Vec::new();
    for p in points.iter().filter(|p| p.kind != "baseline") {
        if !challengers.contains(&p.strategy) {
            challengers.push(p.strategy.clone());
        }
    }
    Some((reference, challengers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{BatchSetup, BatchShape};

    fn p(name: &str, kind: &str, s: usize, tpot: f64) -> Planned {
        let prediction = Prediction {
            shape: BatchShape { nseq: 1, seq_len: s, out_tokens: 2 },
            setup: BatchSetup::default(),
            ttft_s: 1.0,
            tpot_s: tpot,
            e2e_s: 1.0,
            paper_tpot_s: 0.5,
            tps: 1.0,
            itl_s: vec![],
            comm_share: 0.0,
            prefill_use: vec![],
            decode_use: vec![],
            prefill_path: vec![],
            decode_path: vec![],
            prefill_path_ranks: 0,
            active: vec![],
        };
        Planned { strategy: name.into(), kind: kind.into(), prediction }
    }

    #[test]
    fn the_crossover_is_where_fapool_stays_ahead() {
        let pts = vec![
            p("b", "baseline", 1, 1.0),
            p("f", "fapool", 1, 0.9),
            p("b", "baseline", 2, 1.0),
            p("f", "fapool", 2, 1.1),
            p("b", "baseline", 4, 1.0),
            p("f", "fapool", 4, 0.8),
            p("b", "baseline", 8, 1.0),
            p("f", "fapool", 8, 0.5),
        ];
        // Ahead at 1, behind at 2, ahead from 4 on: the crossover is 4.
        assert_eq!(crossover(&pts, "b", "f", Objective::Tpot), Some(4));
        assert_eq!(crossover(&pts[..4], "b", "f", Objective::Tpot), None);
    }
}
