//! UniPC: a unified predictor-corrector framework for fast sampling of diffusion models
//! (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
//! Sampling of Diffusion Models"), as diffusers' `UniPCMultistepScheduler`.
//!
//! Notation (as in DPM-Solver): a variance-preserving sample is `x_t = alpha_t x0 + sigma_t
//! eps`, `lambda_t = ln(alpha_t / sigma_t)`, and a step from `s` to `t` has length
//! `h = lambda_t - lambda_s`. The sampler keeps a table of noise levels
//! `sigma = sigma_t / alpha_t` (built by the shared VP helpers of [`crate::common`]).
//!
//! Each `step` first *corrects* the sample it is given with UniC (using the model output just
//! evaluated at it), then *predicts* the next sample with UniP from the stored outputs.
//!
//! Differences from diffusers: tables are `f64` (diffusers rounds its sigmas to `f32`, so
//! trajectories agree to ~1e-6 relative, and to ~1e-15 against diffusers patched to `f64`
//! tables); the last step to `sigma = 0` with `solver_type = "bh1"` or `predict_x0 = false`
//! ends on its limit (the predicted `x0`) where diffusers computes `-inf * 0` / `0 * inf`
//! and returns NaN; a timestep that is not in the schedule is an error rather than the
//! last step; `solver_p` and the flow-matching keys are unsupported.

use diffusion_core::config::{lenient_f64, lenient_opt_f64};
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::Deserialize;
use serde_json::Value;

use crate::common::{
    FinalSigmasType, ModelOutputs, PredictionType, SigmaSpacing, StepIndex, TimestepSchedule,
    TimestepSpacing, check_steps, config_struct, dynamic_threshold, finite_terminal_alphas_cumprod,
    multistep_timesteps, reject_flow_keys, vp_add_noise, vp_alpha_sigma, vp_inference_sigmas,
    vp_lambda, vp_pred_eps, vp_pred_x0, vp_sigma_min,
};
use crate::schedule::{BetaSchedule, NoiseSchedule, check_not_sigmoid, check_same_shape};
use crate::scheduler::{Scheduler, StepOutput};

/// The `solver_type` key: the choice of `B(h)` in the UniPC update (Zhao et al. 2023, §3.2).
///
/// diffusers replaces the DPM-Solver / DEIS names `midpoint`, `heun` and `logrho` by `bh2`,
/// so they are accepted here too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum UniPcSolverType {
    /// `B(h) = h` (recommended for unconditional sampling with fewer than 10 steps).
    #[serde(rename = "bh1")]
    Bh1,
    /// `B(h) = e^h - 1`.
    #[default]
    #[serde(rename = "bh2", alias = "midpoint", alias = "heun", alias = "logrho")]
    Bh2,
}

