//! The pieces FA Pool's pipeline moves, as pure arithmetic.
//!
//! A batch with the pool active is cut into **units**: a micro-batch of
//! sequences × one causal chunk of the prompt (prefill), or a group of
//! sequences (decode). Within a unit, every active pool rank owns a
//! **block** — its segments of the chunk in every sequence (contiguous or
//! zigzag) — and every base rank owns a **part** of each block: block i's
//! rows split into B contiguous parts. A base rank keeps its rows of a unit
//! ordered block by block (part (0, b), part (1, b), ...), so the message
//! from base rank b to pool rank i is one contiguous slice on both sides,
//! and the way back is the same slice.

use super::layout::{pool_segments, Partition, Segments};
use crate::backend::RowRun;
use std::ops::Range;

/// Splits `n` items into `m` consecutive parts, some empty when `m > n`.
pub fn split_parts(n: usize, m: usize) -> Vec<Range<usize>> {
    let m = m.max(1);
    (0..m).map(|j| j * n / m..(j + 1) * n / m).collect()
}

/// One unit of a batch: sequences `seqs` (batch indices) × prompt positions
/// `positions` (a causal chunk; the single new position in decode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub seqs: Range<usize>,
    pub positions: Range<usize>,
}

impl Unit {
    /// Rows of the unit's activations, sequence-major.
    pub fn rows(&self) -> usize {
        self.seqs.len() * self.positions.len()
    }
    /// The unit-local row of `position` in sequence `n` (counted from `seqs.start`).
    pub fn row(&self, n: usize, position: usize) -> usize {
        n * self.positions.len() + (position - self.positions.start)
    }
}

/// The prefill units of a batch: micro-batch-major, chunks in causal order
/// (a chunk's queries attend to the K/V of the earlier chunks of its
/// micro-batch, which the pool already holds).
pub fn prefill_units(micro_batches: &[Range<usize>], seq_len: usize, chunks: usize) -> Vec<Unit> {
    let cuts = split_parts(seq_len, chunks.min(seq_len).max(1));
    micro_batches.iter().flat_map(|m| cuts.iter().map(move |c| Unit { seqs: m.clone(), positions: c.clone() })).collect()
}

/// Who owns which rows of one unit. Nothing is stored per block: every
/// rank of a deployment of P pool ranks builds the units of each batch, so
/// a block's segments, rows and parts are arithmetic on demand (a rank
/// touches its own block, and walks the others' rows only where its
/// dataflow reads them all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitBlocks {
    pub unit: Unit,
    /// Active pool ranks.
    pub p: usize,
    /// Base ranks.
    pub b: usize,
    /// How each chunk is partitioned among the pool ranks; `None` in decode
    /// (one block, no segments).
    partition: Option<Partition>,
}

impl UnitBlocks {
    /// The blocks of a prefill unit: each chunk is partitioned among the
    /// `p` pool ranks.
    pub fn prefill(unit: Unit, partition: Partition, p: usize, b: usize) -> Self {
        Self { unit, p, b, partition: Some(partition) }
    }

    /// A decode unit (one new row per sequence): every pool rank attends
    /// every sequence, so there are no blocks; the base parts split the
    /// sequences.
    pub fn decode(unit: Unit, p: usize, b: usize) -> Self {
        Self { unit, p, b, partition: None }
    }

    /// A decode unit: one block of every row, and no pool rank's segments.
    pub fn is_decode(&self) -> bool {
        self.partition.is_none()
    }

    /// Segments `(start, len)` (prompt positions) of pool rank `i` (none in decode).
    pub fn segments(&self, i: usize) -> Segments {
        match self.partition {
            Some(partition) => pool_segments(partition, self.unit.positions.len(), self.p, i).shifted(self.unit.positions.start),
            None => Segments::default(),
        }
    }

    /// Rows of pool rank `i`'s block.
    pub fn block_len(&self, i: usize) -> usize {
        match self.partition {
            Some(_) => self.unit.seqs.len() * self.segments(i).total(),
            None => self.unit.rows(),
        }
    }

    /// The largest block (all-gathers pad to it).
    pub fn max_block(&self) -> usize {
        (0..self.blocks()).map(|i| self.block_len(i)).max().unwrap_or(0)
    }

