//! The conditional U-Net of latent diffusion: diffusers' `UNet2DConditionModel`.
//!
//! [`UNet2DConditionConfig`] reads `unet/config.json`; [`UNet2DConditionConfig::init`] builds
//! a [`UNet2DConditionModel`] whose parameter paths equal diffusers' state-dict keys, so
//! `diffusion_pytorch_model.safetensors` loads by direct key match.

pub mod blocks;
pub mod config;
pub mod model;

pub use blocks::{BlockSettings, DownBlock2D, MidBlock2D, UpBlock2D};
pub use config::{
    ClassEmbedType, PerBlock, SD_V1_5_JSON, SD_V2_1_JSON, SDXL_BASE_JSON, SampleSize,
    TransformerLayers, UNet2DConditionConfig, UNetPlan,
};
pub use model::{ClassEmbedding, ClassLabels, UNet2DConditionModel, UNetConditioning};