config_struct! {
    /// The keys of a `UniPCMultistepScheduler` `scheduler_config.json`, with diffusers' defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct UniPcConfig {
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
        /// Order `p` of UniPC (any positive integer; the corrector raises the accuracy to `p + 1`).
        pub solver_order: usize = 2,
        /// What the model predicts.
        pub prediction_type: PredictionType = PredictionType::Epsilon,
        /// Imagen-style dynamic thresholding of the predicted `x0` (with `predict_x0` only).
        pub thresholding: bool = false,
        /// Quantile used by dynamic thresholding.
        #[serde(deserialize_with = "lenient_f64")]
        pub dynamic_thresholding_ratio: f64 = 0.995,
        /// Upper bound of the dynamic threshold.
        #[serde(deserialize_with = "lenient_f64")]
        pub sample_max_value: f64 = 1.0,
        /// Integrate the data prediction `x0` (UniPC with DPM-Solver++'s parametrisation);
        /// otherwise the noise prediction.
        pub predict_x0: bool = true,
        /// `B(h)` of the update.
        pub solver_type: UniPcSolverType = UniPcSolverType::Bh2,
        /// Lower the order over the last steps (stabilises runs of fewer than 15 steps).
        pub lower_order_final: bool = true,
        /// Step indices whose *following* step skips the corrector (diffusers checks
        /// `step_index - 1` against this list).
        pub disable_corrector: Vec<i64> = Vec::new(),
        /// Another scheduler used as predictor (`solver_p + UniC`); not supported, must be null.
        pub solver_p: Option<Value> = None,
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
        /// The noise level after the last step.
        pub final_sigmas_type: FinalSigmasType = FinalSigmasType::Zero,
        /// Rescale betas to zero terminal SNR (the last `alpha_bar` becomes `2^-24`, as diffusers).
        pub rescale_betas_zero_snr: bool = false,
        /// Flow-matching dynamic shifting; not supported (must be false).
        pub use_dynamic_shifting: bool = false,
        /// Flow-matching time shift; only `"exponential"` (the default, unused) is accepted.
        pub time_shift_type: String = "exponential".into(),
        /// Smallest noise level of the Karras / exponential / beta schedules (default: the
        /// smallest training sigma).
        #[serde(deserialize_with = "lenient_opt_f64")]
        pub sigma_min: Option<f64> = None,
        /// Largest noise level of the Karras / exponential / beta schedules (default: the
        /// largest training sigma).
        #[serde(deserialize_with = "lenient_opt_f64")]
        pub sigma_max: Option<f64> = None,
        /// Flow-matching terminal shift; not supported (must be null).
        #[serde(deserialize_with = "lenient_opt_f64")]
        pub shift_terminal: Option<f64> = None,
    }
}

