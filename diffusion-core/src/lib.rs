//! Shared foundations of the `diffusion` crates, with no Burn dependency.
//!
//! - [`Error`] / [`Result`]: the typed error every crate returns.
//! - [`ConfigMap`]: a diffusers `config.json` / `scheduler_config.json`, including the
//!   non-standard `NaN` / `Infinity` tokens Python writes.
//! - [`SchedulerTensor`]: the arithmetic samplers need, implemented for host arrays
//!   ([`HostTensor`]) here and for Burn tensors in `diffusion-models`.
//! - [`ModelDir`]: a diffusers model folder (`model_index.json`, component configs, weight
//!   files including fp16 variants and sharded checkpoints).
//! - [`NoiseSource`]: seeded host-side noise ([`SeededNoise`]) or pre-recorded noise
//!   ([`FixedNoise`]).
//!
//! # Quick start
//!
//! ```
//! use diffusion_core::{ConfigMap, HostTensor, NoiseSource, SchedulerTensor, SeededNoise};
//!
//! let config = ConfigMap::parse(r#"{"beta_end": 0.012, "lambda_min_clipped": -Infinity}"#, "inline")?;
//! assert_eq!(config.get("beta_end").and_then(|v| v.as_f64()), Some(0.012));
//!
//! let mut noise = SeededNoise::new(42);
//! let x = HostTensor::new(noise.sample(&[1, 4, 8, 8])?, vec![1, 4, 8, 8])?;
//! let y = HostTensor::lincomb(&[(0.5, &x), (0.5, &x)]);
//! assert_eq!(x, y);
//! # Ok::<(), diffusion_core::Error>(())
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod model_dir;
pub mod noise;
pub mod tensor;

pub use config::ConfigMap;
pub use error::{Error, Result};
pub use model_dir::{ComponentSpec, ModelDir, ModelIndex, WeightFiles};
pub use noise::{FixedNoise, NoNoise, NoiseSource, SeededNoise};
pub use tensor::{HostTensor, SchedulerTensor};
