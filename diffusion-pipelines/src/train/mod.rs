//! Training: the denoising objective, optimiser schedule, EMA, gradient clipping and
//! checkpoints.

pub mod ema;
pub mod grads;
pub mod lr;
pub mod objective;