    /// Unit-local rows of pool rank `i`'s block, in block order: each
    /// sequence's segments.
    pub fn block_runs(&self, i: usize) -> BlockRuns<'_> {
        let whole = self.is_decode().then(|| RowRun::new(0, self.unit.rows()));
        BlockRuns { unit: &self.unit, segments: self.segments(i), seq: 0, at: 0, whole }
    }

    /// Rows of block `i` that base rank `b` owns (a range of the block's
    /// rows): block i's rows split into `self.b` contiguous parts.
    pub fn part(&self, i: usize, b: usize) -> Range<usize> {
        let (n, m) = (self.block_len(i), self.b.max(1));
        b * n / m..(b + 1) * n / m
    }

    /// Blocks of the unit (the pool ranks in prefill; one shared block in decode).
    pub fn blocks(&self) -> usize {
        if self.is_decode() {
            1
        } else {
            self.p
        }
    }

    /// Base rank `b`'s parts in its order: `(block, where the part sits
    /// among the rank's rows, the part's range of the block's rows)`.
    pub fn base_parts(&self, b: usize) -> impl Iterator<Item = (usize, usize, Range<usize>)> + '_ {
        (0..self.blocks()).scan(0, move |at, i| {
            let part = self.part(i, b);
            let offset = std::mem::replace(at, *at + part.len());
            Some((i, offset, part))
        })
    }

    /// Base rank `b`'s parts that hold rows: `(block, the part's values
    /// among the rank's rows of `width` values each)`, what the hand-off and
    /// the return move.
    pub fn base_slices(&self, b: usize, width: usize) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        self.base_parts(b).filter(|(_, _, part)| !part.is_empty()).map(move |(i, at, part)| (i, at * width..(at + part.len()) * width))
    }

    /// Rows base rank `b` owns in the unit.
    pub fn base_rows(&self, b: usize) -> usize {
        (0..self.blocks()).map(|i| self.part(i, b).len()).sum()
    }

    /// The most rows any base rank owns (base all-gathers pad to it).
    pub fn max_base_rows(&self) -> usize {
        (0..self.b).map(|b| self.base_rows(b)).max().unwrap_or(0)
    }

    /// Unit-local rows of `range` of block `i`'s rows, as runs.
    pub fn block_slice_runs(&self, i: usize, range: Range<usize>) -> Vec<RowRun> {
        let mut out = Vec::new();
        let mut at = 0;
        for r in self.block_runs(i) {
            let (lo, hi) = (range.start.max(at), range.end.min(at + r.len));
            if lo < hi {
                out.push(RowRun::new(r.start + lo - at, hi - lo));
            }
            at += r.len;
        }
        out
    }

    /// Unit-local rows base rank `b` owns, in its order.
    pub fn base_runs(&self, b: usize) -> Vec<RowRun> {
        (0..self.blocks()).flat_map(|i| self.block_slice_runs(i, self.part(i, b))).collect()
    }
}

/// The row runs of one block ([`UnitBlocks::block_runs`]), computed as they
/// are walked.
#[derive(Clone, Debug)]
pub struct BlockRuns<'a> {
    unit: &'a Unit,
    segments: Segments,
    /// The sequence (unit-local) and segment next.
    seq: usize,
    at: usize,
    /// A decode unit's one run of every row.
    whole: Option<RowRun>,
}

impl Iterator for BlockRuns<'_> {
    type Item = RowRun;
    fn next(&mut self) -> Option<RowRun> {
        if let Some(w) = self.whole.take() {
            return Some(w);
        }
        while self.seq < self.unit.seqs.len() {
            if let Some(&(start, len)) = self.segments.get(self.at) {
                self.at += 1;
                return Some(RowRun::new(self.unit.row(self.seq, start), len));
            }
            (self.seq, self.at) = (self.seq + 1, 0);
        }
        None
    }
}

/// One step of the pipeline every rank walks in the same order: the
/// hand-off of a unit's layer input from the base to the pool, or the
/// return of its attention result. Each rank does its part of each step in
/// this order, so every communicator sees the same sequence of messages on
/// all its members (no deadlock with blocking messages), while on a GPU the
/// messages run on their own streams and overlap the compute around them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Handoff { layer: usize, unit: usize },
    Return { layer: usize, unit: usize },
}

