//! Read-only views of a results file beyond [`super::read_run`]: its raw
//! layout (every group and dataset with its attribute and column names),
//! for the checker, which must see what `read_run` papers over (an absent
//! attribute reads as a default there); and the per-rank busy/idle split
//! (`compute_s`, `comm_s`, `wait_s`) of files whose writer records it.
//!
//! Nothing here writes.

use super::reader::check_format;
use super::{Result, ResultsError};
use hdf5::types::TypeDescriptor;
use hdf5::{File, Group, H5Type};
use std::collections::BTreeMap;
use std::path::Path;

/// One group or dataset of the file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectLayout {
    pub is_dataset: bool,
    /// Attribute names.
    pub attrs: Vec<String>,
    /// Column (compound member) names of a compound dataset; empty otherwise.
    pub fields: Vec<String>,
    /// Shape of a dataset; empty for a group or a scalar.
    pub shape: Vec<usize>,
}

/// Every object of the file by its HDF5 path ("/", "/provenance", ...).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileLayout {
    pub objects: BTreeMap<String, ObjectLayout>,
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| ResultsError::Open { path: path.to_path_buf(), source })
}

fn walk(g: &Group, objects: &mut BTreeMap<String, ObjectLayout>) -> Result<()> {
    objects.insert(g.name(), ObjectLayout { is_dataset: false, attrs: g.attr_names()?, ..Default::default() });
    for ds in g.datasets()? {
        let fields = match ds.dtype().and_then(|t| t.to_descriptor()) {
            Ok(TypeDescriptor::Compound(c)) => c.fields.into_iter().map(|f| f.name).collect(),
            _ => Vec::new(),
        };
        objects.insert(ds.name(), ObjectLayout { is_dataset: true, attrs: ds.attr_names()?, fields, shape: ds.shape() });
    }
    for child in g.groups()? {
        walk(&child, objects)?;
    }
    Ok(())
}

/// The layout of the file at `path`, whatever its schema.
pub fn inspect_layout(path: impl AsRef<Path>) -> Result<FileLayout> {
    let file = open(path.as_ref())?;
    let mut objects = BTreeMap::new();
    walk(&file, &mut objects)?;
    Ok(FileLayout { objects })
}

/// Opens the file and refuses it unless it is a fapool results file of
/// this build's schema version (the same test [`super::read_run`] makes).
pub fn verify_format(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    check_format(&open(path)?, path)
}

/// The busy/idle split of one rank in one batch.
#[derive(H5Type, Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct RankTimeSplit {
    pub batch_index: u32,
    pub world_rank: u32,
    pub wall_s: f64,
    pub compute_s: f64,
    pub comm_s: f64,
    pub wait_s: f64,
}

/// The split of every rank row of (strategy, category), or `None` when the
/// file's rank rows do not record it.
pub fn read_rank_time_split(path: impl AsRef<Path>, strategy: &str, category: &str) -> Result<Option<Vec<RankTimeSplit>>> {
    let file = open(path.as_ref())?;
    let name = format!("strategies/{strategy}/{category}/ranks");
    if !file.link_exists(&name) {
        return Ok(None);
    }
    let ds = file.dataset(&name)?;
    let has_all = match ds.dtype()?.to_descriptor()? {
        TypeDescriptor::Compound(c) => ["compute_s", "comm_s", "wait_s"].iter().all(|n| c.fields.iter().any(|f| f.name == *n)),
        _ => false,
    };
    if !has_all {
        return Ok(None);
    }
    // HDF5 converts compound rows member by member, by name, so reading this
    // subset of the columns needs no knowledge of the others.
    Ok(Some(ds.read_raw::<RankTimeSplit>()?))
}

fn column_names<T: H5Type>() -> Vec<String> {
    match T::type_descriptor() {
        TypeDescriptor::Compound(c) => c.fields.into_iter().map(|f| f.name).collect(),
        _ => Vec::new(),
    }
}

/// The columns this build writes in each compound dataset, by dataset name
/// (`batches`, `ranks`, `summary`, `comm` of a category group; `devices`,
/// `roles` of `/provenance`), taken from the row types themselves so a
/// checker cannot drift from the writer.
pub fn schema_columns() -> Vec<(&'static str, Vec<String>)> {
    use super::rows::{BatchRow, CommRow, DeviceRow, RankRow, RoleRowH5, SummaryRow};
    vec![
        ("batches", column_names::<BatchRow>()),
        ("ranks", column_names::<RankRow>()),
        ("summary", column_names::<SummaryRow>()),
        ("comm", column_names::<CommRow>()),
        ("devices", column_names::<DeviceRow>()),
        ("roles", column_names::<RoleRowH5>()),
    ]
}
