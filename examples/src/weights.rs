//! Summaries of safetensors weight files (tensor count, parameters, dtypes), read from the
//! headers through the `safetensors` crate over a memory map.

use std::collections::BTreeSet;
use std::path::Path;

use diffusion_pipelines::core::{Error, Result};

/// What a set of weight files holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightSummary {
    /// Number of tensors.
    pub tensors: usize,
    /// Number of scalar parameters.
    pub parameters: usize,
    /// The dtypes present, e.g. `["F16", "F32"]`.
    pub dtypes: Vec<String>,
}

/// Reads the headers of `files`.
pub fn summarize(files: &[impl AsRef<Path>]) -> Result<WeightSummary> {
    let mut s = WeightSummary::default();
    let mut dtypes = BTreeSet::new();
    for file in files {
        let file = file.as_ref();
        let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
        // SAFETY: the map is read-only and dropped before returning; a file truncated
        // concurrently can at worst make the read fail.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(file, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
            Error::Weights(format!(
                "{}: not a valid safetensors file: {e}",
                file.display()
            ))
        })?;
        for info in meta.tensors().values() {
            s.tensors += 1;
            s.parameters += info.shape.iter().product::<usize>();
            dtypes.insert(format!("{:?}", info.dtype));
        }
    }
    s.dtypes = dtypes.into_iter().collect();
    Ok(s)
}
