//! Linear multistep sampling in sigma space (Karras et al. 2022, "Elucidating the Design
//! Space of Diffusion-Based Generative Models", k-diffusion's `sample_lms`), as diffusers'
//! `LMSDiscreteScheduler`.

use diffusion_core::config::lenient_f64;
use diffusion_core::config::lenient_opt_f64;
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::Deserialize;

use crate::common::{
    PredictionType, SigmaSpacing, StepIndex, TimestepSchedule, TimestepSpacing, config_struct,
    k_add_noise, k_init_noise_sigma, k_noise_schedule, k_pred_x0, k_scale_model_input, k_schedule,
    k_spaced_timesteps, sigma_at, step_count,
};
use crate::schedule::{BetaSchedule, check_same_shape};
use crate::scheduler::{Scheduler, StepOutput};

config_struct! {
    /// The keys of an `LMSDiscreteScheduler` `scheduler_config.json`, with diffusers' defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct LmsConfig {
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
        /// Karras et al. 2022 noise levels.
        pub use_karras_sigmas: bool = false,
        /// Noise levels evenly spaced in log sigma.
        pub use_exponential_sigmas: bool = false,
        /// Beta-quantile noise levels (Lee et al. 2024).
        pub use_beta_sigmas: bool = false,
        /// What the model predicts.
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

/// Linear multistep sampler of order `lms_order` (4 by default, diffusers' `step(order=4)`).
///
/// With `d_i = (x_i - x0_i) / sigma_i` the ODE derivative `dx/dsigma` (Karras et al. 2022,
/// eq. 4), the update is `x_{i+1} = x_i + sum_j c_j d_{i-j}` where `c_j` is the integral from
/// `sigma_i` to `sigma_{i+1}` of the Lagrange basis polynomial through
/// `sigma_i, ..., sigma_{i-order+1}` that is 1 at `sigma_{i-j}` (Adams–Bashforth in sigma).
/// The polynomial integrals are computed exactly (diffusers uses `scipy.integrate.quad`,
/// which is exact for these low degrees).
#[derive(Debug, Clone)]
pub struct LmsDiscreteScheduler<T> {
    config: LmsConfig,
    spacing: SigmaSpacing,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: usize,
    index: StepIndex,
    derivatives: Vec<T>,
    lms_order: usize,
}

impl<T: SchedulerTensor> LmsDiscreteScheduler<T> {
    /// Builds the sampler from its config, validating it. Like diffusers, it starts with a
    /// schedule of `num_train_timesteps` steps.
    pub fn new(config: LmsConfig) -> Result<Self> {
        let spacing = SigmaSpacing::from_flags(
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )?;
        let schedule = k_noise_schedule(
            "LMSDiscreteScheduler",
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas.as_deref(),
            false,
        )?;
        let mut scheduler = Self {
            spacing,
            train_sigmas: schedule.sigmas(),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            num_inference_steps: 0,
            index: StepIndex::default(),
            derivatives: Vec::new(),
            lms_order: 4,
            config,
        };
        scheduler.set_steps(scheduler.config.num_train_timesteps)?;
        Ok(scheduler)
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize("LMSDiscreteScheduler config")?)
    }

    /// The config in use.
    pub fn config(&self) -> &LmsConfig {
        &self.config
    }

    /// The order of the multistep formula (diffusers' `step(order=...)`, default 4).
    pub fn lms_order(&self) -> usize {
        self.lms_order
    }

    /// Sets the order of the multistep formula used by later steps (at least 1).
    pub fn set_lms_order(&mut self, order: usize) -> Result<()> {
        if order == 0 {
            return Err(Error::InvalidArgument(
                "the LMS order must be at least 1".into(),
            ));
        }
        self.lms_order = order;
        Ok(())
    }

    /// The multistep coefficient of derivative `d_{t - current}` for an `order`-step formula
    /// at step `t` (diffusers' `get_lms_coefficient`): the integral over
    /// `[sigma_t, sigma_{t+1}]` of `prod_{k != current} (tau - sigma_{t-k}) /
    /// (sigma_{t-current} - sigma_{t-k})`, integrated exactly in `u = tau - sigma_t`.
    pub fn lms_coefficient(&self, order: usize, t: usize, current: usize) -> Result<f64> {
        if order == 0 || current >= order || order > t + 1 {
            return Err(Error::InvalidArgument(format!(
                "LMS coefficient {current} of order {order} at step {t}"
            )));
        }
        let s = &self.sigmas;
        let start = sigma_at(s, t)?;
        let end = sigma_at(s, t + 1)?;
        // polynomial coefficients in u, lowest degree first
        let mut poly = vec![1.0];
        let pivot = s[t - current];
        for k in (0..order).filter(|&k| k != current) {
            let node = s[t - k];
            let denom = pivot - node;
            // multiply by (u + start - node) / denom
            let shift = (start - node) / denom;
            let mut next = vec![0.0; poly.len() + 1];
            for (i, c) in poly.iter().enumerate() {
                next[i] += c * shift;
                next[i + 1] += c / denom;
            }
            poly = next;
        }
        let h = end - start;
        let mut power = h;
        let mut integral = 0.0;
        for (i, c) in poly.iter().enumerate() {
            integral += c * power / (i + 1) as f64;
            power *= h;
        }
        Ok(integral)
    }

    fn set_steps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        let base = k_spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset);
        let schedule = k_schedule(
            &self.train_sigmas,
            base,
            n,
            self.spacing,
            c.sigma_min,
            c.sigma_max,
            false,
        );
        self.timesteps = schedule.timesteps;
        self.sigmas = schedule.sigmas;
        self.sigmas.push(0.0);
        self.num_inference_steps = n;
        self.index.reset();
        self.derivatives.clear();
        Ok(())
    }
}

