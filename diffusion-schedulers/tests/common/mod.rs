//! Helpers shared by the fixture-based integration tests (`parity.rs`, `schedules.rs`).

use std::path::Path;

use diffusion_core::config::replace_non_finite_tokens;
use serde::de::DeserializeOwned;

/// `err <= tol`, false for NaN.
pub fn within(err: f64, tol: f64) -> bool {
    err <= tol
}

/// Reads a fixture written by `scripts/scheduler_reference.py` (which writes Python's
/// `NaN` / `Infinity` tokens for non-finite numbers), panicking with the path on failure.
pub fn read_fixture<T: DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/scheduler_reference.py)",
            path.display()
        )
    });
    serde_json::from_str(&replace_non_finite_tokens(&text))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
