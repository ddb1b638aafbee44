//! Pieces shared by several samplers: config enums and the `config_struct!` declarations,
//! argument checks, numpy helpers, timestep spacing, sigma schedules (Karras, exponential,
//! beta), step bookkeeping ([`StepIndex`]), prediction-type conversion, and the parts the
//! VP multistep samplers and the k-diffusion samplers each have in common.

use diffusion_core::{Error, Result, SchedulerTensor};
use serde::{Deserialize, Serialize};

pub use crate::schedule::linspace;
use crate::schedule::{
    NoiseSchedule, batch_size, check_same_shape, per_batch, sigmas_from_alphas_cumprod,
};

/// Declares a sampler's config struct with each key's diffusers default written next to it
/// (`pub key: Type = default,`, as in the class's Python `__init__`): the struct, read with
/// `#[serde(default)]` so absent keys take their defaults, and its `Default` impl.
macro_rules! config_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                $field_vis:vis $field:ident : $ty:ty = $default:expr
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[serde(default)]
        $vis struct $name {
            $(
                $(#[$field_meta])*
                $field_vis $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    $($field: $default,)*
                }
            }
        }
    };
}
pub(crate) use config_struct;

/// The `prediction_type` key: what the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise `epsilon` added to the sample.
    #[default]
    Epsilon,
    /// The velocity `v = sqrt(abar) * eps - sqrt(1 - abar) * x0` (Salimans & Ho 2022).
    VPrediction,
    /// The clean sample `x0` itself.
    Sample,
}

/// The `timestep_spacing` key: how inference timesteps are placed among training timesteps
/// (Lin et al. 2023, Table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly spaced from 0 to `num_train_timesteps - 1`, both ends included.
    Linspace,
    /// Multiples of `num_train_timesteps / steps` counted up from 0 (plus `steps_offset`).
    #[default]
    Leading,
    /// Multiples counted down from `num_train_timesteps`, minus one.
    Trailing,
}

/// The `final_sigmas_type` key: the noise level after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// End on sigma = 0 (a clean sample).
    #[default]
    Zero,
    /// End on the smallest training sigma.
    SigmaMin,
}

/// How the inference schedule is chosen in `set_timesteps`.
#[derive(Debug, Clone, PartialEq)]
pub enum TimestepSchedule {
    /// This many steps, placed by the sampler's `timestep_spacing` and sigma options.
    Steps(usize),
    /// Explicit training timesteps, in decreasing order (diffusers' `timesteps=`).
    Timesteps(Vec<f64>),
    /// Explicit noise levels, in decreasing order (diffusers' `sigmas=`).
    Sigmas(Vec<f64>),
}

/// Checks `num_inference_steps` against `num_train_timesteps`.
pub fn check_steps(num_inference_steps: usize, num_train_timesteps: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::InvalidArgument(
            "num_inference_steps must be at least 1".into(),
        ));
    }
    if num_inference_steps > num_train_timesteps {
        return Err(Error::InvalidArgument(format!(
            "num_inference_steps ({num_inference_steps}) cannot exceed num_train_timesteps ({num_train_timesteps})"
        )));
    }
    Ok(())
}

/// The step count of `schedule`, checked by [`check_steps`], for the samplers that take no
/// custom timesteps or sigmas.
pub fn step_count(
    class: &str,
    schedule: TimestepSchedule,
    num_train_timesteps: usize,
) -> Result<usize> {
    let TimestepSchedule::Steps(n) = schedule else {
        return Err(Error::Unsupported(format!(
            "{class} takes a step count, not custom timesteps or sigmas"
        )));
    };
    check_steps(n, num_train_timesteps)?;
    Ok(n)
}

/// Checks that custom timesteps are strictly decreasing and inside `[0, num_train_timesteps)`.
pub fn check_custom_timesteps(timesteps: &[f64], num_train_timesteps: usize) -> Result<()> {
    if timesteps.is_empty() {
        return Err(Error::InvalidArgument("custom timesteps are empty".into()));
    }
    if timesteps.windows(2).any(|w| w[1] >= w[0]) {
        return Err(Error::InvalidArgument(
            "custom timesteps must be in strictly decreasing order".into(),
        ));
    }
    if timesteps
        .iter()
        .any(|&t| !(t >= 0.0 && t < num_train_timesteps as f64))
    {
        return Err(Error::InvalidArgument(format!(
            "custom timesteps must lie in [0, {num_train_timesteps})"
        )));
    }
    Ok(())
}

/// Checks custom timesteps for samplers that index their tables with integer timesteps
/// (diffusers casts them to `int64`): strictly decreasing, in `[0, num_train_timesteps)`
/// and whole numbers.
pub fn check_integer_timesteps(timesteps: &[f64], num_train_timesteps: usize) -> Result<()> {
    check_custom_timesteps(timesteps, num_train_timesteps)?;
    if let Some(t) = timesteps.iter().find(|t| t.fract() != 0.0) {
        return Err(Error::InvalidArgument(format!(
            "custom timesteps must be whole numbers for this sampler, got {t}"
        )));
    }
    Ok(())
}

/// Checks that custom sigmas are finite, non-negative and non-increasing.
pub fn check_custom_sigmas(sigmas: &[f64]) -> Result<()> {
    if sigmas.is_empty() {
        return Err(Error::InvalidArgument("custom sigmas are empty".into()));
    }
    if sigmas.iter().any(|s| !(s.is_finite() && *s >= 0.0)) {
        return Err(Error::InvalidArgument(
            "custom sigmas must be finite and non-negative".into(),
        ));
    }
    if sigmas.windows(2).any(|w| w[1] > w[0]) {
        return Err(Error::InvalidArgument(
            "custom sigmas must be in decreasing order".into(),
        ));
    }
    Ok(())
}

