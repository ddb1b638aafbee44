//! Parity with diffusers: every case of every fixture in `tests/fixtures/` (written by
//! `scripts/scheduler_reference.py` with diffusers 0.42.1) is run through
//! [`run_trace`] and compared with diffusers' trajectory.
//!
//! One test function per fixture file, so failures are separated by sampler. A failing test
//! lists every failing case by name with the quantity, the error and the tolerance. Run
//! `cargo test -p diffusion-schedulers --test parity -- --nocapture` to see the table of all
//! cases; set `PARITY_CASE=<substring>` to run only the cases whose name contains it.
//!
//! # Error measure and tolerances
//!
//! For arrays `a` (ours) and `b` (diffusers) the error is
//! `max|a - b| / max(1, max|b|)`, per sample after each step, then the largest over the run.
//!
//! Diffusers keeps its tables (`betas`, `alphas_cumprod`, `sigmas`, and for the k-diffusion
//! family the timesteps) in float32, and some samplers (Euler, Euler ancestral,
//! DPM-Solver multistep) round the sample itself to float32 inside `step`; our samplers
//! compute everything in f64. An exact f64 port therefore differs from diffusers by the
//! effect of diffusers' own float32 rounding, which depends on how much each run amplifies
//! it (from ~1e-7 for DDIM to ~2e-3 for a chaotic SDE run). The reference script measures
//! that effect per case: it re-runs diffusers with the scheduler module's float32 promoted
//! to float64 (the "float64 twin") on the same noise and stores the difference as
//! `f32_noise`. Each quantity's tolerance is
//!
//! ```text
//! tol = max(floor, 2 * f32_noise)
//! ```
//!
//! with `floor = 1e-6` for sigmas, `init_noise_sigma` and samples (the default where
//! diffusers computes in f64), and `floor = 1e-9` for timesteps: integer timesteps must
//! match exactly, and float32 timesteps (e.g. `linspace(0, 999, 20)` stored as float32)
//! are allowed just their measured float32 rounding. The factor 2 leaves room for our own
//! f64 rounding, which is amplified the same way: if ours equals the twin, the error equals
//! `f32_noise`. Tolerances are never tuned per sampler. The number of noise draws must match
//! exactly.
//!
//! Because a large `f32_noise` (a run that amplifies rounding) also widens the tolerance, the
//! final sample is in addition compared with the float64 twin's, to [`TWIN_TOL`]: an exact
//! f64 port agrees with it to rounding (observed: below 1e-14 for every case), so a real
//! difference cannot hide under diffusers' float32 effect. Cases where the twin itself
//! turned non-finite (a float64-only degenerate step, flagged by the script) skip this
//! check.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{read_fixture, within};
use diffusion_schedulers::trace::{TraceCase, TraceOutput, run_trace};
use serde::Deserialize;
use serde_json::Value;

const FIXTURE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
/// Floor of the sample / sigma tolerance: agreement expected where diffusers computes in f64.
const FLOOR: f64 = 1e-6;
/// Floor of the timestep tolerance: integer timesteps must be exact.
const TIMESTEP_FLOOR: f64 = 1e-9;
/// How far beyond diffusers' measured float32 effect our error may go (see module docs).
const F32_FACTOR: f64 = 2.0;
/// Tolerance of the final sample against diffusers run in float64 (the "twin"): f64
/// rounding, amplified by at most ~1e4 in the most sensitive runs, stays far below it.
const TWIN_TOL: f64 = 1e-9;

#[derive(Deserialize)]
struct Fixture {
    diffusers_version: String,
    class: String,
    cases: Vec<Value>,
}

#[derive(Deserialize)]
struct Expected {
    timesteps: Vec<f64>,
    timesteps_dtype: String,
    sigmas: Option<Vec<f64>>,
    init_noise_sigma: f64,
    samples: Vec<Vec<f64>>,
    #[serde(rename = "final")]
    final_sample: Vec<f64>,
    noise_draws: usize,
}

