//! Build samplers by diffusers class name or short name.
//!
//! [`from_config`] reads the keys it knows from any scheduler config and ignores the rest,
//! so a model's `scheduler_config.json` written for one class configures another, as
//! diffusers' `SomeScheduler.from_config(pipe.scheduler.config)` does. Short names may also
//! set keys (e.g. `dpm++2m-karras` sets `use_karras_sigmas`).

use diffusion_core::{ConfigMap, Error, Result, SchedulerTensor};
use serde_json::Value;

use crate::scheduler::Scheduler;

/// A short name: the class it builds and the config keys it sets.
struct ShortName {
    name: &'static str,
    class: &'static str,
    overrides: &'static [(&'static str, Override)],
}

#[derive(Clone, Copy)]
enum Override {
    Bool(bool),
    Str(&'static str),
    Int(i64),
}

impl From<Override> for Value {
    fn from(o: Override) -> Value {
        match o {
            Override::Bool(b) => Value::Bool(b),
            Override::Str(s) => Value::String(s.to_string()),
            Override::Int(i) => Value::from(i),
        }
    }
}

use Override::{Bool, Int, Str};

const SHORT_NAMES: &[ShortName] = &[
    ShortName {
        name: "ddim",
        class: "DDIMScheduler",
        overrides: &[],
    },
    ShortName {
        name: "ddpm",
        class: "DDPMScheduler",
        overrides: &[],
    },
    ShortName {
        name: "pndm",
        class: "PNDMScheduler",
        overrides: &[],
    },
    ShortName {
        name: "plms",
        class: "PNDMScheduler",
        overrides: &[("skip_prk_steps", Bool(true))],
    },
    ShortName {
        name: "lcm",
        class: "LCMScheduler",
        overrides: &[],
    },
    ShortName {
        name: "tcd",
        class: "TCDScheduler",
        overrides: &[],
    },
    ShortName {
        name: "dpm++2m",
        class: "DPMSolverMultistepScheduler",
        overrides: &[],
    },
    ShortName {
        name: "dpm++2m-karras",
        class: "DPMSolverMultistepScheduler",
        overrides: &[("use_karras_sigmas", Bool(true))],
    },
    ShortName {
        name: "dpm++2m-sde",
        class: "DPMSolverMultistepScheduler",
        overrides: &[("algorithm_type", Str("sde-dpmsolver++"))],
    },
    ShortName {
        name: "dpm++2m-sde-karras",
        class: "DPMSolverMultistepScheduler",
        overrides: &[
            ("algorithm_type", Str("sde-dpmsolver++")),
            ("use_karras_sigmas", Bool(true)),
        ],
    },
    ShortName {
        name: "dpm++3m",
        class: "DPMSolverMultistepScheduler",
        overrides: &[("solver_order", Int(3))],
    },
    ShortName {
        name: "dpm-solver",
        class: "DPMSolverMultistepScheduler",
        overrides: &[
            ("algorithm_type", Str("dpmsolver")),
            ("final_sigmas_type", Str("sigma_min")),
        ],
    },
    ShortName {
        name: "dpm++2s",
        class: "DPMSolverSinglestepScheduler",
        overrides: &[("solver_order", Int(2))],
    },
    ShortName {
        name: "dpm++2s-karras",
        class: "DPMSolverSinglestepScheduler",
        overrides: &[("solver_order", Int(2)), ("use_karras_sigmas", Bool(true))],
    },
    ShortName {
        name: "dpm++-singlestep",
        class: "DPMSolverSinglestepScheduler",
        overrides: &[],
    },
    ShortName {
        name: "unipc",
        class: "UniPCMultistepScheduler",
        overrides: &[],
    },
    ShortName {
        name: "unipc-karras",
        class: "UniPCMultistepScheduler",
        overrides: &[("use_karras_sigmas", Bool(true))],
    },
    ShortName {
        name: "unipc-bh1",
        class: "UniPCMultistepScheduler",
        overrides: &[("solver_type", Str("bh1"))],
    },
    ShortName {
        name: "deis",
        class: "DEISMultistepScheduler",
        overrides: &[],
    },
    ShortName {
        name: "deis-karras",
        class: "DEISMultistepScheduler",
        overrides: &[("use_karras_sigmas", Bool(true))],
    },
    ShortName {
        name: "lms",
        class: "LMSDiscreteScheduler",
        overrides: &[],
    },
    ShortName {
        name: "lms-karras",
        class: "LMSDiscreteScheduler",
        overrides: &[("use_karras_sigmas", Bool(true))],
    },
    ShortName {
        name: "euler",
        class: "EulerDiscreteScheduler",
        overrides: &[],
    },
    ShortName {
        name: "euler-karras",
        class: "EulerDiscreteScheduler",
        overrides: &[("use_karras_sigmas", Bool(true))],
    },
    ShortName {
        name: "euler-a",
        class: "EulerAncestralDiscreteScheduler",
        overrides: &[],
    },
    ShortName {
        name: "euler-ancestral",
        class: "EulerAncestralDiscreteScheduler",
        overrides: &[],
    },
    ShortName {
        name: "heun",
        class: "HeunDiscreteScheduler",
        overrides: &[],
    },
    ShortName {
        name: "heun-karras",
        class: "HeunDiscreteScheduler",
        overrides: &[("use_karras_sigmas", Bool(true))],
    },
    ShortName {
        name: "dpm2",
        class: "KDPM2DiscreteScheduler",
        overrides: &[],
    },
    ShortName {
        name: "dpm2-karras",
        class: "KDPM2DiscreteScheduler",
        overrides: &[("use_karras_sigmas", Bool(true))],
    },
    ShortName {
        name: "dpm2-a",
        class: "KDPM2AncestralDiscreteScheduler",
        overrides: &[],
    },
    ShortName {
        name: "dpm2-a-karras",
        class: "KDPM2AncestralDiscreteScheduler",
        overrides: &[("use_karras_sigmas", Bool(true))],
    },
];

/// The diffusers class names this crate implements.
pub const CLASS_NAMES: &[&str] = &[
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
];

/// Every accepted short name.
pub fn short_names() -> impl Iterator<Item = &'static str> {
    SHORT_NAMES.iter().map(|s| s.name)
}