/// Solves `a x = b` for a small dense square system by Gaussian elimination with partial
/// pivoting (what `torch.linalg.solve` computes for UniPC's Vandermonde-like systems).
pub(crate) fn solve_linear(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f64>> {
    let n = b.len();
    debug_assert!(a.len() == n && a.iter().all(|row| row.len() == n));
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .expect("non-empty pivot range");
        let p = a[pivot][col];
        if p == 0.0 || !p.is_finite() {
            return Err(Error::InvalidState(format!(
                "singular {n}x{n} system in the UniPC coefficients (repeated noise levels?)"
            )));
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for (r, row) in lower.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            if f != 0.0 {
                for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= f * p;
                }
                b[col + 1 + r] -= f * b[col];
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Ok(x)
}

/// The coefficients of one UniP / UniC update of order `order` over step length `h`.
struct BhCoefficients {
    /// `hh = -h` (data prediction) or `h` (noise prediction).
    h_phi_1: f64,
    /// `B(h)`.
    b_h: f64,
    /// `r_k = (lambda_{s_k} - lambda_{s_0}) / h` for the `order - 1` earlier outputs, then 1.
    rks: Vec<f64>,
    /// Right-hand side `b_i = h phi_{i+1}(h) i! / B(h)` (Zhao et al. 2023, eq. 8).
    b: Vec<f64>,
}

impl BhCoefficients {
    fn new(
        solver_type: UniPcSolverType,
        predict_x0: bool,
        h: f64,
        mut rks: Vec<f64>,
        order: usize,
    ) -> Self {
        rks.push(1.0);
        let hh = if predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = match solver_type {
            UniPcSolverType::Bh1 => hh,
            UniPcSolverType::Bh2 => hh.exp_m1(),
        };
        let mut factorial = 1.0;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Self {
            h_phi_1,
            b_h,
            rks,
            b,
        }
    }

    /// `R[i][j] = r_j^i`, restricted to its leading `m x m` block.
    fn r_matrix(&self, m: usize) -> Vec<Vec<f64>> {
        (0..m)
            .map(|i| self.rks[..m].iter().map(|r| r.powi(i as i32)).collect())
            .collect()
    }
}

/// UniPC multistep sampler (UniP predictor + UniC corrector, B(h) variants).
///
/// With `predict_x0` (the default) the model output is converted to `x0` and the predictor
/// of order `p` is (Zhao et al. 2023, Algorithm 2, eq. 8 with DPM-Solver++'s data
/// parametrisation, `hh = -h`):
///
/// `x_t = (sigma_t / sigma_s) x_s - alpha_t (e^hh - 1) m_0 - alpha_t B(h) sum_k a_k D_k`,
/// `D_k = (m_k - m_0) / r_k`,
///
/// with `a` solving `R_{p-1} a = b_{p-1}` (`a = 1/2` for `p = 2`). The corrector recomputes
/// the previous update with the fresh output `m_t` included (`D_t = m_t - m_0`, `r = 1`),
/// solving the full `p x p` system (`1/2` for `p = 1`). Without `predict_x0` the same update
/// runs on the noise prediction, with `alpha` and `sigma` exchanged.
#[derive(Debug, Clone)]
pub struct UniPcMultistepScheduler<T> {
    config: UniPcConfig,
    schedule: NoiseSchedule,
    alphas_cumprod: Vec<f64>,
    spacing: SigmaSpacing,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    model_outputs: ModelOutputs<T>,
    lower_order_nums: usize,
    last_sample: Option<T>,
    this_order: usize,
    index: StepIndex,
}

impl<T: SchedulerTensor> UniPcMultistepScheduler<T> {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: UniPcConfig) -> Result<Self> {
        const CLASS: &str = "UniPCMultistepScheduler";
        if config.solver_order == 0 {
            return Err(Error::config("solver_order", "must be at least 1"));
        }
        if config.solver_p.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(Error::Unsupported(format!(
                "{CLASS}: `solver_p` (another scheduler as predictor) is not supported"
            )));
        }
        reject_flow_keys(
            CLASS,
            config.use_flow_sigmas,
            config.flow_shift,
            config.use_dynamic_shifting,
            &config.time_shift_type,
        )?;
        if config.shift_terminal.is_some() {
            return Err(Error::Unsupported(format!(
                "{CLASS}: `shift_terminal` needs flow-matching sigmas, which are not supported"
            )));
        }
        for (key, value) in [
            ("sigma_min", config.sigma_min),
            ("sigma_max", config.sigma_max),
        ] {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0)
            {
                return Err(Error::config(
                    key,
                    format!("must be finite and positive, got {v}"),
                ));
            }
        }
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
            config.rescale_betas_zero_snr,
        )?;
        let alphas_cumprod = finite_terminal_alphas_cumprod(
            schedule.alphas_cumprod.clone(),
            config.rescale_betas_zero_snr,
        );
        Ok(Self {
            model_outputs: ModelOutputs::new(config.solver_order),
            config,
            schedule,
            alphas_cumprod,
            spacing,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
            index: StepIndex::default(),
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(map.deserialize("UniPCMultistepScheduler config")?)
    }

    /// The config in use.
    pub fn config(&self) -> &UniPcConfig {
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

    fn convert_model_output(&self, model_output: &T, sample: &T, sigma: f64) -> T {
        let (alpha_t, sigma_t) = vp_alpha_sigma(sigma);
        let c = &self.config;
        if c.predict_x0 {
            let x0 = vp_pred_x0(c.prediction_type, model_output, sample, alpha_t, sigma_t);
            if c.thresholding {
                dynamic_threshold(&x0, c.dynamic_thresholding_ratio, c.sample_max_value)
            } else {
                x0
            }
        } else {
            vp_pred_eps(c.prediction_type, model_output, sample, alpha_t, sigma_t)
        }
    }

    /// `(alpha, sigma)` pair the update is written in: `(alpha_t, sigma_t)` for the data
    /// prediction, exchanged for the noise prediction.
    fn update_scales(&self, sigma: f64) -> (f64, f64) {
        let (alpha_t, sigma_t) = vp_alpha_sigma(sigma);
        if self.config.predict_x0 {
            (alpha_t, sigma_t)
        } else {
            (sigma_t, alpha_t)
        }
    }

    /// One UniP step (Zhao et al. 2023, Algorithm 2 / eq. 8, predictor part) from `sample` at
    /// `sigmas[i]` to `sigmas[i + 1]`, using the last `order` stored outputs.
    fn uni_p_update(&self, sample: &T, i: usize, order: usize) -> Result<T> {
        let outputs = self.model_outputs.newest(order)?;
        let m0 = outputs[0];
        let (sigma_t, sigma_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let lambda_s0 = vp_lambda(sigma_s0);
        let h = vp_lambda(sigma_t) - lambda_s0;
        let rks: Vec<f64> = (1..order)
            .map(|k| (vp_lambda(self.sigmas[i - k]) - lambda_s0) / h)
            .collect();
        let co = BhCoefficients::new(
            self.config.solver_type,
            self.config.predict_x0,
            h,
            rks,
            order,
        );
        let rhos: Vec<f64> = match order {
            1 => Vec::new(),
            2 => vec![0.5],
            _ => solve_linear(co.r_matrix(order - 1), co.b[..order - 1].to_vec())?,
        };
        let (scale_t, other_t) = self.update_scales(sigma_t);
        let (scale_s0, other_s0) = self.update_scales(sigma_s0);
        // x_t = (other_t / other_s0) x - scale_t h_phi_1 m0 - scale_t B(h) sum_k rho_k (m_k - m0) / r_k
        let mut m0_coef = if h.is_finite() {
            -scale_t * co.h_phi_1
        } else {
            // A step to sigma = 0: `scale_t h_phi_1` is `0 * inf` for the noise prediction
            // (diffusers returns NaN there); its limit `other_t scale_s0 / other_s0 - scale_t`
            // is the same expression evaluated exactly (the DDIM step to x0).
            scale_t - other_t * scale_s0 / other_s0
        };
        let mut terms = Vec::with_capacity(order + 1);
        terms.push((other_t / other_s0, sample));
        for (k, rho) in rhos.iter().enumerate() {
            let c = -scale_t * co.b_h * rho / co.rks[k];
            m0_coef -= c;
            terms.push((c, outputs[k + 1]));
        }
        terms.push((m0_coef, m0));
        Ok(T::lincomb(&terms))
    }

    /// One UniC step (Zhao et al. 2023, Algorithm 2, corrector part): redoes the update from
    /// `last_sample` at `sigmas[i - 1]` to `sigmas[i]` with the fresh output `model_t` there.
    fn uni_c_update(&self, model_t: &T, last_sample: &T, i: usize, order: usize) -> Result<T> {
        let outputs = self.model_outputs.newest(order)?;
        let m0 = outputs[0];
        let (sigma_t, sigma_s0) = (self.sigmas[i], self.sigmas[i - 1]);
        let lambda_s0 = vp_lambda(sigma_s0);
        let h = vp_lambda(sigma_t) - lambda_s0;
        let rks: Vec<f64> = (1..order)
            .map(|k| (vp_lambda(self.sigmas[i - 1 - k]) - lambda_s0) / h)
            .collect();
        let co = BhCoefficients::new(
            self.config.solver_type,
            self.config.predict_x0,
            h,
            rks,
            order,
        );
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve_linear(co.r_matrix(order), co.b.clone())?
        };
        let (scale_t, other_t) = self.update_scales(sigma_t);
        let (_, other_s0) = self.update_scales(sigma_s0);
        let mut m0_coef = -scale_t * co.h_phi_1;
        let mut terms = Vec::with_capacity(order + 2);
        terms.push((other_t / other_s0, last_sample));
        for (k, rho) in rhos[..order - 1].iter().enumerate() {
            let c = -scale_t * co.b_h * rho / co.rks[k];
            m0_coef -= c;
            terms.push((c, outputs[k + 1]));
        }
        // D1_t = model_t - m0, weighted by the last rho.
        let c_t = -scale_t * co.b_h * rhos[order - 1];
        m0_coef -= c_t;
        terms.push((c_t, model_t));
        terms.push((m0_coef, m0));
        Ok(T::lincomb(&terms))
    }
}

impl<T: SchedulerTensor> Scheduler<T> for UniPcMultistepScheduler<T> {
    fn name(&self) -> &str {
        "UniPCMultistepScheduler"
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let n =
            match schedule {
                TimestepSchedule::Steps(n) => n,
                TimestepSchedule::Timesteps(_) => {
                    return Err(Error::Unsupported(
                        "UniPCMultistepScheduler does not take custom timesteps".into(),
                    ));
                }
                TimestepSchedule::Sigmas(_) => return Err(Error::Unsupported(
                    "UniPCMultistepScheduler takes custom sigmas only with flow-matching sigmas, \
                     which are not supported"
                        .into(),
                )),
            };
        let c = &self.config;
        check_steps(n, c.num_train_timesteps)?;
        let spaced = multistep_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            c.num_train_timesteps,
            n,
            c.steps_offset,
        );
        let table = vp_inference_sigmas(
            &self.alphas_cumprod,
            &spaced,
            n,
            self.spacing,
            c.sigma_min,
            c.sigma_max,
            true,
        );
        let mut sigmas = table.sigmas;
        let sigma_last = match (c.final_sigmas_type, self.spacing) {
            (FinalSigmasType::Zero, _) => 0.0,
            // the respaced schedules end on their own smallest sigma
            (
                FinalSigmasType::SigmaMin,
                SigmaSpacing::Karras | SigmaSpacing::Exponential | SigmaSpacing::Beta,
            ) => *sigmas.last().expect("at least one step"),
            (FinalSigmasType::SigmaMin, SigmaSpacing::Timesteps) => {
                vp_sigma_min(&self.alphas_cumprod)
            }
        };
        sigmas.push(sigma_last);
        self.timesteps = table.timesteps;
        self.sigmas = sigmas;
        self.model_outputs = ModelOutputs::new(c.solver_order);
        self.lower_order_nums = 0;
        self.last_sample = None;
        self.this_order = 1;
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

        let order = self.config.solver_order;
        let converted = self.convert_model_output(model_output, sample, self.sigmas[i]);
        let use_corrector = i > 0
            && !self.config.disable_corrector.contains(&(i as i64 - 1))
            && self.last_sample.is_some();
        let sample = match (use_corrector, &self.last_sample) {
            (true, Some(last)) => self.uni_c_update(&converted, last, i, self.this_order)?,
            _ => sample.clone(),
        };

        self.model_outputs.push(converted.clone());

        let this_order = if self.config.lower_order_final {
            order.min(self.timesteps.len() - i)
        } else {
            order
        };
        // warm-up: never use more outputs than have been stored
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev_sample = self.uni_p_update(&sample, i, self.this_order)?;
        self.last_sample = Some(sample);

        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.index.advance();
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: self.config.predict_x0.then_some(converted),
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
    fn gaussian_elimination_solves_with_pivoting() {
        // needs a row swap: the first pivot is 0
        let a = vec![
            vec![0.0, 2.0, 1.0],
            vec![1.0, 1.0, 1.0],
            vec![4.0, -1.0, 3.0],
        ];
        let x = solve_linear(a, vec![5.0, 4.0, 5.0]).unwrap();
        for (got, want) in x.iter().zip([1.0, 2.0, 1.0]) {
            assert!((got - want).abs() < 1e-12, "{x:?}");
        }
        assert!(solve_linear(vec![vec![1.0, 1.0], vec![1.0, 1.0]], vec![1.0, 2.0]).is_err());
    }

    #[test]
    fn timesteps_and_sigmas_match_diffusers() {
        // diffusers 0.42.1 UniPCMultistepScheduler(), set_timesteps(5)
        let mut s = UniPcMultistepScheduler::<HostTensor>::new(UniPcConfig::default()).unwrap();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 5).unwrap();
        assert_eq!(s.timesteps, vec![999.0, 799.0, 599.0, 400.0, 200.0]);
        assert_eq!(s.sigmas.len(), 6);
        assert_eq!(s.sigmas[5], 0.0);
        assert!((s.sigmas[0] - 157.4071).abs() < 1e-3, "{}", s.sigmas[0]);
    }

    #[test]
    fn bad_configs_are_errors() {
        let bad = |json: &str| {
            let map = ConfigMap::parse(json, "test").unwrap();
            UniPcMultistepScheduler::<HostTensor>::from_config_map(&map).is_err()
        };
        assert!(bad(r#"{"solver_order": 0}"#));
        assert!(bad(r#"{"solver_type": "nope"}"#));
        assert!(bad(
            r#"{"use_karras_sigmas": true, "use_beta_sigmas": true}"#
        ));
        assert!(bad(r#"{"use_flow_sigmas": true}"#));
        assert!(bad(r#"{"solver_p": {"_class_name": "DDIMScheduler"}}"#));
        assert!(bad(r#"{"beta_schedule": "sigmoid"}"#));
        assert!(!bad(
            r#"{"solver_type": "logrho", "solver_p": null, "sigma_min": null}"#
        ));
    }

    #[test]
    fn runs_every_order_without_blowing_up() {
        for order in 1..=4 {
            // bh1 and the noise prediction give NaN at the final step to sigma = 0 in
            // diffusers (`-inf * 0`, `0 * inf`); here they end on the limit, a finite sample
            for (bh1, predict_x0) in [(false, true), (true, true), (false, false), (true, false)] {
                let config = UniPcConfig {
                    solver_order: order,
                    predict_x0,
                    solver_type: if bh1 {
                        UniPcSolverType::Bh1
                    } else {
                        UniPcSolverType::Bh2
                    },
                    ..Default::default()
                };
                let mut s = UniPcMultistepScheduler::<HostTensor>::new(config).unwrap();
                Scheduler::<HostTensor>::set_timesteps(&mut s, 8).unwrap();
                let mut x = HostTensor::new(vec![1.0, -0.5, 0.25, 2.0], vec![1, 1, 2, 2]).unwrap();
                for t in s.timesteps.clone() {
                    let eps = x.scale(0.3);
                    x = s.step(&eps, t, &x, &mut NoNoise).unwrap().prev_sample;
                }
                assert!(
                    x.data().iter().all(|v| v.is_finite()),
                    "order {order}: {x:?}"
                );
            }
        }
    }

    #[test]
    fn add_noise_uses_inference_sigmas() {
        // diffusers 0.42.1: UniPCMultistepScheduler(); set_timesteps(10);
        // add_noise(x0, noise, timesteps[[2, 5]]) (same for DEISMultistepScheduler)
        let want = [0.139065277, 0.121562910, -0.148634008, 1.220887181];
        let x0 = HostTensor::new(vec![1.0, -2.0, 0.5, 3.0], vec![2, 2]).unwrap();
        let noise = HostTensor::new(vec![0.1, 0.2, -0.3, 0.4], vec![2, 2]).unwrap();
        let mut s = UniPcMultistepScheduler::<HostTensor>::new(UniPcConfig::default()).unwrap();
        Scheduler::<HostTensor>::set_timesteps(&mut s, 10).unwrap();
        let ts = [s.timesteps[2], s.timesteps[5]];
        assert_eq!(ts, [799.0, 500.0]);
        let got = s.add_noise(&x0, &noise, &ts).unwrap();
        for (g, w) in got.data().iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert!(s.add_noise(&x0, &noise, &[123.0]).is_err());
    }
}
