//! DPM-Solver and DPM-Solver++ singlestep samplers (Lu et al. 2022a, Algorithms 1-2;
//! Lu et al. 2022b, Algorithm 1 "DPM-Solver++(2S)"), as diffusers'
//! `DPMSolverSinglestepScheduler`.
//!
//! A singlestep solver of order `k` spends `k` model evaluations on one solver step: the
//! run's timesteps are grouped by an order list such as `[1, 2, 1, 2, ...]`; the first
//! evaluation of a group takes a first-order step to the next timestep, and the later ones
//! restart from the group's first sample, now with the intermediate evaluations, to reach
//! one timestep further. The formulas, tables and model-output conversion are shared with
//! [`crate::dpm_solver_multistep`].

use diffusion_core::config::{lenient_f64, lenient_opt_f64};
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::Deserialize;

use crate::common::{
    FinalSigmasType, ModelOutputs, PredictionType, SigmaSpacing, StepIndex, TimestepSchedule,
    TimestepSpacing, config_struct, finite_terminal_alphas_cumprod, multistep_timesteps,
};
use crate::dpm_solver_multistep::{
    AlgorithmType, DpmSigmaOptions, Level, SolverStep, SolverType, clipped_last_timestep,
    deserialize_dpm_config, dpm_add_noise, dpm_base_timesteps, dpm_common_keys,
    dpm_index_for_timestep, dpm_sigma_table, first_order_update, null_as_false,
    second_order_update, third_order_update,
};
use crate::schedule::{BetaSchedule, NoiseSchedule};
use crate::scheduler::{Scheduler, StepOutput};

config_struct! {
    /// The keys of a `DPMSolverSinglestepScheduler` `scheduler_config.json`, with diffusers'
    /// defaults. (diffusers' singlestep class has no `timestep_spacing`, `steps_offset` or
    /// `rescale_betas_zero_snr`: its timesteps are always linspace-spaced.)
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct DpmSolverSinglestepConfig {
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
        /// Solver order, 1 to 3 (2 is recommended for guided sampling, 3 for unconditional).
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
        /// `dpmsolver++`, `dpmsolver` or `sde-dpmsolver++` (`sde-dpmsolver` is multistep only).
        pub algorithm_type: AlgorithmType = AlgorithmType::DpmSolverPlusPlus,
        /// Midpoint or Heun form of the higher-order updates.
        pub solver_type: SolverType = SolverType::Midpoint,
        /// End the run with lower orders. diffusers switches this on (for good) when the step
        /// count is not a multiple of `solver_order` or `final_sigmas_type` is `"zero"`.
        pub lower_order_final: bool = false,
        /// Karras et al. 2022 noise levels.
        #[serde(deserialize_with = "null_as_false")]
        pub use_karras_sigmas: bool = false,
        /// Noise levels evenly spaced in log sigma.
        #[serde(deserialize_with = "null_as_false")]
        pub use_exponential_sigmas: bool = false,
        /// Noise levels at Beta(0.6, 0.6) quantiles (Lee et al. 2024).
        #[serde(deserialize_with = "null_as_false")]
        pub use_beta_sigmas: bool = false,
        /// Flow-matching sigmas (not supported: must be `false`).
        #[serde(deserialize_with = "null_as_false")]
        pub use_flow_sigmas: bool = false,
        /// Flow-matching shift (not supported: must be 1).
        #[serde(deserialize_with = "lenient_opt_f64")]
        pub flow_shift: Option<f64> = Some(1.0),
        /// The noise level after the last step.
        pub final_sigmas_type: FinalSigmasType = FinalSigmasType::Zero,
        /// Timesteps whose `lambda` is below this are not used (`-Infinity`: no clipping).
        #[serde(deserialize_with = "lenient_f64")]
        pub lambda_min_clipped: f64 = f64::NEG_INFINITY,
        /// `"learned"` / `"learned_range"` when the model also outputs its variance.
        pub variance_type: Option<String> = None,
        /// Flow-matching dynamic shifting (not supported: must be `false`).
        #[serde(deserialize_with = "null_as_false")]
        pub use_dynamic_shifting: bool = false,
        /// Flow-matching time-shift type (only `"exponential"` exists).
        pub time_shift_type: String = "exponential".to_string(),
    }
}

const CLASS: &str = "DPMSolverSinglestepScheduler";

