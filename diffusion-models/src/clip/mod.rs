//! CLIP text encoders as transformers implements them (`CLIPTextModel`,
//! `CLIPTextModelWithProjection`), loaded from the `text_encoder/` (and SDXL's
//! `text_encoder_2/`) folder of a diffusers pipeline.
//!
//! ```no_run
//! use burn::backend::NdArray;
//! use burn::tensor::{Int, Tensor};
//! use diffusion_core::ModelDir;
//! use diffusion_models::clip::ClipTextModel;
//!
//! let device = Default::default();
//! let dir = ModelDir::open("stable-diffusion-v1-5")?;
//! let encoder = ClipTextModel::<NdArray<f32>>::load(&dir, "text_encoder", None, &device)?;
//! let ids = Tensor::<NdArray<f32>, 2, Int>::from_ints([[49406, 320, 1125, 49407]], &device);
//! let out = encoder.forward(ids)?;
//! let prompt_embeds = out.last_hidden_state; // [1, 4, 768]
//! # Ok::<(), diffusion_core::Error>(())
//! ```

mod activation;
mod attention;
mod config;
mod embeddings;
mod encoder;
mod mlp;
mod model;

pub use activation::ClipActivation;
pub use attention::{ClipAttention, ClipAttentionConfig};
pub use config::ClipTextConfig;
pub use embeddings::{ClipTextEmbeddings, ClipTextEmbeddingsConfig};
pub use encoder::{ClipEncoder, ClipEncoderConfig, ClipEncoderLayer};
pub use mlp::{ClipMlp, ClipMlpConfig};
pub use model::{ClipTextModel, ClipTextModelWithProjection, ClipTextOutput, LEGACY_EOS_TOKEN_ID};