#[derive(Deserialize)]
struct F32Noise {
    timesteps: f64,
    sigmas: f64,
    init_noise_sigma: f64,
    samples: f64,
}

#[derive(Deserialize)]
struct ExpectedF64 {
    #[serde(rename = "final")]
    final_sample: Option<Vec<f64>>,
}

#[derive(Deserialize)]
struct CaseMeta {
    name: String,
    expected: Expected,
    f32_noise: F32Noise,
    expected_f64: ExpectedF64,
}

/// `max|a - b| / max(1, max|b|)`; infinite when the lengths differ or `a` has a NaN.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        if d.is_nan() {
            return f64::INFINITY;
        }
        worst = worst.max(d);
    }
    worst / scale
}

fn tol(floor: f64, f32_noise: f64) -> f64 {
    floor.max(F32_FACTOR * f32_noise)
}

/// The outcome of one case.
struct CaseReport {
    name: String,
    /// The largest sample error and its tolerance (for the summary table).
    sample_err: f64,
    sample_tol: f64,
    /// Error of our final sample against the float64 twin (diagnostic only).
    twin_err: Option<f64>,
    failures: Vec<String>,
}

fn fmt_list(v: &[f64]) -> String {
    let shown: Vec<String> = v.iter().take(12).map(|x| format!("{x}")).collect();
    let more = if v.len() > 12 {
        format!(", ... ({} in all)", v.len())
    } else {
        String::new()
    };
    format!("[{}{more}]", shown.join(", "))
}

fn compare(meta: &CaseMeta, out: &TraceOutput) -> CaseReport {
    let exp = &meta.expected;
    let noise = &meta.f32_noise;
    let mut failures = Vec::new();

    let t_tol = tol(TIMESTEP_FLOOR, noise.timesteps);
    let t_err = rel_err(&out.timesteps, &exp.timesteps);
    if !within(t_err, t_tol) {
        failures.push(format!(
            "timesteps ({}): err {t_err:.3e} > tol {t_tol:.1e}\n      ours     {}\n      diffusers {}",
            exp.timesteps_dtype,
            fmt_list(&out.timesteps),
            fmt_list(&exp.timesteps)
        ));
    }

    if let Some(exp_sigmas) = &exp.sigmas {
        let s_tol = tol(FLOOR, noise.sigmas);
        match &out.sigmas {
            None => failures.push("sigmas: diffusers has sigmas, ours returned None".into()),
            Some(ours) => {
                let s_err = rel_err(ours, exp_sigmas);
                if !within(s_err, s_tol) {
                    failures.push(format!(
                        "sigmas: err {s_err:.3e} > tol {s_tol:.1e}\n      ours     {}\n      diffusers {}",
                        fmt_list(ours),
                        fmt_list(exp_sigmas)
                    ));
                }
            }
        }
    }

    let i_tol = tol(FLOOR, noise.init_noise_sigma);
    let i_err = rel_err(&[out.init_noise_sigma], &[exp.init_noise_sigma]);
    if !within(i_err, i_tol) {
        failures.push(format!(
            "init_noise_sigma: ours {} vs diffusers {} (err {i_err:.3e} > tol {i_tol:.1e})",
            out.init_noise_sigma, exp.init_noise_sigma
        ));
    }

    if out.noise_draws != exp.noise_draws {
        failures.push(format!(
            "noise draws: ours {} vs diffusers {}",
            out.noise_draws, exp.noise_draws
        ));
    }

    let sample_tol = tol(FLOOR, noise.samples);
    let mut sample_err = 0.0f64;
    if out.samples.len() != exp.samples.len() {
        sample_err = f64::INFINITY;
        failures.push(format!(
            "samples: {} steps vs diffusers {}",
            out.samples.len(),
            exp.samples.len()
        ));
    } else {
        let mut first_bad = None;
        for (i, (a, b)) in out.samples.iter().zip(&exp.samples).enumerate() {
            let e = rel_err(a, b);
            if !within(e, sample_tol) && first_bad.is_none() {
                first_bad = Some((i, e));
            }
            sample_err = if e.is_nan() {
                f64::INFINITY
            } else {
                sample_err.max(e)
            };
        }
        if let Some((i, e)) = first_bad {
            let t = exp.timesteps.get(i).copied().unwrap_or(f64::NAN);
            failures.push(format!(
                "samples: max err {sample_err:.3e} > tol {sample_tol:.1e}; first bad step {i} of {} \
                 (diffusers t = {t}, err {e:.3e})\n      ours      {}\n      diffusers {}",
                exp.samples.len(),
                fmt_list(&out.samples[i]),
                fmt_list(&exp.samples[i])
            ));
        }
    }
    let final_err = rel_err(&out.final_sample, &exp.final_sample);
    if !within(final_err, sample_tol) && failures.is_empty() {
        failures.push(format!("final: err {final_err:.3e} > tol {sample_tol:.1e}"));
    }

    let twin_err = meta
        .expected_f64
        .final_sample
        .as_ref()
        .map(|twin| rel_err(&out.final_sample, twin));
    if let Some(e) = twin_err
        && !within(e, TWIN_TOL)
    {
        failures.push(format!(
            "final sample vs diffusers in float64: err {e:.3e} > tol {TWIN_TOL:.0e}"
        ));
    }
    CaseReport {
        name: meta.name.clone(),
        sample_err,
        sample_tol,
        twin_err,
        failures,
    }
}

