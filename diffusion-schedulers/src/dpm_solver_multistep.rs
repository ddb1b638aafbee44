//! DPM-Solver and DPM-Solver++ multistep samplers (Lu et al. 2022a, "DPM-Solver: A Fast ODE
//! Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps"; Lu et al. 2022b,
//! "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"), as
//! diffusers' `DPMSolverMultistepScheduler`.
//!
//! The module also holds the pieces the singlestep variant
//! ([`crate::dpm_solver_singlestep`]) shares: the sigma/timestep tables, the conversion of a
//! model output into the data or noise prediction the solver integrates, and the first-,
//! second- and third-order update formulas.
//!
//! Notation (both papers): a variance-preserving sample is `x_t = alpha_t x0 + sigma_t eps`,
//! the half log-SNR is `lambda_t = ln(alpha_t / sigma_t)` and a step from `s` to `t` has
//! length `h = lambda_t - lambda_s`. diffusers keeps a table of Karras-style noise levels
//! `sigma = sigma_t / alpha_t` and recovers `alpha_t = 1 / sqrt(sigma^2 + 1)`,
//! `sigma_t = sigma * alpha_t` from it.

use diffusion_core::config::lenient_f64;
use diffusion_core::{ConfigMap, Error, NoiseSource, Result, SchedulerTensor};
use serde::de::Deserializer;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::common::{
    FinalSigmasType, ModelOutputs, PredictionType, SigmaSpacing, StepIndex, TimestepSchedule,
    TimestepSpacing, VpInferenceSigmas, check_custom_timesteps, check_steps, config_struct,
    dynamic_threshold, finite_terminal_alphas_cumprod, linspace, multistep_order,
    multistep_timesteps, vp_add_noise_at, vp_alpha_sigma, vp_inference_sigmas, vp_pred_eps,
    vp_pred_x0, vp_timesteps_of_sigmas,
};
use crate::schedule::{BetaSchedule, NoiseSchedule, check_same_shape, sigmas_from_alphas_cumprod};
use crate::scheduler::{Scheduler, StepOutput};

/// The `algorithm_type` key: which ODE/SDE the solver discretises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AlgorithmType {
    /// DPM-Solver++ (Lu et al. 2022b): integrates the data prediction `x0`. diffusers maps the
    /// DEIS config value `"deis"` to this one.
    #[default]
    #[serde(rename = "dpmsolver++", alias = "deis")]
    DpmSolverPlusPlus,
    /// DPM-Solver (Lu et al. 2022a): integrates the noise prediction `eps`.
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// The stochastic DPM-Solver++ (SDE-DPM-Solver++, Lu et al. 2022b): one noise draw per step.
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    /// The stochastic DPM-Solver on the noise prediction: one noise draw per step
    /// (multistep sampler only).
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
}

impl AlgorithmType {
    /// Whether the solver integrates the data prediction `x0` (the "++" variants).
    pub fn predicts_data(self) -> bool {
        matches!(self, Self::DpmSolverPlusPlus | Self::SdeDpmSolverPlusPlus)
    }

    /// Whether the solver is stochastic (draws noise every step).
    pub fn is_sde(self) -> bool {
        matches!(self, Self::SdeDpmSolverPlusPlus | Self::SdeDpmSolver)
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DpmSolverPlusPlus => "dpmsolver++",
            Self::DpmSolver => "dpmsolver",
            Self::SdeDpmSolverPlusPlus => "sde-dpmsolver++",
            Self::SdeDpmSolver => "sde-dpmsolver",
        }
    }
}

/// The `solver_type` key: how the second-order term is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    /// The midpoint form `0.5 * (e^{-h} - 1) * D1` (recommended). diffusers maps the DEIS /
    /// UniPC values `"logrho"`, `"bh1"` and `"bh2"` to this one.
    #[default]
    #[serde(alias = "logrho", alias = "bh1", alias = "bh2")]
    Midpoint,
    /// The Heun form `((e^{-h} - 1) / h + 1) * D1`.
    Heun,
}

/// Field deserialiser for diffusers' `bool | None = False` keys: JSON `null` is `false`.
pub(crate) fn null_as_false<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