/// numpy's `round` (half to even), as diffusers uses when placing timesteps.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `numpy.interp(x, xp, fp)` for increasing `xp`: piecewise-linear, clamped at the ends.
pub fn interp(x: f64, xp: &[f64], fp: &[f64]) -> f64 {
    debug_assert_eq!(xp.len(), fp.len());
    let n = xp.len();
    if x <= xp[0] {
        return fp[0];
    }
    if x >= xp[n - 1] {
        return fp[n - 1];
    }
    // first index with xp[j] > x
    let j = xp.partition_point(|&v| v <= x);
    let i = j - 1;
    let w = (x - xp[i]) / (xp[j] - xp[i]);
    fp[i] + w * (fp[j] - fp[i])
}

/// diffusers' `_sigma_to_t`: the (fractional) training timestep whose log-sigma is `sigma`'s,
/// by linear interpolation in log space over `log_sigmas` (increasing with t).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // index of the last log_sigma <= log_sigma, clipped to n - 2
    let count = log_sigmas
        .iter()
        .filter(|&&ls| log_sigma - ls >= 0.0)
        .count();
    let low_idx = count.saturating_sub(1).min(n - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al. 2022 ("Elucidating the Design Space...") eq. 5 noise levels, rho = 7:
/// `sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Noise levels evenly spaced in log space from `sigma_max` down to `sigma_min`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Noise levels placed by the quantiles of Beta(alpha, beta) ("Beta Sampling is All You
/// Need", Lee et al. 2024), as diffusers' `_convert_to_beta` with alpha = beta = 0.6.
pub fn beta_sigmas(sigma_min: f64, sigma_max: f64, n: usize, alpha: f64, beta: f64) -> Vec<f64> {
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|u| {
            let ppf = beta_ppf(1.0 - u, alpha, beta);
            sigma_min + ppf * (sigma_max - sigma_min)
        })
        .collect()
}

/// Inverse CDF of the Beta(a, b) distribution, by bisection on the regularised incomplete
/// beta function to full `f64` precision.
pub fn beta_ppf(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if statrs::function::beta::beta_reg(a, b, mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Index of `timestep` in `schedule` as diffusers' `index_for_timestep` picks it: the second
/// match when the timestep occurs more than once (so a run started mid-schedule, as in
/// image-to-image, does not skip a sigma), else the first.
pub fn index_for_timestep(schedule: &[f64], timestep: f64) -> Result<usize> {
    let matches: Vec<usize> = schedule
        .iter()
        .enumerate()
        .filter(|(_, t)| (**t - timestep).abs() < 1e-9 * (1.0 + timestep.abs()))
        .map(|(i, _)| i)
        .collect();
    match matches.len() {
        0 => Err(Error::InvalidArgument(format!(
            "timestep {timestep} is not in the current schedule"
        ))),
        1 => Ok(matches[0]),
        _ => Ok(matches[1]),
    }
}

/// diffusers' `_step_index` / `_begin_index` bookkeeping: where a run is in its schedule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepIndex {
    /// Index of the current step in the schedule, once the run has started.
    pub step: Option<usize>,
    /// Index the run starts at, when a pipeline set one (`set_begin_index`).
    pub begin: Option<usize>,
}

impl StepIndex {
    /// Forgets the position (a new schedule was set).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// The current step index without recording it: the step if the run has started, else
    /// the begin index if one was set, else `lookup(timestep)` (diffusers'
    /// `_init_step_index`).
    pub fn peek(&self, timestep: f64, lookup: impl FnOnce(f64) -> Result<usize>) -> Result<usize> {
        match (self.step, self.begin) {
            (Some(i), _) => Ok(i),
            (None, Some(b)) => Ok(b),
            (None, None) => lookup(timestep),
        }
    }

    /// The current step index, initialised on first use (diffusers' `_init_step_index`):
    /// the begin index if one was set, else the position of `timestep` in `schedule`.
    pub fn current(&mut self, timestep: f64, schedule: &[f64]) -> Result<usize> {
        let i = self.peek(timestep, |t| index_for_timestep(schedule, t))?;
        self.step = Some(i);
        Ok(i)
    }

    /// [`StepIndex::current`], or an error once the run has gone past the last step of
    /// `schedule`.
    pub fn current_within(&mut self, timestep: f64, schedule: &[f64]) -> Result<usize> {
        let i = self.current(timestep, schedule)?;
        if i >= schedule.len() {
            return Err(Error::InvalidState(format!(
                "step {i} is past the end of the {}-step schedule",
                schedule.len()
            )));
        }
        Ok(i)
    }

    /// Moves to the next step.
    pub fn advance(&mut self) {
        if let Some(i) = self.step.as_mut() {
            *i += 1;
        }
    }

    /// The sigma indices `add_noise` uses for `timesteps`: looked up in `schedule` when no
    /// begin index is set, else the current step (or the begin index before the first step).
    pub fn add_noise_indices(&self, timesteps: &[f64], schedule: &[f64]) -> Result<Vec<usize>> {
        self.add_noise_indices_with(timesteps, |t| index_for_timestep(schedule, t))
    }

    /// [`StepIndex::add_noise_indices`] with the timestep lookup given.
    pub fn add_noise_indices_with(
        &self,
        timesteps: &[f64],
        lookup: impl FnMut(f64) -> Result<usize>,
    ) -> Result<Vec<usize>> {
        match (self.begin, self.step) {
            (None, _) => timesteps.iter().copied().map(lookup).collect(),
            (Some(_), Some(i)) | (Some(i), None) => Ok(vec![i; timesteps.len()]),
        }
    }
}

/// `sigmas[i]`, or an error saying the run has gone past its last step.
pub fn sigma_at(sigmas: &[f64], i: usize) -> Result<f64> {
    sigmas.get(i).copied().ok_or_else(|| {
        Error::InvalidState(format!(
            "step {i} is past the end of the schedule ({} sigmas); call set_timesteps again",
            sigmas.len()
        ))
    })
}

/// The noise level of each batch element for `add_noise`: `sigmas[i]` for the step indices
/// of its timesteps (one per element, or one for all).
pub fn add_noise_sigmas(sigmas: &[f64], indices: Vec<usize>, batch: usize) -> Result<Vec<f64>> {
    per_batch(indices, batch)?
        .into_iter()
        .map(|i| {
            sigmas.get(i).copied().ok_or_else(|| {
                Error::InvalidArgument(format!("step index {i} is past the end of the schedule"))
            })
        })
        .collect()
}

/// Converts a model output to the predicted clean sample `x0` for a variance-preserving
/// sample `x_t = alpha_t x0 + sigma_t eps` (`alpha_t = sqrt(abar)`, `sigma_t = sqrt(1-abar)`).
pub fn vp_pred_x0<T: SchedulerTensor>(
    prediction_type: PredictionType,
    model_output: &T,
    sample: &T,
    alpha_t: f64,
    sigma_t: f64,
) -> T {
    match prediction_type {
        PredictionType::Epsilon => {
            T::lincomb(&[(1.0 / alpha_t, sample), (-sigma_t / alpha_t, model_output)])
        }
        PredictionType::Sample => model_output.clone(),
        PredictionType::VPrediction => T::lincomb(&[(alpha_t, sample), (-sigma_t, model_output)]),
    }
}

/// Converts a model output to the predicted noise `eps` for a variance-preserving sample.
pub fn vp_pred_eps<T: SchedulerTensor>(
    prediction_type: PredictionType,
    model_output: &T,
    sample: &T,
    alpha_t: f64,
    sigma_t: f64,
) -> T {
    match prediction_type {
        PredictionType::Epsilon => model_output.clone(),
        PredictionType::Sample => {
            T::lincomb(&[(1.0 / sigma_t, sample), (-alpha_t / sigma_t, model_output)])
        }
        PredictionType::VPrediction => T::lincomb(&[(alpha_t, model_output), (sigma_t, sample)]),
    }
}

/// diffusers' `_threshold_sample` (Imagen, Saharia et al. 2022, §2.3 "dynamic thresholding"):
/// per batch element, `s` = the `ratio` quantile of `|x0|`, clamped to `[1, max_value]`;
/// then `x0 = clamp(x0, -s, s) / s`. Runs on the host (rare: pixel-space models only).
pub fn dynamic_threshold<T: SchedulerTensor>(x0: &T, ratio: f64, max_value: f64) -> T {
    let shape = x0.shape();
    let batch = shape.first().copied().unwrap_or(1).max(1);
    let mut data = x0.to_host();
    let per = data.len() / batch;
    for chunk in data.chunks_mut(per) {
        let mut abs: Vec<f64> = chunk.iter().map(|v| v.abs()).collect();
        abs.sort_by(f64::total_cmp);
        let s = quantile_sorted(&abs, ratio).clamp(1.0, max_value);
        for v in chunk.iter_mut() {
            *v = v.clamp(-s, s) / s;
        }
    }
    x0.from_host_like(data, &shape)
}

/// `torch.quantile` (linear interpolation) of sorted values.
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (pos - lo as f64) * (sorted[hi] - sorted[lo])
}

