//! Euler sampling in sigma space (Karras et al. 2022, "Elucidating the Design Space of
//! Diffusion-Based Generative Models", Algorithm 2 with a first-order step), as diffusers'
//! `EulerDiscreteScheduler`.

use diffusion_core::config::{lenient_f64, lenient_opt_f64};
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::{Deserialize, Serialize};

use crate::common::{
    FinalSigmasType, PredictionType, SigmaSpacing, StepIndex, TimestepSchedule, TimestepSpacing,
    check_custom_sigmas, check_custom_timesteps, check_steps, config_struct,
    finite_terminal_alphas_cumprod, index_for_timestep, k_add_noise, k_init_noise_sigma,
    k_noise_schedule, k_pred_x0, k_scale_model_input, k_spaced_timesteps, linspace, respace_sigmas,
    sigma_at, sigmas_at_timesteps, sigmas_to_timesteps,
};
use crate::schedule::{
    BetaSchedule, NoiseSchedule, batch_size, check_same_shape, per_batch,
    sigmas_from_alphas_cumprod,
};
use crate::scheduler::{Scheduler, StepOutput};

/// The `interpolation_type` key: how inference sigmas are read off the training sigmas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    /// Linear interpolation of the training sigmas at the inference timesteps.
    #[default]
    Linear,
    /// `num_inference_steps + 1` sigmas evenly spaced in log sigma between the extremes of
    /// the training sigmas (diffusers keeps all of them, so the run has one sigma more
    /// than timesteps plus one).
    LogLinear,
}

/// The `timestep_type` key: what the model is given as its timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    /// Training timesteps (possibly fractional).
    #[default]
    Discrete,
    /// With v-prediction, the EDM noise conditioning `c_noise = ln(sigma) / 4` (Karras et
    /// al. 2022, Table 1); otherwise the same as `discrete`.
    Continuous,
}

config_struct! {
    /// The keys of an `EulerDiscreteScheduler` `scheduler_config.json`, with diffusers'
    /// defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct EulerConfig {
        /// Training timesteps.
        pub num_train_timesteps: usize = 1000,
        /// First beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_start: f64 = 0.0001,
        /// Last beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_end: f64 = 0.02,
        /// Beta schedule (`sigmoid` is not implemented by this class).
        pub beta_schedule: BetaSchedule = BetaSchedule::Linear,
        /// Explicit betas, overriding the schedule.
        pub trained_betas: Option<Vec<f64>> = None,
        /// What the model predicts.
        pub prediction_type: PredictionType = PredictionType::Epsilon,
        /// How inference sigmas are read off the training sigmas.
        pub interpolation_type: InterpolationType = InterpolationType::Linear,
        /// Karras et al. 2022 noise levels.
        pub use_karras_sigmas: bool = false,
        /// Noise levels evenly spaced in log sigma.
        pub use_exponential_sigmas: bool = false,
        /// Beta-quantile noise levels (Lee et al. 2024).
        pub use_beta_sigmas: bool = false,
        /// Smallest sigma of Karras / exponential / beta spacing (default: the smallest
        /// inference sigma).
        #[serde(deserialize_with = "lenient_opt_f64")]
        pub sigma_min: Option<f64> = None,
        /// Largest sigma of Karras / exponential / beta spacing (default: the largest inference
        /// sigma).
        #[serde(deserialize_with = "lenient_opt_f64")]
        pub sigma_max: Option<f64> = None,
        /// How inference timesteps are placed.
        pub timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace,
        /// What the model is given as its timestep.
        pub timestep_type: TimestepType = TimestepType::Discrete,
        /// Added to every timestep with `leading` spacing.
        pub steps_offset: usize = 0,
        /// Rescale betas to zero terminal SNR (the last `alphas_cumprod` is then set to
        /// `2^-24`, as diffusers does, so the largest sigma is finite: 4096).
        pub rescale_betas_zero_snr: bool = false,
        /// The noise level after the last step.
        pub final_sigmas_type: FinalSigmasType = FinalSigmasType::Zero,
    }
}

