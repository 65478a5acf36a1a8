//! `fapool check FILE.h5`: whether a results file can be trusted. It checks
//! the layout against the schema (every documented attribute, dataset and
//! column present), the provenance (hosts, roles and devices for every
//! rank, a job spec that parses), and the file's internal consistency:
//! TPS equals tokens over wall time, the rank rows add up to the batch and
//! summary totals, each batch's per-step latencies add up to E2E − TTFT,
//! and every strategy generated the same tokens. Every problem is listed.
//!
//! A file that is not a fapool results file of this schema version is bad
//! input, reported as an error rather than as problems.

use super::AnalyzeError;
use crate::metrics::{CategorySummary, Distribution, LayerRouting};
use crate::results::{inspect_layout, read_run, schema_columns, verify_format, FileLayout, RankAggregates, RunData, RunStatus};
use std::collections::BTreeSet;
use std::path::Path;

/// A per-step sum may miss E2E − TTFT by host bookkeeping between steps:
/// up to this many seconds, or this share of E2E − TTFT if that is larger.
pub const STEP_SUM_TOLERANCE_S: f64 = 2e-3;
pub const STEP_SUM_TOLERANCE_SHARE: f64 = 0.02;
/// Relative tolerance of stored totals against their recomputation
/// (floating-point summation order only).
const REL: f64 = 1e-9;

/// What the checker found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Checks made.
    pub checks: usize,
    /// Every failed check, in words.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// No problem found.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    fn expect(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        self.checks += 1;
        if !ok {
            self.problems.push(problem());
        }
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) || (a.is_nan() && b.is_nan())
}

const ROOT_ATTRS: [&str; 6] = ["format", "schema_version", "tool_version", "git_commit", "status", "started_utc"];
const PROVENANCE_ATTRS: [&str; 9] = ["tool_version", "git_commit", "world_size", "backend", "transport", "mpi_library", "seed_workload", "seed_weights", "started_utc"];
const PROVENANCE_DATASETS: [&str; 6] = ["job_toml", "argv", "hosts", "categories", "devices", "roles"];
const STRATEGY_ATTRS: [&str; 4] = ["kind", "params", "world_ranks_used", "order"];

fn check_layout(layout: &FileLayout, version: u32, r: &mut CheckReport) {
    let columns = schema_columns(version);
    let get = |path: &str| layout.objects.get(path);
    let attrs = |r: &mut CheckReport, path: &str, names: &[&str]| {
        if let Some(o) = get(path) {
            for a in names {
                r.expect(o.attrs.iter().any(|x| x == a), || format!("{path}: attribute `{a}` missing"));
            }
        }
    };
    attrs(r, "/", &ROOT_ATTRS);
    r.expect(get("/provenance").is_some(), || "group /provenance missing".into());
    attrs(r, "/provenance", &PROVENANCE_ATTRS);
    let dataset = |r: &mut CheckReport, path: String, name: &str| {
        let o = get(&path);
        r.expect(o.is_some_and(|o| o.is_dataset), || format!("dataset {path} missing"));
        if let (Some(o), Some((_, want))) = (o, columns.iter().find(|c| c.0 == name)) {
            for col in want {
                r.expect(o.fields.contains(col), || format!("{path}: column `{col}` missing"));
            }
        }
    };
    for d in PROVENANCE_DATASETS {
        dataset(r, format!("/provenance/{d}"), d);
    }
    r.expect(get("/strategies").is_some(), || "group /strategies missing".into());
    let strategies: Vec<&String> = layout.objects.keys().filter(|k| k.starts_with("/strategies/") && k.matches('/').count() == 2).collect();
    for s in strategies {
        attrs(r, s, &STRATEGY_ATTRS);
        let categories: Vec<&String> = layout.objects.iter().filter(|(k, o)| !o.is_dataset && k.starts_with(&format!("{s}/")) && k.matches('/').count() == 3).map(|(k, _)| k).collect();
        for c in categories {
            attrs(r, c, &["order"]);
            for d in ["batches", "itl_s", "ranks"] {
                dataset(r, format!("{c}/{d}"), d);
            }
            // A mixture-of-experts strategy's routing rows, where it has them.
            for d in ["experts", "routing"] {
                if get(&format!("{c}/{d}")).is_some() {
                    dataset(r, format!("{c}/{d}"), d);
                }
            }
            // Summary and comm come together, after the category ends.
            if get(&format!("{c}/summary")).is_some() || get(&format!("{c}/comm")).is_some() {
                dataset(r, format!("{c}/summary"), "summary");
                dataset(r, format!("{c}/comm"), "comm");
            }
        }
    }
}