/// `alphas_cumprod` as diffusers' sigma-table samplers (Euler, DPM-Solver, UniPC) keep it:
/// after zero-terminal-SNR rescaling (`rescaled`) the last value, exactly 0, becomes
/// `2^-24` so the largest sigma stays finite (4096).
pub fn finite_terminal_alphas_cumprod(mut alphas_cumprod: Vec<f64>, rescaled: bool) -> Vec<f64> {
    if rescaled && let Some(last) = alphas_cumprod.last_mut() {
        *last = 2f64.powi(-24);
    }
    alphas_cumprod
}

// ---------------------------------------------------------------------------------------
// Timestep spacing (`timestep_spacing`, Lin et al. 2023, Table 2).
//
// diffusers spaces inference timesteps three ways, each family with its own variant:
// [`spaced_timesteps`] (DDIM, DDPM, PNDM: integers), [`k_spaced_timesteps`] (the
// k-diffusion samplers: fractional with `linspace`) and [`multistep_timesteps`]
// (DPM-Solver, UniPC, DEIS: `n + 1` points with the last dropped).
//
// `trailing` spacing is `round(arange(T, 0, -T / n)) - 1`, and for some step counts
// (61, 103, 121, ... of 1000) numpy's float `arange` yields `n + 1` elements, the last just
// above 0, which becomes a timestep of -1. The families treat it differently, each as
// diffusers' result makes sense:
//
// - The sigma-table samplers (k-diffusion, DPM-Solver, UniPC, DEIS) keep it, as diffusers
//   does: they read noise levels with `np.interp`, which clamps -1 to training timestep 0,
//   so the extra step is a well-defined step to the smallest training sigma (our runs
//   match diffusers' there).
// - DDIM, DDPM and PNDM drop it, so their schedules always have `n` timesteps: diffusers
//   indexes `alphas_cumprod[-1]` there, the *noisiest* level, so its extra step turns the
//   finished sample into noise (e.g. DDIM's final sample jumps to the `clip_sample` bound,
//   PNDM's grows a hundredfold). Keeping the -1 would copy that bug, dropping it for the
//   others would lose a step diffusers takes meaningfully, so the two stay different.
// ---------------------------------------------------------------------------------------

/// `numpy.arange(start, stop, step)` for floats, reproducing numpy's element count
/// `ceil((stop - start) / step)` and its fill rule (`start + i * (x[1] - x[0])`), so
/// rounding quirks (an extra element close to `stop`) match numpy.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `round(arange(start, 0, -step)) - 1`: `trailing` spacing counted down from `start`,
/// including numpy's occasional extra element, which becomes -1 (see the section notes).
fn trailing_timesteps(start: f64, step: f64) -> Vec<f64> {
    np_arange(start, 0.0, -step)
        .into_iter()
        .map(|v| np_round(v) - 1.0)
        .collect()
}

