//! `fapool bench comm`: the collectives and point-to-point messages of the
//! strategies, timed through the communication layer (so this measures the
//! path the strategies use, with the comm layer's own timing: device marks
//! on GPU), over message sizes, on every rank of the launch.
//!
//! The harness here does, for every [`Collective`] and size: fill each
//! rank's buffers with known values (a NaN poison where the call must
//! write), one call, a check of every element each rank received against
//! what a correct call gives (the `#wrong` column, summed over the ranks on
//! rank 0), then `warmup` untimed calls and `iters` timed ones, whose median
//! counts. Algorithm bandwidth is the counted bytes over the median time;
//! bus bandwidth applies nccl-tests' factor. Each collective's file says
//! only what is specific to it.
//!
//! This module must not change the comm layer or time anything itself.

mod all_gather;
mod all_reduce;
mod broadcast;
mod send_recv;

use super::{median, Row};
use crate::backend::{Backend, Dtype};
use crate::comm::{Category, Comm, Group, Result};

/// A rank's buffers for one collective call.
pub struct Buffers<B: Backend> {
    pub send: B::Buf,
    pub recv: B::Buf,
}

/// What is specific to one measured collective.
pub trait Collective<B: Backend> {
    /// The row's name in the table.
    fn name(&self) -> &'static str;
    /// The category its calls are recorded under (whose time is read back).
    fn category(&self) -> Category;
    /// Whether it can run on `ranks` ranks.
    fn runs_on(&self, _ranks: usize) -> bool {
        true
    }
    /// Bytes the algorithm bandwidth counts, for `bytes` per rank.
    fn counted_bytes(&self, bytes: f64, _ranks: usize) -> f64 {
        bytes
    }
    /// nccl-tests' bus-bandwidth factor: bus bandwidth = algorithm bandwidth × factor.
    fn bus_factor(&self, ranks: usize) -> f64;
    /// This rank's send and receive buffers before a call, `len` elements
    /// per rank, as host values.
    fn fill(&self, rank: usize, ranks: usize, len: usize) -> (Vec<f32>, Vec<f32>);
    /// One call through the comm layer.
    fn call(&self, comm: &Comm<'_, B>, group: &Group, bufs: &mut Buffers<B>) -> Result<()>;
    /// The length of this rank's receive buffer after the call; `None`: this
    /// rank receives nothing to check.
    fn received(&self, rank: usize, ranks: usize, len: usize) -> Option<usize>;
    /// Element `i` of this rank's receive buffer after a correct call.
    fn expected(&self, rank: usize, ranks: usize, len: usize, i: usize) -> f32;
}

/// The known value element `i` of rank `rank` starts with: small integers,
/// exact in every dtype and in sums over up to 16 ranks.
pub fn value(rank: usize, i: usize) -> f32 {
    ((rank * 7 + i * 3) % 16 + 1) as f32
}

/// Elements of `got` that differ from `want(i)` by more than the dtype's
/// relative tolerance, for a result of `len` elements (NaN always differs;
/// missing or extra elements count too).
pub fn count_wrong(got: &[f32], len: usize, want: impl Fn(usize) -> f32, dtype: Dtype) -> u64 {
    let tol = crate::checks::tolerance(dtype) as f32;
    let close = |g: f32, w: f32| (g - w).abs() <= tol * w.abs(); // false for NaN
    let differ = got.iter().take(len).enumerate().filter(|&(i, &g)| !close(g, want(i))).count();
    (differ + got.len().abs_diff(len)) as u64
}

/// Elements of this rank's receive buffer that a correct call would not leave there.
fn wrong_after<B: Backend>(c: &dyn Collective<B>, be: &B, recv: &B::Buf, rank: usize, ranks: usize, len: usize) -> crate::backend::Result<u64> {
    let Some(expected_len) = c.received(rank, ranks, len) else {
        return Ok(0);
    };
    Ok(count_wrong(&be.download(recv)?, expected_len, |i| c.expected(rank, ranks, len, i), be.dtype()))
}

/// The collectives measured, in table order.
fn collectives<'a, B: Backend + 'a>() -> [&'a dyn Collective<B>; 4] {
    [&all_reduce::AllReduce, &broadcast::Broadcast, &all_gather::AllGather, &send_recv::SendRecv]
}

/// Sums `wrong` over the group's ranks onto group rank 0 (as control
/// messages through the comm layer); other ranks keep their own count.
fn total_wrong<B: Backend>(comm: &Comm<'_, B>, group: &Group, wrong: u64) -> crate::comm::Result<u64> {
    let split = |w: u64| [(w >> 32) as u32, w as u32];
    if group.rank() != 0 {
        comm.send_tokens(Category::Control, group, 0, &split(wrong))?;
        return Ok(wrong);
    }
    let mut total = wrong;
    for r in 1..group.size() {
        let mut words = [0u32; 2];
        comm.recv_tokens(Category::Control, group, r, &mut words)?;
        total = total.saturating_add(((words[0] as u64) << 32) | words[1] as u64);
    }
    Ok(total)
}

/// Times each collective over `sizes` bytes per rank: a checked call,
/// `warmup` untimed then `iters` timed calls; the median call time counts.
/// Every rank of `world` must call this; rank 0's rows carry the totals.
pub fn run<B: Backend>(be: &B, comm: &Comm<'_, B>, world: &Group, sizes: &[usize], warmup: usize, iters: usize) -> Result<Vec<Row>> {
    let (n, me) = (world.size(), world.rank());
    let elem = be.dtype().size_bytes();
    let mut rows = Vec::new();
    for &bytes in sizes {
        let len = (bytes / elem).max(1);
        for c in collectives::<B>() {
            if !c.runs_on(n) {
                continue;
            }
            let (send, recv) = c.fill(me, n, len);
            let mut bufs = Buffers { send: be.upload(&send)?, recv: be.upload(&recv)? };
            c.call(comm, world, &mut bufs)?;
            be.synchronize()?;
            let wrong = total_wrong(comm, world, wrong_after(c, be, &bufs.recv, me, n, len)?)?;
            for _ in 0..warmup {
                c.call(comm, world, &mut bufs)?;
            }
            be.synchronize()?;
            comm.take_stats()?;
            let mut times = Vec::with_capacity(iters);
            for _ in 0..iters {
                c.call(comm, world, &mut bufs)?;
                let stats = comm.take_stats()?;
                times.push(stats.0.by_category.get(&c.category()).map(|s| s.seconds / s.calls.max(1) as f64).unwrap_or(f64::NAN));
            }
            let t = median(times);
            let algbw = c.counted_bytes((len * elem) as f64, n) / t / 1e9;
            rows.push(Row {
                what: c.name().into(),
                shape: format!("{} MiB x {n} ranks", (len * elem) >> 20),
                median_ms: t * 1e3,
                figure: algbw,
                unit: "GB/s alg".into(),
                busbw_gbs: algbw * c.bus_factor(n),
                wrong: Some(wrong),
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn all() -> [&'static dyn Collective<CpuBackend>; 4] {
        collectives::<CpuBackend>()
    }

    #[test]
    fn known_values_are_small_integers_that_differ_between_ranks() {
        assert!((0..64).all(|i| (1.0..=16.0).contains(&value(3, i)) && value(3, i).fract() == 0.0));
        assert_ne!((0..8).map(|i| value(0, i)).collect::<Vec<_>>(), (0..8).map(|i| value(1, i)).collect::<Vec<_>>());
    }

    fn want(c: &dyn Collective<CpuBackend>, rank: usize, ranks: usize, len: usize) -> Option<Vec<f32>> {
        c.received(rank, ranks, len).map(|n| (0..n).map(|i| c.expected(rank, ranks, len, i)).collect())
    }

    #[test]
    fn nan_and_values_off_by_more_than_the_tolerance_count_as_wrong() {
        let want = [4.0, 8.0, 16.0, 2.0];
        let at = |i: usize| want[i];
        assert_eq!(count_wrong(&[4.0, 8.0, 16.0, 2.0], 4, at, Dtype::Fp32), 0);
        assert_eq!(count_wrong(&[4.0, f32::NAN, 16.5, 2.0], 4, at, Dtype::Fp32), 2);
        // bf16: 1% relative
        assert_eq!(count_wrong(&[4.02, 8.0, 16.0, 2.0], 4, at, Dtype::Bf16), 0);
        assert_eq!(count_wrong(&[4.0, 8.0], 4, at, Dtype::Bf16), 2);
    }

    #[test]
    fn an_untouched_receive_buffer_fails_the_check() {
        // What a collective that did nothing leaves behind fails on every
        // rank that receives, except a broadcast's root, which holds the data.
        for c in all() {
            for rank in 0..3 {
                let (_, recv) = c.fill(rank, 3, 5);
                if let Some(want) = want(c, rank, 3, 5) {
                    let wrong = count_wrong(&recv, want.len(), |i| want[i], Dtype::Fp32);
                    let root_of_broadcast = c.name() == "broadcast" && rank == 0;
                    assert_eq!(wrong > 0, !root_of_broadcast, "{} rank {rank}: {wrong} wrong", c.name());
                }
            }
        }
    }

    #[test]
    fn the_sum_of_the_ranks_values_is_what_all_reduce_leaves() {
        let want = want(&all_reduce::AllReduce, 0, 3, 4).unwrap();
        assert_eq!(want, (0..4).map(|i| value(0, i) + value(1, i) + value(2, i)).collect::<Vec<_>>());
        // Missing one rank's contribution is wrong everywhere.
        let partial: Vec<f32> = (0..4).map(|i| value(0, i) + value(1, i)).collect();
        assert_eq!(count_wrong(&partial, 4, |i| want[i], Dtype::Bf16), 4);
    }

    #[test]
    fn all_gather_expects_every_rank_in_order_and_send_recv_only_on_rank_one() {
        let ag = want(&all_gather::AllGather, 2, 3, 2).unwrap();
        assert_eq!(ag, [value(0, 0), value(0, 1), value(1, 0), value(1, 1), value(2, 0), value(2, 1)]);
        assert_eq!(want(&send_recv::SendRecv, 0, 3, 2), None);
        assert_eq!(want(&send_recv::SendRecv, 1, 3, 2), Some(vec![value(0, 0), value(0, 1)]));
    }

    #[test]
    fn bandwidth_factors_are_nccl_tests_ones() {
        let [ar, bc, ag, sr] = all();
        assert_eq!((ar.bus_factor(4), bc.bus_factor(4), ag.bus_factor(4), sr.bus_factor(2)), (1.5, 1.0, 0.75, 1.0));
        assert_eq!(ag.counted_bytes(10.0, 4), 40.0);
        assert!(!sr.runs_on(1) && sr.runs_on(2));
    }
}