/// The steps of `layers` layers over `units` units. Pipelined: every unit's
/// first hand-off, then per layer and unit the return and at once the next
/// layer's hand-off of the same unit, so the pool attends unit j + 1 while
/// the base runs the FFN of unit j, across layers. Not pipelined: each
/// unit's hand-off and return one after another.
pub fn schedule(layers: usize, units: usize, pipelined: bool) -> Vec<Step> {
    let mut out = Vec::with_capacity(2 * layers * units);
    if !pipelined {
        for layer in 0..layers {
            for unit in 0..units {
                out.push(Step::Handoff { layer, unit });
                out.push(Step::Return { layer, unit });
            }
        }
        return out;
    }
    out.extend((0..units).map(|unit| Step::Handoff { layer: 0, unit }));
    for layer in 0..layers {
        for unit in 0..units {
            out.push(Step::Return { layer, unit });
            if layer + 1 < layers {
                out.push(Step::Handoff { layer: layer + 1, unit });
            }
        }
    }
    out
}

impl UnitBlocks {
    /// The base rank that owns unit-local row `row`, and its index among
    /// that rank's rows.
    pub fn owner_of(&self, row: usize) -> Option<(usize, usize)> {
        (0..self.b).find_map(|b| {
            let mut at = 0;
            for r in self.base_runs(b) {
                if r.range().contains(&row) {
                    return Some((b, at + row - r.start));
                }
                at += r.len;
            }
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_may_be_empty_and_cover_every_item_once() {
        assert_eq!(split_parts(2, 4), vec![0..0, 0..1, 1..1, 1..2]);
        assert_eq!(split_parts(7, 2), vec![0..3, 3..7]);
    }

    #[test]
    fn prefill_units_are_micro_batch_major_with_causal_chunks() {
        let u = prefill_units(&[0..2, 2..3], 10, 3);
        assert_eq!(u.len(), 6);
        assert_eq!((u[0].seqs.clone(), u[0].positions.clone()), (0..2, 0..3));
        assert_eq!(u[2].positions, 6..10);
        assert_eq!(u[3].seqs, 2..3);
        // More chunks than tokens: one chunk per token.
        assert_eq!(prefill_units(&[0..1], 2, 8).len(), 2);
    }

    #[test]
    fn every_unit_row_belongs_to_exactly_one_base_rank_and_one_block() {
        for part in [Partition::Contiguous, Partition::Zigzag] {
            for (nseq, chunk, p, b) in [(2, 9, 2, 3), (1, 16, 4, 2), (3, 5, 3, 1), (1, 3, 4, 2)] {
                let unit = Unit { seqs: 0..nseq, positions: 7..7 + chunk };
                let ub = UnitBlocks::prefill(unit.clone(), part, p, b);
                let mut owner = vec![0; unit.rows()];
                for r in 0..b {
                    for run in ub.base_runs(r) {
                        run.range().for_each(|x| owner[x] += 1);
                    }
                    assert_eq!(ub.base_runs(r).iter().map(|x| x.len).sum::<usize>(), ub.base_rows(r));
                }
                assert!(owner.iter().all(|&c| c == 1), "{part:?} {nseq} {chunk} {p} {b}: {owner:?}");
                let in_blocks: usize = (0..p).map(|i| ub.block_len(i)).sum();
                assert_eq!(in_blocks, unit.rows());
            }
        }
    }

    #[test]
    fn a_base_rank_holds_its_parts_block_by_block() {
        // 1 sequence of chunk 0..8, 2 pool ranks (contiguous), 2 base ranks:
        // block 0 = rows 0..4, block 1 = rows 4..8; base 0 owns 0..2 and 4..6.
        let ub = UnitBlocks::prefill(Unit { seqs: 0..1, positions: 0..8 }, Partition::Contiguous, 2, 2);
        assert_eq!(ub.base_runs(0), vec![RowRun::new(0, 2), RowRun::new(4, 2)]);
        assert_eq!(ub.base_parts(0).nth(1), Some((1, 2, 0..2)));
        assert_eq!(ub.base_runs(1), vec![RowRun::new(2, 2), RowRun::new(6, 2)]);
    }

    #[test]
    fn a_base_ranks_parts_sit_one_after_another_in_block_order() {
        for part in [Partition::Contiguous, Partition::Zigzag] {
            let ub = UnitBlocks::prefill(Unit { seqs: 0..2, positions: 3..20 }, part, 3, 2);
            for b in 0..2 {
                let parts: Vec<_> = ub.base_parts(b).collect();
                assert_eq!(parts.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1, 2]);
                for (k, (i, at, part)) in parts.iter().enumerate() {
                    assert_eq!((*at, part.clone()), (parts[..k].iter().map(|p| p.2.len()).sum::<usize>(), ub.part(*i, b)));
                }
                assert_eq!(parts.iter().map(|p| p.2.len()).sum::<usize>(), ub.base_rows(b));
                // The slices: the parts that hold rows, in values of a row width.
                let slices: Vec<_> = parts.iter().filter(|p| !p.2.is_empty()).map(|(i, at, part)| (*i, at * 5..(at + part.len()) * 5)).collect();
                assert_eq!(ub.base_slices(b, 5).collect::<Vec<_>>(), slices);
            }
        }
    }

    #[test]
    fn a_block_runs_over_its_segments_of_each_sequence() {
        // Zigzag over 2 pool ranks of chunk 0..8: rank 0 owns positions 0..2 and 6..8.
        let ub = UnitBlocks::prefill(Unit { seqs: 0..2, positions: 0..8 }, Partition::Zigzag, 2, 1);
        assert_eq!(*ub.segments(0), [(0, 2), (6, 2)]);
        assert_eq!(ub.block_runs(0).collect::<Vec<_>>(), vec![RowRun::new(0, 2), RowRun::new(6, 2), RowRun::new(8, 2), RowRun::new(14, 2)]);
        assert_eq!((ub.block_len(0), ub.max_block()), (8, 8));
        // A decode unit is one block of every row.
        let d = UnitBlocks::decode(Unit { seqs: 0..3, positions: 8..9 }, 2, 1);
        assert_eq!((d.block_runs(0).collect::<Vec<_>>(), d.segments(1).len()), (vec![RowRun::new(0, 3)], 0));
    }

    #[test]
    fn decode_units_split_the_sequences_among_base_ranks() {
        let ub = UnitBlocks::decode(Unit { seqs: 3..8, positions: 100..101 }, 3, 2);
        assert_eq!((ub.base_rows(0), ub.base_rows(1)), (2, 3));
        assert_eq!(ub.base_runs(1), vec![RowRun::new(2, 3)]);
        assert_eq!(ub.blocks(), 1);
    }

    #[test]
    fn the_pipelined_schedule_hands_a_unit_on_as_soon_as_its_result_returns() {
        use Step::*;
        assert_eq!(
            schedule(2, 2, true),
            vec![
                Handoff { layer: 0, unit: 0 },
                Handoff { layer: 0, unit: 1 },
                Return { layer: 0, unit: 0 },
                Handoff { layer: 1, unit: 0 },
                Return { layer: 0, unit: 1 },
                Handoff { layer: 1, unit: 1 },
                Return { layer: 1, unit: 0 },
                Return { layer: 1, unit: 1 }
            ]
        );
        assert_eq!(schedule(1, 2, false), vec![Handoff { layer: 0, unit: 0 }, Return { layer: 0, unit: 0 }, Handoff { layer: 0, unit: 1 }, Return { layer: 0, unit: 1 }]);
        // Every (layer, unit) is handed off once, and returned once after it.
        for pipelined in [true, false] {
            let s = schedule(3, 4, pipelined);
            for l in 0..3 {
                for u in 0..4 {
                    let h = s.iter().position(|x| *x == Handoff { layer: l, unit: u }).unwrap();
                    let r = s.iter().position(|x| *x == Return { layer: l, unit: u }).unwrap();
                    assert!(h < r);
                    if l > 0 {
                        assert!(s.iter().position(|x| *x == Return { layer: l - 1, unit: u }).unwrap() < h, "a layer's input leaves after the previous layer's result");
                    }
                }
            }
        }
    }

    #[test]
    fn the_owner_of_a_row_is_the_base_rank_whose_part_holds_it() {
        let ub = UnitBlocks::prefill(Unit { seqs: 0..1, positions: 0..8 }, Partition::Contiguous, 2, 2);
        assert_eq!(ub.owner_of(7), Some((1, 3)));
        assert_eq!(ub.owner_of(4), Some((0, 2)));
        assert_eq!(ub.owner_of(8), None);
    }
}
