//! Reading a results file back into memory ([`read_run`]), for `analyze`,
//! for tests, and for a resumed run that needs its earlier batches.

use super::attrs;
use super::routing::{ExpertRow, RoutingRow};
use super::rows::{BatchRow, CommRow, DeviceRow, RankRow, RankRowV1, RankRowV2, RoleRowH5, SummaryRow};
use super::schema::{check_format, PROVENANCE, STRATEGIES};
use super::{CategoryData, DeviceInfo, Provenance, Result, ResultsError, RoleRow, RunData, RunStatus, Seeds, StrategyData, StrategyInfo};
use crate::metrics::{BatchRecord, ExpertLoad, RankRecord};
use hdf5::types::VarLenUnicode;
use hdf5::{File, Group};
use std::collections::BTreeMap;
use std::path::Path;

/// Reads a whole results file: provenance, strategies, and for each
/// category its batches (with ITL and tokens), rank rows, summary and
/// predictions.
pub fn read_run(path: impl AsRef<Path>) -> Result<RunData> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| ResultsError::Open { path: path.to_path_buf(), source })?;
    super::cloexec::keep_from_children(path);
    let version = check_format(&file, path)?;
    let status = attrs::get_str(&file, "status")?.map(|s| s.parse::<RunStatus>()).transpose()?;
    let mut strategies = Vec::new();
    for g in ordered_groups(&file.group(STRATEGIES)?)? {
        let info = StrategyInfo {
            name: last_component(&g.name()),
            kind: attrs::get_str(&g, "kind")?.unwrap_or_default(),
            params: attrs::get_str(&g, "params")?.unwrap_or_default(),
            world_ranks_used: attrs::get_array(&g, "world_ranks_used")?,
        };
        let categories = ordered_groups(&g)?.iter().map(|c| read_category(c, path, version)).collect::<Result<Vec<_>>>()?;
        strategies.push(StrategyData { info, categories });
    }
    Ok(RunData {
        path: path.to_path_buf(),
        status,
        ended_utc: attrs::get_str(&file, "ended_utc")?,
        failed_batch: attrs::get_str(&file, "failed_batch")?,
        failure: attrs::get_str(&file, "failure")?,
        provenance: read_provenance(&file)?,
        strategies,
    })
}

fn last_component(h5_path: &str) -> String {
    h5_path.rsplit('/').next().unwrap_or_default().to_string()
}

/// Child groups in the order their `order` attribute gives (HDF5 itself
/// lists links alphabetically).
fn ordered_groups(parent: &Group) -> Result<Vec<Group>> {
    let mut keyed = Vec::new();
    for g in parent.groups()? {
        let order = attrs::get_scalar::<u32>(&g, "order")?.unwrap_or(u32::MAX);
        keyed.push((order, g.name(), g));
    }
    keyed.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(keyed.into_iter().map(|(_, _, g)| g).collect())
}

fn strings(g: &Group, name: &str) -> Result<Vec<String>> {
    if !g.link_exists(name) {
        return Ok(Vec::new());
    }
    Ok(g.dataset(name)?.read_raw::<VarLenUnicode>()?.iter().map(|s| s.as_str().to_string()).collect())
}

fn read_provenance(file: &File) -> Result<Provenance> {
    let g = file.group(PROVENANCE)?;
    let text = |name: &str| -> Result<String> { Ok(attrs::get_str(&g, name)?.unwrap_or_default()) };
    let job_toml = if g.link_exists("job_toml") { g.dataset("job_toml")?.read_scalar::<VarLenUnicode>()?.as_str().to_string() } else { String::new() };
    let devices = if g.link_exists("devices") {
        g.dataset("devices")?
            .read_raw::<DeviceRow>()?
            .into_iter()
            .map(|d| DeviceInfo { world_rank: d.world_rank, name: d.name.as_str().to_string(), uuid: d.uuid.as_str().to_string(), pci_bus_id: d.pci_bus_id.as_str().to_string() })
            .collect()
    } else {
        Vec::new()
    };
    let roles = if g.link_exists("roles") {
        g.dataset("roles")?
            .read_raw::<RoleRowH5>()?
            .into_iter()
            .map(|r| RoleRow { world_rank: r.world_rank, host: r.host.as_str().to_string(), local_rank: r.local_rank, strategy: r.strategy.as_str().to_string(), role: r.role.as_str().to_string() })
            .collect()
    } else {
        Vec::new()
    };
    let mut slurm = BTreeMap::new();
    if g.link_exists("slurm") {
        let s = g.group("slurm")?;
        for name in s.attr_names()? {
            let value = attrs::get_str(&s, &name)?.unwrap_or_default();
            slurm.insert(name, value);
        }
    }
    Ok(Provenance {
        schema_version: attrs::get_scalar::<u32>(file, "schema_version")?.unwrap_or(0),
        tool_version: text("tool_version")?,
        git_commit: text("git_commit")?,
        job_toml,
        argv: strings(&g, "argv")?,
        hosts: strings(&g, "hosts")?,
        world_size: attrs::get_scalar::<u32>(&g, "world_size")?.unwrap_or(0),
        backend: text("backend")?,
        transport: text("transport")?,
        mpi_library: text("mpi_library")?,
        cuda_version: attrs::get_str(&g, "cuda_version")?,
        nccl_version: attrs::get_str(&g, "nccl_version")?,
        driver_version: attrs::get_str(&g, "driver_version")?,
        devices,
        slurm,
        seeds: Seeds { workload: attrs::get_scalar::<u64>(&g, "seed_workload")?.unwrap_or(0), weights: attrs::get_scalar::<u64>(&g, "seed_weights")?.unwrap_or(0) },
        started_utc: text("started_utc")?,
        categories: strings(&g, "categories")?,
        roles,
    })
}

