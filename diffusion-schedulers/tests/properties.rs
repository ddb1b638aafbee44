//! Property tests of the noise schedules and samplers.

use diffusion_core::{ConfigMap, HostTensor, NoNoise, SchedulerTensor};
use diffusion_schedulers::registry;
use diffusion_schedulers::{BetaSchedule, DdimConfig, DdimScheduler, NoiseSchedule, Scheduler};
use proptest::prelude::*;

fn beta_schedule() -> impl Strategy<Value = BetaSchedule> {
    prop_oneof![
        Just(BetaSchedule::Linear),
        Just(BetaSchedule::ScaledLinear),
        Just(BetaSchedule::SquaredcosCapV2),
        Just(BetaSchedule::Sigmoid),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// alpha_bar is strictly decreasing and stays inside (0, 1) for every schedule
    /// (without zero-terminal-SNR rescaling, which deliberately ends at 0).
    #[test]
    fn alphas_cumprod_strictly_decreasing_in_unit_interval(
        schedule in beta_schedule(),
        n in 2usize..2000,
        beta_start in 1e-5f64..1e-2,
        span in 1e-4f64..0.05,
    ) {
        let s = NoiseSchedule::new(n, beta_start, beta_start + span, schedule, None, false).unwrap();
        for w in s.alphas_cumprod.windows(2) {
            prop_assert!(w[1] < w[0], "{:?} not decreasing", w);
        }
        prop_assert!(s.alphas_cumprod.iter().all(|a| *a > 0.0 && *a < 1.0));
    }

    /// Noising x0 in closed form and inverting with the true noise recovers x0.
    #[test]
    fn add_noise_inverts_with_true_noise(
        schedule in beta_schedule(),
        t0 in 0usize..1000,
        t1 in 0usize..1000,
        values in proptest::collection::vec(-3.0f64..3.0, 8),
        noise_values in proptest::collection::vec(-3.0f64..3.0, 8),
    ) {
        let s = NoiseSchedule::new(1000, 0.00085, 0.012, schedule, None, false).unwrap();
        let x0 = HostTensor::new(values, vec![2, 4]).unwrap();
        let eps = HostTensor::new(noise_values, vec![2, 4]).unwrap();
        let ts = [t0 as f64, t1 as f64];
        let xt = s.add_noise(&x0, &eps, &ts).unwrap();
        let a: Vec<f64> = ts.iter().map(|&t| 1.0 / s.alpha_bar(t).unwrap().sqrt()).collect();
        let b: Vec<f64> = ts.iter().map(|&t| {
            let ab = s.alpha_bar(t).unwrap();
            -(1.0 - ab).sqrt() / ab.sqrt()
        }).collect();
        let back = xt.scale_batch(&a).add(&eps.scale_batch(&b));
        for (r, o) in back.data().iter().zip(x0.data()) {
            prop_assert!((r - o).abs() < 1e-6 * (1.0 + o.abs()), "{r} vs {o}");
        }
    }

    /// Every registered sampler's timesteps are strictly decreasing (per model evaluation
    /// for first-order samplers; second-order ones may repeat a timestep but never increase)
    /// and lie in [0, num_train_timesteps).
    #[test]
    fn timesteps_decrease_inside_training_range(
        steps in 1usize..60,
        spacing in prop_oneof![Just("leading"), Just("trailing"), Just("linspace")],
    ) {
        let mut config = ConfigMap::new();
        config.set("timestep_spacing", spacing);
        config.set("beta_schedule", "scaled_linear");
        config.set("beta_start", 0.00085);
        config.set("beta_end", 0.012);
        for name in registry::CLASS_NAMES {
            let mut s = registry::from_config::<HostTensor>(name, &config).unwrap();
            if let Err(e) = s.set_timesteps(steps) {
                // Known limits, as in diffusers: LCM/TCD cannot take more steps than their
                // distillation schedule (original_inference_steps = 50); PNDM's Runge-Kutta
                // warm-up needs at least 4 steps. Anything else must succeed.
                let allowed = matches!(*name, "LCMScheduler" | "TCDScheduler") && steps > 50
                    || *name == "PNDMScheduler" && steps < 4;
                prop_assert!(allowed, "{name} ({spacing}, {steps}): {e}");
                prop_assert!(matches!(e, diffusion_core::Error::InvalidArgument(_) | diffusion_core::Error::InvalidConfig { .. } | diffusion_core::Error::Unsupported(_)), "{name}: {e}");
                continue;
            }
            let ts = s.timesteps();
            prop_assert!(!ts.is_empty(), "{name}: no timesteps");
            prop_assert!(ts.iter().all(|&t| (0.0..1000.0).contains(&t)), "{name}: {ts:?}");
            if s.order() == 1 && !matches!(*name, "PNDMScheduler") {
                prop_assert!(ts.windows(2).all(|w| w[1] < w[0]), "{name} ({spacing}, {steps}): {ts:?}");
            } else {
                prop_assert!(ts.windows(2).all(|w| w[1] <= w[0]), "{name} ({spacing}, {steps}): {ts:?}");
            }
        }
    }

    /// Deterministic DDIM with the exact denoiser of a one-point data distribution
    /// (eps(x_t) = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t)) lands on that point.
    #[test]
    fn ddim_lands_on_a_point_mass(
        steps in 1usize..100,
        c in proptest::collection::vec(-2.0f64..2.0, 4),
        start in proptest::collection::vec(-3.0f64..3.0, 4),
    ) {
        let config = DdimConfig { clip_sample: false, ..DdimConfig::default() };
        let mut s = DdimScheduler::new(config).unwrap();
        Scheduler::<HostTensor>::set_timesteps(&mut s, steps).unwrap();
        let target = HostTensor::new(c, vec![1, 4]).unwrap();
        let mut x = HostTensor::new(start, vec![1, 4]).unwrap();
        for t in Scheduler::<HostTensor>::timesteps(&s).to_vec() {
            let ab = s.schedule().alpha_bar(t).unwrap();
            let eps = HostTensor::lincomb(&[
                (1.0 / (1.0 - ab).sqrt(), &x),
                (-ab.sqrt() / (1.0 - ab).sqrt(), &target),
            ]);
            x = s.step(&eps, t, &x, &mut NoNoise).unwrap().prev_sample;
        }
        for (a, b) in x.data().iter().zip(target.data()) {
            prop_assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
    }
}