/// Euler sampler, optionally with Karras et al.'s stochastic "churn".
///
/// With `gamma = min(s_churn / (len(sigmas) - 1), sqrt(2) - 1)` when
/// `s_tmin <= sigma_i <= s_tmax` (else 0), the step is (Karras et al. 2022, Algorithm 2,
/// lines 4-8 without the second-order correction):
/// `sigma_hat = sigma_i (1 + gamma)`, `x_hat = x_i + s_noise * sqrt(sigma_hat^2 - sigma_i^2) z`
/// (one noise draw, only when `gamma > 0`), `d = (x_hat - x0) / sigma_hat`,
/// `x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: EulerConfig,
    spacing: SigmaSpacing,
    alphas_cumprod: Vec<f64>,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: StepIndex,
    s_churn: f64,
    s_tmin: f64,
    s_tmax: f64,
    s_noise: f64,
}

impl EulerDiscreteScheduler {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: EulerConfig) -> Result<Self> {
        let spacing = SigmaSpacing::from_flags(
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )?;
        let NoiseSchedule { alphas_cumprod, .. } = k_noise_schedule(
            "EulerDiscreteScheduler",
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas.as_deref(),
            config.rescale_betas_zero_snr,
        )?;
        let alphas_cumprod =
            finite_terminal_alphas_cumprod(alphas_cumprod, config.rescale_betas_zero_snr);
        let train_sigmas = sigmas_from_alphas_cumprod(&alphas_cumprod);
        let (timesteps, sigmas) = full_schedule(&train_sigmas);
        let timesteps = if config.continuous_v() {
            continuous_timesteps(&sigmas)
        } else {
            timesteps
        };
        Ok(Self {
            config,
            spacing,
            alphas_cumprod,
            train_sigmas,
            timesteps,
            sigmas,
            index: StepIndex::default(),
            s_churn: 0.0,
            s_tmin: 0.0,
            s_tmax: f64::INFINITY,
            s_noise: 1.0,
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize("EulerDiscreteScheduler config")?)
    }

    /// The config in use.
    pub fn config(&self) -> &EulerConfig {
        &self.config
    }

    /// `alphas_cumprod` of the training schedule (with the zero-SNR adjustment, if any).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Amount of stochasticity `S_churn` (diffusers' `step(s_churn=...)`, default 0).
    pub fn set_s_churn(&mut self, s_churn: f64) {
        self.s_churn = s_churn;
    }

    /// Smallest sigma that gets churn, `S_tmin` (default 0).
    pub fn set_s_tmin(&mut self, s_tmin: f64) {
        self.s_tmin = s_tmin;
    }

    /// Largest sigma that gets churn, `S_tmax` (default infinity).
    pub fn set_s_tmax(&mut self, s_tmax: f64) {
        self.s_tmax = s_tmax;
    }

    /// Scale of the churn noise, `S_noise` (default 1).
    pub fn set_s_noise(&mut self, s_noise: f64) {
        self.s_noise = s_noise;
    }

    /// diffusers' `get_velocity`: `sqrt(abar) * noise - sqrt(1 - abar) * sample`. As in
    /// diffusers, `abar` is `alphas_cumprod[i]` with `i` the *position* of each timestep in
    /// [`Scheduler::timesteps`], not the timestep itself.
    pub fn get_velocity<T: SchedulerTensor>(
        &self,
        sample: &T,
        noise: &T,
        timesteps: &[f64],
    ) -> Result<T> {
        check_same_shape(sample, noise)?;
        let abar = timesteps
            .iter()
            .map(|&t| {
                let i = index_for_timestep(&self.timesteps, t)?;
                sigma_at(&self.alphas_cumprod, i)
            })
            .collect::<Result<Vec<f64>>>()?;
        let abar = per_batch(abar, batch_size(sample))?;
        let a: Vec<f64> = abar.iter().map(|v| v.sqrt()).collect();
        let s: Vec<f64> = abar.iter().map(|v| (1.0 - v).sqrt()).collect();
        Ok(noise.scale_batch(&a).sub(&sample.scale_batch(&s)))
    }

    fn log_sigmas(&self) -> Vec<f64> {
        self.train_sigmas.iter().map(|s| s.ln()).collect()
    }