/// DPM-Solver / DPM-Solver++ singlestep sampler (diffusers' `DPMSolverSinglestepScheduler`).
///
/// With the order list's group starting at `s` (sample `x_s`, output `m_s`):
///
/// * order 2 (DPM-Solver++(2S), Lu et al. 2022b, Algorithm 1; DPM-Solver-2, Lu et al. 2022a,
///   Algorithm 1): from `s` through the intermediate `s0` to `t`, `h = lambda_t - lambda_s`,
///   `r0 = (lambda_s0 - lambda_s) / h`, `D0 = m_s`, `D1 = (m_s0 - m_s) / r0`;
/// * order 3 (DPM-Solver-3, Lu et al. 2022a, Algorithm 2): through `s1` and `s0`,
///   `r1 = (lambda_s1 - lambda_s) / h`, `r0 = (lambda_s0 - lambda_s) / h`,
///   `D1_0 = (m_s1 - m_s) / r1`, `D1_1 = (m_s0 - m_s) / r0`; the midpoint form uses `D1_1`
///   alone, the Heun form `D1 = (r0 D1_0 - r1 D1_1) / (r0 - r1)` and
///   `D2 = 2 (D1_1 - D1_0) / (r0 - r1)`.
///
/// `sde-dpmsolver++` draws one noise array per model evaluation.
#[derive(Debug, Clone)]
pub struct DpmSolverSinglestepScheduler<T> {
    config: DpmSolverSinglestepConfig,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: usize,
    order_list: Vec<usize>,
    model_outputs: ModelOutputs<T>,
    group_sample: Option<T>,
    index: StepIndex,
}

