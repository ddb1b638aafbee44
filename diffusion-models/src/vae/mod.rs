//! The KL autoencoder of latent diffusion: diffusers' `AutoencoderKL`.
//!
//! [`AutoencoderKLConfig`] reads `vae/config.json`; [`AutoencoderKL`] encodes images into a
//! [`DiagonalGaussian`] posterior and decodes latents, optionally tile by tile
//! ([`VaeTiling`]) with diffusers' exact blending, and converts between VAE latents and the
//! scaled latents the U-Net works on.

pub mod config;
pub mod model;

pub use config::{AutoencoderKLConfig, SD_V1_5_VAE_JSON, SDXL_VAE_JSON};
pub use model::{
    AutoencoderKL, Decoder, DiagonalGaussian, DownEncoderBlock2D, Encoder, UpDecoderBlock2D,
    VaeMidBlock, VaeTiling,
};