    /// Sigmas (with the final one) and timesteps from a step count or custom timesteps.
    fn spaced_schedule(&self, n: usize, custom: Option<Vec<f64>>) -> (Vec<f64>, Vec<f64>) {
        let c = &self.config;
        let mut timesteps = custom.unwrap_or_else(|| {
            k_spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset)
        });
        let mut sigmas = match c.interpolation_type {
            InterpolationType::Linear => sigmas_at_timesteps(&self.train_sigmas, &timesteps),
            InterpolationType::LogLinear => {
                let lo = self.train_sigmas[0].ln();
                let hi = self.train_sigmas[self.train_sigmas.len() - 1].ln();
                linspace(hi, lo, n + 1).into_iter().map(f64::exp).collect()
            }
        };
        if let Some(respaced) = respace_sigmas(self.spacing, &sigmas, n, c.sigma_min, c.sigma_max) {
            timesteps = sigmas_to_timesteps(&respaced, &self.log_sigmas());
            sigmas = respaced;
        }
        let last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.train_sigmas[0],
        };
        sigmas.push(last);
        (sigmas, timesteps)
    }
}

/// diffusers' state of the Euler samplers before `set_timesteps`: every training timestep,
/// decreasing, and the training sigmas in the same order followed by 0.
pub(crate) fn full_schedule(train_sigmas: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let n = train_sigmas.len();
    let timesteps = k_spaced_timesteps(TimestepSpacing::Linspace, n, n, 0);
    let mut sigmas: Vec<f64> = train_sigmas.iter().rev().copied().collect();
    sigmas.push(0.0);
    (timesteps, sigmas)
}

/// The EDM noise conditioning `c_noise = ln(sigma) / 4` of each step's sigma (the model's
/// timesteps with `timestep_type = "continuous"` and v-prediction).
fn continuous_timesteps(sigmas_with_final: &[f64]) -> Vec<f64> {
    sigmas_with_final[..sigmas_with_final.len() - 1]
        .iter()
        .map(|s| 0.25 * s.ln())
        .collect()
}

impl EulerConfig {
    fn continuous_v(&self) -> bool {
        self.timestep_type == TimestepType::Continuous
            && self.prediction_type == PredictionType::VPrediction
    }
}

impl<T: SchedulerTensor> Scheduler<T> for EulerDiscreteScheduler {
    fn name(&self) -> &str {
        "EulerDiscreteScheduler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n_train = self.config.num_train_timesteps;
        let (sigmas, timesteps) = match schedule {
            TimestepSchedule::Steps(n) => {
                check_steps(n, n_train)?;
                self.spaced_schedule(n, None)
            }
            TimestepSchedule::Timesteps(t) => {
                if self.spacing != SigmaSpacing::Timesteps {
                    return Err(Error::Unsupported(
                        "custom timesteps cannot be combined with Karras, exponential or beta \
                         sigmas"
                            .into(),
                    ));
                }
                if self.config.continuous_v() {
                    return Err(Error::Unsupported(
                        "custom timesteps cannot be combined with timestep_type `continuous` \
                         and v-prediction"
                            .into(),
                    ));
                }
                check_custom_timesteps(&t, n_train)?;
                self.spaced_schedule(t.len(), Some(t))
            }
            TimestepSchedule::Sigmas(s) => {
                check_custom_sigmas(&s)?;
                if s.len() < 2 {
                    return Err(Error::InvalidArgument(
                        "custom sigmas need at least two values (the last is the final noise \
                         level)"
                            .into(),
                    ));
                }
                let timesteps = sigmas_to_timesteps(&s[..s.len() - 1], &self.log_sigmas());
                (s, timesteps)
            }
        };
        self.timesteps = if self.config.continuous_v() {
            continuous_timesteps(&sigmas)
        } else {
            timesteps
        };
        self.sigmas = sigmas;
        self.index.reset();
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
        let sigma = sigma_at(&self.sigmas, i)?;
        Ok(k_scale_model_input(sample, sigma))
    }

