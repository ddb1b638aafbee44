//! The project's embedded default model, used when no `--model` is given.

use std::path::PathBuf;

use diffusion_pipelines::core::{Error, Result};

/// The folder of the embedded default model.
///
/// The default model is trained by the project's own trainer on the procedural shapes
/// dataset; until it is committed under `models/shapes`, this says so.
pub fn default_model_dir() -> Result<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/shapes"));
    if dir.join("model_index.json").exists() {
        Ok(dir)
    } else {
        Err(Error::InvalidArgument(
            "no --model given and this build has no embedded default model yet \
             (it will be trained on the shapes dataset); pass --model DIR with a diffusers-format folder"
                .into(),
        ))
    }
}