/// Fractional inference timesteps of the k-diffusion samplers, in decreasing order:
///
/// - `linspace`: `linspace(0, num_train_timesteps - 1, n)` reversed, not rounded;
/// - `leading`: `i * (num_train_timesteps // n) + steps_offset` for `i = n - 1, ..., 0`;
/// - `trailing`: `round(arange(num_train_timesteps, 0, -num_train_timesteps / n)) - 1`,
///   ending on -1 where numpy's `arange` yields an extra element, as in diffusers (the
///   sigma there is the smallest training sigma; see the section notes).
pub fn k_spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let (n_train, n) = (num_train_timesteps, num_inference_steps);
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t = linspace(0.0, (n_train - 1) as f64, n);
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing_timesteps(n_train as f64, n_train as f64 / n as f64),
    }
}

/// Integer inference timesteps of diffusers' DDIM / DDPM / PNDM, in decreasing order: the
/// [`k_spaced_timesteps`] rounded (numpy half-even; only `linspace` has fractions), without
/// the -1 that `trailing` spacing yields for some `n` (61 of 1000, ...), so the schedule
/// always has `n` timesteps. diffusers keeps that -1 and indexes `alphas_cumprod[-1]` with
/// it, turning the finished sample into noise in one extra step (see the section notes).
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    k_spaced_timesteps(
        spacing,
        num_train_timesteps,
        num_inference_steps,
        steps_offset,
    )
    .into_iter()
    .map(np_round)
    .filter(|&t| t >= 0.0)
    .collect()
}

/// Errors unless every spaced timestep is a training timestep: a `steps_offset` can push
/// `leading` timesteps past the end (diffusers would fail indexing its tables).
pub fn check_steps_offset(timesteps: &[f64], num_train_timesteps: usize) -> Result<()> {
    if let Some(t) = timesteps.iter().find(|&&t| t >= num_train_timesteps as f64) {
        return Err(Error::config(
            "steps_offset",
            format!("puts timestep {t} outside the {num_train_timesteps} training timesteps"),
        ));
    }
    Ok(())
}

/// Integer inference timesteps of diffusers' VP multistep solvers, before any sigma
/// respacing, in decreasing order:
///
/// - `linspace`: `round(linspace(0, last_timestep - 1, n + 1))`, reversed, last dropped;
/// - `leading`: `i * (last_timestep // (n + 1)) + steps_offset` for `i = n, ..., 1`;
/// - `trailing`: `round(arange(last_timestep, 0, -num_train_timesteps / n)) - 1`, ending on
///   -1 where numpy's `arange` yields an extra element, as in diffusers (its sigma is the
///   smallest training sigma; see the section notes).
///
/// `last_timestep` is `num_train_timesteps` except where DPM-Solver clips the schedule by
/// `lambda_min_clipped`.
pub fn multistep_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    last_timestep: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let n = num_inference_steps;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<f64> = linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .map(np_round)
                .collect();
            t.reverse();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            trailing_timesteps(last_timestep as f64, num_train_timesteps as f64 / n as f64)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Variance-preserving multistep solver tables.
//
// Shared by the diffusers samplers that keep a table of VP noise levels and work in
// `lambda = log(alpha_t / sigma_t)`: DPMSolverMultistepScheduler (dpm_solver_multistep.rs),
// UniPCMultistepScheduler (unipc.rs) and DEISMultistepScheduler (deis.rs). Their
// `set_timesteps` all (1) space integer timesteps by `timestep_spacing`
// ([`multistep_timesteps`]), (2) turn them into noise levels, optionally respaced as
// Karras / exponential / beta sigmas ([`vp_inference_sigmas`]), and (3) append a final
// sigma, which each sampler chooses itself. Their `add_noise` works at the inference noise
// levels ([`vp_add_noise_at`]) and their steps keep the last outputs in [`ModelOutputs`].
// ---------------------------------------------------------------------------------------

/// How a VP multistep solver places its inference noise levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigmaSpacing {
    /// The training sigmas at the spaced timesteps (`np.interp`).
    #[default]
    Timesteps,
    /// Karras et al. 2022 sigmas ([`karras_sigmas`]), `use_karras_sigmas`.
    Karras,
    /// Log-uniform sigmas ([`exponential_sigmas`]), `use_exponential_sigmas`.
    Exponential,
    /// Beta-quantile sigmas ([`beta_sigmas`]), `use_beta_sigmas`.
    Beta,
}

impl SigmaSpacing {
    /// Reads the `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas` keys,
    /// of which at most one may be set.
    pub fn from_flags(karras: bool, exponential: bool, beta: bool) -> Result<Self> {
        match (karras, exponential, beta) {
            (false, false, false) => Ok(Self::Timesteps),
            (true, false, false) => Ok(Self::Karras),
            (false, true, false) => Ok(Self::Exponential),
            (false, false, true) => Ok(Self::Beta),
            _ => Err(Error::config(
                "use_karras_sigmas/use_exponential_sigmas/use_beta_sigmas",
                "only one of them can be true",
            )),
        }
    }
}

/// Inference timesteps and noise levels (without the final one) of a VP multistep solver,
/// as diffusers' DPM-Solver / UniPC / DEIS `set_timesteps` computes them.
#[derive(Debug, Clone, PartialEq)]
pub struct VpInferenceSigmas {
    /// Timesteps given to the model; integers (diffusers stores them as `int64`).
    pub timesteps: Vec<f64>,
    /// Noise levels `sigma = sqrt((1 - abar) / abar)`, one per timestep.
    pub sigmas: Vec<f64>,
}