    fn step(
        &mut self,
        model_output: &T,
        timestep: f64,
        sample: &T,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        check_same_shape(model_output, sample)?;
        let i = self.index.current(timestep, &self.timesteps)?;
        let sigma = sigma_at(&self.sigmas, i)?;
        let sigma_next = sigma_at(&self.sigmas, i + 1)?;
        let gamma = if self.s_tmin <= sigma && sigma <= self.s_tmax {
            (self.s_churn / (self.sigmas.len() - 1) as f64).min(2f64.sqrt() - 1.0)
        } else {
            0.0
        };
        let sigma_hat = sigma * (gamma + 1.0);
        // churn: raise the noise level from sigma to sigma_hat
        let churned;
        let sample = if gamma > 0.0 {
            let z = model_output.noise_like(noise)?;
            let amount = self.s_noise * (sigma_hat * sigma_hat - sigma * sigma).sqrt();
            churned = T::lincomb(&[(1.0, sample), (amount, &z)]);
            &churned
        } else {
            sample
        };
        let pred_x0 = match self.config.prediction_type {
            PredictionType::VPrediction => {
                k_pred_x0(PredictionType::VPrediction, model_output, sample, sigma)
            }
            other => k_pred_x0(other, model_output, sample, sigma_hat),
        };
        // x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (x_hat - x0) / sigma_hat
        let ratio = (sigma_next - sigma_hat) / sigma_hat;
        let prev_sample = T::lincomb(&[(1.0 + ratio, sample), (-ratio, &pred_x0)]);
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

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::HostTensor;

    fn set(s: &mut EulerDiscreteScheduler, schedule: TimestepSchedule) -> Result<()> {
        Scheduler::<HostTensor>::set_timestep_schedule(s, schedule)
    }

    #[test]
    fn log_linear_keeps_an_extra_sigma() {
        let mut s = EulerDiscreteScheduler::new(EulerConfig {
            interpolation_type: InterpolationType::LogLinear,
            ..EulerConfig::default()
        })
        .unwrap();
        set(&mut s, TimestepSchedule::Steps(5)).unwrap();
        assert_eq!(Scheduler::<HostTensor>::timesteps(&s).len(), 5);
        assert_eq!(s.sigmas.len(), 7);
    }

    #[test]
    fn velocity_indexes_alphas_by_schedule_position() {
        let mut s = EulerDiscreteScheduler::new(EulerConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            rescale_betas_zero_snr: true,
            ..EulerConfig::default()
        })
        .unwrap();
        set(&mut s, TimestepSchedule::Steps(10)).unwrap();
        let ts = Scheduler::<HostTensor>::timesteps(&s).to_vec();
        let x = HostTensor::new(vec![1.0, 2.0], vec![2, 1]).unwrap();
        let n = HostTensor::new(vec![0.5, -0.25], vec![2, 1]).unwrap();
        let v = s.get_velocity(&x, &n, &[ts[0], ts[5]]).unwrap();
        // diffusers 0.42.1 with float64 tables
        let want = [0.4706326953503216, -0.3973030359781252];
        for (a, b) in v.data().iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{a} vs {b}");
        }
    }

    #[test]
    fn zero_snr_has_finite_top_sigma() {
        let s = EulerDiscreteScheduler::new(EulerConfig {
            rescale_betas_zero_snr: true,
            ..EulerConfig::default()
        })
        .unwrap();
        assert!((s.train_sigmas[999] - 4095.999877929).abs() < 1e-6);
    }

    #[test]
    fn custom_schedules_are_validated() {
        let mut s = EulerDiscreteScheduler::new(EulerConfig::default()).unwrap();
        assert!(set(&mut s, TimestepSchedule::Sigmas(vec![1.0])).is_err());
        assert!(set(&mut s, TimestepSchedule::Timesteps(vec![1.0, 5.0])).is_err());
        set(&mut s, TimestepSchedule::Sigmas(vec![10.0, 1.0, 0.0])).unwrap();
        assert_eq!(Scheduler::<HostTensor>::timesteps(&s).len(), 2);
        let mut k = EulerDiscreteScheduler::new(EulerConfig {
            use_karras_sigmas: true,
            ..EulerConfig::default()
        })
        .unwrap();
        assert!(matches!(
            set(&mut k, TimestepSchedule::Timesteps(vec![900.0, 100.0])),
            Err(Error::Unsupported(_))
        ));
    }
}
