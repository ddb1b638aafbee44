//! DPM-Solver-2 in sigma space (k-diffusion's `sample_dpm_2`: a midpoint method in
//! log sigma, after Lu et al. 2022, "DPM-Solver", and Karras et al. 2022), as diffusers'
//! `KDPM2DiscreteScheduler`.

use diffusion_core::config::{lenient_f64, lenient_opt_f64};
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::Deserialize;

use crate::common::{
    KSchedule, PredictionType, SigmaSpacing, StepIndex, TimestepSchedule, TimestepSpacing,
    check_not_sample_prediction, config_struct, k_add_noise, k_init_noise_sigma, k_noise_schedule,
    k_pred_x0, k_scale_model_input, k_schedule, k_spaced_timesteps, log_midpoint,
    repeat_after_first, sigma_at, sigmas_to_timesteps, step_count,
};
use crate::schedule::{BetaSchedule, check_same_shape};
use crate::scheduler::{Scheduler, StepOutput};

config_struct! {
    /// The keys of a `KDPM2DiscreteScheduler` `scheduler_config.json`, with diffusers'
    /// defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct Kdpm2Config {
        /// Training timesteps.
        pub num_train_timesteps: usize = 1000,
        /// First beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_start: f64 = 0.00085,
        /// Last beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_end: f64 = 0.012,
        /// Beta schedule (`sigmoid` is not implemented by this class).
        pub beta_schedule: BetaSchedule = BetaSchedule::Linear,
        /// Explicit betas, overriding the schedule.
        pub trained_betas: Option<Vec<f64>> = None,
        /// Karras et al. 2022 noise levels (their timesteps are rounded to integers).
        pub use_karras_sigmas: bool = false,
        /// Noise levels evenly spaced in log sigma.
        pub use_exponential_sigmas: bool = false,
        /// Beta-quantile noise levels (Lee et al. 2024).
        pub use_beta_sigmas: bool = false,
        /// What the model predicts (`sample` is not implemented by this class).
        pub prediction_type: PredictionType = PredictionType::Epsilon,
        /// How inference timesteps are placed.
        pub timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace,
        /// Added to every timestep with `leading` spacing.
        pub steps_offset: usize = 0,
        /// Smallest sigma of Karras / exponential / beta spacing (default: the smallest
        /// inference sigma). Not an argument of this class, but diffusers honours it when a
        /// loaded config carries it (e.g. one written for `EulerDiscreteScheduler`).
        #[serde(deserialize_with = "lenient_opt_f64")]
        pub sigma_min: Option<f64> = None,
        /// Largest sigma of Karras / exponential / beta spacing (default: the largest inference
        /// sigma); a hidden key like `sigma_min`.
        #[serde(deserialize_with = "lenient_opt_f64")]
        pub sigma_max: Option<f64> = None,
    }
}

/// The sigma spacing and training sigmas of a KDPM2 sampler, validating `config` (both
/// KDPM2 classes take the same keys and reject the same values).
pub(crate) fn kdpm2_training_sigmas(
    class: &str,
    config: &Kdpm2Config,
) -> Result<(SigmaSpacing, Vec<f64>)> {
    check_not_sample_prediction(class, config.prediction_type)?;
    let spacing = SigmaSpacing::from_flags(
        config.use_karras_sigmas,
        config.use_exponential_sigmas,
        config.use_beta_sigmas,
    )?;
    let schedule = k_noise_schedule(
        class,
        config.num_train_timesteps,
        config.beta_start,
        config.beta_end,
        config.beta_schedule,
        config.trained_betas.as_deref(),
        false,
    )?;
    Ok((spacing, schedule.sigmas()))
}

/// The step timesteps and sigmas of a KDPM2 run of `n` steps: the k-diffusion schedule,
/// Karras timesteps rounded, the sigmas ending on 0.
pub(crate) fn kdpm2_step_schedule(
    config: &Kdpm2Config,
    train_sigmas: &[f64],
    spacing: SigmaSpacing,
    n: usize,
) -> KSchedule {
    let c = config;
    let base = k_spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset);
    let mut ks = k_schedule(
        train_sigmas,
        base,
        n,
        spacing,
        c.sigma_min,
        c.sigma_max,
        true,
    );
    ks.sigmas.push(0.0);
    ks
}