fn load_fixture(file: &str) -> Fixture {
    read_fixture(&Path::new(FIXTURE_DIR).join(file))
}

fn check_fixture(file: &str) {
    let fixture = load_fixture(file);
    let filter = std::env::var("PARITY_CASE").ok();
    let mut reports = Vec::new();
    for value in &fixture.cases {
        let meta: CaseMeta = serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{file}: malformed case: {e}"));
        if filter
            .as_ref()
            .is_some_and(|f| !meta.name.contains(f.as_str()))
        {
            continue;
        }
        let case = TraceCase::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{file} / {}: bad trace case: {e}", meta.name));
        let report = match run_trace(&case) {
            Ok(out) => compare(&meta, &out),
            Err(e) => CaseReport {
                name: meta.name.clone(),
                sample_err: f64::INFINITY,
                sample_tol: tol(FLOOR, meta.f32_noise.samples),
                twin_err: None,
                failures: vec![format!("run_trace failed: {e}")],
            },
        };
        reports.push(report);
    }

    println!(
        "\n{file} ({}, diffusers {}): {} cases",
        fixture.class,
        fixture.diffusers_version,
        reports.len()
    );
    println!(
        "  {:<55} {:>10} {:>9} {:>10}  result",
        "case", "max err", "tol", "vs f64"
    );
    for r in &reports {
        let twin = r.twin_err.map_or("-".to_string(), |e| format!("{e:.2e}"));
        println!(
            "  {:<55} {:>10.2e} {:>9.1e} {:>10}  {}",
            r.name,
            r.sample_err,
            r.sample_tol,
            twin,
            if r.failures.is_empty() { "ok" } else { "FAIL" }
        );
    }
    let failed: Vec<&CaseReport> = reports.iter().filter(|r| !r.failures.is_empty()).collect();
    if !failed.is_empty() {
        let mut msg = format!(
            "{file} ({}): {} of {} cases differ from diffusers {}:\n",
            fixture.class,
            failed.len(),
            reports.len(),
            fixture.diffusers_version
        );
        for r in failed {
            msg.push_str(&format!("  case {:?}:\n", r.name));
            for f in &r.failures {
                msg.push_str(&format!("    {f}\n"));
            }
        }
        panic!("{msg}");
    }
}

macro_rules! parity_tests {
    ($($test:ident => $file:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check_fixture($file);
            }
        )*
        const FIXTURE_FILES: &[&str] = &[$($file),*];
    };
}

