//! Calibration files: what `fapool calibrate` measured through the suite's
//! own backend (and, with `--comm`, its communication layer), and how the
//! cost model reads between the measured points.
//!
//! Layout (HDF5, schema [`SCHEMA_VERSION`]): root attributes `format`
//! (`fapool-calibration`), `schema_version`, `dtype`, `backend`, `device`,
//! `created_utc`, `heads`, `kv_heads`, `head_dim`, `ranks` (of the `--comm` run, 0
//! without), `sequence_overhead_s_per_byte` (what an operation costs in a
//! sequence of different ones beyond its table time, per byte it moves),
//! `step_overhead_s` (what a decode step costs beyond its operations: the
//! host's turn between one step's sampled tokens and the next step's first
//! kernel), `record_s` and `record_per_op_s` (recording a decode step as a
//! CUDA graph, once per batch: a fixed part and one per operation; 0 where
//! the backend does not record); 2-D f64 datasets, one row per measured point: `gemm` (m, k, n,
//! seconds), `attention_prefill` (sq, q_offset, FLOPs, seconds; one
//! sequence of `heads × head_dim`), `attention_decode` (nseq, len, bytes
//! read, seconds), and under
//! `bandwidth/` one dataset per kind (`rmsnorm`, `elementwise`, `gelu`,
//! `embed`, `copy`, `zeros`: bytes moved, seconds); under `comm/` (`all_reduce`, `all_gather`,
//! `broadcast`, `send_recv`, `host`: ranks, bytes, seconds); under
//! `contention/` one row per class (ranks, slowdown when they compute at once).
//!
//! Interpolation: throughput (FLOP/s, or bytes/s for bandwidth-bound
//! kernels) is interpolated multilinearly in log–log space between the grid
//! points that bracket the query on each axis (GEMM: m, k, n; prefill: query
//! length and query offset; decode: sequences and attended length;
//! bandwidth: bytes), then time = work / throughput. A power law is a
//! straight line there, so the latency-bound small shapes and the
//! throughput-bound large ones are both followed. Outside the grid the edge
//! throughput holds (time keeps scaling with the work). A bracket corner the
//! grid skipped is taken from the nearest measured point. Communication
//! points are fitted per kind to alpha-beta with the algorithm's step counts
//! (ring all-reduce 2(n−1) steps of 1/n of the buffer, all-gather n−1, a
//! pipelined broadcast n−1 latencies and one buffer, point-to-point one),
//! which then apply to other group sizes on the same kind of link.

use crate::backend::Dtype;
use crate::rules::{violation, Violation};
use hdf5::types::VarLenUnicode;
use std::collections::BTreeMap;
use std::path::Path;

pub const FORMAT: &str = "fapool-calibration";
pub const SCHEMA_VERSION: u32 = 2;

/// Bandwidth-bound kernel kinds measured.
pub const BANDWIDTH_KINDS: [&str; 6] = ["rmsnorm", "elementwise", "gelu", "embed", "copy", "zeros"];
/// Communication kinds measured with `--comm`.
pub const COMM_KINDS: [&str; 5] = ["all_reduce", "all_gather", "broadcast", "send_recv", "host"];