/// The timesteps a KDPM2 run evaluates the model at: the first step timestep, then for each
/// later step `k` its midpoint timestep `midpoint(k, t_k)` and `t_k` itself.
pub(crate) fn interleave_midpoints(
    step_timesteps: &[f64],
    midpoint: impl Fn(usize, f64) -> f64,
) -> Vec<f64> {
    let mut timesteps = Vec::with_capacity(2 * step_timesteps.len());
    timesteps.extend(step_timesteps.first().copied());
    for (k, &t) in step_timesteps.iter().enumerate().skip(1) {
        timesteps.push(midpoint(k, t));
        timesteps.push(t);
    }
    timesteps
}

const CLASS: &str = "KDPM2DiscreteScheduler";

/// KDPM2 sampler: two model evaluations per step (the second at the log-midpoint sigma), so
/// [`Scheduler::timesteps`] interleaves midpoint timesteps between the step timesteps.
///
/// With `sigma_mid = sqrt(sigma_i sigma_{i+1})` (the midpoint in log sigma) and
/// `d(x, sigma) = (x - x0(x, sigma)) / sigma` (Karras et al. 2022, eq. 4):
/// `x' = x_i + (sigma_mid - sigma_i) d(x_i, sigma_i)`,
/// `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d(x', sigma_mid)`. The last step (to
/// `sigma = 0`) is a single Euler step.
#[derive(Debug, Clone)]
pub struct Kdpm2DiscreteScheduler<T> {
    config: Kdpm2Config,
    spacing: SigmaSpacing,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    sigmas_interpol: Vec<f64>,
    index: StepIndex,
    sample: Option<T>,
}

impl<T: SchedulerTensor> Kdpm2DiscreteScheduler<T> {
    /// Builds the sampler from its config, validating it. Like diffusers, it starts with a
    /// schedule of `num_train_timesteps` steps.
    pub fn new(config: Kdpm2Config) -> Result<Self> {
        let (spacing, train_sigmas) = kdpm2_training_sigmas(CLASS, &config)?;
        let mut scheduler = Self {
            spacing,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            sigmas_interpol: Vec::new(),
            index: StepIndex::default(),
            sample: None,
            config,
        };
        scheduler.set_steps(scheduler.config.num_train_timesteps);
        Ok(scheduler)
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize(&format!("{CLASS} config"))?)
    }

    /// The config in use.
    pub fn config(&self) -> &Kdpm2Config {
        &self.config
    }

    /// Whether the next `step` is the first half of a step.
    pub fn state_in_first_order(&self) -> bool {
        self.sample.is_none()
    }

    /// The midpoint sigmas, one per entry of [`Scheduler::sigmas`].
    pub fn sigmas_interpol(&self) -> &[f64] {
        &self.sigmas_interpol
    }

    fn set_steps(&mut self, n: usize) {
        let ks = kdpm2_step_schedule(&self.config, &self.train_sigmas, self.spacing, n);
        let sigmas = ks.sigmas;
        // log-midpoint of each sigma and the one before it (torch's roll(1) wraps around)
        let m = sigmas.len();
        let interpol: Vec<f64> = (0..m)
            .map(|i| log_midpoint(sigmas[i], sigmas[(i + m - 1) % m]))
            .collect();
        let log_sigmas: Vec<f64> = self.train_sigmas.iter().map(|s| s.ln()).collect();
        let t_interpol = sigmas_to_timesteps(&interpol, &log_sigmas);
        self.sigmas = repeat_after_first(&sigmas);
        self.sigmas_interpol = repeat_after_first(&interpol);
        self.timesteps = interleave_midpoints(&ks.timesteps, |k, _| t_interpol[k]);
        self.sample = None;
        self.index.reset();
    }
}

