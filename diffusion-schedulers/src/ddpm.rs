//! DDPM: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020), as diffusers'
//! `DDPMScheduler`, including the learned variances of Improved DDPM (Nichol & Dhariwal
//! 2021).

use diffusion_core::config::lenient_f64;
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::{Deserialize, Serialize};

use crate::common::{
    PredictionType, TimestepSchedule, TimestepSpacing, check_integer_timesteps, check_steps,
    check_steps_offset, config_struct, dynamic_threshold, spaced_timesteps, vp_pred_x0,
};
use crate::schedule::{BetaSchedule, NoiseSchedule, check_same_shape};
use crate::scheduler::{Scheduler, StepOutput};

/// The `beta_schedule` key of `DDPMScheduler`: the shared schedules plus `laplace`, which
/// only DDPM accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DdpmBetaSchedule {
    /// Betas linear from `beta_start` to `beta_end`.
    #[default]
    Linear,
    /// `sqrt(beta)` linear from `sqrt(beta_start)` to `sqrt(beta_end)`.
    ScaledLinear,
    /// The Improved-DDPM cosine schedule.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// `sigmoid(linspace(-6, 6))` rescaled into `[beta_start, beta_end]`.
    Sigmoid,
    /// Betas discretising a Laplace-shaped log-SNR (`alpha_transform_type="laplace"`).
    Laplace,
}

impl From<BetaSchedule> for DdpmBetaSchedule {
    fn from(s: BetaSchedule) -> Self {
        match s {
            BetaSchedule::Linear => Self::Linear,
            BetaSchedule::ScaledLinear => Self::ScaledLinear,
            BetaSchedule::SquaredcosCapV2 => Self::SquaredcosCapV2,
            BetaSchedule::Sigmoid => Self::Sigmoid,
        }
    }
}

/// The `variance_type` key: the variance of the noise added in each DDPM step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// The posterior variance `beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t` (Ho et
    /// al. 2020, §3.2, `sigma_t^2 = beta~_t`).
    #[default]
    FixedSmall,
    /// `beta~_t`, computed through its logarithm.
    FixedSmallLog,
    /// `beta_t` itself (Ho et al. 2020, §3.2, `sigma_t^2 = beta_t`).
    FixedLarge,
    /// `beta_t`, computed through its logarithm. diffusers takes the square root of the
    /// logarithm here and produces NaN; this crate uses the standard deviation
    /// `exp(log(beta_t) / 2)` the option stands for.
    FixedLargeLog,
    /// The model predicts the variance itself in its extra output channels.
    Learned,
    /// The model predicts `v` in `[-1, 1]` in its extra channels, interpolating the log
    /// variance between `beta~_t` and `beta_t` (Nichol & Dhariwal 2021, eq. 15).
    LearnedRange,
}

impl VarianceType {
    fn is_learned(self) -> bool {
        matches!(self, Self::Learned | Self::LearnedRange)
    }
}

config_struct! {
    /// The keys of a `DDPMScheduler` `scheduler_config.json`, with diffusers' defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct DdpmConfig {
        /// Training timesteps.
        pub num_train_timesteps: usize = 1000,
        /// First beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_start: f64 = 0.0001,
        /// Last beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_end: f64 = 0.02,
        /// Beta schedule.
        pub beta_schedule: DdpmBetaSchedule = DdpmBetaSchedule::Linear,
        /// Explicit betas, overriding the schedule.
        pub trained_betas: Option<Vec<f64>> = None,
        /// Variance of the noise added at each step.
        pub variance_type: VarianceType = VarianceType::FixedSmall,
        /// Clip the predicted `x0` to `[-clip_sample_range, clip_sample_range]`.
        pub clip_sample: bool = true,
        /// What the model predicts.
        pub prediction_type: PredictionType = PredictionType::Epsilon,
        /// Imagen-style dynamic thresholding of `x0`.
        pub thresholding: bool = false,
        /// Quantile used by dynamic thresholding.
        #[serde(deserialize_with = "lenient_f64")]
        pub dynamic_thresholding_ratio: f64 = 0.995,
        /// Clip range for `clip_sample`.
        #[serde(deserialize_with = "lenient_f64")]
        pub clip_sample_range: f64 = 1.0,
        /// Upper bound of the dynamic threshold.
        #[serde(deserialize_with = "lenient_f64")]
        pub sample_max_value: f64 = 1.0,
        /// How inference timesteps are placed.
        pub timestep_spacing: TimestepSpacing = TimestepSpacing::Leading,
        /// Added to every timestep with `leading` spacing.
        pub steps_offset: usize = 0,
        /// Rescale betas to zero terminal SNR.
        pub rescale_betas_zero_snr: bool = false,
    }
}

