//! Beta schedules and the forward process against diffusers: `tests/fixtures/schedules.json`
//! (written by `scripts/scheduler_reference.py` from diffusers 0.42.1's `DDPMScheduler`)
//! holds `betas` / `alphas_cumprod` of every `beta_schedule` (linear, scaled_linear,
//! squaredcos_cap_v2, sigmoid), of a zero-terminal-SNR rescale and of a 100-step schedule,
//! plus `add_noise` / `get_velocity` of a batch with one timestep per element.
//!
//! # float32-aware tolerances
//!
//! diffusers computes these tables in float32 (we compute them in f64); the fixture stores
//! its float32 values in shortest form, so they are read back exactly by rounding to f32.
//! With `u = 2^-24` the float32 unit roundoff, the bounds are:
//!
//! - `betas`: `|ours - diffusers| <= 8u |diffusers|`: a float32 `linspace` (and for
//!   scaled_linear a square) plus the final rounding is a handful of roundings;
//!   squaredcos_cap_v2 is computed in f64 and rounded once.
//! - `alphas_cumprod[i]`: `<= (2(i + 1) + 8) u |diffusers|`: each of the `i + 1` factors
//!   `1 - beta` carries one rounding of its own and one inherited from its beta.
//! - With `rescale_betas_zero_snr` the rescale shifts `sqrt(alphas_cumprod)` by an absolute
//!   amount in float32, so `alphas_cumprod` also gets an absolute `16u`, and
//!   `beta_i = 1 - abar_i / abar_{i-1}` divides that by `abar_{i-1}`:
//!   `|d beta_i| <= 8u |beta_i| + 2 * 16u / abar_{i-1}` (with `abar_{-1} = 1`).
//! - `add_noise` / `get_velocity` (float64 samples, diffusers' float32 `alphas_cumprod`):
//!   `max(1e-12, 2 * measured)` where `measured` is the difference between diffusers and
//!   diffusers with float32 promoted to float64 (the "twin", as in the parity tests); in
//!   addition ours must equal the twin to 1e-12.

mod common;

use std::path::Path;

use common::{read_fixture, within};
use diffusion_core::{ConfigMap, HostTensor, SchedulerTensor};
use diffusion_schedulers::{BetaSchedule, NoiseSchedule, registry};
use serde::Deserialize;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schedules.json");
const U: f64 = 1.0 / 16_777_216.0; // 2^-24

#[derive(Deserialize)]
struct Fixture {
    diffusers_version: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: serde_json::Map<String, serde_json::Value>,
    shape: Vec<usize>,
    original_samples: Vec<f64>,
    noise: Vec<f64>,
    timesteps: Vec<i64>,
    expected: Expected,
    expected_f64: ExpectedF64,
}

#[derive(Deserialize)]
struct Expected {
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    add_noise: Vec<f64>,
    get_velocity: Vec<f64>,
}

#[derive(Deserialize)]
struct ExpectedF64 {
    add_noise: Vec<f64>,
    get_velocity: Vec<f64>,
}

#[derive(Deserialize)]
struct ScheduleKeys {
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: BetaSchedule,
    trained_betas: Option<Vec<f64>>,
    rescale_betas_zero_snr: bool,
}

fn load() -> Fixture {
    read_fixture(Path::new(FIXTURE))
}

fn schedule(case: &Case) -> NoiseSchedule {
    let k: ScheduleKeys = ConfigMap(case.config.clone())
        .deserialize(&case.name)
        .expect("schedule keys");
    NoiseSchedule::new(
        k.num_train_timesteps,
        k.beta_start,
        k.beta_end,
        k.beta_schedule,
        k.trained_betas.as_deref(),
        k.rescale_betas_zero_snr,
    )
    .expect("schedule")
}

fn rescaled(case: &Case) -> bool {
    case.config["rescale_betas_zero_snr"].as_bool() == Some(true)
}

/// diffusers' float32 value, recovered exactly from its shortest decimal form.
fn f32_value(v: f64) -> f64 {
    v as f32 as f64
}

/// `max|a - b| / max(1, max|b|)`, as in the parity tests.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn fixture_is_from_the_followed_diffusers() {
    let f = load();
    assert_eq!(f.diffusers_version, "0.42.1");
    let names: Vec<&str> = f.cases.iter().map(|c| c.name.as_str()).collect();
    for schedule in ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] {
        assert!(
            names.contains(&schedule),
            "{schedule} missing from {names:?}"
        );
    }
    assert!(f.cases.iter().any(rescaled));
}

