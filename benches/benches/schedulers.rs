//! `set_timesteps` and one `step` of every sampler on a [1, 4, 64, 64] latent
//! (the SD 1.x latent of a 512x512 image), on host `f64` arrays.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use diffusion_pipelines::core::{ConfigMap, HostTensor, SchedulerTensor, SeededNoise};
use diffusion_pipelines::schedulers::registry;
use std::hint::black_box;

fn sd15_config() -> ConfigMap {
    ConfigMap::parse(
        r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "steps_offset": 1, "num_train_timesteps": 1000}"#,
        "bench",
    )
    .expect("valid config")
}

fn bench(c: &mut Criterion) {
    let config = sd15_config();
    let shape = vec![1, 4, 64, 64];
    let n: usize = shape.iter().product();
    let mut noise = SeededNoise::new(0);
    let sample = HostTensor::new(
        diffusion_pipelines::core::NoiseSource::sample(&mut noise, &shape).unwrap(),
        shape.clone(),
    )
    .unwrap();
    let model_output = sample.scale(0.3);
    assert_eq!(sample.data().len(), n);

    let mut group = c.benchmark_group("set_timesteps(50)");
    for name in registry::CLASS_NAMES {
        let mut s = registry::from_config::<HostTensor>(name, &config).unwrap();
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| s.set_timesteps(black_box(50)).unwrap())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("step [1,4,64,64]");
    for name in registry::CLASS_NAMES {
        let s =
            std::cell::RefCell::new(registry::from_config::<HostTensor>(name, &config).unwrap());
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            // A fresh run per batch of iterations keeps multistep state realistic.
            b.iter_batched(
                || {
                    let mut s = s.borrow_mut();
                    s.set_timesteps(50).unwrap();
                    s.timesteps()[0]
                },
                |t| {
                    let mut s = s.borrow_mut();
                    let x = s.scale_model_input(&sample, t).unwrap();
                    black_box(s.step(&model_output, t, &x, &mut noise).unwrap());
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