/// Betas of the Laplace noise schedule (diffusers' `betas_for_alpha_bar(...,
/// alpha_transform_type="laplace")`): `lambda(t) = -sign(1/2 - t) ln(1 - 2|1/2 - t| + 1e-6) / 2`,
/// `abar(t) = sqrt(sigmoid(lambda))`, `beta_i = min(1 - abar((i+1)/N) / abar(i/N), 0.999)`.
fn laplace_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        let lmb = -0.5 * (0.5 - t).signum() * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
        let snr = lmb.exp();
        (snr / (1.0 + snr)).sqrt()
    };
    let nf = n as f64;
    (0..n)
        .map(|i| (1.0 - alpha_bar((i + 1) as f64 / nf) / alpha_bar(i as f64 / nf)).min(0.999))
        .collect()
}

/// The DDPM ancestral sampler.
///
/// Each step samples the posterior `q(x_{t-1} | x_t, x0)` (Ho et al. 2020, eqs. 6-7) at the
/// predicted `x0` (eq. 15):
/// `x_{t-1} = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0
///          + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t + sigma_t z`,
/// where `alpha_t = abar_t / abar_{t-1}` spans the gap to the previous inference timestep
/// and `sigma_t` follows [`VarianceType`]. No noise is added at `t = 0`.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: DdpmConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    custom_timesteps: bool,
}

impl DdpmScheduler {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: DdpmConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        let laplace;
        let (schedule_kind, trained) = match (&config.trained_betas, config.beta_schedule) {
            (Some(tb), _) => (BetaSchedule::Linear, Some(tb.as_slice())),
            (None, DdpmBetaSchedule::Laplace) => {
                laplace = laplace_betas(n);
                (BetaSchedule::Linear, Some(laplace.as_slice()))
            }
            (None, DdpmBetaSchedule::Linear) => (BetaSchedule::Linear, None),
            (None, DdpmBetaSchedule::ScaledLinear) => (BetaSchedule::ScaledLinear, None),
            (None, DdpmBetaSchedule::SquaredcosCapV2) => (BetaSchedule::SquaredcosCapV2, None),
            (None, DdpmBetaSchedule::Sigmoid) => (BetaSchedule::Sigmoid, None),
        };
        let schedule = NoiseSchedule::new(
            n,
            config.beta_start,
            config.beta_end,
            schedule_kind,
            trained,
            config.rescale_betas_zero_snr,
        )?;
        Ok(Self {
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            config,
            schedule,
            num_inference_steps: None,
            custom_timesteps: false,
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize("DDPMScheduler config")?)
    }

    /// The config in use.
    pub fn config(&self) -> &DdpmConfig {
        &self.config
    }

    /// The training noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The v-prediction training target at `timesteps` (Salimans & Ho 2022, §4).
    pub fn get_velocity<T: SchedulerTensor>(
        &self,
        sample: &T,
        noise: &T,
        timesteps: &[f64],
    ) -> Result<T> {
        self.schedule.get_velocity(sample, noise, timesteps)
    }

    /// The timestep after `t` in the schedule, `-1` after the last (diffusers'
    /// `previous_timestep`). Before `set_timesteps` the chain runs over every training step.
    pub fn previous_timestep(&self, t: f64) -> Result<f64> {
        if !self.custom_timesteps && self.num_inference_steps.is_none() {
            return Ok(t - 1.0);
        }
        let index = self.timesteps.iter().position(|&x| x == t).ok_or_else(|| {
            Error::InvalidArgument(format!("timestep {t} is not in the current schedule"))
        })?;
        Ok(self.timesteps.get(index + 1).copied().unwrap_or(-1.0))
    }
}