impl<T: SchedulerTensor> Scheduler<T> for LmsDiscreteScheduler<T> {
    fn name(&self) -> &str {
        "LMSDiscreteScheduler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n = step_count(
            "LMSDiscreteScheduler",
            schedule,
            self.config.num_train_timesteps,
        )?;
        self.set_steps(n)
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        check_same_shape(model_output, sample)?;
        let i = self.index.current(timestep, &self.timesteps)?;
        let sigma = sigma_at(&self.sigmas, i)?;
        sigma_at(&self.sigmas, i + 1)?;
        // 1. x0 and the ODE derivative d = (x - x0) / sigma
        let pred_x0 = k_pred_x0(self.config.prediction_type, model_output, sample, sigma);
        let derivative = T::lincomb(&[(1.0 / sigma, sample), (-1.0 / sigma, &pred_x0)]);
        self.derivatives.push(derivative);
        if self.derivatives.len() > self.lms_order {
            self.derivatives.remove(0);
        }
        // 2. x_{i+1} = x_i + sum_j c_j d_{i-j}; like Python's zip, unmatched terms drop out
        let order = self.lms_order.min(i + 1);
        let coeffs = (0..order)
            .map(|j| self.lms_coefficient(order, i, j))
            .collect::<Result<Vec<f64>>>()?;
        let mut terms: Vec<(f64, &T)> = vec![(1.0, sample)];
        terms.extend(coeffs.iter().copied().zip(self.derivatives.iter().rev()));
        let prev_sample = T::lincomb(&terms);
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

    fn sd_config() -> LmsConfig {
        LmsConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            ..LmsConfig::default()
        }
    }

    #[test]
    fn coefficients_integrate_lagrange_polynomials() {
        let mut s = LmsDiscreteScheduler::<HostTensor>::new(sd_config()).unwrap();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 10).unwrap();
        // order 1 is the Euler step: the interval length
        let h = s.sigmas[1] - s.sigmas[0];
        assert!((s.lms_coefficient(1, 0, 0).unwrap() - h).abs() < 1e-14);
        // the coefficients of any order sum to the interval length (they integrate 1)
        for order in 1..=4 {
            let t = 5;
            let sum: f64 = (0..order)
                .map(|j| s.lms_coefficient(order, t, j).unwrap())
                .sum();
            assert!(
                (sum - (s.sigmas[t + 1] - s.sigmas[t])).abs() < 1e-12,
                "order {order}"
            );
        }
        // values printed by diffusers 0.42.1 (scipy quad) for this schedule
        let want = [
            -0.6766709965173816,
            0.3578711809926821,
            -0.10326072227310099,
            0.009490564565549323,
        ];
        for (j, w) in want.iter().enumerate() {
            let got = s.lms_coefficient(4, 5, j).unwrap();
            // diffusers evaluates the integrand in float32
            assert!(
                (got - w).abs() < 1e-5 * w.abs(),
                "coefficient {j}: {got} vs {w}"
            );
        }
    }

    #[test]
    fn invalid_settings_are_errors() {
        let mut s = LmsDiscreteScheduler::<HostTensor>::new(LmsConfig::default()).unwrap();
        assert!(s.set_lms_order(0).is_err());
        assert!(Scheduler::<HostTensor>::set_timesteps(&mut s, 0).is_err());
        assert!(Scheduler::<HostTensor>::set_timesteps(&mut s, 1001).is_err());
        let both = LmsConfig {
            use_karras_sigmas: true,
            use_beta_sigmas: true,
            ..LmsConfig::default()
        };
        assert!(LmsDiscreteScheduler::<HostTensor>::new(both).is_err());
    }
}
