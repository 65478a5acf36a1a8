//! The statistics `analyze` puts beside each figure: median, p90 and p99
//! with a seeded percentile-bootstrap 95 % confidence interval, the
//! coefficient of variation, and whether a point is too noisy (or too thin)
//! to trust.
//!
//! The limits are part of the documented output (docs/results-schema.md,
//! "Analysis exports"): [`BOOTSTRAP_RESAMPLES`] resamples drawn with
//! [`BOOTSTRAP_SEED`], a point is unstable with fewer than [`MIN_BATCHES`]
//! batches or a coefficient of variation above [`CV_LIMIT`].
//!
//! Arithmetic only: no file access, no printing.

use crate::metrics::Distribution;

/// Resamples of every bootstrap confidence interval.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;
/// Seed of the bootstrap's generator (the ASCII bytes of "fapool"), so the
/// same file always gives the same intervals.
pub const BOOTSTRAP_SEED: u64 = 0x6661_706f_6f6c;
/// Fewest batches a point needs to count as stable.
pub const MIN_BATCHES: usize = 3;
/// Largest coefficient of variation (sample standard deviation over mean)
/// a stable point may have.
pub const CV_LIMIT: f64 = 0.10;

/// A small, fast, seedable generator (SplitMix64). The bootstrap needs
/// reproducible uniform indices, not cryptographic quality.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform index below `n` (Lemire's multiply-shift; `n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// The `q`-quantile (0..1) of sorted values, interpolating linearly between
/// closest ranks as numpy's default does; NaN for no values.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let x = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (x - lo as f64)
}

/// The `q`-quantile of unsorted values.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    quantile_sorted(&v, q)
}

/// Sample standard deviation over mean; NaN for fewer than two values or a
/// zero mean.
pub fn coefficient_of_variation(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 2 {
        return f64::NAN;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if mean == 0.0 {
        return f64::NAN;
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    var.sqrt() / mean.abs()
}

/// Why a point is not to be trusted, if it is not.
pub fn instability(n: usize, cv: f64) -> Option<String> {
    if n < MIN_BATCHES {
        Some(format!("{n} batch{} < {MIN_BATCHES}", if n == 1 { "" } else { "es" }))
    } else if cv > CV_LIMIT {
        Some(format!("CV {:.0} % > {:.0} %", cv * 100.0, CV_LIMIT * 100.0))
    } else {
        None
    }
}

/// A 95 % confidence interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    const NAN: Interval = Interval { lo: f64::NAN, hi: f64::NAN };
}

/// Percentile bootstrap: the 2.5 % and 97.5 % quantiles of `statistic` over
/// [`BOOTSTRAP_RESAMPLES`] resamples (with replacement) of `values`.
pub fn bootstrap(values: &[f64], statistic: impl Fn(&[f64]) -> f64) -> Interval {
    bootstrap_indices(values.len(), |idx| {
        let resample: Vec<f64> = idx.iter().map(|&i| values[i]).collect();
        statistic(&resample)
    })
}

/// Percentile bootstrap over resampled index sets of `n` items (so paired
/// data, or ratios of sums, can be resampled together).
pub fn bootstrap_indices(n: usize, statistic: impl Fn(&[usize]) -> f64) -> Interval {
    if n == 0 {
        return Interval::NAN;
    }
    let mut rng = SplitMix64::new(BOOTSTRAP_SEED);
    let mut idx = vec![0usize; n];
    let mut stats: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            for i in idx.iter_mut() {
                *i = rng.below(n);
            }
            statistic(&idx)
        })
        .filter(|s| !s.is_nan())
        .collect();
    stats.sort_by(f64::total_cmp);
    Interval { lo: quantile_sorted(&stats, 0.025), hi: quantile_sorted(&stats, 0.975) }
}

/// Percentile bootstrap of a statistic of two independent samples of `na`
/// and `nb` items, each resampled on its own (an unpaired comparison).
pub fn bootstrap_two(na: usize, nb: usize, statistic: impl Fn(&[usize], &[usize]) -> f64) -> Interval {
    if na == 0 || nb == 0 {
        return Interval::NAN;
    }
    let mut rng = SplitMix64::new(BOOTSTRAP_SEED);
    let (mut a, mut b) = (vec![0usize; na], vec![0usize; nb]);
    let mut stats: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            a.iter_mut().for_each(|i| *i = rng.below(na));
            b.iter_mut().for_each(|i| *i = rng.below(nb));
            statistic(&a, &b)
        })
        .filter(|s| !s.is_nan())
        .collect();
    stats.sort_by(f64::total_cmp);
    Interval { lo: quantile_sorted(&stats, 0.025), hi: quantile_sorted(&stats, 0.975) }
}

/// A latency's figures over the batches of one point (a category or one
/// sequence length).
#[derive(Clone, Debug, PartialEq)]
pub struct Stat {
    pub n: usize,
    pub mean: f64,
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p50_ci: Interval,
    pub p90_ci: Interval,
    pub p99_ci: Interval,
    pub cv: f64,
    /// `Some(reason)` when the point is unstable.
    pub unstable: Option<String>,
}

impl Stat {
    /// The figures of `values`. Mean and percentiles are computed exactly
    /// as the results file's summaries compute them.
    pub fn of(values: &[f64]) -> Self {
        let d = Distribution::of(values);
        let cv = coefficient_of_variation(values);
        let empty = values.is_empty();
        let nan_if_empty = |v: f64| if empty { f64::NAN } else { v };
        Self {
            n: values.len(),
            mean: nan_if_empty(d.mean),
            p10: quantile(values, 0.10),
            p50: nan_if_empty(d.p50),
            p90: nan_if_empty(d.p90),
            p99: nan_if_empty(d.p99),
            p50_ci: bootstrap(values, |v| quantile(v, 0.50)),
            p90_ci: bootstrap(values, |v| quantile(v, 0.90)),
            p99_ci: bootstrap(values, |v| quantile(v, 0.99)),
            cv,
            unstable: instability(values.len(), cv),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_numpy() {
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 0.5), 2.5);
        assert!((quantile(&[4.0, 1.0, 3.0, 2.0], 0.9) - 3.7).abs() < 1e-12);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn the_bootstrap_is_reproducible_and_brackets_the_median() {
        let v: Vec<f64> = (0..40).map(|i| 10.0 + (i % 7) as f64).collect();
        let a = bootstrap(&v, |x| quantile(x, 0.5));
        let b = bootstrap(&v, |x| quantile(x, 0.5));
        assert_eq!(a, b);
        let m = quantile(&v, 0.5);
        assert!(a.lo <= m && m <= a.hi && a.lo < a.hi, "{a:?} around {m}");
    }

    #[test]
    fn a_constant_sample_has_a_zero_width_interval() {
        let ci = bootstrap(&[2.0; 5], |x| quantile(x, 0.5));
        assert_eq!((ci.lo, ci.hi), (2.0, 2.0));
    }

    #[test]
    fn few_batches_or_a_wide_spread_is_unstable() {
        assert!(Stat::of(&[1.0, 1.0]).unstable.unwrap().contains("< 3"));
        assert!(Stat::of(&[1.0, 1.5, 2.0]).unstable.unwrap().contains("CV"));
        assert_eq!(Stat::of(&[1.0, 1.01, 0.99]).unstable, None);
    }

    #[test]
    fn indices_are_uniform_enough() {
        let mut rng = SplitMix64::new(1);
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[rng.below(4)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }
}