/// Everything one calibration run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Calibration {
    pub dtype: Dtype,
    pub backend: String,
    pub device: String,
    pub created_utc: String,
    pub heads: usize,
    /// K/V heads of the attention shapes (older files: `heads`).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Ranks of the `--comm` measurement (0: none).
    pub ranks: usize,
    pub gemm: Vec<[f64; 4]>,
    pub prefill: Vec<[f64; 4]>,
    pub decode: Vec<[f64; 4]>,
    pub bandwidth: BTreeMap<String, Vec<[f64; 2]>>,
    pub comm: BTreeMap<String, Vec<[f64; 3]>>,
    /// What an operation of a run costs beyond its table time per byte it
    /// moves, from a decode layer timed as a chain and op by op (s/byte).
    pub sequence_overhead_s_per_byte: f64,
    /// Seconds a decode step costs beyond its operations' table times: from
    /// the leader's sampled tokens on the host to the next step's first
    /// kernel (step scalars, launch, download, wake-up).
    pub step_overhead_s: f64,
    /// Recording the first decode step of a batch (where the backend
    /// records): `record_s + record_per_op_s · operations` beyond running it.
    pub record_s: f64,
    pub record_per_op_s: f64,
    /// How much `ranks` ranks computing at once on a node slow each other,
    /// per class (`gemm`, `attention_prefill`, `attention_decode`,
    /// `bandwidth`): time together / time alone (`--comm` only).
    pub contention: BTreeMap<String, f64>,
}

fn vlen(s: &str) -> hdf5::Result<VarLenUnicode> {
    s.parse().map_err(|_| hdf5::Error::from("string with NUL"))
}

fn write_rows<const N: usize>(g: &hdf5::Group, name: &str, rows: &[[f64; N]]) -> hdf5::Result<()> {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    let ds = g.new_dataset::<f64>().shape((rows.len(), N)).create(name)?;
    if !flat.is_empty() {
        ds.write_raw(&flat)?;
    }
    Ok(())
}

fn read_rows<const N: usize>(g: &hdf5::Group, name: &str) -> hdf5::Result<Vec<[f64; N]>> {
    if !g.link_exists(name) {
        return Ok(Vec::new());
    }
    let flat = g.dataset(name)?.read_raw::<f64>()?;
    Ok(flat.chunks(N).filter(|c| c.len() == N).map(|c| std::array::from_fn(|i| c[i])).collect())
}

fn set_attr_str(loc: &hdf5::Location, name: &str, v: &str) -> hdf5::Result<()> {
    loc.new_attr::<VarLenUnicode>().shape(()).create(name)?.write_scalar(&vlen(v)?)
}

fn set_attr_u64(loc: &hdf5::Location, name: &str, v: u64) -> hdf5::Result<()> {
    loc.new_attr::<u64>().shape(()).create(name)?.write_scalar(&v)
}

fn attr_str(loc: &hdf5::Location, name: &str) -> Option<String> {
    loc.attr(name).ok()?.read_scalar::<VarLenUnicode>().ok().map(|v| v.as_str().to_string())
}

fn attr_u64(loc: &hdf5::Location, name: &str) -> Option<u64> {
    loc.attr(name).ok()?.read_scalar::<u64>().ok()
}

fn attr_f64(loc: &hdf5::Location, name: &str) -> f64 {
    loc.attr(name).ok().and_then(|a| a.read_scalar::<f64>().ok()).unwrap_or(0.0)
}

impl Calibration {
    /// Writes the file (replacing one at `path`).
    pub fn write(&self, path: &Path) -> hdf5::Result<()> {
        let f = hdf5::File::create(path)?;
        // A process started while the file is open (a test's launcher) must not inherit its lock.
        crate::results::cloexec::keep_from_children(path);
        set_attr_str(&f, "format", FORMAT)?;
        set_attr_u64(&f, "schema_version", SCHEMA_VERSION as u64)?;
        set_attr_str(&f, "dtype", self.dtype.name())?;
        set_attr_str(&f, "backend", &self.backend)?;
        set_attr_str(&f, "device", &self.device)?;
        set_attr_str(&f, "created_utc", &self.created_utc)?;
        set_attr_u64(&f, "heads", self.heads as u64)?;
        set_attr_u64(&f, "kv_heads", self.kv_heads as u64)?;
        set_attr_u64(&f, "head_dim", self.head_dim as u64)?;
        set_attr_u64(&f, "ranks", self.ranks as u64)?;
        for (name, v) in
            [("sequence_overhead_s_per_byte", self.sequence_overhead_s_per_byte), ("step_overhead_s", self.step_overhead_s), ("record_s", self.record_s), ("record_per_op_s", self.record_per_op_s)]
        {
            f.new_attr::<f64>().shape(()).create(name)?.write_scalar(&v)?;
        }
        write_rows(&f, "gemm", &self.gemm)?;
        write_rows(&f, "attention_prefill", &self.prefill)?;
        write_rows(&f, "attention_decode", &self.decode)?;
        let bw = f.create_group("bandwidth")?;
        for (k, rows) in &self.bandwidth {
            write_rows(&bw, k, rows)?;
        }
        let comm = f.create_group("comm")?;
        for (k, rows) in &self.comm {
            write_rows(&comm, k, rows)?;
        }
        let cont = f.create_group("contention")?;
        for (k, factor) in &self.contention {
            write_rows(&cont, k, &[[self.ranks as f64, *factor]])?;
        }
        Ok(())
    }

