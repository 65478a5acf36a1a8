//! `--set key=value`: dotted keys into the job's TOML before it is checked.
//! Numeric segments index arrays (`strategy.0.tp=4`); a value that is not
//! TOML is taken as a string.

use super::SpecError;

/// Applies one `key=value` override to the parsed TOML.
pub fn apply(root: &mut toml::Value, o: &str) -> Result<(), SpecError> {
    let (key, raw) = o.split_once('=').ok_or_else(|| SpecError::BadOverride(o.into()))?;
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    };
    let segs: Vec<&str> = key.trim().split('.').collect();
    if segs.iter().any(|s| s.is_empty()) {
        return Err(SpecError::BadOverride(o.into()));
    }
    let mut cur = root;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        cur = match cur {
            toml::Value::Table(t) => {
                if last {
                    t.insert(seg.to_string(), value);
                    return Ok(());
                }
                t.entry(seg.to_string()).or_insert_with(|| toml::Value::Table(Default::default()))
            }
            toml::Value::Array(a) => {
                let idx: usize = seg.parse().map_err(|_| SpecError::BadOverride(format!("{o}: `{seg}` must index an array")))?;
                let len = a.len();
                let slot = a.get_mut(idx).ok_or_else(|| SpecError::BadOverride(format!("{o}: index {idx} out of range (array has {len})")))?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            _ => return Err(SpecError::BadOverride(format!("{o}: `{seg}` is inside a plain value"))),
        };
    }
    Ok(())
}