fn check_provenance(run: &RunData, r: &mut CheckReport) {
    let p = &run.provenance;
    r.expect(p.world_size > 0, || "provenance: world_size is 0".into());
    r.expect(p.hosts.len() == p.world_size as usize, || format!("provenance: {} hosts for world_size {}", p.hosts.len(), p.world_size));
    r.expect(!p.git_commit.is_empty(), || "provenance: git_commit is empty".into());
    r.expect(!p.started_utc.is_empty(), || "provenance: started_utc is empty".into());
    r.expect(!p.categories.is_empty(), || "provenance: no workload categories".into());
    r.expect(crate::spec::parse_job(&p.job_toml, &[]).is_ok(), || "provenance: job_toml does not parse as a job spec".into());
    if p.backend == "cuda" {
        r.expect(p.devices.len() == p.world_size as usize, || format!("provenance: {} devices for {} ranks on the cuda backend", p.devices.len(), p.world_size));
    }
    r.expect(run.status != Some(RunStatus::Running) || run.ended_utc.is_none(), || "a running file has ended_utc".into());
    r.expect(run.status == Some(RunStatus::Running) || run.ended_utc.is_some(), || "status is final but ended_utc is missing".into());
    for s in &run.strategies {
        for rank in &s.info.world_ranks_used {
            r.expect(p.roles.iter().any(|x| x.strategy == s.info.name && x.world_rank == *rank), || format!("provenance: no role of rank {rank} in {}", s.info.name));
        }
    }
}