config_struct! {
    /// The keys of a `DPMSolverMultistepScheduler` `scheduler_config.json`, with diffusers'
    /// defaults.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    pub struct DpmSolverMultistepConfig {
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
        /// DPM-Solver or DPM-Solver++, deterministic or stochastic.
        pub algorithm_type: AlgorithmType = AlgorithmType::DpmSolverPlusPlus,
        /// Midpoint or Heun form of the second-order update.
        pub solver_type: SolverType = SolverType::Midpoint,
        /// Use lower orders for the last steps of runs shorter than 15 steps.
        pub lower_order_final: bool = true,
        /// Use a first-order (Euler) update for the last step.
        pub euler_at_final: bool = false,
        /// Karras et al. 2022 noise levels.
        #[serde(deserialize_with = "null_as_false")]
        pub use_karras_sigmas: bool = false,
        /// Noise levels evenly spaced in log sigma.
        #[serde(deserialize_with = "null_as_false")]
        pub use_exponential_sigmas: bool = false,
        /// Noise levels at Beta(0.6, 0.6) quantiles (Lee et al. 2024).
        #[serde(deserialize_with = "null_as_false")]
        pub use_beta_sigmas: bool = false,
        /// Steps uniform in log-SNR `lambda`, as Lu et al. 2022a recommend.
        #[serde(deserialize_with = "null_as_false")]
        pub use_lu_lambdas: bool = false,
        /// Flow-matching sigmas (not supported: must be `false`).
        #[serde(deserialize_with = "null_as_false")]
        pub use_flow_sigmas: bool = false,
        /// Flow-matching shift (not supported: must be 1).
        #[serde(deserialize_with = "diffusion_core::config::lenient_opt_f64")]
        pub flow_shift: Option<f64> = Some(1.0),
        /// The noise level after the last step.
        pub final_sigmas_type: FinalSigmasType = FinalSigmasType::Zero,
        /// Timesteps whose `lambda` is below this are not used (`-Infinity`: no clipping).
        #[serde(deserialize_with = "lenient_f64")]
        pub lambda_min_clipped: f64 = f64::NEG_INFINITY,
        /// `"learned"` / `"learned_range"` when the model also outputs its variance (the
        /// output then has twice the sample's channels; the variance half is dropped).
        pub variance_type: Option<String> = None,
        /// How inference timesteps are placed.
        pub timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace,
        /// Added to every timestep with `leading` spacing.
        pub steps_offset: usize = 0,
        /// Rescale betas to zero terminal SNR (Lin et al. 2023).
        pub rescale_betas_zero_snr: bool = false,
        /// Flow-matching dynamic shifting (not supported: must be `false`).
        #[serde(deserialize_with = "null_as_false")]
        pub use_dynamic_shifting: bool = false,
        /// Flow-matching time-shift type (only `"exponential"` exists).
        pub time_shift_type: String = "exponential".to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Shared by the multistep and singlestep samplers.
// ---------------------------------------------------------------------------------------

/// Reads a DPM-Solver config from a map, turning the flow-matching prediction type (which
/// this crate does not implement) into [`Error::Unsupported`] rather than a parse error.
pub(crate) fn deserialize_dpm_config<C: serde::de::DeserializeOwned>(
    map: &ConfigMap,
    class: &str,
) -> Result<C> {
    if map.get("prediction_type") == Some(&Value::String("flow_prediction".into())) {
        return Err(Error::Unsupported(format!(
            "{class}: prediction_type \"flow_prediction\" (flow matching) is not supported"
        )));
    }
    map.deserialize(&format!("{class} config"))
}

/// The config keys both DPM-Solver samplers share: validated the same way and read by the
/// model-output conversion. [`dpm_common_keys!`] reads them off either config.
pub(crate) struct DpmCommonKeys<'a> {
    pub class: &'a str,
    pub solver_order: usize,
    pub beta_schedule: BetaSchedule,
    pub algorithm_type: AlgorithmType,
    pub final_sigmas_type: FinalSigmasType,
    /// `use_karras_sigmas`, `use_exponential_sigmas`, `use_beta_sigmas`.
    pub sigma_flags: [bool; 3],
    pub lambda_min_clipped: f64,
    pub use_flow_sigmas: bool,
    pub flow_shift: Option<f64>,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: &'a str,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub prediction_type: PredictionType,
    pub variance_type: Option<&'a str>,
}

/// [`DpmCommonKeys`] of a DPM-Solver config: the multistep and singlestep configs name these
/// keys alike.
macro_rules! dpm_common_keys {
    ($class:expr, $config:expr) => {{
        let c = $config;
        $crate::dpm_solver_multistep::DpmCommonKeys {
            class: $class,
            solver_order: c.solver_order,
            beta_schedule: c.beta_schedule,
            algorithm_type: c.algorithm_type,
            final_sigmas_type: c.final_sigmas_type,
            sigma_flags: [
                c.use_karras_sigmas,
                c.use_exponential_sigmas,
                c.use_beta_sigmas,
            ],
            lambda_min_clipped: c.lambda_min_clipped,
            use_flow_sigmas: c.use_flow_sigmas,
            flow_shift: c.flow_shift,
            use_dynamic_shifting: c.use_dynamic_shifting,
            time_shift_type: &c.time_shift_type,
            thresholding: c.thresholding,
            dynamic_thresholding_ratio: c.dynamic_thresholding_ratio,
            sample_max_value: c.sample_max_value,
            prediction_type: c.prediction_type,
            variance_type: c.variance_type.as_deref(),
        }
    }};
}
pub(crate) use dpm_common_keys;

impl DpmCommonKeys<'_> {
    /// Validates the keys as diffusers' constructors do (plus range checks diffusers leaves
    /// to a crash later).
    pub(crate) fn validate(&self) -> Result<()> {
        let class = self.class;
        if !(1..=3).contains(&self.solver_order) {
            return Err(Error::config(
                "solver_order",
                format!("{class} supports orders 1 to 3, got {}", self.solver_order),
            ));
        }
        if self.beta_schedule == BetaSchedule::Sigmoid {
            return Err(Error::config(
                "beta_schedule",
                format!("sigmoid is not implemented for {class}"),
            ));
        }
        let [karras, exponential, beta] = self.sigma_flags;
        SigmaSpacing::from_flags(karras, exponential, beta)?;
        if !self.algorithm_type.predicts_data() && self.final_sigmas_type == FinalSigmasType::Zero {
            return Err(Error::config(
                "final_sigmas_type",
                format!(
                    "\"zero\" is not supported with algorithm_type {}; use \"sigma_min\"",
                    self.algorithm_type.as_str()
                ),
            ));
        }
        if self.lambda_min_clipped.is_nan() {
            return Err(Error::config("lambda_min_clipped", "must not be NaN"));
        }
        if self.use_flow_sigmas {
            return Err(Error::Unsupported(format!(
                "{class}: use_flow_sigmas (flow matching) is not supported"
            )));
        }
        if let Some(shift) = self.flow_shift
            && shift != 1.0
        {
            return Err(Error::Unsupported(format!(
                "{class}: flow_shift = {shift} (flow matching) is not supported; it must be 1"
            )));
        }
        if self.use_dynamic_shifting {
            return Err(Error::Unsupported(format!(
                "{class}: use_dynamic_shifting (flow matching) is not supported"
            )));
        }
        if self.time_shift_type != "exponential" {
            return Err(Error::config(
                "time_shift_type",
                format!(
                    "only \"exponential\" exists, got {:?}",
                    self.time_shift_type
                ),
            ));
        }
        if self.thresholding
            && !(self.dynamic_thresholding_ratio > 0.0
                && self.dynamic_thresholding_ratio <= 1.0
                && self.sample_max_value >= 1.0)
        {
            return Err(Error::config(
                "dynamic_thresholding_ratio",
                "thresholding needs a ratio in (0, 1] and sample_max_value >= 1",
            ));
        }
        Ok(())
    }

    /// How the sampler converts model outputs.
    pub(crate) fn conversion(&self) -> ModelOutputConversion {
        ModelOutputConversion {
            algorithm_type: self.algorithm_type,
            prediction_type: self.prediction_type,
            learned_variance: matches!(self.variance_type, Some("learned" | "learned_range")),
            thresholding: self.thresholding,
            dynamic_thresholding_ratio: self.dynamic_thresholding_ratio,
            sample_max_value: self.sample_max_value,
        }
    }
}

