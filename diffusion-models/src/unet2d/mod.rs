//! The pixel-space U-Net of DDPM-style models: diffusers' `UNet2DModel`.
//!
//! [`UNet2DConfig`] reads `unet/config.json`; [`UNet2DConfig::init`] builds a
//! [`UNet2DModel`] whose parameter paths equal diffusers' state-dict keys, so
//! `diffusion_pytorch_model.safetensors` loads by direct key match (checkpoints with the
//! deprecated attention key names too). Unlike [`crate::unet::UNet2DConditionModel`] it has
//! no text conditioning; it may be class-conditional (`num_class_embeds`,
//! `class_embed_type`). Its blocks reuse the layers of [`crate::nn`].

pub mod blocks;
pub mod config;
pub mod model;

pub use blocks::{BlockSettings, DownBlock, Downsampler, MidBlock, UpBlock, Upsampler};
pub use config::{SamplerType, TimeEmbeddingType, UNet2DClassEmbedding, UNet2DConfig, UNet2DPlan};
pub use model::{GaussianFourierProjection, SinusoidalProjection, TimeProjection, UNet2DModel};