fn check_category(run: &RunData, strategy: &str, c: &crate::results::CategoryData, r: &mut CheckReport) {
    let at = |what: String| format!("{strategy}/{}: {what}", c.name);
    let world = run.provenance.world_size as usize;
    for b in &c.batches {
        let steps = b.output_tokens.saturating_sub(1) as usize;
        r.expect(b.itl_s.len() == steps, || at(format!("batch {} has {} per-step latencies for {} output tokens", b.batch_index, b.itl_s.len(), b.output_tokens)));
        r.expect(b.ttft_s > 0.0 && b.e2e_s >= b.ttft_s, || at(format!("batch {}: TTFT {} s, E2E {} s", b.batch_index, b.ttft_s, b.e2e_s)));
        let decode = b.e2e_s - b.ttft_s;
        let gap = decode - b.itl_s.iter().sum::<f64>();
        r.expect(gap.abs() <= STEP_SUM_TOLERANCE_S.max(STEP_SUM_TOLERANCE_SHARE * decode), || {
            at(format!("batch {}: per-step latencies sum to E2E − TTFT − {:.3} ms (E2E − TTFT = {:.3} ms)", b.batch_index, gap * 1e3, decode * 1e3))
        });
        let ranks: Vec<_> = c.ranks.iter().filter(|x| x.batch_index == b.batch_index).collect();
        let distinct: BTreeSet<u32> = ranks.iter().map(|x| x.world_rank).collect();
        r.expect(ranks.len() == world && distinct.len() == world, || at(format!("batch {}: {} rank rows ({} ranks) for a world of {world}", b.batch_index, ranks.len(), distinct.len())));
        let rank_flops: f64 = ranks.iter().map(|x| x.flops).sum();
        r.expect(close(rank_flops, b.flops, 1e-6), || at(format!("batch {}: rank flops add up to {rank_flops:e}, the batch records {:e}", b.batch_index, b.flops)));
    }
    check_routing(c, &at, r);
    let Some(stored) = &c.summary else {
        r.expect(run.status != Some(RunStatus::Complete), || at("no summary in a complete run".into()));
        return;
    };
    let (s, a) = (&stored.summary, &stored.aggregates);
    let wall: f64 = c.batches.iter().map(|b| b.e2e_s).sum();
    let recomputed = CategorySummary::from_batches(&c.batches, s.wall_s);
    r.expect(s.batches == c.batches.len(), || at(format!("summary counts {} batches, the file holds {}", s.batches, c.batches.len())));
    r.expect(s.total_tokens == recomputed.total_tokens, || at(format!("summary total_tokens {} ≠ {} summed over the batches", s.total_tokens, recomputed.total_tokens)));
    r.expect(s.sequences == recomputed.sequences, || at(format!("summary sequences {} ≠ {} summed over the batches", s.sequences, recomputed.sequences)));
    r.expect(close(s.wall_s, wall, REL), || at(format!("summary wall_s {} ≠ {wall} (the batches' E2E summed)", s.wall_s)));
    let tps = if s.wall_s > 0.0 { s.total_tokens as f64 / s.wall_s } else { 0.0 };
    r.expect(close(s.tps, tps, REL), || at(format!("TPS {} ≠ total_tokens / wall_s = {tps}", s.tps)));
    for (name, stored, fresh) in [("TTFT", &s.ttft, &recomputed.ttft), ("TPOT", &s.tpot, &recomputed.tpot), ("E2E", &s.e2e, &recomputed.e2e), ("ITL", &s.itl, &recomputed.itl)] {
        let same = |x: &Distribution, y: &Distribution| x.count == y.count && close(x.mean, y.mean, REL) && close(x.p50, y.p50, REL) && close(x.p90, y.p90, REL) && close(x.p99, y.p99, REL);
        r.expect(same(stored, fresh), || at(format!("summary {name} {stored:?} ≠ {fresh:?} recomputed from the batches")));
    }
    let flops: f64 = c.batches.iter().map(|b| b.flops).sum();
    r.expect(close(stored.flops, flops, REL), || at(format!("summary flops {:e} ≠ {flops:e} summed over the batches", stored.flops)));
    let fresh = RankAggregates::from_ranks(&c.ranks);
    r.expect(a.rank_rows == fresh.rank_rows, || at(format!("summary aggregates {} rank rows, the file holds {}", a.rank_rows, fresh.rank_rows)));
    r.expect(close(a.comm_s, fresh.comm_s, REL), || at(format!("summary comm_s {} ≠ {} summed over the active rank rows", a.comm_s, fresh.comm_s)));
    r.expect(close(a.active_wall_s, fresh.active_wall_s, REL), || at(format!("summary active_wall_s {} ≠ {} summed over the active rank rows", a.active_wall_s, fresh.active_wall_s)));
    r.expect(a.peak_memory_max_bytes == fresh.peak_memory_max_bytes, || at(format!("summary peak memory {:?} ≠ {:?}, the largest rank row", a.peak_memory_max_bytes, fresh.peak_memory_max_bytes)));
    r.expect(a.energy_j.is_some() == fresh.energy_j.is_some() && close(a.energy_j.unwrap_or(0.0), fresh.energy_j.unwrap_or(0.0), REL), || {
        at(format!("summary energy {:?} J ≠ {:?} J summed over the rank rows", a.energy_j, fresh.energy_j))
    });
    for f in &fresh.comm {
        let stored_c = a.comm_of(f.category);
        // A writer that predates a category stored no row for it; none is needed where nothing was sent.
        let unused = f.calls == 0 && f.bytes == 0 && f.seconds_sum == 0.0;
        let ok = stored_c.map_or(unused, |x| x.bytes == f.bytes && x.calls == f.calls && close(x.seconds_sum, f.seconds_sum, REL));
        r.expect(ok, || {
            let (bytes, calls, secs) = stored_c.map_or((0, 0, 0.0), |x| (x.bytes, x.calls, x.seconds_sum));
            at(format!("comm {}: summary {bytes} bytes, {calls} calls, {secs} s ≠ rank rows {} bytes, {} calls, {} s", f.category.name(), f.bytes, f.calls, f.seconds_sum))
        });
    }
}

