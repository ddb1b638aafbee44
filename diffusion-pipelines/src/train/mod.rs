//! Training: the denoising objective, optimiser schedule, EMA, gradient clipping and
//! checkpoints.

pub mod batches;
pub mod checkpoint;
pub mod denoiser;
pub mod ema;
pub mod export;
pub mod grads;
pub mod lr;
pub mod model;
pub mod objective;
pub mod optim;
pub mod rng;
pub mod vae;
