//! The T5 text encoder (transformers' `T5EncoderModel`), as used by SD3, Flux, PixArt and
//! DeepFloyd IF.
//!
//! [`T5Config`] reads a transformers `config.json`; [`T5EncoderModel::from_dir`] /
//! [`T5EncoderModel::from_model_dir`] build the model and load its safetensors weights
//! (single file or shards, any float dtype) through [`crate::loading`].
//!
//! ```no_run
//! use burn::backend::NdArray;
//! use burn::tensor::{Int, Tensor};
//! use diffusion_models::t5::T5EncoderModel;
//!
//! let device = Default::default();
//! let t5 = T5EncoderModel::<NdArray<f32>>::from_dir("t5-encoder", &device)?;
//! let ids = Tensor::<NdArray<f32>, 2, Int>::from_data([[71, 1712, 1]], &device);
//! let hidden = t5.forward(ids, None); // [1, 3, d_model]
//! # Ok::<(), diffusion_core::Error>(())
//! ```

mod config;
mod layer_norm;
mod model;

use std::path::Path;

use burn::tensor::backend::Backend;
use diffusion_core::model_dir::ROOT;
use diffusion_core::{ModelDir, Result};

use crate::loading::{LoadOptions, load_module};

pub use config::{T5Activation, T5Config};
pub use layer_norm::{T5LayerNorm, T5LayerNormConfig};
pub use model::{
    T5Attention, T5AttentionConfig, T5Block, T5DenseReluDense, T5EncoderModel, T5LayerFF,
    T5LayerSelfAttention, T5Stack, relative_position_bucket, relative_position_buckets,
};

/// The loading options for T5 encoder weights.
///
/// Checkpoints may also hold `encoder.embed_tokens.weight` (a tied copy of
/// `shared.weight`), and full `T5ForConditionalGeneration` checkpoints hold a decoder and
/// an `lm_head`; the encoder ignores those keys.
pub fn t5_load_options() -> LoadOptions {
    LoadOptions::new()
        .ignore_unexpected(r"encoder\.embed_tokens\.weight")
        .ignore_unexpected(r"decoder\..*")
        .ignore_unexpected(r"lm_head\.weight")
}

impl<B: Backend> T5EncoderModel<B> {
    /// Loads a T5 encoder from a folder holding `config.json` and its safetensors weights
    /// (`model.safetensors` or a sharded index).
    pub fn from_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        Self::from_model_dir(&ModelDir::open(dir)?, ROOT, None, device)
    }

    /// Loads the T5 encoder `component` (e.g. `"text_encoder_3"`, or [`ROOT`] for a
    /// single-model folder) of a diffusers model folder, preferring the weight `variant`
    /// (e.g. `"fp16"`) when given.
    pub fn from_model_dir(
        dir: &ModelDir,
        component: &str,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<Self> {
        let config = T5Config::from_config_map(&dir.config(component)?)?;
        let model = config.init::<B>(device)?;
        let weights = dir.weight_files(component, variant)?;
        load_module(model, &weights.files, &t5_load_options())
    }
}