/// Turns spaced timesteps (from [`multistep_timesteps`]) into noise levels.
///
/// With [`SigmaSpacing::Timesteps`] the training sigmas are interpolated at `timesteps`.
/// Otherwise `num_inference_steps` sigmas are placed between `sigma_min` and `sigma_max`
/// (defaulting to the extremes of the training sigmas) and the timesteps become their
/// fractional training timesteps ([`sigma_to_t`]), rounded (numpy half-even) for Karras
/// sigmas when `round_karras` is set, then truncated toward zero as diffusers' `int64`
/// cast does.
pub fn vp_inference_sigmas(
    alphas_cumprod: &[f64],
    timesteps: &[f64],
    num_inference_steps: usize,
    spacing: SigmaSpacing,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    round_karras: bool,
) -> VpInferenceSigmas {
    let train = sigmas_from_alphas_cumprod(alphas_cumprod);
    if spacing == SigmaSpacing::Timesteps {
        return VpInferenceSigmas {
            timesteps: timesteps.to_vec(),
            sigmas: sigmas_at_timesteps(&train, timesteps),
        };
    }
    let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
    let lo = sigma_min.unwrap_or(train[0]);
    let hi = sigma_max.unwrap_or(train[train.len() - 1]);
    let n = num_inference_steps;
    let sigmas = match spacing {
        SigmaSpacing::Karras => karras_sigmas(lo, hi, n),
        SigmaSpacing::Exponential => exponential_sigmas(lo, hi, n),
        SigmaSpacing::Beta => beta_sigmas(lo, hi, n, 0.6, 0.6),
        SigmaSpacing::Timesteps => unreachable!("handled above"),
    };
    let round = round_karras && spacing == SigmaSpacing::Karras;
    VpInferenceSigmas {
        timesteps: vp_timesteps_of_sigmas(&sigmas, &log_sigmas, round),
        sigmas,
    }
}

/// The integer training timesteps of respaced VP noise levels: [`sigma_to_t`] of each,
/// rounded (numpy half-even) when `round`, else truncated toward zero as diffusers' `int64`
/// cast does.
pub fn vp_timesteps_of_sigmas(sigmas: &[f64], log_sigmas: &[f64], round: bool) -> Vec<f64> {
    sigmas
        .iter()
        .map(|&s| {
            let t = sigma_to_t(s, log_sigmas);
            if round { np_round(t) } else { t.trunc() }
        })
        .collect()
}

/// `(alpha_t, sigma_t)` of the VP process at noise level `sigma = sigma_t / alpha_t`:
/// `alpha_t = 1 / sqrt(sigma^2 + 1)`, `sigma_t = sigma * alpha_t` (diffusers'
/// `_sigma_to_alpha_sigma_t`).
pub fn vp_alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// Half log-SNR `lambda = ln(alpha_t) - ln(sigma_t)` at noise level `sigma` (Lu et al.
/// 2022, DPM-Solver §3.1); `+inf` at `sigma = 0`.
pub fn vp_lambda(sigma: f64) -> f64 {
    let (alpha_t, sigma_t) = vp_alpha_sigma(sigma);
    alpha_t.ln() - sigma_t.ln()
}

/// The smallest noise level of the training schedule, `sqrt((1 - abar_0) / abar_0)`
/// (where `final_sigmas_type = "sigma_min"` ends a VP multistep run).
pub fn vp_sigma_min(alphas_cumprod: &[f64]) -> f64 {
    let a0 = alphas_cumprod[0];
    ((1.0 - a0) / a0).sqrt()
}

/// `add_noise` of diffusers' VP multistep samplers: `x = alpha_t x0 + sigma_t noise` at the
/// inference noise level `sigmas[i]` of each batch element's step index `i`.
pub fn vp_add_noise_at<T: SchedulerTensor>(
    original_samples: &T,
    noise: &T,
    sigmas: &[f64],
    indices: Vec<usize>,
) -> Result<T> {
    let levels = add_noise_sigmas(sigmas, indices, batch_size(original_samples))?;
    let (alphas, sigmas_t): (Vec<f64>, Vec<f64>) = levels.into_iter().map(vp_alpha_sigma).unzip();
    Ok(original_samples
        .scale_batch(&alphas)
        .add(&noise.scale_batch(&sigmas_t)))
}

/// `add_noise` of UniPC and DEIS: [`vp_add_noise_at`] with the step indices of
/// [`StepIndex::add_noise_indices`] (each timestep looked up in the schedule, or the current
/// / begin step when a pipeline set a begin index).
///
/// Before `set_timesteps` the training schedule is used (diffusers would index its
/// training sigmas with positions in its reversed timestep list, a bug not reproduced here).
pub fn vp_add_noise<T: SchedulerTensor>(
    schedule: &NoiseSchedule,
    inference_timesteps: &[f64],
    sigmas: &[f64],
    index: &StepIndex,
    original_samples: &T,
    noise: &T,
    timesteps: &[f64],
) -> Result<T> {
    if inference_timesteps.is_empty() {
        return schedule.add_noise(original_samples, noise, timesteps);
    }
    check_same_shape(original_samples, noise)?;
    let indices = index.add_noise_indices(timesteps, inference_timesteps)?;
    vp_add_noise_at(original_samples, noise, sigmas, indices)
}

/// Rejects the flow-matching keys diffusers' VP multistep samplers carry but this crate does
/// not implement for them, unless they hold their defaults.
pub fn reject_flow_keys(
    class: &str,
    use_flow_sigmas: bool,
    flow_shift: f64,
    use_dynamic_shifting: bool,
    time_shift_type: &str,
) -> Result<()> {
    let unsupported = |key: &str| {
        Err(Error::Unsupported(format!(
            "{class}: `{key}` (flow-matching sigmas) is not supported; use a flow-matching scheduler"
        )))
    };
    if use_flow_sigmas {
        return unsupported("use_flow_sigmas");
    }
    if flow_shift != 1.0 {
        return unsupported("flow_shift");
    }
    if use_dynamic_shifting {
        return unsupported("use_dynamic_shifting");
    }
    if time_shift_type != "exponential" {
        return unsupported("time_shift_type");
    }
    Ok(())
}