impl<T: SchedulerTensor> Scheduler<T> for Kdpm2DiscreteScheduler<T> {
    fn name(&self) -> &str {
        CLASS
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n = step_count(CLASS, schedule, self.config.num_train_timesteps)?;
        self.set_steps(n);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        k_init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&mut self, sample: &T, timestep: f64) -> Result<T> {
        let i = self.index.current(timestep, &self.timesteps)?;
        let sigma = if self.sample.is_none() {
            sigma_at(&self.sigmas, i)?
        } else {
            sigma_at(&self.sigmas_interpol, i)?
        };
        Ok(k_scale_model_input(sample, sigma))
    }

    fn step(
        &mut self,
        model_output: &T,
        timestep: f64,
        sample: &T,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        check_same_shape(model_output, sample)?;
        let i = self.index.current(timestep, &self.timesteps)?;
        let first_order = self.sample.is_none();
        let (sigma, sigma_mid, sigma_next) = if first_order {
            (
                sigma_at(&self.sigmas, i)?,
                sigma_at(&self.sigmas_interpol, i + 1)?,
                sigma_at(&self.sigmas, i + 1)?,
            )
        } else {
            let prev = i.checked_sub(1).ok_or_else(|| {
                Error::InvalidState("second half of a KDPM2 step at index 0".into())
            })?;
            (
                sigma_at(&self.sigmas, prev)?,
                sigma_at(&self.sigmas_interpol, i)?,
                sigma_at(&self.sigmas, i)?,
            )
        };
        let sigma_input = if first_order { sigma } else { sigma_mid };
        let pred_x0 = k_pred_x0(
            self.config.prediction_type,
            model_output,
            sample,
            sigma_input,
        );
        let prev_sample = if first_order {
            // x' = x + (sigma_mid - sigma) (x - x0) / sigma
            let r = (sigma_mid - sigma) / sigma;
            self.sample = Some(sample.clone());
            T::lincomb(&[(1.0 + r, sample), (-r, &pred_x0)])
        } else {
            // x_{i+1} = x_i + (sigma_next - sigma) (x' - x0') / sigma_mid
            let r = (sigma_next - sigma) / sigma_mid;
            let x = self.sample.take().expect("second-order state");
            T::lincomb(&[(1.0, &x), (r, sample), (-r, &pred_x0)])
        };
        self.index.advance();
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_x0),
        })
    }

    fn add_noise(&self, original_samples: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        k_add_noise(
            original_samples,
            noise,
            timesteps,
            &self.timesteps,
            &self.sigmas,
            &self.index,
        )
    }

    fn order(&self) -> usize {
        2
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::{HostTensor, NoNoise};

    #[test]
    fn schedule_shape() {
        let mut s = Kdpm2DiscreteScheduler::<HostTensor>::new(Kdpm2Config::default()).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps().len(), 7);
        assert_eq!(s.sigmas().unwrap().len(), 10);
        let sig = s.sigmas().unwrap();
        let mid = s.sigmas_interpol();
        assert!((mid[1] - (sig[0] * sig[1]).sqrt()).abs() < 1e-12 * sig[0]);
    }

    #[test]
    fn exact_for_a_linear_denoiser() {
        // x0 = 0: every half step scales x by the ratio of its sigmas
        let mut s = Kdpm2DiscreteScheduler::<HostTensor>::new(Kdpm2Config::default()).unwrap();
        s.set_timesteps(5).unwrap();
        let sigmas = s.sigmas().unwrap().to_vec();
        let mids = s.sigmas_interpol().to_vec();
        let mut x = HostTensor::new(vec![sigmas[0]], vec![1, 1]).unwrap();
        for (k, t) in s.timesteps().to_vec().into_iter().enumerate() {
            let sigma = if s.state_in_first_order() {
                sigmas[k]
            } else {
                mids[k]
            };
            let eps = x.scale(1.0 / sigma);
            x = s.step(&eps, t, &x, &mut NoNoise).unwrap().prev_sample;
        }
        assert!(x.data()[0].abs() < 1e-12);
    }
}
