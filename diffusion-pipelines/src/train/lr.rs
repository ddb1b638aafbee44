//! Learning-rate schedules: linear warm-up followed by a constant or cosine schedule.

use serde::{Deserialize, Serialize};

/// The shape of the learning rate after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Constant at the base rate.
    #[default]
    Constant,
    /// Half a cosine from the base rate down to zero at `total_steps`
    /// (Loshchilov & Hutter 2017, SGDR without restarts).
    Cosine,
}

/// Learning rate at optimizer step `step` (0-based): `base * min(1, (step + 1) / warmup)`,
/// times `0.5 * (1 + cos(pi * progress))` for the cosine schedule, where progress runs from 0
/// after warm-up to 1 at `total_steps`.
pub fn learning_rate(
    base: f64,
    schedule: LrSchedule,
    step: usize,
    warmup: usize,
    total_steps: usize,
) -> f64 {
    let warm = if warmup > 0 {
        ((step + 1) as f64 / warmup as f64).min(1.0)
    } else {
        1.0
    };
    let decay = match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Cosine => {
            if step < warmup || total_steps <= warmup {
                1.0
            } else {
                let progress = ((step - warmup) as f64 / (total_steps - warmup) as f64).min(1.0);
                0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    };
    base * warm * decay
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        assert!((learning_rate(1.0, LrSchedule::Constant, 0, 4, 100) - 0.25).abs() < 1e-12);
        assert_eq!(learning_rate(1.0, LrSchedule::Constant, 50, 4, 100), 1.0);
        assert_eq!(learning_rate(1.0, LrSchedule::Cosine, 4, 4, 104), 1.0);
        assert!((learning_rate(1.0, LrSchedule::Cosine, 54, 4, 104) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, LrSchedule::Cosine, 104, 4, 104).abs() < 1e-12);
    }
}