impl<T: SchedulerTensor> Scheduler<T> for DdpmScheduler {
    fn name(&self) -> &str {
        "DDPMScheduler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n_train = self.config.num_train_timesteps;
        match schedule {
            TimestepSchedule::Steps(n) => {
                check_steps(n, n_train)?;
                let timesteps = spaced_timesteps(
                    self.config.timestep_spacing,
                    n_train,
                    n,
                    self.config.steps_offset,
                );
                check_steps_offset(&timesteps, n_train)?;
                self.timesteps = timesteps;
                self.num_inference_steps = Some(n);
                self.custom_timesteps = false;
            }
            TimestepSchedule::Timesteps(timesteps) => {
                check_integer_timesteps(&timesteps, n_train)?;
                self.timesteps = timesteps;
                self.custom_timesteps = true;
            }
            TimestepSchedule::Sigmas(_) => {
                return Err(Error::Unsupported(
                    "DDPMScheduler takes a step count or custom timesteps, not sigmas".into(),
                ));
            }
        }
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &T,
        timestep: f64,
        sample: &T,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        let c = &self.config;
        let t = timestep;
        let prev_t = self.previous_timestep(t)?;

        // Learned variances come in the model's extra output channels.
        let (out_shape, sample_shape) = (model_output.shape(), sample.shape());
        let split = c.variance_type.is_learned()
            && out_shape.len() >= 2
            && sample_shape.len() >= 2
            && out_shape[1] == 2 * sample_shape[1];
        let (model_output, predicted_variance) = if split {
            let (mo, pv) = model_output.split_channels(sample_shape[1]);
            (mo, Some(pv))
        } else {
            (model_output.clone(), None)
        };
        check_same_shape(&model_output, sample)?;

        // 1. alphas and betas over the gap t -> prev_t
        let alpha_prod_t = self.schedule.alpha_bar(t)?;
        let alpha_prod_t_prev = self.schedule.alpha_bar_or(prev_t, 1.0)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        // 2. predicted x0 (eq. 15)
        let (a, s) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let mut pred_x0 = vp_pred_x0(c.prediction_type, &model_output, sample, a, s);

        // 3. clip or threshold x0
        if c.thresholding {
            pred_x0 = dynamic_threshold(&pred_x0, c.dynamic_thresholding_ratio, c.sample_max_value);
        } else if c.clip_sample {
            pred_x0 = pred_x0.clamp(-c.clip_sample_range, c.clip_sample_range);
        }

        // 4. posterior mean mu~_t(x_t, x0) (eq. 7)
        let x0_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let mut prev = T::lincomb(&[(x0_coeff, &pred_x0), (sample_coeff, sample)]);

        // 5. add noise, except at t = 0
        if t > 0.0 {
            let z = model_output.noise_like(noise)?;
            // beta~_t, the posterior variance (eq. 7), floored at 1e-20 as diffusers does
            let small =
                ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t).max(1e-20);
            let learned_input = || {
                predicted_variance.as_ref().ok_or_else(|| {
                    Error::Shape(format!(
                        "variance_type {:?} needs a model output with twice the sample's channels ({:?} vs {:?})",
                        c.variance_type, out_shape, sample_shape
                    ))
                })
            };
            let noise_term = match c.variance_type {
                VarianceType::FixedSmall => z.scale(small.sqrt()),
                VarianceType::FixedSmallLog => z.scale((0.5 * small.ln()).exp()),
                VarianceType::FixedLarge => z.scale(current_beta_t.sqrt()),
                VarianceType::FixedLargeLog => z.scale((0.5 * current_beta_t.ln()).exp()),
                VarianceType::Learned => {
                    let pv = learned_input()?;
                    let shape = pv.shape();
                    let std = pv.to_host().into_iter().map(f64::sqrt).collect();
                    pv.from_host_like(std, &shape).mul(&z)
                }
                VarianceType::LearnedRange => {
                    // log var = frac * log beta_t + (1 - frac) * log beta~_t, frac = (v + 1) / 2
                    let (min_log, max_log) = (small.ln(), current_beta_t.ln());
                    let pv = learned_input()?;
                    pv.scale(0.25 * (max_log - min_log))
                        .add_scalar(0.25 * (max_log + min_log))
                        .exp()
                        .mul(&z)
                }
            };
            prev = prev.add(&noise_term);
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(pred_x0),
        })
    }

    fn add_noise(&self, original_samples: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        self.schedule.add_noise(original_samples, noise, timesteps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::{FixedNoise, HostTensor, NoNoise};

    fn host(data: Vec<f64>, shape: Vec<usize>) -> HostTensor {
        HostTensor::new(data, shape).unwrap()
    }

    #[test]
    fn timesteps_follow_spacing_and_custom_lists() {
        let mut s = DdpmScheduler::new(DdpmConfig::default()).unwrap();
        assert_eq!(Scheduler::<HostTensor>::timesteps(&s).len(), 1000);
        Scheduler::<HostTensor>::set_timesteps(&mut s, 4).unwrap();
        assert_eq!(
            Scheduler::<HostTensor>::timesteps(&s),
            &[750.0, 500.0, 250.0, 0.0]
        );
        assert_eq!(s.previous_timestep(500.0).unwrap(), 250.0);
        assert_eq!(s.previous_timestep(0.0).unwrap(), -1.0);
        assert!(s.previous_timestep(499.0).is_err());
        let custom = TimestepSchedule::Timesteps(vec![900.0, 300.0, 7.0]);
        Scheduler::<HostTensor>::set_timestep_schedule(&mut s, custom).unwrap();
        assert_eq!(s.previous_timestep(300.0).unwrap(), 7.0);
        for bad in [vec![3.0, 5.0], vec![1000.0], vec![5.5]] {
            let r = Scheduler::<HostTensor>::set_timestep_schedule(
                &mut s,
                TimestepSchedule::Timesteps(bad),
            );
            assert!(r.is_err());
        }
        assert!(Scheduler::<HostTensor>::set_timesteps(&mut s, 0).is_err());
        assert!(Scheduler::<HostTensor>::set_timesteps(&mut s, 1001).is_err());
    }

    /// One step from t = 500 to t = 0 (fixed_small) against the closed form of eqs. 7 and 15.
    #[test]
    fn step_matches_diffusers() {
        let mut s = DdpmScheduler::new(DdpmConfig::default()).unwrap();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 2).unwrap();
        let x = host(vec![0.5, -1.0, 2.0, 0.25], vec![1, 2, 2, 1]);
        let eps = host(vec![0.1, 0.2, -0.3, 0.4], vec![1, 2, 2, 1]);
        let z = vec![1.0, -1.0, 0.5, 0.0];
        let out = s
            .step(&eps, 500.0, &x, &mut FixedNoise::new(vec![z]))
            .unwrap();
        let abar = s.schedule().alphas_cumprod.clone();
        let (at, ap) = (abar[500], abar[0]);
        let x0: Vec<f64> = x
            .data()
            .iter()
            .zip(eps.data())
            .map(|(x, e)| ((x - (1.0 - at).sqrt() * e) / at.sqrt()).clamp(-1.0, 1.0))
            .collect();
        assert_eq!(out.pred_original_sample.as_ref().unwrap().data(), &x0[..]);
        let beta = 1.0 - at / ap;
        let var = (1.0 - ap) / (1.0 - at) * beta;
        let expect: Vec<f64> = (0..4)
            .map(|i| {
                ap.sqrt() * beta / (1.0 - at) * x0[i]
                    + (at / ap).sqrt() * (1.0 - ap) / (1.0 - at) * x.data()[i]
                    + var.sqrt() * [1.0, -1.0, 0.5, 0.0][i]
            })
            .collect();
        for (a, b) in out.prev_sample.data().iter().zip(&expect) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        // the final step (t = 0) draws no noise
        let out0 = s.step(&eps, 0.0, &x, &mut NoNoise).unwrap();
        assert_eq!(out0.prev_sample.shape(), vec![1, 2, 2, 1]);
    }

    #[test]
    fn learned_range_splits_channels() {
        let config = DdpmConfig {
            variance_type: VarianceType::LearnedRange,
            ..DdpmConfig::default()
        };
        let mut s = DdpmScheduler::new(config).unwrap();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 10).unwrap();
        let x = host(vec![0.3, -0.2], vec![1, 1, 2]);
        // channel 0: eps; channel 1: v = 1 (the upper end: variance beta_t)
        let out = host(vec![0.1, 0.1, 1.0, 1.0], vec![1, 2, 2]);
        let z = vec![1.0, 2.0];
        let r = s
            .step(&out, 900.0, &x, &mut FixedNoise::new(vec![z]))
            .unwrap();
        let fixed_large = DdpmScheduler::new(DdpmConfig {
            variance_type: VarianceType::FixedLarge,
            ..DdpmConfig::default()
        })
        .unwrap();
        let mut fl = fixed_large;
        Scheduler::<HostTensor>::set_timesteps(&mut fl, 10).unwrap();
        let eps = host(vec![0.1, 0.1], vec![1, 1, 2]);
        let r2 = fl
            .step(&eps, 900.0, &x, &mut FixedNoise::new(vec![vec![1.0, 2.0]]))
            .unwrap();
        for (a, b) in r.prev_sample.data().iter().zip(r2.prev_sample.data()) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        // learned variance without the extra channels is a typed error
        let mut again = DdpmScheduler::new(DdpmConfig {
            variance_type: VarianceType::Learned,
            ..DdpmConfig::default()
        })
        .unwrap();
        Scheduler::<HostTensor>::set_timesteps(&mut again, 10).unwrap();
        let err = again.step(&eps, 900.0, &x, &mut FixedNoise::new(vec![vec![0.0; 2]]));
        assert!(matches!(err, Err(Error::Shape(_))));
    }

    #[test]
    fn laplace_and_sigmoid_schedules_build() {
        for beta_schedule in [DdpmBetaSchedule::Laplace, DdpmBetaSchedule::Sigmoid] {
            let s = DdpmScheduler::new(DdpmConfig {
                beta_schedule,
                ..DdpmConfig::default()
            })
            .unwrap();
            let ab = &s.schedule().alphas_cumprod;
            assert!(ab.windows(2).all(|w| w[1] <= w[0]));
        }
        let map = ConfigMap::parse(
            r#"{"beta_schedule": "laplace", "variance_type": "learned_range"}"#,
            "t",
        )
        .unwrap();
        assert!(DdpmScheduler::from_config_map(&map).is_ok());
        let map = ConfigMap::parse(r#"{"variance_type": "huge"}"#, "t").unwrap();
        assert!(DdpmScheduler::from_config_map(&map).is_err());
    }
}