/// The expert rows add up: per batch, layer and phase every kept
/// assignment was processed by exactly one expert copy; expert rows belong
/// to recorded batches; the stored routing summary is the rows' summary.
fn check_routing(c: &crate::results::CategoryData, at: &dyn Fn(String) -> String, r: &mut CheckReport) {
    if c.experts.is_empty() {
        return;
    }
    let mut sums: std::collections::BTreeMap<(u32, u32, bool), (u64, u64)> = std::collections::BTreeMap::new();
    for l in &c.experts {
        let s = sums.entry((l.batch_index, l.layer, l.decode)).or_default();
        s.0 += l.routed - l.dropped.min(l.routed);
        s.1 += l.received;
    }
    for ((batch, layer, decode), (kept, received)) in sums {
        r.expect(kept == received, || at(format!("batch {batch} layer {layer} {}: {kept} assignments kept, {received} rows processed by the experts", if decode { "decode" } else { "prefill" })));
        r.expect(c.batches.iter().any(|b| b.batch_index == batch), || at(format!("expert rows of batch {batch}, which the file does not record")));
    }
    if c.summary.is_some() {
        let fresh = LayerRouting::of(&c.experts);
        let same = fresh.len() == c.routing.len()
            && fresh.iter().zip(&c.routing).all(|(a, b)| {
                a.layer == b.layer && a.decode == b.decode && a.assignments == b.assignments && a.dropped == b.dropped && close(a.expert_max, b.expert_max, REL) && close(a.rank_mean, b.rank_mean, REL)
            });
        r.expect(same, || at(format!("the routing summary ({} rows) is not the summary of the expert rows ({} rows)", c.routing.len(), fresh.len())));
    }
}

fn check_tokens(run: &RunData, r: &mut CheckReport) {
    for category in run.category_order() {
        let with: Vec<_> = run.strategies.iter().filter_map(|s| Some((s.info.name.as_str(), s.category(&category)?))).collect();
        let Some((first, reference)) = with.first() else { continue };
        for (name, c) in &with[1..] {
            for b in &c.batches {
                let Some(x) = reference.batches.iter().find(|x| x.batch_index == b.batch_index && x.seq_len == b.seq_len && x.num_sequences == b.num_sequences) else { continue };
                let differs = x.tokens != b.tokens;
                r.expect(!differs, || {
                    let at = x.tokens.iter().zip(&b.tokens).position(|(p, q)| p != q).unwrap_or(0);
                    let width = b.output_tokens.max(1) as usize;
                    format!("{category} batch {}: tokens of {name} differ from {first} (first at sequence {}, output token {})", b.batch_index, at / width, at % width)
                });
            }
        }
    }
}

/// Checks the file at `path`. Bad input (not HDF5, truncated, not a fapool
/// results file, another schema version) is an error; problems of a
/// readable results file are in the report.
pub fn check(path: &Path) -> Result<CheckReport, AnalyzeError> {
    let bad = |source| AnalyzeError::BadInput { path: path.to_path_buf(), source };
    let version = verify_format(path).map_err(bad)?;
    let layout = inspect_layout(path).map_err(bad)?;
    let mut report = CheckReport::default();
    check_layout(&layout, version, &mut report);
    let run = match read_run(path) {
        Ok(run) => run,
        Err(err) => {
            report.expect(false, || format!("the file does not read back: {err}"));
            return Ok(report);
        }
    };
    check_provenance(&run, &mut report);
    for s in &run.strategies {
        for c in &s.categories {
            check_category(&run, &s.info.name, c, &mut report);
        }
    }
    check_tokens(&run, &mut report);
    Ok(report)
}