    /// Reads a calibration file made for `dtype`; another dtype or schema
    /// version is refused by rule.
    pub fn load(path: &Path, dtype: Dtype) -> Result<Self, Violation> {
        let shown = path.display();
        let bad = |why: String| violation("calibration-file-valid", format!("{shown}: {why}"));
        let f = hdf5::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        crate::results::cloexec::keep_from_children(path);
        if attr_str(&f, "format").as_deref() != Some(FORMAT) {
            return Err(bad(format!("not a calibration file (no root attribute `format` = \"{FORMAT}\")")));
        }
        let version = attr_u64(&f, "schema_version").unwrap_or(0);
        if version != SCHEMA_VERSION as u64 {
            return Err(violation("calibration-schema-version", format!("{shown} has calibration schema version {version}; this build reads version {SCHEMA_VERSION} (run `fapool calibrate` again)")));
        }
        let stored = attr_str(&f, "dtype").unwrap_or_default();
        if stored != dtype.name() {
            return Err(violation("calibration-dtype-matches", format!("{shown} was measured in {stored}; the job runs in {} (calibrate with --dtype {})", dtype.name(), dtype.name())));
        }
        let rows = |e: hdf5::Error| bad(e.to_string());
        let mut c = Calibration {
            dtype,
            backend: attr_str(&f, "backend").unwrap_or_default(),
            device: attr_str(&f, "device").unwrap_or_default(),
            created_utc: attr_str(&f, "created_utc").unwrap_or_default(),
            heads: attr_u64(&f, "heads").unwrap_or(1) as usize,
            kv_heads: attr_u64(&f, "kv_heads").or_else(|| attr_u64(&f, "heads")).unwrap_or(1) as usize,
            head_dim: attr_u64(&f, "head_dim").unwrap_or(1) as usize,
            ranks: attr_u64(&f, "ranks").unwrap_or(0) as usize,
            sequence_overhead_s_per_byte: attr_f64(&f, "sequence_overhead_s_per_byte"),
            step_overhead_s: attr_f64(&f, "step_overhead_s"),
            record_s: attr_f64(&f, "record_s"),
            record_per_op_s: attr_f64(&f, "record_per_op_s"),
            gemm: read_rows(&f, "gemm").map_err(rows)?,
            prefill: read_rows(&f, "attention_prefill").map_err(rows)?,
            decode: read_rows(&f, "attention_decode").map_err(rows)?,
            ..Default::default()
        };
        if let Ok(g) = f.group("bandwidth") {
            for k in BANDWIDTH_KINDS {
                c.bandwidth.insert(k.to_string(), read_rows(&g, k).map_err(rows)?);
            }
        }
        if let Ok(g) = f.group("comm") {
            for k in COMM_KINDS {
                let r = read_rows(&g, k).map_err(rows)?;
                if !r.is_empty() {
                    c.comm.insert(k.to_string(), r);
                }
            }
        }
        if let Ok(g) = f.group("contention") {
            for k in g.member_names().map_err(rows)? {
                if let Some(r) = read_rows::<2>(&g, &k).map_err(rows)?.first() {
                    c.contention.insert(k, r[1]);
                }
            }
        }
        if c.gemm.is_empty() {
            return Err(bad("it holds no GEMM measurements".into()));
        }
        Ok(c)
    }
}