/// The batches of a category group with their ITL and token payloads.
pub(crate) fn read_batches(g: &Group) -> Result<Vec<BatchRecord>> {
    if !g.link_exists("batches") {
        return Ok(Vec::new());
    }
    let rows = g.dataset("batches")?.read_raw::<BatchRow>()?;
    let itl = g.dataset("itl_s")?.read_raw::<f64>()?;
    let (tokens, width) = if g.link_exists("tokens") {
        let ds = g.dataset("tokens")?;
        let width = ds.shape()[1];
        (ds.read_raw::<u32>()?, width)
    } else {
        (Vec::new(), 0)
    };
    let slice = |v: &[f64], from: u64, count: u64| v.get(from as usize..(from + count) as usize).map(<[f64]>::to_vec);
    rows.iter()
        .map(|row| {
            let mut b = row.to_record();
            b.itl_s = slice(&itl, row.itl_offset, row.itl_count).ok_or_else(|| corrupt(g, row, "itl_s"))?;
            if row.output_tokens > 0 {
                let from = row.tokens_offset as usize * width;
                let to = from + row.num_sequences as usize * width;
                b.tokens = tokens.get(from..to).ok_or_else(|| corrupt(g, row, "tokens"))?.to_vec();
            }
            Ok(b)
        })
        .collect()
}

fn corrupt(g: &Group, row: &BatchRow, dataset: &str) -> ResultsError {
    ResultsError::Corrupt(format!("{}: batch {} points past the end of `{dataset}`", g.name(), row.batch_index))
}

/// The rank rows of a category group of a file of schema `version`.
pub(crate) fn read_ranks(g: &Group, version: u32) -> Result<Vec<RankRecord>> {
    if !g.link_exists("ranks") {
        return Ok(Vec::new());
    }
    let ds = g.dataset("ranks")?;
    Ok(match version {
        1 => ds.read_raw::<RankRowV1>()?.iter().map(RankRowV1::to_record).collect(),
        2 => ds.read_raw::<RankRowV2>()?.iter().map(RankRowV2::to_record).collect(),
        _ => ds.read_raw::<RankRow>()?.iter().map(RankRow::to_record).collect(),
    })
}

/// The expert rows of a category group (none before schema 3 or without experts).
pub(crate) fn read_experts(g: &Group) -> Result<Vec<ExpertLoad>> {
    if !g.link_exists("experts") {
        return Ok(Vec::new());
    }
    Ok(g.dataset("experts")?.read_raw::<ExpertRow>()?.into_iter().map(ExpertRow::to_load).collect())
}

fn read_category(g: &Group, path: &Path, version: u32) -> Result<CategoryData> {
    let summary = if g.link_exists("summary") {
        let row = g.dataset("summary")?.read_raw::<SummaryRow>()?.into_iter().next();
        let comm_rows = if g.link_exists("comm") { g.dataset("comm")?.read_raw::<CommRow>()? } else { Vec::new() };
        let comm = comm_rows
            .iter()
            .map(|c| c.to_aggregate().ok_or_else(|| ResultsError::UnknownCommCategory { path: path.to_path_buf(), name: c.category.as_str().to_string() }))
            .collect::<Result<Vec<_>>>()?;
        row.map(|r| r.to_summary(comm))
    } else {
        None
    };
    let (mut predictions, mut prediction_notes) = (BTreeMap::new(), BTreeMap::new());
    if g.link_exists("prediction") {
        let p = g.group("prediction")?;
        for name in p.attr_names()? {
            // Schema 4 adds text notes beside the float figures.
            let text = version >= 4 && matches!(p.attr(&name)?.dtype()?.to_descriptor()?, hdf5::types::TypeDescriptor::VarLenUnicode);
            if text {
                if let Some(v) = attrs::get_str(&p, &name)? {
                    prediction_notes.insert(name, v);
                }
            } else if let Some(v) = attrs::get_scalar::<f64>(&p, &name)? {
                predictions.insert(name, v);
            }
        }
    }
    let routing = if g.link_exists("routing") { g.dataset("routing")?.read_raw::<RoutingRow>()?.into_iter().map(RoutingRow::to_routing).collect() } else { Vec::new() };
    Ok(CategoryData { name: last_component(&g.name()), batches: read_batches(g)?, ranks: read_ranks(g, version)?, experts: read_experts(g)?, routing, summary, predictions, prediction_notes })
}
