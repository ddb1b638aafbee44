//! The [`Scheduler`] trait: what every sampler, ours or a user's, implements.

use diffusion_core::{NoiseSource, Result, SchedulerTensor};

use crate::common::TimestepSchedule;

/// What one sampler step returns.
#[derive(Debug, Clone)]
pub struct StepOutput<T> {
    /// The sample at the previous (less noisy) timestep, `x_{t-1}`.
    pub prev_sample: T,
    /// The sampler's estimate of the clean sample `x_0`, where it forms one.
    pub pred_original_sample: Option<T>,
}

/// A diffusion sampler: a noise schedule plus the update rule that walks a sample from pure
/// noise to a clean sample.
///
/// The sampling loop every pipeline runs is:
///
/// ```text
/// scheduler.set_timesteps(steps)?;
/// x = noise * scheduler.init_noise_sigma();
/// for t in scheduler.timesteps() {
///     let x_in = scheduler.scale_model_input(&x, t)?;
///     let out = model(x_in, t);
///     x = scheduler.step(&out, t, &x, &mut noise_source)?.prev_sample;
/// }
/// ```
///
/// Implementations are generic over the tensor type `T`, so the same sampler runs on host
/// arrays and on device tensors; `Box<dyn Scheduler<T>>` makes them swappable at run time.
/// Stochastic samplers draw their noise from the caller's [`NoiseSource`]; deterministic
/// ones never touch it.
pub trait Scheduler<T: SchedulerTensor> {
    /// The diffusers class this sampler reproduces (e.g. `"DDIMScheduler"`), or a user name.
    fn name(&self) -> &str;

    /// Number of timesteps the model was trained with.
    fn num_train_timesteps(&self) -> usize;

    /// Prepares a run of `num_inference_steps` steps, resetting any multistep state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.set_timestep_schedule(TimestepSchedule::Steps(num_inference_steps))
    }

    /// Prepares a run from a step count or explicit timesteps / sigmas. Samplers that do not
    /// accept explicit timesteps or sigmas return [`diffusion_core::Error::Unsupported`].
    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()>;

    /// The timesteps the model is evaluated at, in order (one entry per model evaluation, so
    /// second-order samplers list some timesteps twice).
    fn timesteps(&self) -> &[f64];

    /// The noise levels of the run, where the sampler works in sigma space.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// Standard deviation of the initial noise: the first sample is `noise * init_noise_sigma`.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Scales the sample before it is given to the model (identity for most samplers; divides
    /// by `sqrt(sigma^2 + 1)` for the k-diffusion family).
    fn scale_model_input(&mut self, sample: &T, _timestep: f64) -> Result<T> {
        Ok(sample.clone())
    }

    /// One update from timestep `timestep` given the model's output there.
    fn step(
        &mut self,
        model_output: &T,
        timestep: f64,
        sample: &T,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>>;

    /// The forward process: noises clean samples to the given timesteps (one per batch
    /// element, or one for all), as training and image-to-image need.
    fn add_noise(&self, original_samples: &T, noise: &T, timesteps: &[f64]) -> Result<T>;

    /// Order of the solver (the number of model evaluations per timestep for singlestep
    /// higher-order samplers; pipelines use it to count progress).
    fn order(&self) -> usize {
        1
    }

    /// Starts the run at position `begin_index` of [`Scheduler::timesteps`] (image-to-image).
    fn set_begin_index(&mut self, _begin_index: usize) {}

    /// Sets the stochasticity `eta` of samplers that take one (DDIM, TCD), as diffusers'
    /// `step(eta=...)`. Returns whether the sampler uses it.
    fn set_eta(&mut self, _eta: f64) -> bool {
        false
    }
}
