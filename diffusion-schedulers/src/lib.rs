//! Noise schedules and samplers for diffusion models, equal to HuggingFace diffusers.
//!
//! Pure `f64` math with no deep-learning framework: every sampler is generic over
//! [`SchedulerTensor`](diffusion_core::SchedulerTensor), so it runs on host arrays and on
//! Burn tensors alike. Each sampler is configured by the keys of diffusers'
//! `scheduler_config.json`, and [`registry`] builds any of them by class or short name.
//!
//! # Quick start
//!
//! ```
//! use diffusion_core::{ConfigMap, HostTensor, NoNoise, SchedulerTensor};
//! use diffusion_schedulers::{registry, Scheduler};
//!
//! // A Stable Diffusion 1.x scheduler config, switched to DDIM as diffusers' from_config does.
//! let config = ConfigMap::parse(
//!     r#"{"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
//!         "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}"#,
//!     "scheduler_config.json",
//! )?;
//! let mut scheduler = registry::from_config::<HostTensor>("ddim", &config)?;
//! scheduler.set_timesteps(10)?;
//!
//! let mut x = HostTensor::zeros(vec![1, 4, 8, 8]).add_scalar(1.0);
//! x = x.scale(scheduler.init_noise_sigma());
//! for t in scheduler.timesteps().to_vec() {
//!     let input = scheduler.scale_model_input(&x, t)?;
//!     let eps = input.scale(0.5); // your model here
//!     x = scheduler.step(&eps, t, &x, &mut NoNoise)?.prev_sample;
//! }
//! # Ok::<(), diffusion_core::Error>(())
//! ```
#![warn(missing_docs)]

pub mod common;
pub mod ddim;
pub mod ddpm;
pub mod deis;
pub mod dpm_solver_multistep;
pub mod dpm_solver_singlestep;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod kdpm2;
pub mod kdpm2_ancestral;
pub mod lcm;
pub mod lms;
pub mod pndm;
pub mod registry;
pub mod schedule;
pub mod scheduler;
pub mod tcd;
pub mod trace;
pub mod unipc;

pub use common::{FinalSigmasType, PredictionType, TimestepSchedule, TimestepSpacing};
pub use ddim::{DdimConfig, DdimScheduler};
pub use schedule::{BetaSchedule, NoiseSchedule};
pub use scheduler::{Scheduler, StepOutput};