/// Throughput over log-spaced axes, interpolated multilinearly in log–log space.
#[derive(Clone, Debug, Default)]
pub struct LogGrid {
    axes: Vec<Vec<f64>>,
    points: BTreeMap<Vec<usize>, f64>,
    raw: Vec<(Vec<f64>, f64)>,
}

fn ln1(x: f64) -> f64 {
    (1.0 + x.max(0.0)).ln()
}

impl LogGrid {
    /// Points `(coordinates, throughput)`; throughputs must be positive.
    pub fn new(points: &[(Vec<f64>, f64)]) -> Self {
        let pts: Vec<(Vec<f64>, f64)> = points.iter().filter(|(_, v)| *v > 0.0 && v.is_finite()).map(|(c, v)| (c.iter().map(|&x| ln1(x)).collect(), v.ln())).collect();
        let dims = pts.first().map_or(0, |p| p.0.len());
        let mut axes: Vec<Vec<f64>> = vec![Vec::new(); dims];
        for (c, _) in &pts {
            for (d, &x) in c.iter().enumerate() {
                if !axes[d].iter().any(|&a| (a - x).abs() < 1e-12) {
                    axes[d].push(x);
                }
            }
        }
        axes.iter_mut().for_each(|a| a.sort_by(f64::total_cmp));
        let mut map = BTreeMap::new();
        for (c, v) in &pts {
            let idx: Vec<usize> = c.iter().enumerate().map(|(d, &x)| axes[d].iter().position(|&a| (a - x).abs() < 1e-12).expect("on its axis")).collect();
            map.insert(idx, *v);
        }
        Self { axes, points: map, raw: pts }
    }

    /// A bandwidth table's grid: rows of (bytes moved, seconds), as bytes per second over bytes.
    pub fn of_bandwidth(rows: &[[f64; 2]]) -> Self {
        Self::new(&rows.iter().map(|r| (vec![r[0]], r[0] / r[1])).collect::<Vec<_>>())
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    fn at(&self, idx: &[usize]) -> f64 {
        if let Some(v) = self.points.get(idx) {
            return *v;
        }
        let want: Vec<f64> = idx.iter().enumerate().map(|(d, &i)| self.axes[d][i]).collect();
        let dist = |c: &[f64]| c.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
        self.raw.iter().min_by(|a, b| dist(&a.0).total_cmp(&dist(&b.0))).map_or(0.0, |p| p.1)
    }

    /// Throughput at `x`.
    pub fn eval(&self, x: &[f64]) -> Option<f64> {
        if self.raw.is_empty() {
            return None;
        }
        let mut brackets = Vec::with_capacity(x.len());
        for (d, &v) in x.iter().enumerate() {
            let a = &self.axes[d];
            let lx = ln1(v);
            let hi = a.iter().position(|&p| p >= lx).unwrap_or(a.len() - 1);
            let lo = if a[hi] >= lx { hi.saturating_sub(1) } else { hi };
            let t = if hi == lo || a[hi] == a[lo] { 0.0 } else { ((lx - a[lo]) / (a[hi] - a[lo])).clamp(0.0, 1.0) };
            // Below the first point: the first point's throughput holds.
            let (lo, t) = if lx <= a[0] { (0, 0.0) } else { (lo, t) };
            brackets.push((lo, hi.max(lo), t));
        }
        let mut total = 0.0;
        for corner in 0..(1usize << x.len()) {
            let mut w = 1.0;
            let idx: Vec<usize> = brackets
                .iter()
                .enumerate()
                .map(|(d, &(lo, hi, t))| {
                    let up = corner >> d & 1 == 1;
                    w *= if up { t } else { 1.0 - t };
                    if up {
                        hi
                    } else {
                        lo
                    }
                })
                .collect();
            if w > 0.0 {
                total += w * self.at(&idx);
            }
        }
        Some(total.exp())
    }
}

/// Alpha-beta of one communication kind, per algorithm step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CommFit {
    pub alpha_s: f64,
    /// Bytes per second of one link.
    pub bandwidth: f64,
}