impl<T: SchedulerTensor> DpmSolverSinglestepScheduler<T> {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: DpmSolverSinglestepConfig) -> Result<Self> {
        let c = &config;
        if c.algorithm_type == AlgorithmType::SdeDpmSolver {
            return Err(Error::config(
                "algorithm_type",
                "sde-dpmsolver is not implemented for DPMSolverSinglestepScheduler \
                 (use dpmsolver++, dpmsolver or sde-dpmsolver++)",
            ));
        }
        dpm_common_keys!(CLASS, c).validate()?;
        let schedule = NoiseSchedule::new(
            c.num_train_timesteps,
            c.beta_start,
            c.beta_end,
            c.beta_schedule,
            c.trained_betas.as_deref(),
            false,
        )?;
        let alphas_cumprod = finite_terminal_alphas_cumprod(schedule.alphas_cumprod, false);
        Ok(Self {
            model_outputs: ModelOutputs::new(c.solver_order),
            config,
            alphas_cumprod,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            num_inference_steps: 0,
            order_list: Vec::new(),
            group_sample: None,
            index: StepIndex::default(),
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(deserialize_dpm_config(map, CLASS)?)
    }

    /// The config in use (`lower_order_final` may have been switched on by `set_timesteps`,
    /// as diffusers does).
    pub fn config(&self) -> &DpmSolverSinglestepConfig {
        &self.config
    }

    /// `alphas_cumprod` of the training schedule.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The solver order used at each timestep of the run (diffusers' `order_list`).
    pub fn order_list(&self) -> &[usize] {
        &self.order_list
    }

    /// The index of the next step, once the run has started.
    pub fn step_index(&self) -> Option<usize> {
        self.index.step
    }
}

/// diffusers' `get_order_list`: the solver order at each of `steps` timesteps.
pub fn singlestep_order_list(
    steps: usize,
    solver_order: usize,
    lower_order_final: bool,
    final_sigmas_type: FinalSigmasType,
) -> Vec<usize> {
    let repeat = |pattern: &[usize], times: usize| -> Vec<usize> {
        pattern
            .iter()
            .copied()
            .cycle()
            .take(pattern.len() * times)
            .collect()
    };
    let mut orders = match (solver_order, lower_order_final) {
        (3, true) => match steps % 3 {
            0 => [
                repeat(&[1, 2, 3], (steps / 3).saturating_sub(1)),
                vec![1, 2, 1],
            ]
            .concat(),
            1 => [repeat(&[1, 2, 3], steps / 3), vec![1]].concat(),
            _ => [repeat(&[1, 2, 3], steps / 3), vec![1, 2]].concat(),
        },
        (2, true) => {
            if steps.is_multiple_of(2) {
                [repeat(&[1, 2], (steps / 2).saturating_sub(1)), vec![1, 1]].concat()
            } else {
                [repeat(&[1, 2], steps / 2), vec![1]].concat()
            }
        }
        (3, false) => repeat(&[1, 2, 3], steps / 3),
        (2, false) => repeat(&[1, 2], steps / 2),
        _ => vec![1; steps],
    };
    if final_sigmas_type == FinalSigmasType::Zero
        && let Some(last) = orders.last_mut()
    {
        *last = 1;
    }
    orders
}

impl<T: SchedulerTensor> Scheduler<T> for DpmSolverSinglestepScheduler<T> {
    fn name(&self) -> &str {
        CLASS
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let c = &self.config;
        let n_train = c.num_train_timesteps;
        let options = DpmSigmaOptions {
            spacing: SigmaSpacing::from_flags(
                c.use_karras_sigmas,
                c.use_exponential_sigmas,
                c.use_beta_sigmas,
            )?,
            lu_lambdas: false,
        };
        let (base, n) = dpm_base_timesteps(CLASS, schedule, options, n_train, |n| {
            let last = clipped_last_timestep(&self.alphas_cumprod, c.lambda_min_clipped)?;
            Ok(multistep_timesteps(
                TimestepSpacing::Linspace,
                n_train,
                last,
                n,
                0,
            ))
        })?;
        // Karras timesteps are always rounded here (unlike the multistep sampler).
        let (timesteps, sigmas) = dpm_sigma_table(
            &self.alphas_cumprod,
            &base,
            n,
            options,
            true,
            c.final_sigmas_type,
        );
        // diffusers rewrites its config in these two cases, and the change sticks.
        if !self.config.lower_order_final
            && (n % self.config.solver_order != 0
                || self.config.final_sigmas_type == FinalSigmasType::Zero)
        {
            self.config.lower_order_final = true;
        }
        let c = &self.config;
        self.order_list =
            singlestep_order_list(n, c.solver_order, c.lower_order_final, c.final_sigmas_type);
        self.num_inference_steps = n;
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.model_outputs = ModelOutputs::new(c.solver_order);
        self.group_sample = None;
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
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        if self.num_inference_steps == 0 {
            return Err(Error::InvalidState("call set_timesteps before step".into()));
        }
        let n = self.timesteps.len();
        let idx = self
            .index
            .peek(timestep, |t| Ok(dpm_index_for_timestep(&self.timesteps, t)))?;
        if idx >= n || idx >= self.order_list.len() {
            return Err(Error::InvalidState(format!(
                "step {idx} is past the end of the {n}-step schedule; call set_timesteps again"
            )));
        }
        let c = &self.config;
        let (converted, x0) = dpm_common_keys!(CLASS, c).conversion().convert(
            model_output,
            sample,
            self.sigmas[idx],
        )?;
        let z = if c.algorithm_type.is_sde() {
            Some(converted.noise_like(noise)?)
        } else {
            None
        };

        self.model_outputs.push(converted);
        // A run started mid-group (image-to-image) lacks the group's earlier outputs.
        let mut order = self.order_list[idx]
            .min(self.model_outputs.capacity())
            .min(idx + 1);
        while order > 1 && !self.model_outputs.has(order - 1) {
            order -= 1;
        }
        if order == 1 {
            self.group_sample = Some(sample.clone());
        }
        let group_sample = self
            .group_sample
            .as_ref()
            .ok_or_else(|| Error::InvalidState("missing the solver group's first sample".into()))?;
        let m = self.model_outputs.newest(order)?;
        let level = |i: usize| Level::new(self.sigmas[i]);
        let t = level(idx + 1);
        let algorithm = c.algorithm_type;
        let prev_sample = match order {
            1 => {
                let step = SolverStep { s: level(idx), t };
                first_order_update(algorithm, step, group_sample, m[0], z.as_ref())?
            }
            2 => {
                let (s0, s1) = (level(idx), level(idx - 1));
                let (m0, m1) = (m[0], m[1]);
                let r0 = (s0.lambda - s1.lambda) / (t.lambda - s1.lambda);
                let d1 = T::lincomb(&[(1.0 / r0, m0), (-1.0 / r0, m1)]);
                second_order_update(
                    algorithm,
                    c.solver_type,
                    SolverStep { s: s1, t },
                    group_sample,
                    m1,
                    &d1,
                    z.as_ref(),
                )?
            }
            _ => {
                let (s0, s1, s2) = (level(idx), level(idx - 1), level(idx - 2));
                let (m0, m1, m2) = (m[0], m[1], m[2]);
                let h = t.lambda - s2.lambda;
                let r0 = (s0.lambda - s2.lambda) / h;
                let r1 = (s1.lambda - s2.lambda) / h;
                let d1_0 = T::lincomb(&[(1.0 / r1, m1), (-1.0 / r1, m2)]);
                let d1_1 = T::lincomb(&[(1.0 / r0, m0), (-1.0 / r0, m2)]);
                match c.solver_type {
                    SolverType::Midpoint => third_order_update(
                        algorithm,
                        SolverStep { s: s2, t },
                        group_sample,
                        m2,
                        &d1_1,
                        None,
                        z.as_ref(),
                    )?,
                    SolverType::Heun => {
                        let d1 = T::lincomb(&[(r0 / (r0 - r1), &d1_0), (-r1 / (r0 - r1), &d1_1)]);
                        let d2 = T::lincomb(&[(-2.0 / (r0 - r1), &d1_0), (2.0 / (r0 - r1), &d1_1)]);
                        third_order_update(
                            algorithm,
                            SolverStep { s: s2, t },
                            group_sample,
                            m2,
                            &d1,
                            Some(&d2),
                            z.as_ref(),
                        )?
                    }
                }
            }
        };
        self.index.step = Some(idx + 1);
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, original_samples: &T, noise: &T, timesteps: &[f64]) -> Result<T> {
        dpm_add_noise(
            &self.sigmas,
            &self.timesteps,
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
    use diffusion_core::{FixedNoise, HostTensor, NoNoise};

    fn sched(map: serde_json::Value) -> DpmSolverSinglestepScheduler<HostTensor> {
        let map = ConfigMap::from_value(map, "test").unwrap();
        DpmSolverSinglestepScheduler::from_config_map(&map).unwrap()
    }

    #[test]
    fn order_lists_match_diffusers() {
        use FinalSigmasType::{SigmaMin, Zero};
        assert_eq!(
            singlestep_order_list(6, 3, true, SigmaMin),
            vec![1, 2, 3, 1, 2, 1]
        );
        assert_eq!(
            singlestep_order_list(7, 3, true, SigmaMin),
            vec![1, 2, 3, 1, 2, 3, 1]
        );
        assert_eq!(
            singlestep_order_list(5, 3, true, SigmaMin),
            vec![1, 2, 3, 1, 2]
        );
        assert_eq!(
            singlestep_order_list(6, 2, true, SigmaMin),
            vec![1, 2, 1, 2, 1, 1]
        );
        assert_eq!(singlestep_order_list(5, 2, true, Zero), vec![1, 2, 1, 2, 1]);
        assert_eq!(
            singlestep_order_list(6, 3, false, SigmaMin),
            vec![1, 2, 3, 1, 2, 3]
        );
        assert_eq!(singlestep_order_list(4, 2, false, Zero), vec![1, 2, 1, 1]);
        assert_eq!(singlestep_order_list(2, 1, false, Zero), vec![1, 1]);
    }

    #[test]
    fn zero_final_sigma_switches_on_lower_order_final() {
        let mut s = sched(serde_json::json!({"solver_order": 3}));
        assert!(!s.config().lower_order_final);
        s.set_timesteps(6).unwrap();
        assert!(s.config().lower_order_final);
        assert_eq!(s.order_list(), &[1, 2, 3, 1, 2, 1]);
        assert_eq!(s.timesteps(), &[999.0, 832.0, 666.0, 500.0, 333.0, 166.0]);
    }

    #[test]
    fn runs_every_order_and_variant() {
        for (alg, fst) in [
            ("dpmsolver++", "zero"),
            ("dpmsolver", "sigma_min"),
            ("sde-dpmsolver++", "zero"),
        ] {
            for order in 1..=3 {
                for solver in ["midpoint", "heun"] {
                    let mut s = sched(serde_json::json!({"algorithm_type": alg,
                        "final_sigmas_type": fst, "solver_order": order, "solver_type": solver}));
                    s.set_timesteps(7).unwrap();
                    let mut noise = FixedNoise::new(vec![vec![0.1, -0.2]; 7]);
                    let mut x = HostTensor::new(vec![1.0, -1.0], vec![1, 2]).unwrap();
                    for t in s.timesteps().to_vec() {
                        let eps = x.scale(0.3);
                        x = s.step(&eps, t, &x, &mut noise).unwrap().prev_sample;
                    }
                    assert!(
                        x.data().iter().all(|v| v.is_finite()),
                        "{alg} {order} {solver}"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_bad_configs() {
        let bad = |v: serde_json::Value| {
            let map = ConfigMap::from_value(v, "t").unwrap();
            DpmSolverSinglestepScheduler::<HostTensor>::from_config_map(&map).is_err()
        };
        assert!(bad(serde_json::json!({"algorithm_type": "sde-dpmsolver"})));
        assert!(bad(serde_json::json!({"solver_order": 4})));
        assert!(bad(serde_json::json!({"algorithm_type": "dpmsolver"})));
        let mut s = sched(serde_json::json!({}));
        let x = HostTensor::zeros(vec![1, 2]);
        assert!(s.step(&x, 0.0, &x, &mut NoNoise).is_err());
    }
}