/// The last `solver_order` converted model outputs of a multistep solver, oldest first
/// (diffusers' `model_outputs` list); empty slots before the run has produced them.
#[derive(Debug, Clone)]
pub struct ModelOutputs<T>(Vec<Option<T>>);

impl<T> ModelOutputs<T> {
    /// Room for `solver_order` outputs, all empty.
    pub fn new(solver_order: usize) -> Self {
        Self((0..solver_order).map(|_| None).collect())
    }

    /// How many outputs are kept (the solver order).
    pub fn capacity(&self) -> usize {
        self.0.len()
    }

    /// Stores `output` as the newest, dropping the oldest.
    pub fn push(&mut self, output: T) {
        self.0.rotate_left(1);
        if let Some(last) = self.0.last_mut() {
            *last = Some(output);
        }
    }

    /// Whether the `back`-th newest output (0 = the newest) is stored.
    pub fn has(&self, back: usize) -> bool {
        back < self.0.len() && self.0[self.0.len() - 1 - back].is_some()
    }

    /// The newest `count` outputs, newest first.
    pub fn newest(&self, count: usize) -> Result<Vec<&T>> {
        if count > self.0.len() {
            return Err(Error::InvalidState(format!(
                "{count} earlier model outputs asked of a solver that keeps {}",
                self.0.len()
            )));
        }
        self.0
            .iter()
            .rev()
            .take(count)
            .map(|m| {
                m.as_ref()
                    .ok_or_else(|| Error::InvalidState("missing an earlier model output".into()))
            })
            .collect()
    }
}

/// The order of the next step of an order-1-to-3 multistep solver (DPM-Solver multistep,
/// DEIS): capped by how many steps have stored outputs (`warmed_up`), and lowered to 1 or 2
/// where the sampler asks for a lower order at the end of the run.
pub fn multistep_order(
    solver_order: usize,
    warmed_up: usize,
    lower_order_final: bool,
    lower_order_second: bool,
) -> usize {
    if solver_order == 1 || warmed_up < 1 || lower_order_final {
        1
    } else if solver_order == 2 || warmed_up < 2 || lower_order_second {
        2
    } else {
        3
    }
}

// ---------------------------------------------------------------------------------------
// k-diffusion (sigma-space) samplers.
//
// Shared by LMSDiscreteScheduler (lms.rs), EulerDiscreteScheduler (euler.rs),
// EulerAncestralDiscreteScheduler (euler_ancestral.rs), HeunDiscreteScheduler (heun.rs),
// KDPM2DiscreteScheduler (kdpm2.rs) and KDPM2AncestralDiscreteScheduler
// (kdpm2_ancestral.rs). They integrate the probability-flow ODE of
// `x = x0 + sigma * eps` in sigma (Karras et al. 2022, eq. 4) over noise levels
// `sigma_t = sqrt((1 - abar_t) / abar_t)`. Their `set_timesteps` all (1) space fractional
// timesteps by `timestep_spacing` ([`k_spaced_timesteps`]), (2) interpolate the training
// sigmas there ([`sigmas_at_timesteps`]), (3) optionally respace the sigmas as Karras /
// exponential / beta sigmas and map them back to timesteps ([`k_schedule`]).
// ---------------------------------------------------------------------------------------

/// The training sigmas at fractional `timesteps`: `np.interp(timesteps, arange(N),
/// train_sigmas)`, clamped at both ends.
pub fn sigmas_at_timesteps(train_sigmas: &[f64], timesteps: &[f64]) -> Vec<f64> {
    let grid: Vec<f64> = (0..train_sigmas.len()).map(|i| i as f64).collect();
    timesteps
        .iter()
        .map(|&t| interp(t, &grid, train_sigmas))
        .collect()
}

/// diffusers' `_convert_to_karras` / `_convert_to_exponential` / `_convert_to_beta` of the
/// k-diffusion samplers: `n` sigmas from `sigma_max` down to `sigma_min`, which default to
/// the first and last of `in_sigmas` (the interpolated inference sigmas, so with `leading`
/// spacing and `steps_offset` the smallest is not the smallest training sigma).
/// Returns `None` for [`SigmaSpacing::Timesteps`] (no respacing).
pub fn respace_sigmas(
    spacing: SigmaSpacing,
    in_sigmas: &[f64],
    n: usize,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
) -> Option<Vec<f64>> {
    let lo = sigma_min.or(in_sigmas.last().copied()).unwrap_or(0.0);
    let hi = sigma_max.or(in_sigmas.first().copied()).unwrap_or(0.0);
    match spacing {
        SigmaSpacing::Timesteps => None,
        SigmaSpacing::Karras => Some(karras_sigmas(lo, hi, n)),
        SigmaSpacing::Exponential => Some(exponential_sigmas(lo, hi, n)),
        SigmaSpacing::Beta => Some(beta_sigmas(lo, hi, n, 0.6, 0.6)),
    }
}

/// Fractional training timesteps of `sigmas` ([`sigma_to_t`] of each).
pub fn sigmas_to_timesteps(sigmas: &[f64], log_sigmas: &[f64]) -> Vec<f64> {
    sigmas.iter().map(|&s| sigma_to_t(s, log_sigmas)).collect()
}

/// Inference timesteps and sigmas (without the final sigma) of a k-diffusion sampler.
#[derive(Debug, Clone, PartialEq)]
pub struct KSchedule {
    /// Timesteps given to the model, possibly fractional.
    pub timesteps: Vec<f64>,
    /// Noise levels, one per timestep.
    pub sigmas: Vec<f64>,
}