/// One end of a solver step: the noise level and its `alpha_t`, `sigma_t` and half log-SNR
/// `lambda = ln(alpha_t) - ln(sigma_t)` (`+inf` at `sigma = 0`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Level {
    pub alpha: f64,
    pub sigma: f64,
    pub lambda: f64,
}

impl Level {
    pub(crate) fn new(sigma: f64) -> Self {
        let (alpha, sigma) = vp_alpha_sigma(sigma);
        Self {
            alpha,
            sigma,
            lambda: alpha.ln() - sigma.ln(),
        }
    }
}

/// One solver update, from the reference point `s` to `t`; its length in half log-SNR is
/// `h = lambda_t - lambda_s`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SolverStep {
    pub s: Level,
    pub t: Level,
}

/// The last usable training timestep + 1 under `lambda_min_clipped`: `num_train_timesteps`
/// minus the number of timesteps whose `lambda` is below the threshold (diffusers'
/// `searchsorted` on the flipped lambda table).
pub(crate) fn clipped_last_timestep(
    alphas_cumprod: &[f64],
    lambda_min_clipped: f64,
) -> Result<usize> {
    let mut lambdas: Vec<f64> = alphas_cumprod
        .iter()
        .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
        .collect();
    lambdas.reverse();
    let clipped = lambdas.partition_point(|&l| l < lambda_min_clipped);
    let last = alphas_cumprod.len() - clipped;
    if last == 0 {
        return Err(Error::config(
            "lambda_min_clipped",
            format!("{lambda_min_clipped} clips every training timestep"),
        ));
    }
    Ok(last)
}

/// Which noise levels a DPM-Solver run uses: the shared VP spacings plus, for the multistep
/// sampler, `use_lu_lambdas` (steps uniform in `lambda`, the
/// uniform-logSNR step schedule of Lu et al. 2022a).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DpmSigmaOptions {
    pub spacing: SigmaSpacing,
    pub lu_lambdas: bool,
}

impl DpmSigmaOptions {
    /// The config key of the option that replaces the spaced timesteps, if any (custom
    /// timesteps are refused with one set, as diffusers does).
    pub(crate) fn respacing_key(self) -> Option<&'static str> {
        match self.spacing {
            SigmaSpacing::Karras => Some("use_karras_sigmas"),
            _ if self.lu_lambdas => Some("use_lu_lambdas"),
            SigmaSpacing::Exponential => Some("use_exponential_sigmas"),
            SigmaSpacing::Beta => Some("use_beta_sigmas"),
            SigmaSpacing::Timesteps => None,
        }
    }
}

/// Builds the run's `(timesteps, sigmas)` as the DPM-Solver samplers' `set_timesteps` do.
///
/// `timesteps` are the spaced (or custom) integer training timesteps, whose interpolated
/// training sigmas are used unless an option respaces them ([`vp_inference_sigmas`]; Karras
/// takes precedence over Lu lambdas, which take precedence over exponential and beta
/// sigmas, in diffusers' order). Karras and Lu timesteps are rounded when
/// `round_karras_lu`, the others truncated (diffusers' `int64` cast). The sigmas get one
/// more entry: the level after the last step (`final_sigmas_type`).
pub(crate) fn dpm_sigma_table(
    alphas_cumprod: &[f64],
    timesteps: &[f64],
    num_inference_steps: usize,
    options: DpmSigmaOptions,
    round_karras_lu: bool,
    final_sigmas_type: FinalSigmasType,
) -> (Vec<f64>, Vec<f64>) {
    let VpInferenceSigmas {
        timesteps,
        mut sigmas,
    } = if options.lu_lambdas && options.spacing != SigmaSpacing::Karras {
        lu_lambda_sigmas(alphas_cumprod, num_inference_steps, round_karras_lu)
    } else {
        vp_inference_sigmas(
            alphas_cumprod,
            timesteps,
            num_inference_steps,
            options.spacing,
            None,
            None,
            round_karras_lu,
        )
    };
    sigmas.push(match final_sigmas_type {
        FinalSigmasType::SigmaMin => ((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt(),
        FinalSigmasType::Zero => 0.0,
    });
    (timesteps, sigmas)
}

/// diffusers' `_convert_to_lu` (rho = 1): `n` log-sigmas on a straight ramp from the
/// largest to the smallest training log-sigma, i.e. uniform steps in `lambda`, with their
/// training timesteps.
fn lu_lambda_sigmas(alphas_cumprod: &[f64], n: usize, round: bool) -> VpInferenceSigmas {
    let log_sigmas: Vec<f64> = sigmas_from_alphas_cumprod(alphas_cumprod)
        .iter()
        .map(|s| s.ln())
        .collect();
    let (lo, hi) = (log_sigmas[0], log_sigmas[log_sigmas.len() - 1]);
    let sigmas: Vec<f64> = linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (hi + r * (lo - hi)).exp())
        .collect();
    VpInferenceSigmas {
        timesteps: vp_timesteps_of_sigmas(&sigmas, &log_sigmas, round),
        sigmas,
    }
}

/// Custom timesteps as diffusers takes them (`np.array(timesteps).astype(np.int64)`).
pub(crate) fn dpm_custom_timesteps(
    timesteps: &[f64],
    num_train_timesteps: usize,
) -> Result<Vec<f64>> {
    check_custom_timesteps(timesteps, num_train_timesteps)?;
    Ok(timesteps.iter().map(|t| t.trunc()).collect())
}

/// diffusers' `index_for_timestep` for the DPM-Solver samplers: the second match when the
/// timestep occurs more than once, else the first; a timestep not in the schedule maps to
/// the last index.
pub(crate) fn dpm_index_for_timestep(schedule: &[f64], timestep: f64) -> usize {
    let mut matches = schedule
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == timestep)
        .map(|(i, _)| i);
    match (matches.next(), matches.next()) {
        (_, Some(second)) => second,
        (Some(first), None) => first,
        (None, None) => schedule.len().saturating_sub(1),
    }
}

