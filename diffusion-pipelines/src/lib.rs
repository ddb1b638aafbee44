//! The facade crate: pipelines for inference and training, re-exporting the building blocks.
#![warn(missing_docs)]

pub use diffusion_core as core;
pub use diffusion_models as models;
pub use diffusion_schedulers as schedulers;

pub mod data;
pub mod ddpm_pipeline;
pub mod image_io;
pub mod stable_diffusion;
pub mod train;