/// The common k-diffusion `set_timesteps`: sigmas interpolated at `timesteps`, then, for
/// Karras / exponential / beta spacing, `num_inference_steps` respaced sigmas
/// ([`respace_sigmas`]) whose timesteps are recovered by [`sigma_to_t`] (rounded,
/// numpy half-even, when `round_karras` is set and the spacing is Karras, as KDPM2 does).
pub fn k_schedule(
    train_sigmas: &[f64],
    timesteps: Vec<f64>,
    num_inference_steps: usize,
    spacing: SigmaSpacing,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    round_karras: bool,
) -> KSchedule {
    let sigmas = sigmas_at_timesteps(train_sigmas, &timesteps);
    match respace_sigmas(spacing, &sigmas, num_inference_steps, sigma_min, sigma_max) {
        None => KSchedule { timesteps, sigmas },
        Some(sigmas) => {
            let log_sigmas: Vec<f64> = train_sigmas.iter().map(|s| s.ln()).collect();
            let mut timesteps = sigmas_to_timesteps(&sigmas, &log_sigmas);
            if round_karras && spacing == SigmaSpacing::Karras {
                timesteps.iter_mut().for_each(|t| *t = np_round(*t));
            }
            KSchedule { timesteps, sigmas }
        }
    }
}

/// The training noise schedule of a k-diffusion sampler: [`NoiseSchedule::new`], except
/// that these diffusers classes do not implement the `sigmoid` beta schedule.
///
/// [`NoiseSchedule::new`]: crate::schedule::NoiseSchedule::new
pub fn k_noise_schedule(
    class: &str,
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: crate::schedule::BetaSchedule,
    trained_betas: Option<&[f64]>,
    rescale_betas_zero_snr: bool,
) -> Result<crate::schedule::NoiseSchedule> {
    if trained_betas.is_none() && beta_schedule == crate::schedule::BetaSchedule::Sigmoid {
        return Err(Error::Unsupported(format!(
            "beta_schedule `sigmoid` is not implemented by {class}"
        )));
    }
    crate::schedule::NoiseSchedule::new(
        num_train_timesteps,
        beta_start,
        beta_end,
        beta_schedule,
        trained_betas,
        rescale_betas_zero_snr,
    )
}

/// `init_noise_sigma` of the k-diffusion samplers: the largest sigma with `linspace` and
/// `trailing` spacing, `sqrt(sigma_max^2 + 1)` with `leading` spacing.
pub fn k_init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// The model input of a k-diffusion sampler at noise level `sigma`: the sample scaled by
/// `c_in = 1 / sqrt(sigma^2 + 1)` (Karras et al. 2022, Table 1, VP column), so the model sees
/// unit variance as it did in training.
pub fn k_scale_model_input<T: SchedulerTensor>(sample: &T, sigma: f64) -> T {
    sample.scale(1.0 / (sigma * sigma + 1.0).sqrt())
}

/// Errors for `prediction_type = "sample"` in the k-diffusion classes that do not implement
/// it (Euler ancestral, KDPM2 and KDPM2 ancestral).
pub fn check_not_sample_prediction(class: &str, prediction_type: PredictionType) -> Result<()> {
    if prediction_type == PredictionType::Sample {
        return Err(Error::Unsupported(format!(
            "{class} does not implement prediction_type `sample`"
        )));
    }
    Ok(())
}

/// The clean-sample estimate `x0` of a k-diffusion sampler at noise level `sigma`
/// (Karras et al. 2022, Table 1, with `c_skip`, `c_out` of the VP parameterisation):
/// `x - sigma * eps` for epsilon, `-sigma / sqrt(sigma^2 + 1) * v + x / (sigma^2 + 1)`
/// for v-prediction, the output itself for sample prediction.
pub fn k_pred_x0<T: SchedulerTensor>(
    prediction_type: PredictionType,
    model_output: &T,
    sample: &T,
    sigma: f64,
) -> T {
    match prediction_type {
        PredictionType::Epsilon => T::lincomb(&[(1.0, sample), (-sigma, model_output)]),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            T::lincomb(&[(-sigma / s2.sqrt(), model_output), (1.0 / s2, sample)])
        }
        PredictionType::Sample => model_output.clone(),
    }
}

/// `add_noise` of the sigma-space samplers: `x = x0 + sigma * noise` with each batch
/// element's sigma found from its timestep ([`StepIndex::add_noise_indices`]); one timestep
/// noises the whole batch.
pub fn k_add_noise<T: SchedulerTensor>(
    original_samples: &T,
    noise: &T,
    timesteps: &[f64],
    schedule: &[f64],
    sigmas: &[f64],
    step_index: &StepIndex,
) -> Result<T> {
    check_same_shape(original_samples, noise)?;
    let indices = step_index.add_noise_indices(timesteps, schedule)?;
    let sigmas = add_noise_sigmas(sigmas, indices, batch_size(original_samples))?;
    Ok(original_samples.add(&noise.scale_batch(&sigmas)))
}

/// `torch.lerp(a.log(), b.log(), 0.5).exp()` as torch evaluates it (`end - (end - start)
/// * 0.5` at weight 0.5), including its infinities: the geometric mean of two sigmas, `0`
/// when `a` is 0, NaN when only `b` is 0. KDPM2's interpolated sigmas.
pub fn log_midpoint(a: f64, b: f64) -> f64 {
    let (start, end) = (a.ln(), b.ln());
    (end - (end - start) * 0.5).exp()
}

/// torch's `cat([x[:1], x[1:].repeat_interleave(2)])`: every entry after the first doubled
/// (the per-evaluation tables of the two-evaluation samplers, Heun's).
pub fn double_after_first(x: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(2 * x.len());
    if let Some((&first, rest)) = x.split_first() {
        out.push(first);
        out.extend(rest.iter().flat_map(|&v| [v, v]));
    }
    out
}

/// torch's `cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`: [`double_after_first`] with
/// the last entry once more (KDPM2's per-evaluation sigma tables).
pub fn repeat_after_first(x: &[f64]) -> Vec<f64> {
    let mut out = double_after_first(x);
    out.extend(x.last());
    out
}