/// diffusers' sigma-based `add_noise` of the DPM-Solver samplers: [`vp_add_noise_at`] with
/// each timestep's index looked up by [`dpm_index_for_timestep`] (or the current step index
/// / `begin_index` when a begin index is set, as for inpainting and image-to-image).
pub(crate) fn dpm_add_noise<T: SchedulerTensor>(
    sigmas: &[f64],
    schedule: &[f64],
    index: &StepIndex,
    original_samples: &T,
    noise: &T,
    timesteps: &[f64],
) -> Result<T> {
    if schedule.is_empty() {
        return Err(Error::InvalidState(
            "call set_timesteps before add_noise".into(),
        ));
    }
    check_same_shape(original_samples, noise)?;
    let indices =
        index.add_noise_indices_with(timesteps, |t| Ok(dpm_index_for_timestep(schedule, t)))?;
    vp_add_noise_at(original_samples, noise, sigmas, indices)
}

/// The base timesteps of a DPM-Solver `set_timesteps` and the step count: `spaced(n)` for
/// `n` steps; custom timesteps as diffusers takes them (refused when an option respaces
/// the sigmas, as diffusers does); custom sigmas are not taken.
pub(crate) fn dpm_base_timesteps(
    class: &str,
    schedule: TimestepSchedule,
    options: DpmSigmaOptions,
    num_train_timesteps: usize,
    spaced: impl FnOnce(usize) -> Result<Vec<f64>>,
) -> Result<(Vec<f64>, usize)> {
    match schedule {
        TimestepSchedule::Steps(n) => {
            check_steps(n, num_train_timesteps)?;
            Ok((spaced(n)?, n))
        }
        TimestepSchedule::Timesteps(ts) => {
            if let Some(key) = options.respacing_key() {
                return Err(Error::InvalidArgument(format!(
                    "custom timesteps cannot be used with {key} = true"
                )));
            }
            let ts = dpm_custom_timesteps(&ts, num_train_timesteps)?;
            let n = ts.len();
            Ok((ts, n))
        }
        TimestepSchedule::Sigmas(_) => Err(Error::Unsupported(format!(
            "{class} takes a step count or custom timesteps, not custom sigmas"
        ))),
    }
}

/// Turns a raw model output into what a DPM-Solver integrates (diffusers'
/// `convert_model_output`): the data prediction `x0` for DPM-Solver++ (Lu et al. 2022b,
/// which solves the diffusion ODE in terms of `x0`), the noise prediction `eps` for
/// DPM-Solver (Lu et al. 2022a).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelOutputConversion {
    pub algorithm_type: AlgorithmType,
    pub prediction_type: PredictionType,
    pub learned_variance: bool,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
}

impl ModelOutputConversion {
    /// Converts `model_output` at noise level `sigma` (of `sample`). Returns the converted
    /// output and the matching `x0` estimate.
    pub(crate) fn convert<T: SchedulerTensor>(
        &self,
        model_output: &T,
        sample: &T,
        sigma: f64,
    ) -> Result<(T, T)> {
        let mut output = model_output.clone();
        if self.learned_variance && self.prediction_type == PredictionType::Epsilon {
            // Keep the mean half. diffusers slices `[:, :3]` (its only such models are
            // 3-channel pixel models, where this is the same split).
            let (out_shape, sample_shape) = (output.shape(), sample.shape());
            if out_shape.len() >= 2 && sample_shape.len() >= 2 && out_shape[1] > sample_shape[1] {
                output = output.split_channels(sample_shape[1]).0;
            }
        }
        check_same_shape(&output, sample)?;
        let (alpha_t, sigma_t) = vp_alpha_sigma(sigma);
        let threshold =
            |x0: T| dynamic_threshold(&x0, self.dynamic_thresholding_ratio, self.sample_max_value);
        if self.algorithm_type.predicts_data() {
            let mut x0 = vp_pred_x0(self.prediction_type, &output, sample, alpha_t, sigma_t);
            if self.thresholding {
                x0 = threshold(x0);
            }
            Ok((x0.clone(), x0))
        } else {
            let mut eps = vp_pred_eps(self.prediction_type, &output, sample, alpha_t, sigma_t);
            let mut x0 = vp_pred_x0(PredictionType::Epsilon, &eps, sample, alpha_t, sigma_t);
            if self.thresholding {
                x0 = threshold(x0);
                eps = vp_pred_eps(PredictionType::Sample, &x0, sample, alpha_t, sigma_t);
            }
            Ok((eps, x0))
        }
    }
}

