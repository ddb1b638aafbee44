//! DEIS: Diffusion Exponential Integrator Sampler (Zhang & Chen 2023, "Fast Sampling of
//! Diffusion Models with Exponential Integrator"), as diffusers' `DEISMultistepScheduler`.
//!
//! The multistep "log-rho" variant: the sampler integrates the probability-flow ODE in
//! `rho = sigma_t / alpha_t` with the noise prediction extrapolated by a Lagrange polynomial
//! in `log rho` through the last 1-3 model outputs, integrated exactly (Zhang & Chen 2023,
//! §4, "rhoAB-DEIS"). The noise-level table is built by the shared VP helpers of
//! [`crate::common`].

use diffusion_core::config::lenient_f64;
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::Deserialize;

use crate::common::{
    ModelOutputs, PredictionType, SigmaSpacing, StepIndex, TimestepSchedule, TimestepSpacing,
    config_struct, dynamic_threshold, multistep_order, multistep_timesteps, reject_flow_keys,
    step_count, vp_add_noise, vp_alpha_sigma, vp_inference_sigmas, vp_lambda, vp_pred_x0,
    vp_sigma_min,
};
use crate::schedule::{BetaSchedule, NoiseSchedule, check_not_sigmoid, check_same_shape};
use crate::scheduler::{Scheduler, StepOutput};

/// The `algorithm_type` key. Only `deis` exists; diffusers replaces the DPM-Solver names
/// `dpmsolver` and `dpmsolver++` by it, so they are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum DeisAlgorithmType {
    /// The DEIS exponential integrator on the noise prediction.
    #[default]
    #[serde(rename = "deis", alias = "dpmsolver", alias = "dpmsolver++")]
    Deis,
}

/// The `solver_type` key. Only `logrho` exists; diffusers replaces the DPM-Solver and UniPC
/// names `midpoint`, `heun`, `bh1` and `bh2` by it, so they are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum DeisSolverType {
    /// Polynomial extrapolation in `log rho`.
    #[default]
    #[serde(
        rename = "logrho",
        alias = "midpoint",
        alias = "heun",
        alias = "bh1",
        alias = "bh2"
    )]
    LogRho,
}

config_struct! {
    /// The keys of a `DEISMultistepScheduler` `scheduler_config.json`, with diffusers' defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct DeisConfig {
        /// Training timesteps.
        pub num_train_timesteps: usize = 1000,
        /// First beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_start: f64 = 0.0001,
        /// Last beta.
        #[serde(deserialize_with = "lenient_f64")]
        pub beta_end: f64 = 0.02,
        /// Beta schedule (`linear`, `scaled_linear` or `squaredcos_cap_v2`).
        pub beta_schedule: BetaSchedule = BetaSchedule::Linear,
        /// Explicit betas, overriding the schedule.
        pub trained_betas: Option<Vec<f64>> = None,
        /// Order of the multistep method: 1, 2 or 3.
        pub solver_order: usize = 2,
        /// What the model predicts.
        pub prediction_type: PredictionType = PredictionType::Epsilon,
        /// Imagen-style dynamic thresholding of the predicted `x0`.
        pub thresholding: bool = false,
        /// Quantile used by dynamic thresholding.
        #[serde(deserialize_with = "lenient_f64")]
        pub dynamic_thresholding_ratio: f64 = 0.995,
        /// Upper bound of the dynamic threshold.
        #[serde(deserialize_with = "lenient_f64")]
        pub sample_max_value: f64 = 1.0,
        /// Integrator; only `deis`.
        pub algorithm_type: DeisAlgorithmType = DeisAlgorithmType::Deis,
        /// Extrapolation variable; only `logrho`.
        pub solver_type: DeisSolverType = DeisSolverType::LogRho,
        /// Lower the order over the last two steps of runs shorter than 15 steps.
        pub lower_order_final: bool = true,
        /// Karras et al. 2022 noise levels.
        pub use_karras_sigmas: bool = false,
        /// Noise levels evenly spaced in log space.
        pub use_exponential_sigmas: bool = false,
        /// Beta-distribution noise levels (Lee et al. 2024).
        pub use_beta_sigmas: bool = false,
        /// Flow-matching sigmas; not supported (must be false).
        pub use_flow_sigmas: bool = false,
        /// Flow-matching shift; only the default 1.0 is accepted.
        #[serde(deserialize_with = "lenient_f64")]
        pub flow_shift: f64 = 1.0,
        /// How inference timesteps are placed.
        pub timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace,
        /// Added to every timestep with `leading` spacing.
        pub steps_offset: usize = 0,
        /// Flow-matching dynamic shifting; not supported (must be false).
        pub use_dynamic_shifting: bool = false,
        /// Flow-matching time shift; only `"exponential"` (the default, unused) is accepted.
        pub time_shift_type: String = "exponential".into(),
    }
}