/// `(latency steps, bandwidth factor)` of a kind over `n` ranks: time =
/// steps · alpha + factor · bytes / bandwidth (bytes as `Comm` counts them).
pub fn steps(kind: &str, n: usize) -> (f64, f64) {
    let nf = n.max(1) as f64;
    match kind {
        "all_reduce" => (2.0 * (nf - 1.0), 2.0 * (nf - 1.0) / nf),
        "all_gather" => (nf - 1.0, (nf - 1.0) / nf),
        "reduce_scatter" => (nf - 1.0, (nf - 1.0) / nf),
        "broadcast" => (nf - 1.0, 1.0),
        "host" => (nf.log2().ceil().max(1.0), 1.0),
        _ => (1.0, 1.0),
    }
}

/// Least-squares alpha-beta of `(ranks, bytes, seconds)` points of `kind`.
pub fn fit(kind: &str, rows: &[[f64; 3]]) -> Option<CommFit> {
    if rows.is_empty() {
        return None;
    }
    let n = rows[0][0] as usize;
    let (s, f) = steps(kind, n);
    // seconds = a + b·bytes
    let m = rows.len() as f64;
    let (sx, sy) = rows.iter().fold((0.0, 0.0), |(a, b), r| (a + r[1], b + r[2]));
    let (mx, my) = (sx / m, sy / m);
    let (sxy, sxx) = rows.iter().fold((0.0, 0.0), |(a, b), r| (a + (r[1] - mx) * (r[2] - my), b + (r[1] - mx).powi(2)));
    let b = if sxx > 0.0 { (sxy / sxx).max(1e-15) } else { my / mx.max(1.0) };
    let a = (my - b * mx).max(0.0);
    Some(CommFit { alpha_s: a / s.max(1.0), bandwidth: f / b })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_law_is_interpolated_exactly_between_points() {
        // throughput = x^0.5
        let g = LogGrid::new(&[(vec![100.0], 10.0), (vec![10000.0], 100.0)]);
        let v = g.eval(&[999.0]).unwrap();
        assert!((v / 1000f64.sqrt() - 1.0).abs() < 0.01, "{v}");
        // Outside the grid the edge throughput holds.
        assert!((g.eval(&[1e6]).unwrap() - 100.0).abs() < 1e-9);
        assert!((g.eval(&[1.0]).unwrap() - 10.0).abs() < 1e-9);
    }

    #[test]
    fn a_skipped_corner_takes_the_nearest_point() {
        let g = LogGrid::new(&[(vec![1.0, 1.0], 4.0), (vec![100.0, 1.0], 4.0), (vec![1.0, 100.0], 4.0)]);
        assert!((g.eval(&[50.0, 50.0]).unwrap() - 4.0).abs() < 1e-9);
    }

    #[test]
    fn an_alpha_beta_fit_recovers_its_link() {
        // all_reduce on 4 ranks: 6 steps of 5 us, 1.5 bytes per byte at 10 GB/s.
        let rows: Vec<[f64; 3]> = [1e3, 1e6, 1e8].iter().map(|&b| [4.0, b, 6.0 * 5e-6 + 1.5 * b / 1e10]).collect();
        let f = fit("all_reduce", &rows).unwrap();
        assert!((f.alpha_s - 5e-6).abs() < 1e-9 && (f.bandwidth / 1e10 - 1.0).abs() < 1e-6, "{f:?}");
    }
}