/// First-order update from `s` to `t` with `h = lambda_t - lambda_s` (diffusers'
/// `dpm_solver_first_order_update`; equal to DDIM):
///
/// * DPM-Solver++ (Lu et al. 2022b, its first-order solver):
///   `x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0`
/// * DPM-Solver-1 (Lu et al. 2022a, eq. 3.7): `x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps`
/// * SDE-DPM-Solver++-1: `x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) x0
///   + sigma_t sqrt(1 - e^{-2h}) z`
/// * SDE-DPM-Solver-1: `x_t = (alpha_t / alpha_s) x_s - 2 sigma_t (e^h - 1) eps
///   + sigma_t sqrt(e^{2h} - 1) z`
pub(crate) fn first_order_update<T: SchedulerTensor>(
    algorithm_type: AlgorithmType,
    SolverStep { s, t }: SolverStep,
    sample: &T,
    d0: &T,
    noise: Option<&T>,
) -> Result<T> {
    let h = t.lambda - s.lambda;
    Ok(match algorithm_type {
        AlgorithmType::DpmSolverPlusPlus => T::lincomb(&[
            (t.sigma / s.sigma, sample),
            (-t.alpha * ((-h).exp() - 1.0), d0),
        ]),
        AlgorithmType::DpmSolver => T::lincomb(&[
            (t.alpha / s.alpha, sample),
            (-t.sigma * (h.exp() - 1.0), d0),
        ]),
        AlgorithmType::SdeDpmSolverPlusPlus => T::lincomb(&[
            (t.sigma / s.sigma * (-h).exp(), sample),
            (t.alpha * (1.0 - (-2.0 * h).exp()), d0),
            (
                sde_noise_scale(t.sigma, 1.0 - (-2.0 * h).exp()),
                need_noise(noise)?,
            ),
        ]),
        AlgorithmType::SdeDpmSolver => T::lincomb(&[
            (t.alpha / s.alpha, sample),
            (-2.0 * t.sigma * (h.exp() - 1.0), d0),
            (
                sde_noise_scale(t.sigma, (2.0 * h).exp() - 1.0),
                need_noise(noise)?,
            ),
        ]),
    })
}

/// `sigma_t * sqrt(radicand)` for the noise term of the SDE updates. The radicand
/// (`1 - e^{-2h}` or `e^{2h} - 1`) is 0 for a step between equal noise levels, e.g. from the
/// last Karras sigma to a `sigma_min` final sigma, where f64 rounding can leave it at
/// `-1e-17`; it is clamped at 0 there (diffusers' float32 tables give exactly 0).
fn sde_noise_scale(sigma_t: f64, radicand: f64) -> f64 {
    sigma_t * radicand.max(0.0).sqrt()
}

fn need_noise<T>(noise: Option<&T>) -> Result<&T> {
    noise.ok_or_else(|| Error::InvalidState("a stochastic DPM-Solver step needs noise".into()))
}

/// Second-order combination from the reference point `s` (whose sample is `sample`) to `t`,
/// with `h = lambda_t - lambda_s`, `D0` the model output at `s` and `D1` the scaled first
/// difference. The multistep sampler uses it with `s` = the current point
/// (DPM-Solver++(2M), Lu et al. 2022b, Algorithm 2); the singlestep one with `s` = the
/// previous point and the current output as the intermediate evaluation
/// (DPM-Solver++(2S), Algorithm 1; DPM-Solver-2, Lu et al. 2022a, Algorithm 1):
///
/// * DPM-Solver++: `x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0 + c D1`, with
///   `c = -0.5 alpha_t (e^{-h} - 1)` (midpoint) or `alpha_t ((e^{-h} - 1) / h + 1)` (Heun)
/// * DPM-Solver: `x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) D0 + c D1`, with
///   `c = -0.5 sigma_t (e^h - 1)` (midpoint) or `-sigma_t ((e^h - 1) / h - 1)` (Heun)
/// * SDE-DPM-Solver++(2M) (Lu et al. 2022b, appendix): `x_t = (sigma_t / sigma_s) e^{-h} x_s
///   + alpha_t (1 - e^{-2h}) D0 + c D1 + sigma_t sqrt(1 - e^{-2h}) z`, with
///   `c = 0.5 alpha_t (1 - e^{-2h})` (midpoint) or `alpha_t ((1 - e^{-2h}) / (-2h) + 1)` (Heun)
/// * SDE-DPM-Solver: `x_t = (alpha_t / alpha_s) x_s - 2 sigma_t (e^h - 1) D0 + c D1
///   + sigma_t sqrt(e^{2h} - 1) z`, with `c = -sigma_t (e^h - 1)` (midpoint) or
///   `-2 sigma_t ((e^h - 1) / h - 1)` (Heun)
pub(crate) fn second_order_update<T: SchedulerTensor>(
    algorithm_type: AlgorithmType,
    solver_type: SolverType,
    SolverStep { s, t }: SolverStep,
    sample: &T,
    d0: &T,
    d1: &T,
    noise: Option<&T>,
) -> Result<T> {
    let h = t.lambda - s.lambda;
    let midpoint = solver_type == SolverType::Midpoint;
    Ok(match algorithm_type {
        AlgorithmType::DpmSolverPlusPlus => {
            let em1 = (-h).exp() - 1.0;
            let c1 = if midpoint {
                -0.5 * (t.alpha * em1)
            } else {
                t.alpha * (em1 / h + 1.0)
            };
            T::lincomb(&[
                (t.sigma / s.sigma, sample),
                (-(t.alpha * em1), d0),
                (c1, d1),
            ])
        }
        AlgorithmType::DpmSolver => {
            let ep1 = h.exp() - 1.0;
            let c1 = if midpoint {
                -0.5 * (t.sigma * ep1)
            } else {
                -(t.sigma * (ep1 / h - 1.0))
            };
            T::lincomb(&[
                (t.alpha / s.alpha, sample),
                (-(t.sigma * ep1), d0),
                (c1, d1),
            ])
        }
        AlgorithmType::SdeDpmSolverPlusPlus => {
            let one_m = 1.0 - (-2.0 * h).exp();
            let c1 = if midpoint {
                0.5 * (t.alpha * one_m)
            } else {
                t.alpha * (one_m / (-2.0 * h) + 1.0)
            };
            T::lincomb(&[
                (t.sigma / s.sigma * (-h).exp(), sample),
                (t.alpha * one_m, d0),
                (c1, d1),
                (sde_noise_scale(t.sigma, one_m), need_noise(noise)?),
            ])
        }
        AlgorithmType::SdeDpmSolver => {
            let ep1 = h.exp() - 1.0;
            let c1 = if midpoint {
                -(t.sigma * ep1)
            } else {
                -2.0 * (t.sigma * (ep1 / h - 1.0))
            };
            T::lincomb(&[
                (t.alpha / s.alpha, sample),
                (-2.0 * (t.sigma * ep1), d0),
                (c1, d1),
                (
                    sde_noise_scale(t.sigma, (2.0 * h).exp() - 1.0),
                    need_noise(noise)?,
                ),
            ])
        }
    })
}