/// `int_{rho_s0}^{rho_t}` of the Lagrange basis polynomial (in `log rho`) through the nodes
/// `b` (the one it is 1 at) and `c`: the antiderivative `F(t) = t (ln t - ln c - 1) /
/// (ln b - ln c)`, evaluated between `rho_s0` and `rho_t`.
fn logrho_coef2(rho_t: f64, rho_s0: f64, b: f64, c: f64) -> f64 {
    let f = |t: f64| t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln());
    f(rho_t) - f(rho_s0)
}

/// The same for the quadratic Lagrange basis polynomial through `b` (where it is 1), `c`
/// and `d`.
fn logrho_coef3(rho_t: f64, rho_s0: f64, b: f64, c: f64, d: f64) -> f64 {
    let (lb, lc, ld) = (b.ln(), c.ln(), d.ln());
    let f = |t: f64| {
        let lt = t.ln();
        let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
        numerator / ((lb - lc) * (lb - ld))
    };
    f(rho_t) - f(rho_s0)
}

/// DEIS multistep sampler (log-rho, orders 1-3).
///
/// With `rho = sigma_t / alpha_t` and `eps_k` the noise predictions at the last nodes
/// `rho_{s_k}`, one step from `s0` to `t` is (Zhang & Chen 2023, eq. 15 with the polynomial
/// extrapolation of §4):
///
/// `x_t = alpha_t (x_{s0} / alpha_{s0} + sum_k C_k eps_k)`,
/// `C_k = int_{rho_{s0}}^{rho_t} L_k(log rho) d rho`,
///
/// where `L_k` is the Lagrange basis polynomial of node `k`; with one node this is DDIM,
/// `x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps`.
#[derive(Debug, Clone)]
pub struct DeisMultistepScheduler<T> {
    config: DeisConfig,
    schedule: NoiseSchedule,
    spacing: SigmaSpacing,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    model_outputs: ModelOutputs<T>,
    lower_order_nums: usize,
    index: StepIndex,
}

impl<T: SchedulerTensor> DeisMultistepScheduler<T> {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: DeisConfig) -> Result<Self> {
        const CLASS: &str = "DEISMultistepScheduler";
        if !(1..=3).contains(&config.solver_order) {
            return Err(Error::config(
                "solver_order",
                format!("must be 1, 2 or 3, got {}", config.solver_order),
            ));
        }
        reject_flow_keys(
            CLASS,
            config.use_flow_sigmas,
            config.flow_shift,
            config.use_dynamic_shifting,
            &config.time_shift_type,
        )?;
        let spacing = SigmaSpacing::from_flags(
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )?;
        check_not_sigmoid(CLASS, config.beta_schedule, config.trained_betas.as_deref())?;
        let schedule = NoiseSchedule::new(
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas.as_deref(),
            false,
        )?;
        Ok(Self {
            model_outputs: ModelOutputs::new(config.solver_order),
            config,
            schedule,
            spacing,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            lower_order_nums: 0,
            index: StepIndex::default(),
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize("DEISMultistepScheduler config")?)
    }

    /// The config in use.
    pub fn config(&self) -> &DeisConfig {
        &self.config
    }