#[test]
fn betas_and_alphas_cumprod_match_diffusers() {
    let mut failures = Vec::new();
    for case in load().cases {
        let ours = schedule(&case);
        let betas: Vec<f64> = case.expected.betas.iter().copied().map(f32_value).collect();
        let abar: Vec<f64> = case
            .expected
            .alphas_cumprod
            .iter()
            .copied()
            .map(f32_value)
            .collect();
        assert_eq!(ours.betas.len(), betas.len(), "{}", case.name);
        let zsnr = rescaled(&case);
        let mut worst_beta = 0.0f64;
        let mut worst_abar = 0.0f64;
        for i in 0..betas.len() {
            let abar_tol = (2.0 * (i + 1) as f64 + 8.0) * U * abar[i].abs()
                + if zsnr { 16.0 * U } else { 0.0 };
            // alphas_cumprod before step i (1 for the first step)
            let abar_prev = if i > 0 {
                ours.alphas_cumprod[i - 1]
            } else {
                1.0
            };
            let beta_tol = 8.0 * U * betas[i].abs() + if zsnr { 32.0 * U / abar_prev } else { 0.0 };
            let (db, da) = (
                (ours.betas[i] - betas[i]).abs(),
                (ours.alphas_cumprod[i] - abar[i]).abs(),
            );
            worst_beta = worst_beta.max(db / beta_tol.max(f64::MIN_POSITIVE));
            worst_abar = worst_abar.max(da / abar_tol.max(f64::MIN_POSITIVE));
            if !within(db, beta_tol) {
                failures.push(format!(
                    "{}: betas[{i}] ours {} vs diffusers {} (tol {beta_tol:.2e})",
                    case.name, ours.betas[i], betas[i]
                ));
            }
            if !within(da, abar_tol) {
                failures.push(format!(
                    "{}: alphas_cumprod[{i}] ours {} vs diffusers {} (tol {abar_tol:.2e})",
                    case.name, ours.alphas_cumprod[i], abar[i]
                ));
            }
        }
        println!(
            "{:<40} betas err/tol {worst_beta:.2}  alphas_cumprod err/tol {worst_abar:.2}",
            case.name
        );
    }
    assert!(
        failures.is_empty(),
        "{} table entries differ:\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn check_forward(
    what: &str,
    case: &Case,
    ours: &HostTensor,
    expected: &[f64],
    twin: &[f64],
) -> Option<String> {
    let measured = rel_err(expected, twin);
    let tol = (2.0 * measured).max(1e-12);
    let err = rel_err(ours.data(), expected);
    let twin_err = rel_err(ours.data(), twin);
    println!(
        "{:<40} {what:<12} err {err:.2e} (tol {tol:.1e})  vs f64 {twin_err:.2e}",
        case.name
    );
    if !(within(err, tol) && within(twin_err, 1e-12)) {
        return Some(format!(
            "{} {what}: err {err:.3e} (tol {tol:.1e}), vs float64 twin {twin_err:.3e} (tol 1e-12)",
            case.name
        ));
    }
    None
}

#[test]
fn add_noise_and_velocity_match_diffusers() {
    let mut failures = Vec::new();
    for case in load().cases {
        let s = schedule(&case);
        let x0 = HostTensor::new(case.original_samples.clone(), case.shape.clone()).unwrap();
        let noise = HostTensor::new(case.noise.clone(), case.shape.clone()).unwrap();
        let ts: Vec<f64> = case.timesteps.iter().map(|&t| t as f64).collect();
        let noisy = s.add_noise(&x0, &noise, &ts).unwrap();
        let v = s.get_velocity(&x0, &noise, &ts).unwrap();
        failures.extend(check_forward(
            "add_noise",
            &case,
            &noisy,
            &case.expected.add_noise,
            &case.expected_f64.add_noise,
        ));
        failures.extend(check_forward(
            "get_velocity",
            &case,
            &v,
            &case.expected.get_velocity,
            &case.expected_f64.get_velocity,
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same forward process through the registry's `DDPMScheduler` (the trait method the
/// training and image-to-image pipelines call).
#[test]
fn ddpm_scheduler_add_noise_matches_diffusers() {
    let mut failures = Vec::new();
    for case in load().cases {
        let scheduler =
            registry::from_config::<HostTensor>("DDPMScheduler", &ConfigMap(case.config.clone()))
                .expect("DDPMScheduler");
        let x0 = HostTensor::new(case.original_samples.clone(), case.shape.clone()).unwrap();
        let noise = HostTensor::new(case.noise.clone(), case.shape.clone()).unwrap();
        let ts: Vec<f64> = case.timesteps.iter().map(|&t| t as f64).collect();
        let noisy = scheduler.add_noise(&x0, &noise, &ts).unwrap();
        failures.extend(check_forward(
            "add_noise",
            &case,
            &noisy,
            &case.expected.add_noise,
            &case.expected_f64.add_noise,
        ));
        assert_eq!(noisy.shape(), case.shape);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
