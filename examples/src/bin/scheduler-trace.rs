//! `scheduler-trace`: runs one sampler through the toy sampling loop of
//! `diffusion_schedulers::trace` and prints its trajectory.
//!
//! Reads ONE JSON object (a `TraceCase`: class, config, num_inference_steps or
//! timesteps / sigmas, shape, sample, optional eta and noise) on stdin and prints the
//! `TraceOutput` (timesteps, sigmas, init_noise_sigma, samples, final, noise_draws) as JSON
//! on stdout. Python's `NaN` / `Infinity` / `-Infinity` tokens are accepted in the input.
//! On bad input it prints a one-line error on stderr and exits with status 1.
//!
//! ```text
//! cargo run --release -p diffusion-examples --bin scheduler-trace < case.json
//! ```

use std::io::{Read, Write};
use std::process::ExitCode;

use diffusion_pipelines::schedulers::trace::{TraceCase, run_trace};

fn run() -> Result<String, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("reading stdin: {e}"))?;
    let case = TraceCase::from_json_str(&input).map_err(|e| e.to_string())?;
    let output = run_trace(&case).map_err(|e| e.to_string())?;
    serde_json::to_string(&output).map_err(|e| format!("writing the trace: {e}"))
}

fn main() -> ExitCode {
    match run() {
        Ok(json) => {
            let mut stdout = std::io::stdout().lock();
            if writeln!(stdout, "{json}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("scheduler-trace: {}", message.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