    /// The training noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Index of the next step in the schedule, once the run has started.
    pub fn step_index(&self) -> Option<usize> {
        self.index.step
    }

    /// The model output as the noise prediction DEIS integrates, going through `x0` so that
    /// thresholding applies: `eps = (x - alpha_t x0) / sigma_t`. Returns `(eps, x0)`.
    fn convert_model_output(&self, model_output: &T, sample: &T, sigma: f64) -> (T, T) {
        let c = &self.config;
        let (alpha_t, sigma_t) = vp_alpha_sigma(sigma);
        let mut x0 = vp_pred_x0(c.prediction_type, model_output, sample, alpha_t, sigma_t);
        if c.thresholding {
            x0 = dynamic_threshold(&x0, c.dynamic_thresholding_ratio, c.sample_max_value);
        }
        let eps = T::lincomb(&[(1.0 / sigma_t, sample), (-alpha_t / sigma_t, &x0)]);
        (eps, x0)
    }

    /// One DEIS step of `order` from `sample` at `sigmas[i]` to `sigmas[i + 1]`.
    fn update(&self, sample: &T, i: usize, order: usize) -> Result<T> {
        let m = self.model_outputs.newest(order)?;
        let (alpha_t, sigma_t) = vp_alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = vp_alpha_sigma(self.sigmas[i]);
        if order == 1 {
            // first order (DDIM): x_t = (alpha_t / alpha_s) x - sigma_t (e^h - 1) eps, with
            // `exp(h) - 1` as diffusers writes it rather than `expm1`
            let h = vp_lambda(self.sigmas[i + 1]) - vp_lambda(self.sigmas[i]);
            return Ok(T::lincomb(&[
                (alpha_t / alpha_s0, sample),
                (-(sigma_t * (h.exp() - 1.0)), m[0]),
            ]));
        }
        let rho = |sigma: f64| {
            let (a, s) = vp_alpha_sigma(sigma);
            s / a
        };
        let rho_t = sigma_t / alpha_t;
        let rho_s0 = sigma_s0 / alpha_s0;
        let rho_s1 = rho(self.sigmas[i - 1]);
        let coefs = if order == 2 {
            vec![
                logrho_coef2(rho_t, rho_s0, rho_s0, rho_s1),
                logrho_coef2(rho_t, rho_s0, rho_s1, rho_s0),
            ]
        } else {
            let rho_s2 = rho(self.sigmas[i - 2]);
            vec![
                logrho_coef3(rho_t, rho_s0, rho_s0, rho_s1, rho_s2),
                logrho_coef3(rho_t, rho_s0, rho_s1, rho_s2, rho_s0),
                logrho_coef3(rho_t, rho_s0, rho_s2, rho_s0, rho_s1),
            ]
        };
        let mut terms = Vec::with_capacity(order + 1);
        terms.push((alpha_t / alpha_s0, sample));
        for (c, mk) in coefs.iter().zip(m) {
            terms.push((alpha_t * c, mk));
        }
        Ok(T::lincomb(&terms))
    }
}

