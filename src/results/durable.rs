//! The durable writer: rank 0's side of the results file during a run.
//! Every completed batch is made durable before the next starts, by
//! appending to a copy of the file and renaming it over the file (a rename is
//! atomic, so a kill at any moment leaves either the old or the new complete
//! file, never a torn one).

use std::path::{Path, PathBuf};

/// A results file written through a copy renamed into place.
#[derive(Clone)]
pub struct Durable {
    path: PathBuf,
    /// Held while the file is being rewritten (the watchdog writes from its own thread).
    io: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Durable {
    fn tmp(&self) -> PathBuf {
        let mut name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".partial");
        self.path.with_file_name(name)
    }

    pub fn create(path: &Path, prov: &super::Provenance) -> Result<Self, String> {
        let d = Self { path: path.to_path_buf(), io: Default::default() };
        let tmp = d.tmp();
        let _ = std::fs::remove_file(&tmp);
        drop(super::ResultsFile::create(&tmp, true, prov).map_err(|e| e.to_string())?);
        d.commit()?;
        Ok(d)
    }

    pub fn open(path: &Path) -> Self {
        Self { path: path.to_path_buf(), io: Default::default() }
    }

    pub fn update<T>(&self, f: impl FnOnce(&mut super::ResultsFile) -> super::Result<T>) -> Result<T, String> {
        let _io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = self.tmp();
        std::fs::copy(&self.path, &tmp).map_err(|e| format!("copying {}: {e}", self.path.display()))?;
        let out = {
            let mut file = super::ResultsFile::open_existing(&tmp).map_err(|e| e.to_string())?;
            let out = f(&mut file).map_err(|e| e.to_string())?;
            file.flush().map_err(|e| e.to_string())?;
            out
        };
        self.commit()?;
        Ok(out)
    }

    fn commit(&self) -> Result<(), String> {
        let tmp = self.tmp();
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::File::open(dir).and_then(|f| f.sync_all());
        }
        Ok(())
    }
}
