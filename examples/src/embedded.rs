//! The project's embedded default model, used when no `--model` is given.
//!
//! `models/shapes` (a diffusers-format `StableDiffusionPipeline` folder, ~10 MB) is trained by
//! this project's own trainer on the procedural shapes dataset (see `scripts/train_shapes.sh`
//! and docs/QUALITY.md). Its files are compiled into the binary, so `diffusion generate`
//! works from any directory: when the source folder is not next to the binary's sources, the
//! files are written once to a folder under the system's temporary directory.

use std::path::{Path, PathBuf};

use diffusion_pipelines::core::{Error, Result};

macro_rules! model_files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/shapes/", $path)) as &[u8])),*]
    };
}

/// Every file of `models/shapes`, by path relative to the model folder.
const FILES: &[(&str, &[u8])] = model_files![
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
    "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

/// The folder of the embedded default model: the source tree's `models/shapes` when it is
/// there and unchanged, else a copy of the compiled-in files under the temporary directory.
pub fn default_model_dir() -> Result<PathBuf> {
    let source = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/shapes"));
    if matches_embedded(&source) {
        return Ok(source);
    }
    let digest = FILES
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, (name, bytes)| {
            fnv1a(fnv1a(h, name.as_bytes()), bytes)
        });
    let dir = std::env::temp_dir().join(format!("diffusion-shapes-{digest:016x}"));
    if matches_embedded(&dir) {
        return Ok(dir);
    }
    // Written into a fresh folder, then renamed into place, so a half-written copy is
    // never used.
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".diffusion-shapes-")
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    for (name, bytes) in FILES {
        let path = tmp.path().join(name);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    let written = tmp.keep();
    if std::fs::rename(&written, &dir).is_err() {
        // Another process may have put it there first.
        let _ = std::fs::remove_dir_all(&written);
        if !matches_embedded(&dir) {
            return Err(Error::InvalidState(format!(
                "cannot place the embedded model at {}",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

/// Whether `dir` holds exactly the embedded files (sizes and contents).
fn matches_embedded(dir: &Path) -> bool {
    FILES.iter().all(|(name, bytes)| {
        std::fs::read(dir.join(name)).is_ok_and(|on_disk| on_disk.as_slice() == *bytes)
    })
}

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_model_is_complete_and_found() {
        let dir = default_model_dir().unwrap();
        assert!(matches_embedded(&dir));
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("model_index.json")).unwrap()).unwrap();
        assert_eq!(index["_class_name"], "StableDiffusionPipeline");
    }
}