impl<T: SchedulerTensor> Scheduler<T> for DeisMultistepScheduler<T> {
    fn name(&self) -> &str {
        "DEISMultistepScheduler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n = step_count(
            "DEISMultistepScheduler",
            schedule,
            self.config.num_train_timesteps,
        )?;
        let c = &self.config;
        let spaced = multistep_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            c.num_train_timesteps,
            n,
            c.steps_offset,
        );
        let table = vp_inference_sigmas(
            &self.schedule.alphas_cumprod,
            &spaced,
            n,
            self.spacing,
            None,
            None,
            true,
        );
        let mut sigmas = table.sigmas;
        // DEIS never ends on sigma = 0: the respaced schedules repeat their smallest sigma,
        // the plain one ends on the first training sigma.
        let sigma_last = match self.spacing {
            SigmaSpacing::Timesteps => vp_sigma_min(&self.schedule.alphas_cumprod),
            _ => *sigmas.last().expect("at least one step"),
        };
        sigmas.push(sigma_last);
        self.timesteps = table.timesteps;
        self.sigmas = sigmas;
        self.model_outputs = ModelOutputs::new(c.solver_order);
        self.lower_order_nums = 0;
        self.index.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn step(
        &mut self,
        model_output: &T,
        timestep: f64,
        sample: &T,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        if self.timesteps.is_empty() {
            return Err(Error::InvalidState("call set_timesteps before step".into()));
        }
        check_same_shape(model_output, sample)?;
        let i = self.index.current_within(timestep, &self.timesteps)?;
        let n = self.timesteps.len();

        let c = &self.config;
        let short_run = c.lower_order_final && n < 15;
        let lower_order_final = short_run && i == n - 1;
        let lower_order_second = short_run && i + 2 == n;

        let (eps, x0) = self.convert_model_output(model_output, sample, self.sigmas[i]);
        let order = c.solver_order;
        self.model_outputs.push(eps);

        let this_order = multistep_order(
            order,
            self.lower_order_nums,
            lower_order_final,
            lower_order_second,
        );
        let prev_sample = self.update(sample, i, this_order)?;

        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.index.advance();
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, original_samples: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        vp_add_noise(
            &self.schedule,
            &self.timesteps,
            &self.sigmas,
            &self.index,
            original_samples,
            noise,
            timesteps,
        )
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
    fn first_order_is_ddim() {
        // one DEIS step of order 1 equals the DDIM update with eps = model output
        let config = DeisConfig {
            solver_order: 1,
            ..Default::default()
        };
        let mut s = DeisMultistepScheduler::<HostTensor>::new(config).unwrap();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 4).unwrap();
        let x = HostTensor::new(vec![0.3, -1.2], vec![1, 2]).unwrap();
        let eps = HostTensor::new(vec![0.5, 0.1], vec![1, 2]).unwrap();
        let (a_s, s_s) = vp_alpha_sigma(s.sigmas[0]);
        let (a_t, s_t) = vp_alpha_sigma(s.sigmas[1]);
        let t0 = s.timesteps[0];
        let out = s.step(&eps, t0, &x, &mut NoNoise).unwrap().prev_sample;
        for k in 0..2 {
            let x0 = (x.data()[k] - s_s * eps.data()[k]) / a_s;
            let want = a_t * x0 + s_t * eps.data()[k];
            assert!((out.data()[k] - want).abs() < 1e-12);
        }
    }

    #[test]
    fn lagrange_coefficients_integrate_constants() {
        // the basis polynomials sum to 1, so their integrals sum to rho_t - rho_s0
        let (t, s0, s1, s2) = (0.2, 0.5, 0.9, 1.7);
        let sum2 = logrho_coef2(t, s0, s0, s1) + logrho_coef2(t, s0, s1, s0);
        assert!((sum2 - (t - s0)).abs() < 1e-12);
        let sum3 = logrho_coef3(t, s0, s0, s1, s2)
            + logrho_coef3(t, s0, s1, s2, s0)
            + logrho_coef3(t, s0, s2, s0, s1);
        assert!((sum3 - (t - s0)).abs() < 1e-12);
    }

    #[test]
    fn final_sigma_is_never_zero() {
        let mut s = DeisMultistepScheduler::<HostTensor>::new(DeisConfig::default()).unwrap();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 5).unwrap();
        assert_eq!(s.timesteps, vec![999.0, 799.0, 599.0, 400.0, 200.0]);
        assert!(s.sigmas[5] > 0.0);
        let map = ConfigMap::parse(r#"{"solver_order": 4}"#, "t").unwrap();
        assert!(DeisMultistepScheduler::<HostTensor>::from_config_map(&map).is_err());
        let map = ConfigMap::parse(
            r#"{"algorithm_type": "dpmsolver++", "solver_type": "bh2"}"#,
            "t",
        )
        .unwrap();
        assert!(DeisMultistepScheduler::<HostTensor>::from_config_map(&map).is_ok());
    }
}
