//! Burn modules for latent diffusion, loaded from diffusers-format checkpoints.
#![warn(missing_docs)]

pub use diffusion_core;

pub mod clip;
pub mod loading;

pub mod nn;
pub mod precision;
pub mod unet;
pub mod unet2d;
pub mod vae;

pub mod tensor;

pub mod t5;
pub mod tokenizer;
