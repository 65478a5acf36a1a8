//! The binary tree over the active pool ranks (log2 P levels towards rank
//! 0): at level k a rank whose index is an odd multiple of k hands what it
//! holds to the rank k below and leaves the tree; the others take in what the
//! rank k above holds. FA Pool uses it to gather prefill blocks (as in the
//! paper) and to merge decode partials by their log-sum-exp.

use std::ops::Range;

/// One step of rank `i` in the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeStep {
    /// Hand what this rank holds (the results of ranks `covering`) to `to`;
    /// the rank's part in the tree ends here.
    Send { to: usize, covering: Range<usize> },
    /// Take in the results of ranks `covering` from `from`.
    Receive { from: usize, covering: Range<usize> },
}

/// The steps of rank `i` of `p`, in order. Rank 0 only receives and ends
/// holding every rank's result.
pub fn steps(i: usize, p: usize) -> Vec<TreeStep> {
    let mut out = Vec::new();
    let mut k = 1;
    while k < p {
        if i % (2 * k) == k {
            out.push(TreeStep::Send { to: i - k, covering: i..(i + k).min(p) });
            return out;
        }
        if i + k < p {
            out.push(TreeStep::Receive { from: i + k, covering: i + k..(i + 2 * k).min(p) });
        }
        k *= 2;
    }
    out
}

/// Levels of the tree over `p` ranks: ceil(log2 p).
pub fn levels(p: usize) -> usize {
    p.max(1).next_power_of_two().trailing_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_but_the_root_sends_once_and_the_root_ends_holding_all() {
        for p in 1..=9 {
            let mut held: Vec<Range<usize>> = (0..p).map(|i| i..i + 1).collect();
            // Play the levels in order: a rank's receives come before its send.
            for level in 0..levels(p) {
                let k = 1 << level;
                for i in 0..p {
                    if let Some(TreeStep::Send { to, covering }) = steps(i, p).into_iter().find(|s| matches!(s, TreeStep::Send { to, .. } if i - to == k)) {
                        assert_eq!(held[i], covering, "p={p} rank {i} sends what it holds");
                        assert_eq!(held[to].end, covering.start, "p={p}: contiguous");
                        held[to] = held[to].start..covering.end;
                    }
                }
            }
            assert_eq!(held[0], 0..p, "p={p}");
            for i in 1..p {
                assert_eq!(steps(i, p).iter().filter(|s| matches!(s, TreeStep::Send { .. })).count(), 1, "p={p} rank {i}");
            }
        }
    }

    #[test]
    fn the_tree_has_log2_levels() {
        assert_eq!((levels(1), levels(2), levels(3), levels(4), levels(5), levels(32)), (0, 1, 2, 2, 3, 5));
        assert_eq!(steps(0, 4), vec![TreeStep::Receive { from: 1, covering: 1..2 }, TreeStep::Receive { from: 2, covering: 2..4 }]);
        assert_eq!(steps(3, 4), vec![TreeStep::Send { to: 2, covering: 3..4 }]);
    }
}