/// Helpers of the samplers' unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    /// Integer timesteps as the `f64` the samplers use.
    pub fn ts(v: &[i64]) -> Vec<f64> {
        v.iter().map(|&t| t as f64).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaced_timesteps_match_diffusers() {
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Leading, 1000, 10, 1),
            vec![
                901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0
            ]
        );
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Trailing, 1000, 3, 0),
            vec![999.0, 666.0, 332.0]
        );
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Linspace, 1000, 4, 0),
            vec![999.0, 666.0, 333.0, 0.0]
        );
        // numpy: 19 elements (a naive `while v > 0` loop finds 20); 61: numpy finds 62, the
        // last being the bogus -1 that is dropped.
        for n in [19, 48, 61, 103] {
            let t = spaced_timesteps(TimestepSpacing::Trailing, 1000, n, 0);
            assert_eq!(t.len(), n, "{n}");
            assert_eq!(t[0], 999.0);
        }
        // np.round(np.arange(1000, 0, -1000/48)) - 1, element 3: numpy's fill rule lands
        // just below 937.5 (a naive `1000 - 3 * step` gives 937.5, rounding to 938).
        let t48 = spaced_timesteps(TimestepSpacing::Trailing, 1000, 48, 0);
        assert_eq!(t48[3], 936.0);
    }

    #[test]
    fn interp_matches_numpy() {
        let xp = [0.0, 1.0, 3.0];
        let fp = [10.0, 20.0, 40.0];
        assert_eq!(interp(-1.0, &xp, &fp), 10.0);
        assert_eq!(interp(2.0, &xp, &fp), 30.0);
        assert_eq!(interp(5.0, &xp, &fp), 40.0);
        assert_eq!(interp(1.0, &xp, &fp), 20.0);
    }

    #[test]
    fn beta_ppf_inverts_cdf() {
        for p in [0.01, 0.3, 0.5, 0.77, 0.999] {
            let x = beta_ppf(p, 0.6, 0.6);
            assert!((statrs::function::beta::beta_reg(0.6, 0.6, x) - p).abs() < 1e-12);
        }
        assert!((beta_ppf(0.5, 0.6, 0.6) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn np_round_is_half_even() {
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(3.5), 4.0);
        assert_eq!(np_round(-0.5), 0.0);
    }

    #[test]
    fn multistep_timesteps_match_diffusers() {
        // UniPC / DEIS / DPM-Solver defaults (values printed by diffusers 0.42.1).
        let lin = multistep_timesteps(TimestepSpacing::Linspace, 1000, 1000, 5, 0);
        assert_eq!(lin, vec![999.0, 799.0, 599.0, 400.0, 200.0]);
        let lead = multistep_timesteps(TimestepSpacing::Leading, 1000, 1000, 5, 1);
        assert_eq!(lead, vec![831.0, 665.0, 499.0, 333.0, 167.0]);
        let trail = multistep_timesteps(TimestepSpacing::Trailing, 1000, 1000, 3, 0);
        assert_eq!(trail, vec![999.0, 666.0, 332.0]);
        // numpy's arange yields 62 elements here, the last rounding to -1.
        let quirk = multistep_timesteps(TimestepSpacing::Trailing, 1000, 1000, 61, 0);
        assert_eq!(quirk.len(), 62);
        assert_eq!(*quirk.last().unwrap(), -1.0);
    }

    #[test]
    fn vp_lambda_is_half_log_snr() {
        let (a, s) = vp_alpha_sigma(0.5);
        assert!((a * a + s * s - 1.0).abs() < 1e-15);
        assert!((vp_lambda(0.5) - 2f64.ln()).abs() < 1e-15);
        assert_eq!(vp_lambda(0.0), f64::INFINITY);
    }
}

#[cfg(test)]
mod k_diffusion_tests {
    use super::*;

    #[test]
    fn k_spaced_timesteps_match_diffusers() {
        let lin = k_spaced_timesteps(TimestepSpacing::Linspace, 1000, 4, 0);
        assert_eq!(lin, vec![999.0, 666.0, 333.0, 0.0]);
        let lead = k_spaced_timesteps(TimestepSpacing::Leading, 1000, 4, 1);
        assert_eq!(lead, vec![751.0, 501.0, 251.0, 1.0]);
        let trail = k_spaced_timesteps(TimestepSpacing::Trailing, 1000, 3, 0);
        assert_eq!(trail, vec![999.0, 666.0, 332.0]);
        let quirk = k_spaced_timesteps(TimestepSpacing::Trailing, 1000, 61, 0);
        assert_eq!(quirk.len(), 62);
        assert_eq!(*quirk.last().unwrap(), -1.0);
    }

    #[test]
    fn log_midpoint_follows_torch_lerp() {
        assert!((log_midpoint(4.0, 1.0) - 2.0).abs() < 1e-15);
        assert_eq!(log_midpoint(0.0, 3.0), 0.0);
        assert!(log_midpoint(3.0, 0.0).is_nan());
        assert_eq!(
            repeat_after_first(&[1.0, 2.0, 0.0]),
            vec![1.0, 2.0, 2.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn step_index_lookup() {
        let schedule = [999.0, 500.0, 500.0, 0.0];
        let mut idx = StepIndex::default();
        assert_eq!(idx.current(500.0, &schedule).unwrap(), 2);
        idx.advance();
        assert_eq!(idx.current(0.0, &schedule).unwrap(), 3);
        assert_eq!(
            idx.add_noise_indices(&[999.0, 0.0], &schedule).unwrap(),
            vec![0, 3]
        );
        idx.reset();
        idx.begin = Some(1);
        assert_eq!(
            idx.add_noise_indices(&[0.0, 0.0], &schedule).unwrap(),
            vec![1, 1]
        );
        assert!(idx.current(7.0, &schedule).is_ok());
    }
}
