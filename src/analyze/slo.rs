//! Latency limits for goodput: `--slo ttft=2000ms,tpot=200ms`, or a named
//! preset holding MLPerf Inference's LLM latency constraints.
//!
//! The presets are the Server-scenario `ttft_latency` and `tpot_latency`
//! of the LLM benchmarks in MLPerf Inference's `loadgen/mlperf.conf`
//! (MLCommons, github.com/mlcommons/inference). MLPerf applies them to the
//! 99th percentile of a run; goodput here is the share of sequences whose
//! batch met both limits (see docs/results-schema.md).
//!
//! Parsing and arithmetic only.

use std::fmt;

/// A TTFT and a TPOT limit, in seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Slo {
    /// What the user gave (a preset name, or the limits as typed).
    pub name: String,
    pub ttft_s: f64,
    pub tpot_s: f64,
}

/// MLPerf Inference's LLM Server-scenario limits: (preset, TTFT ms, TPOT ms).
pub const MLPERF_PRESETS: [(&str, f64, f64); 9] = [
    ("mlperf-llama2-70b", 2000.0, 200.0),
    ("mlperf-llama2-70b-interactive", 450.0, 40.0),
    ("mlperf-mixtral-8x7b", 2000.0, 200.0),
    ("mlperf-llama3.1-405b", 6000.0, 175.0),
    ("mlperf-llama3.1-405b-interactive", 4500.0, 80.0),
    ("mlperf-llama3.1-8b", 2000.0, 100.0),
    ("mlperf-llama3.1-8b-interactive", 500.0, 30.0),
    ("mlperf-deepseek-r1", 2000.0, 80.0),
    ("mlperf-deepseek-r1-interactive", 1500.0, 15.0),
];

/// Why an `--slo` value was refused.
#[derive(Debug, thiserror::Error)]
#[error("--slo `{given}`: {why} (expected `ttft=<time>,tpot=<time>` with units us, ms or s, or a preset: {presets})")]
pub struct SloError {
    given: String,
    why: String,
    presets: String,
}

fn duration_s(text: &str) -> Option<f64> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    let v: f64 = number.trim().parse().ok()?;
    (v.is_finite() && v > 0.0).then_some(v * scale)
}

impl Slo {
    /// Parses `ttft=…,tpot=…` (both required) or a preset name.
    pub fn parse(given: &str) -> Result<Self, SloError> {
        let fail = |why: &str| SloError { given: given.to_string(), why: why.to_string(), presets: MLPERF_PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ") };
        if let Some((name, ttft_ms, tpot_ms)) = MLPERF_PRESETS.iter().find(|p| p.0 == given.trim()) {
            return Ok(Self { name: name.to_string(), ttft_s: ttft_ms * 1e-3, tpot_s: tpot_ms * 1e-3 });
        }
        let (mut ttft, mut tpot) = (None, None);
        for part in given.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| fail(&format!("`{part}` is not key=value")))?;
            let v = duration_s(value).ok_or_else(|| fail(&format!("`{value}` is not a positive time with a unit")))?;
            match key.trim() {
                "ttft" => ttft = Some(v),
                "tpot" => tpot = Some(v),
                other => return Err(fail(&format!("unknown limit `{other}`"))),
            }
        }
        match (ttft, tpot) {
            (Some(ttft_s), Some(tpot_s)) => Ok(Self { name: given.trim().to_string(), ttft_s, tpot_s }),
            _ => Err(fail("both ttft and tpot are needed")),
        }
    }

    /// Whether a batch with this TTFT and TPOT meets both limits.
    pub fn met_by(&self, ttft_s: f64, tpot_s: f64) -> bool {
        ttft_s <= self.ttft_s && tpot_s <= self.tpot_s
    }
}

impl fmt::Display for Slo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (TTFT ≤ {} ms, TPOT ≤ {} ms)", self.name, self.ttft_s * 1e3, self.tpot_s * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_with_units() {
        let s = Slo::parse("ttft=2000ms,tpot=0.2s").unwrap();
        assert_eq!((s.ttft_s, s.tpot_s), (2.0, 0.2));
        assert!(s.met_by(2.0, 0.2) && !s.met_by(2.01, 0.1));
    }

    #[test]
    fn a_preset_gives_mlperfs_limits() {
        let s = Slo::parse("mlperf-llama2-70b-interactive").unwrap();
        assert!((s.ttft_s - 0.45).abs() < 1e-12 && (s.tpot_s - 0.04).abs() < 1e-12);
    }

    #[test]
    fn a_missing_limit_or_unit_is_refused_with_the_presets_listed() {
        let e = Slo::parse("ttft=2000ms").unwrap_err().to_string();
        assert!(e.contains("both ttft and tpot") && e.contains("mlperf-llama2-70b"), "{e}");
        assert!(Slo::parse("ttft=2000,tpot=200ms").unwrap_err().to_string().contains("unit"));
    }
}
