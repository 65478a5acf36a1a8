//! Read-only views of a results file beyond [`super::read_run`]: its raw
//! layout (every group and dataset with its attribute and column names),
//! for the checker, which must see what `read_run` papers over (an absent
//! attribute reads as a default there); and the per-rank busy/idle split
//! (`compute_s`, `comm_s`, `wait_s`) of files whose writer records it.
//!
//! Nothing here writes.

use super::schema::check_format;
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

/// Opens the file and refuses it unless it is a fapool results file of a
/// schema version this build reads (the same test [`super::read_run`]
/// makes); returns the version.
pub fn verify_format(path: impl AsRef<Path>) -> Result<u32> {
    let path = path.as_ref();
    check_format(&open(path)?, path)
}

/// The busy/idle split of one rank in one batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RankTimeSplit {
    pub batch_index: u32,
    pub world_rank: u32,
    pub wall_s: f64,
    pub compute_s: f64,
    pub comm_s: f64,
    pub wait_s: f64,
}

fn column_names<T: H5Type>() -> Vec<String> {
    match T::type_descriptor() {
        TypeDescriptor::Compound(c) => c.fields.into_iter().map(|f| f.name).collect(),
        _ => Vec::new(),
    }
}

/// The columns of each compound dataset in a file of schema `version`, by
/// dataset name (`batches`, `ranks`, `summary`, `comm`, and from version 3
/// the optional `experts` and `routing` of a category group; `devices`,
/// `roles` of `/provenance`), taken from the row types themselves so a
/// checker cannot drift from the writer and the reader.
pub fn schema_columns(version: u32) -> Vec<(&'static str, Vec<String>)> {
    use super::routing::{ExpertRow, RoutingRow};
    use super::rows::{BatchRow, CommRow, DeviceRow, RankRow, RankRowV1, RankRowV2, RoleRowH5, SummaryRow};
    let ranks = match version {
        1 => column_names::<RankRowV1>(),
        2 => column_names::<RankRowV2>(),
        _ => column_names::<RankRow>(),
    };
    let mut columns = vec![
        ("batches", column_names::<BatchRow>()),
        ("ranks", ranks),
        ("summary", column_names::<SummaryRow>()),
        ("comm", column_names::<CommRow>()),
        ("devices", column_names::<DeviceRow>()),
        ("roles", column_names::<RoleRowH5>()),
    ];
    if version >= 3 {
        columns.extend([("experts", column_names::<ExpertRow>()), ("routing", column_names::<RoutingRow>())]);
    }
    columns
}
