//! Helpers shared by the benchmark binaries (`src/bin`); the criterion benchmarks live in
//! `benches/`.

use std::time::Instant;

/// Runs `f` once as a warm-up, timed on its own (GPU backends compile kernels on first
/// use), then `iters` times; returns (first call, mean, standard deviation) in
/// milliseconds.
pub fn time<F: FnMut()>(iters: usize, mut f: F) -> (f64, f64, f64) {
    let t0 = Instant::now();
    f();
    let first = t0.elapsed().as_secs_f64() * 1e3;
    let mut samples = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / samples.len().max(1) as f64;
    (first, mean, var.sqrt())
}