/// Third-order combination from the reference point `s` to `t` (`h = lambda_t - lambda_s`),
/// given `D0`, the first-derivative estimate `D1` and, for the full third-order form, the
/// second-derivative estimate `D2` (DPM-Solver-3, Lu et al. 2022a, Algorithm 2, with the
/// Taylor terms of its Proposition 3.1 expansion; DPM-Solver++(3M), Lu et al. 2022b, appendix):
///
/// * DPM-Solver++: `x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0
///   + alpha_t ((e^{-h} - 1) / h + 1) D1 - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) D2`
/// * DPM-Solver: `x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) D0
///   - sigma_t ((e^h - 1) / h - 1) D1 - sigma_t ((e^h - 1 - h) / h^2 - 1/2) D2`
/// * SDE-DPM-Solver++: `x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D0
///   + alpha_t ((1 - e^{-2h}) / (-2h) + 1) D1
///   + alpha_t ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2) D2 + sigma_t sqrt(1 - e^{-2h}) z`
///
/// diffusers has no third-order SDE-DPM-Solver (noise prediction) update.
pub(crate) fn third_order_update<T: SchedulerTensor>(
    algorithm_type: AlgorithmType,
    SolverStep { s, t }: SolverStep,
    sample: &T,
    d0: &T,
    d1: &T,
    d2: Option<&T>,
    noise: Option<&T>,
) -> Result<T> {
    let h = t.lambda - s.lambda;
    let mut terms: Vec<(f64, &T)> = Vec::with_capacity(5);
    match algorithm_type {
        AlgorithmType::DpmSolverPlusPlus => {
            let em1 = (-h).exp() - 1.0;
            terms.push((t.sigma / s.sigma, sample));
            terms.push((-(t.alpha * em1), d0));
            terms.push((t.alpha * (em1 / h + 1.0), d1));
            if let Some(d2) = d2 {
                terms.push((-(t.alpha * (((-h).exp() - 1.0 + h) / (h * h) - 0.5)), d2));
            }
        }
        AlgorithmType::DpmSolver => {
            let ep1 = h.exp() - 1.0;
            terms.push((t.alpha / s.alpha, sample));
            terms.push((-(t.sigma * ep1), d0));
            terms.push((-(t.sigma * (ep1 / h - 1.0)), d1));
            if let Some(d2) = d2 {
                terms.push((-(t.sigma * ((h.exp() - 1.0 - h) / (h * h) - 0.5)), d2));
            }
        }
        AlgorithmType::SdeDpmSolverPlusPlus => {
            let one_m = 1.0 - (-2.0 * h).exp();
            terms.push((t.sigma / s.sigma * (-h).exp(), sample));
            terms.push((t.alpha * one_m, d0));
            terms.push((t.alpha * (one_m / (-2.0 * h) + 1.0), d1));
            if let Some(d2) = d2 {
                let c2 = t.alpha * ((one_m - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5);
                terms.push((c2, d2));
            }
            terms.push((sde_noise_scale(t.sigma, one_m), need_noise(noise)?));
        }
        AlgorithmType::SdeDpmSolver => {
            return Err(Error::Unsupported(
                "third-order updates of algorithm_type sde-dpmsolver do not exist in diffusers; \
                 use solver_order <= 2 or sde-dpmsolver++"
                    .into(),
            ));
        }
    }
    Ok(T::lincomb(&terms))
}

// ---------------------------------------------------------------------------------------
// The multistep sampler.
// ---------------------------------------------------------------------------------------

const CLASS: &str = "DPMSolverMultistepScheduler";

/// DPM-Solver / DPM-Solver++ multistep sampler (diffusers' `DPMSolverMultistepScheduler`).
///
/// Each step evaluates the model once and reuses the converted outputs of the previous
/// one or two steps for a second- or third-order update: DPM-Solver++(2M) (Lu et al.
/// 2022b, Algorithm 2) with `D1 = (m0 - m1) / r0`, `r0 = h_{i-1} / h_i`, and its
/// third-order extension with
/// `D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)`, `D2 = (D1_0 - D1_1) / (r0 + r1)`.
/// The first step (and, with `lower_order_final`, the last steps of short runs) uses a
/// lower order. The `sde-*` variants draw one noise array per step.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler<T> {
    config: DpmSolverMultistepConfig,
    sigma_options: DpmSigmaOptions,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: usize,
    model_outputs: ModelOutputs<T>,
    lower_order_nums: usize,
    index: StepIndex,
}

impl<T: SchedulerTensor> DpmSolverMultistepScheduler<T> {
    /// Builds the sampler from its config, validating it.
    pub fn new(config: DpmSolverMultistepConfig) -> Result<Self> {
        let c = &config;
        dpm_common_keys!(CLASS, c).validate()?;
        let schedule = NoiseSchedule::new(
            c.num_train_timesteps,
            c.beta_start,
            c.beta_end,
            c.beta_schedule,
            c.trained_betas.as_deref(),
            c.rescale_betas_zero_snr,
        )?;
        let alphas_cumprod =
            finite_terminal_alphas_cumprod(schedule.alphas_cumprod, c.rescale_betas_zero_snr);
        let sigma_options = DpmSigmaOptions {
            spacing: SigmaSpacing::from_flags(
                c.use_karras_sigmas,
                c.use_exponential_sigmas,
                c.use_beta_sigmas,
            )?,
            lu_lambdas: c.use_lu_lambdas,
        };
        Ok(Self {
            model_outputs: ModelOutputs::new(c.solver_order),
            config,
            sigma_options,
            alphas_cumprod,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            num_inference_steps: 0,
            lower_order_nums: 0,
            index: StepIndex::default(),
        })
    }

