//! Small typed helpers over HDF5 attributes and string datasets, so the
//! writer and reader say what they store rather than how.
//!
//! Every string goes out as variable-length UTF-8, the one string type h5py
//! and pandas read as text without decoding options.

use super::{Result, ResultsError};
use hdf5::types::VarLenUnicode;
use hdf5::{H5Type, Location};

pub(crate) fn vlen(s: &str) -> Result<VarLenUnicode> {
    s.parse().map_err(|_| ResultsError::InvalidString(s.chars().take(60).collect()))
}

pub(crate) fn has_attr(loc: &Location, name: &str) -> Result<bool> {
    Ok(loc.attr_names()?.iter().any(|n| n == name))
}

/// Attributes cannot be rewritten with a new shape in place; replacing one
/// means deleting it first.
pub(crate) fn remove(loc: &Location, name: &str) -> Result<()> {
    if has_attr(loc, name)? {
        loc.delete_attr(name)?;
    }
    Ok(())
}

pub(crate) fn set_str(loc: &Location, name: &str, value: &str) -> Result<()> {
    remove(loc, name)?;
    loc.new_attr::<VarLenUnicode>().shape(()).create(name)?.write_scalar(&vlen(value)?)?;
    Ok(())
}

pub(crate) fn set_scalar<T: H5Type>(loc: &Location, name: &str, value: T) -> Result<()> {
    remove(loc, name)?;
    loc.new_attr::<T>().shape(()).create(name)?.write_scalar(&value)?;
    Ok(())
}

pub(crate) fn set_array<T: H5Type>(loc: &Location, name: &str, values: &[T]) -> Result<()> {
    remove(loc, name)?;
    let attr = loc.new_attr::<T>().shape((values.len(),)).create(name)?;
    if !values.is_empty() {
        attr.write_raw(values)?;
    }
    Ok(())
}

pub(crate) fn get_str(loc: &Location, name: &str) -> Result<Option<String>> {
    if !has_attr(loc, name)? {
        return Ok(None);
    }
    let v: VarLenUnicode = loc.attr(name)?.read_scalar()?;
    Ok(Some(v.as_str().to_string()))
}

pub(crate) fn get_scalar<T: H5Type>(loc: &Location, name: &str) -> Result<Option<T>> {
    if !has_attr(loc, name)? {
        return Ok(None);
    }
    Ok(Some(loc.attr(name)?.read_scalar()?))
}

pub(crate) fn get_array<T: H5Type>(loc: &Location, name: &str) -> Result<Vec<T>> {
    if !has_attr(loc, name)? {
        return Ok(Vec::new());
    }
    Ok(loc.attr(name)?.read_raw()?)
}