fn known_names() -> String {
    CLASS_NAMES
        .iter()
        .copied()
        .chain(short_names())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves `name` (a class name or short name, case-insensitive) to its class and the
/// config keys the name sets.
pub fn resolve(name: &str) -> Result<(&'static str, Vec<(&'static str, Value)>)> {
    let lower = name.trim().to_ascii_lowercase();
    if let Some(class) = CLASS_NAMES.iter().find(|c| c.to_ascii_lowercase() == lower) {
        return Ok((class, Vec::new()));
    }
    let normalized = lower.replace('_', "-");
    if let Some(s) = SHORT_NAMES.iter().find(|s| s.name == normalized) {
        let overrides = s
            .overrides
            .iter()
            .map(|(k, v)| (*k, Value::from(*v)))
            .collect();
        return Ok((s.class, overrides));
    }
    Err(Error::UnknownScheduler {
        name: name.to_string(),
        known: known_names(),
    })
}

/// Builds the sampler `name` from a scheduler config map.
pub fn from_config<T: SchedulerTensor + 'static>(
    name: &str,
    config: &ConfigMap,
) -> Result<Box<dyn Scheduler<T>>> {
    let (class, overrides) = resolve(name)?;
    let mut map = config.clone();
    for (k, v) in overrides {
        map.set(k, v);
    }
    build(class, &map)
}

/// Builds the sampler named by the config's own `_class_name`.
pub fn from_class_config<T: SchedulerTensor + 'static>(
    config: &ConfigMap,
) -> Result<Box<dyn Scheduler<T>>> {
    let class = config.class_name().ok_or_else(|| {
        Error::config(
            "_class_name",
            "missing: the config does not name its scheduler class",
        )
    })?;
    from_config(class, config)
}

fn build<T: SchedulerTensor + 'static>(
    class: &str,
    map: &ConfigMap,
) -> Result<Box<dyn Scheduler<T>>> {
    use crate::*;
    Ok(match class {
        "DDIMScheduler" => Box::new(DdimScheduler::from_config_map(map)?),
        "DDPMScheduler" => Box::new(ddpm::DdpmScheduler::from_config_map(map)?),
        "PNDMScheduler" => Box::new(pndm::PndmScheduler::<T>::from_config_map(map)?),
        "LCMScheduler" => Box::new(lcm::LcmScheduler::from_config_map(map)?),
        "TCDScheduler" => Box::new(tcd::TcdScheduler::from_config_map(map)?),
        "DPMSolverMultistepScheduler" => {
            Box::new(dpm_solver_multistep::DpmSolverMultistepScheduler::<T>::from_config_map(map)?)
        }
        "DPMSolverSinglestepScheduler" => Box::new(
            dpm_solver_singlestep::DpmSolverSinglestepScheduler::<T>::from_config_map(map)?,
        ),
        "UniPCMultistepScheduler" => {
            Box::new(unipc::UniPcMultistepScheduler::<T>::from_config_map(map)?)
        }
        "DEISMultistepScheduler" => {
            Box::new(deis::DeisMultistepScheduler::<T>::from_config_map(map)?)
        }
        "LMSDiscreteScheduler" => Box::new(lms::LmsDiscreteScheduler::<T>::from_config_map(map)?),
        "EulerDiscreteScheduler" => Box::new(euler::EulerDiscreteScheduler::from_config_map(map)?),
        "EulerAncestralDiscreteScheduler" => {
            Box::new(euler_ancestral::EulerAncestralDiscreteScheduler::from_config_map(map)?)
        }
        "HeunDiscreteScheduler" => {
            Box::new(heun::HeunDiscreteScheduler::<T>::from_config_map(map)?)
        }
        "KDPM2DiscreteScheduler" => {
            Box::new(kdpm2::Kdpm2DiscreteScheduler::<T>::from_config_map(map)?)
        }
        "KDPM2AncestralDiscreteScheduler" => {
            Box::new(kdpm2_ancestral::Kdpm2AncestralDiscreteScheduler::<T>::from_config_map(map)?)
        }
        other => {
            return Err(Error::UnknownScheduler {
                name: other.to_string(),
                known: known_names(),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::HostTensor;

    #[test]
    fn unknown_names_are_typed_errors() {
        let err = from_config::<HostTensor>("warp-drive", &ConfigMap::new())
            .err()
            .unwrap();
        assert!(matches!(err, Error::UnknownScheduler { .. }), "{err}");
    }

    #[test]
    fn every_name_builds() {
        for name in CLASS_NAMES.iter().copied().chain(short_names()) {
            let s = from_config::<HostTensor>(name, &ConfigMap::new())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!s.name().is_empty());
        }
    }
}
