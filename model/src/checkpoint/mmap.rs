//! Read-only memory mapping of checkpoint files (the one place that needs `unsafe` for I/O).
#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

/// A file mapped read-only for the lifetime of the checkpoint.
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only and private to this process. Checkpoint files are treated as
        // immutable while a model is loaded; if another process truncates one, reads may fault,
        // which is the documented contract of every mmap-based safetensors loader.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(MappedFile { map })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}