    /// Builds the sampler from a `scheduler_config.json` map (unknown keys ignored).
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        Self::new(deserialize_dpm_config(map, CLASS)?)
    }

    /// The config in use.
    pub fn config(&self) -> &DpmSolverMultistepConfig {
        &self.config
    }

    /// `alphas_cumprod` of the training schedule.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The index of the next step, once the run has started.
    pub fn step_index(&self) -> Option<usize> {
        self.index.step
    }
}

impl<T: SchedulerTensor> Scheduler<T> for DpmSolverMultistepScheduler<T> {
    fn name(&self) -> &str {
        CLASS
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timestep_schedule(&mut self, schedule: TimestepSchedule) -> Result<()> {
        let c = &self.config;
        let n_train = c.num_train_timesteps;
        let options = self.sigma_options;
        let (base, n) = dpm_base_timesteps(CLASS, schedule, options, n_train, |n| {
            let last = clipped_last_timestep(&self.alphas_cumprod, c.lambda_min_clipped)?;
            Ok(multistep_timesteps(
                c.timestep_spacing,
                n_train,
                last,
                n,
                c.steps_offset,
            ))
        })?;
        let round = c.beta_schedule != BetaSchedule::SquaredcosCapV2;
        let (timesteps, sigmas) = dpm_sigma_table(
            &self.alphas_cumprod,
            &base,
            n,
            options,
            round,
            c.final_sigmas_type,
        );
        if timesteps.is_empty() {
            return Err(Error::InvalidArgument(
                "the schedule has no timesteps".into(),
            ));
        }
        self.num_inference_steps = timesteps.len();
        self.timesteps = timesteps;
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
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<T>> {
        if self.num_inference_steps == 0 {
            return Err(Error::InvalidState("call set_timesteps before step".into()));
        }
        let n = self.timesteps.len();
        let idx = self
            .index
            .peek(timestep, |t| Ok(dpm_index_for_timestep(&self.timesteps, t)))?;
        if idx >= n {
            return Err(Error::InvalidState(format!(
                "step {idx} is past the end of the {n}-step schedule; call set_timesteps again"
            )));
        }
        let c = &self.config;
        let lower_order_final = idx == n - 1
            && (c.euler_at_final
                || (c.lower_order_final && n < 15)
                || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = idx + 2 == n && c.lower_order_final && n < 15;

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
        let order = multistep_order(
            c.solver_order,
            self.lower_order_nums,
            lower_order_final,
            lower_order_second,
        );
        if idx + 1 < order {
            return Err(Error::InvalidState(format!(
                "a order-{order} step at index {idx} needs {} earlier steps",
                order - 1
            )));
        }
        if order == 3 && c.algorithm_type == AlgorithmType::SdeDpmSolver {
            return Err(Error::Unsupported(
                "diffusers has no third-order sde-dpmsolver update; use solver_order <= 2 or sde-dpmsolver++"
                    .into(),
            ));
        }

        self.model_outputs.push(converted);
        let m = self.model_outputs.newest(order)?;
        let level = |i: usize| Level::new(self.sigmas[i]);
        let (t, s0) = (level(idx + 1), level(idx));
        let algorithm = c.algorithm_type;
        let prev_sample = match order {
            1 => first_order_update(algorithm, SolverStep { s: s0, t }, sample, m[0], z.as_ref())?,
            2 => {
                let s1 = level(idx - 1);
                let (m0, m1) = (m[0], m[1]);
                let r0 = (s0.lambda - s1.lambda) / (t.lambda - s0.lambda);
                let d1 = T::lincomb(&[(1.0 / r0, m0), (-1.0 / r0, m1)]);
                second_order_update(
                    algorithm,
                    c.solver_type,
                    SolverStep { s: s0, t },
                    sample,
                    m0,
                    &d1,
                    z.as_ref(),
                )?
            }
            _ => {
                let (s1, s2) = (level(idx - 1), level(idx - 2));
                let (m0, m1, m2) = (m[0], m[1], m[2]);
                let h = t.lambda - s0.lambda;
                let r0 = (s0.lambda - s1.lambda) / h;
                let r1 = (s1.lambda - s2.lambda) / h;
                let d1_0 = T::lincomb(&[(1.0 / r0, m0), (-1.0 / r0, m1)]);
                let d1_1 = T::lincomb(&[(1.0 / r1, m1), (-1.0 / r1, m2)]);
                let w = r0 / (r0 + r1);
                let d1 = T::lincomb(&[(1.0 + w, &d1_0), (-w, &d1_1)]);
                let d2 = T::lincomb(&[(1.0 / (r0 + r1), &d1_0), (-1.0 / (r0 + r1), &d1_1)]);
                third_order_update(
                    algorithm,
                    SolverStep { s: s0, t },
                    sample,
                    m0,
                    &d1,
                    Some(&d2),
                    z.as_ref(),
                )?
            }
        };
        if self.lower_order_nums < c.solver_order {
            self.lower_order_nums += 1;
        }
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

    fn sched(map: serde_json::Value) -> DpmSolverMultistepScheduler<HostTensor> {
        let map = ConfigMap::from_value(map, "test").unwrap();
        DpmSolverMultistepScheduler::from_config_map(&map).unwrap()
    }

    #[test]
    fn spacing_matches_diffusers() {
        let mut s = sched(serde_json::json!({}));
        s.set_timesteps(10).unwrap();
        assert_eq!(
            s.timesteps(),
            &[
                999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0
            ]
        );
        let mut s = sched(serde_json::json!({"timestep_spacing": "leading", "steps_offset": 1}));
        s.set_timesteps(10).unwrap();
        assert_eq!(
            s.timesteps(),
            &[
                901.0, 811.0, 721.0, 631.0, 541.0, 451.0, 361.0, 271.0, 181.0, 91.0
            ]
        );
        let mut s = sched(serde_json::json!({"timestep_spacing": "trailing"}));
        s.set_timesteps(3).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 666.0, 332.0]);
        assert_eq!(Scheduler::<HostTensor>::sigmas(&s).unwrap().len(), 4);
    }

    #[test]
    fn config_aliases_and_validation() {
        let s = sched(
            serde_json::json!({"algorithm_type": "deis", "solver_type": "bh2",
            "lambda_min_clipped": "-Infinity", "use_karras_sigmas": null}),
        );
        assert_eq!(s.config().algorithm_type, AlgorithmType::DpmSolverPlusPlus);
        assert_eq!(s.config().solver_type, SolverType::Midpoint);
        let bad = |v: serde_json::Value| {
            let map = ConfigMap::from_value(v, "t").unwrap();
            DpmSolverMultistepScheduler::<HostTensor>::from_config_map(&map).is_err()
        };
        assert!(bad(serde_json::json!({"solver_order": 4})));
        assert!(bad(serde_json::json!({"solver_order": 0})));
        assert!(bad(serde_json::json!({"algorithm_type": "dpmsolver"})));
        assert!(bad(
            serde_json::json!({"use_karras_sigmas": true, "use_beta_sigmas": true})
        ));
        assert!(bad(
            serde_json::json!({"prediction_type": "flow_prediction"})
        ));
        assert!(bad(serde_json::json!({"use_flow_sigmas": true})));
        assert!(bad(serde_json::json!({"algorithm_type": "magic"})));
        assert!(!bad(
            serde_json::json!({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"})
        ));
    }

    #[test]
    fn first_order_is_ddim() {
        // solver_order 1 with dpmsolver++ is DDIM (eta = 0) on the interpolated sigmas.
        let mut s = sched(serde_json::json!({"solver_order": 1}));
        s.set_timesteps(5).unwrap();
        let x = HostTensor::new(vec![0.3, -1.2], vec![1, 2]).unwrap();
        let eps = HostTensor::new(vec![0.1, 0.4], vec![1, 2]).unwrap();
        let t = s.timesteps()[0];
        let sig = s.sigmas[..2].to_vec();
        let out = s.step(&eps, t, &x, &mut NoNoise).unwrap().prev_sample;
        let (a0, s0) = vp_alpha_sigma(sig[0]);
        let (a1, s1) = vp_alpha_sigma(sig[1]);
        for i in 0..2 {
            let x0 = (x.data()[i] - s0 * eps.data()[i]) / a0;
            let want = a1 * x0 + s1 * eps.data()[i];
            assert!(
                (out.data()[i] - want).abs() < 1e-12,
                "{} vs {want}",
                out.data()[i]
            );
        }
    }

    #[test]
    fn sde_draws_one_noise_per_step() {
        let mut s = sched(serde_json::json!({"algorithm_type": "sde-dpmsolver++"}));
        s.set_timesteps(4).unwrap();
        let mut noise = FixedNoise::new(vec![vec![0.5, -0.5]; 4]);
        let mut x = HostTensor::new(vec![1.0, -1.0], vec![1, 2]).unwrap();
        for t in s.timesteps().to_vec() {
            let eps = x.scale(0.5);
            x = s.step(&eps, t, &x, &mut noise).unwrap().prev_sample;
        }
        assert_eq!(noise.remaining(), 0);
        assert!(x.data().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn errors_instead_of_panics() {
        let mut s = sched(serde_json::json!({}));
        let x = HostTensor::zeros(vec![1, 2]);
        assert!(s.step(&x, 999.0, &x, &mut NoNoise).is_err());
        assert!(s.set_timesteps(0).is_err());
        assert!(s.set_timesteps(1001).is_err());
        assert!(
            s.set_timestep_schedule(TimestepSchedule::Sigmas(vec![1.0, 0.5]))
                .is_err()
        );
        s.set_timesteps(2).unwrap();
        let y = HostTensor::zeros(vec![1, 3]);
        assert!(s.step(&y, 999.0, &x, &mut NoNoise).is_err());
        for t in s.timesteps().to_vec() {
            s.step(&x, t, &x, &mut NoNoise).unwrap();
        }
        assert!(s.step(&x, 0.0, &x, &mut NoNoise).is_err());
    }

    #[test]
    fn add_noise_matches_diffusers() {
        let mut s = sched(serde_json::json!({}));
        let x = HostTensor::new(vec![0.5, -1.0, 2.0, 0.25], vec![2, 2]).unwrap();
        let n = HostTensor::new(vec![0.1, 0.2, -0.3, 0.4], vec![2, 2]).unwrap();
        assert!(s.add_noise(&x, &n, &[899.0]).is_err());
        s.set_timesteps(10).unwrap();
        let close =
            |a: &HostTensor, b: &[f64]| a.data().iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        // diffusers 0.42.1 (float32 sigma table)
        let got = s.add_noise(&x, &n, &[899.0, 300.0]).unwrap();
        assert!(
            close(&got, &[0.108281, 0.183383, 1.021870, 0.468307]),
            "{got:?}"
        );
        Scheduler::<HostTensor>::set_begin_index(&mut s, 2);
        let got = s.add_noise(&x, &n, &[899.0]).unwrap();
        assert!(
            close(&got, &[0.119494, 0.160705, -0.221486, 0.409479]),
            "{got:?}"
        );
    }
}