parity_tests! {
    ddim => "ddim.json",
    ddpm => "ddpm.json",
    pndm => "pndm.json",
    lcm => "lcm.json",
    tcd => "tcd.json",
    lms => "lms.json",
    euler => "euler.json",
    euler_ancestral => "euler_ancestral.json",
    heun => "heun.json",
    kdpm2 => "kdpm2.json",
    kdpm2_ancestral => "kdpm2_ancestral.json",
    dpm_solver_multistep => "dpm_solver_multistep.json",
    dpm_solver_singlestep => "dpm_solver_singlestep.json",
    unipc => "unipc.json",
    deis => "deis.json",
}

/// A fixture file without a test above would silently go unchecked.
#[test]
fn every_fixture_file_is_tested() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(FIXTURE_DIR)
        .expect("fixture directory")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && n != "schedules.json")
        .collect();
    let tested: BTreeSet<String> = FIXTURE_FILES.iter().map(|s| s.to_string()).collect();
    assert_eq!(on_disk, tested, "fixture files and parity tests differ");
}

/// The fixtures were recorded with the diffusers version this crate follows, and every
/// case names the fixture's class.
#[test]
fn fixtures_are_consistent() {
    for file in FIXTURE_FILES {
        let fixture = load_fixture(file);
        assert_eq!(fixture.diffusers_version, "0.42.1", "{file}");
        assert!(!fixture.cases.is_empty(), "{file}");
        let mut names = BTreeSet::new();
        for case in &fixture.cases {
            assert_eq!(case["class"], Value::from(fixture.class.as_str()), "{file}");
            let name = case["name"].as_str().expect("case name").to_string();
            assert!(
                names.insert(name.clone()),
                "{file}: duplicate case {name:?}"
            );
        }
    }
}

#[test]
fn error_measure() {
    assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert_eq!(rel_err(&[0.5], &[0.25]), 0.25);
    assert_eq!(rel_err(&[10.5], &[10.0]), 0.05);
    assert!(rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
    assert!(rel_err(&[f64::NAN], &[1.0]).is_infinite());
    assert_eq!(tol(1e-6, 1e-9), 1e-6);
    assert_eq!(tol(1e-6, 1e-5), 2e-5);
}

/// The harness itself: a slightly wrong sampler (beta_end off by 0.5%), a wrong option and a
/// skipped noise draw must all be reported.
#[test]
fn harness_detects_differences() {
    let fixture = load_fixture("ddim.json");
    let find = |name: &str| {
        fixture
            .cases
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("ddim.json has no case {name:?}"))
            .clone()
    };
    let value = find("beta_schedule=scaled_linear");
    let meta: CaseMeta = serde_json::from_value(value.clone()).unwrap();
    let mut case = TraceCase::from_value(value).unwrap();
    assert!(
        compare(&meta, &run_trace(&case).unwrap())
            .failures
            .is_empty()
    );
    case.config.insert("beta_end".into(), Value::from(0.01206));
    assert!(
        !compare(&meta, &run_trace(&case).unwrap())
            .failures
            .is_empty()
    );

    let value = find("default (full saved config)");
    let meta: CaseMeta = serde_json::from_value(value.clone()).unwrap();
    let mut case = TraceCase::from_value(value).unwrap();
    case.config
        .insert("timestep_spacing".into(), Value::from("trailing"));
    let report = compare(&meta, &run_trace(&case).unwrap());
    assert!(
        report.failures.iter().any(|f| f.starts_with("timesteps")),
        "{:?}",
        report.failures
    );

    let value = find("eta=1 (noise)");
    let meta: CaseMeta = serde_json::from_value(value.clone()).unwrap();
    let mut case = TraceCase::from_value(value).unwrap();
    assert!(meta.expected.noise_draws > 0);
    case.eta = Some(0.0);
    let report = compare(&meta, &run_trace(&case).unwrap());
    assert!(
        report.failures.iter().any(|f| f.starts_with("noise draws")),
        "{:?}",
        report.failures
    );
}
