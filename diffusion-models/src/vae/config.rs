//! `AutoencoderKLConfig`: the VAE's `vae/config.json`, with diffusers' defaults and presets.

use diffusion_core::{ConfigMap, Error, Result};
use serde::{Deserialize, Serialize};

use crate::nn::Activation;
use crate::unet::SampleSize;
use crate::unet::config::{null_as_default, number};

/// The configuration of an [`AutoencoderKL`](super::AutoencoderKL), as written in diffusers'
/// `vae/config.json`. Absent keys take diffusers' defaults; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Decoded image channels.
    pub out_channels: usize,
    /// Encoder blocks; only `DownEncoderBlock2D` is supported.
    pub down_block_types: Vec<String>,
    /// Decoder blocks; only `UpDecoderBlock2D` is supported.
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level (the image is downsampled `len - 1` times).
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Activation (`silu`, ...).
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Image size the VAE was trained at; the default tile size of tiled encode/decode.
    pub sample_size: SampleSize,
    /// Latents are multiplied by this factor before the U-Net sees them.
    #[serde(deserialize_with = "number")]
    pub scaling_factor: f64,
    /// Latents are shifted by this before scaling (SD3, Flux); `None` = 0.
    pub shift_factor: Option<f64>,
    /// Per-channel latent means (informational; used by some pipelines).
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviations (informational).
    pub latents_std: Option<Vec<f64>>,
    /// Whether the VAE must run in `f32` even in a half-precision pipeline.
    #[serde(deserialize_with = "null_as_default")]
    pub force_upcast: bool,
    /// Whether `quant_conv` exists (a 1x1 convolution on the moments).
    #[serde(deserialize_with = "null_as_default")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists (a 1x1 convolution on the latents).
    #[serde(deserialize_with = "null_as_default")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their self-attention layer.
    #[serde(deserialize_with = "null_as_default")]
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    /// diffusers' defaults (`AutoencoderKL.__init__`).
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: SampleSize::Square(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Reads the typed config from a parsed `config.json`.
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        let config: Self = map.deserialize("vae/config.json")?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::from_config_map(&ConfigMap::parse(text, "vae/config.json")?)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.block_out_channels.contains(&0) {
            return Err(Error::config(
                "block_out_channels",
                "must be a non-empty list of positive channel counts",
            ));
        }
        for (key, types, expected) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(Error::config(
                    key,
                    format!("has {} entries, block_out_channels has {n}", types.len()),
                ));
            }
            if let Some(other) = types.iter().find(|t| t.as_str() != expected) {
                return Err(Error::Unsupported(format!(
                    "VAE config: {key} entry `{other}` (supported: {expected})"
                )));
            }
        }
        if self.layers_per_block == 0 {
            return Err(Error::config("layers_per_block", "must be positive"));
        }
        if self.norm_num_groups == 0 {
            return Err(Error::config("norm_num_groups", "must be positive"));
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(Error::config(
                    "norm_num_groups",
                    format!("{} does not divide {c}", self.norm_num_groups),
                ));
            }
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err(Error::config(
                "latent_channels",
                "channel counts must be positive",
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(Error::config("scaling_factor", "must be a positive number"));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return Err(Error::config("shift_factor", "must be finite"));
        }
        Activation::from_name(&self.act_fn, "act_fn")?;
        Ok(())
    }

    /// The activation.
    pub fn activation(&self) -> Result<Activation> {
        Activation::from_name(&self.act_fn, "act_fn")
    }

    /// Spatial downsampling factor between image and latent (`2^(levels - 1)`).
    pub fn downsampling_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// `runwayml/stable-diffusion-v1-5`'s `vae/config.json` ([`SD_V1_5_VAE_JSON`]).
    pub fn sd_v1_5() -> Self {
        let four = |s: &str| vec![s.to_string(); 4];
        Self {
            down_block_types: four("DownEncoderBlock2D"),
            up_block_types: four("UpDecoderBlock2D"),
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: SampleSize::Square(512),
            ..Self::default()
        }
    }

    /// `stabilityai/stable-diffusion-xl-base-1.0`'s `vae/config.json`
    /// ([`SDXL_VAE_JSON`]): SD 1.5's architecture, trained at 1024 with scaling 0.13025.
    pub fn sdxl() -> Self {
        Self {
            sample_size: SampleSize::Square(1024),
            scaling_factor: 0.13025,
            ..Self::sd_v1_5()
        }
    }
}

/// `vae/config.json` of `runwayml/stable-diffusion-v1-5`, as published on the Hugging Face
/// Hub.
pub const SD_V1_5_VAE_JSON: &str = r#"{
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": [
    "DownEncoderBlock2D",
    "DownEncoderBlock2D",
    "DownEncoderBlock2D",
    "DownEncoderBlock2D"
  ],
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "up_block_types": [
    "UpDecoderBlock2D",
    "UpDecoderBlock2D",
    "UpDecoderBlock2D",
    "UpDecoderBlock2D"
  ]
}"#;

/// `vae/config.json` of `stabilityai/stable-diffusion-xl-base-1.0`, as published on the
/// Hugging Face Hub.
pub const SDXL_VAE_JSON: &str = r#"{
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.20.0.dev0",
  "_name_or_path": "../sdxl-vae/",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": [
    "DownEncoderBlock2D",
    "DownEncoderBlock2D",
    "DownEncoderBlock2D",
    "DownEncoderBlock2D"
  ],
  "force_upcast": true,
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 1024,
  "scaling_factor": 0.13025,
  "up_block_types": [
    "UpDecoderBlock2D",
    "UpDecoderBlock2D",
    "UpDecoderBlock2D",
    "UpDecoderBlock2D"
  ]
}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn presets_equal_the_published_configs() {
        assert_eq!(
            AutoencoderKLConfig::from_json(SD_V1_5_VAE_JSON).unwrap(),
            AutoencoderKLConfig::sd_v1_5()
        );
        assert_eq!(
            AutoencoderKLConfig::from_json(SDXL_VAE_JSON).unwrap(),
            AutoencoderKLConfig::sdxl()
        );
        assert_eq!(AutoencoderKLConfig::sd_v1_5().downsampling_factor(), 8);
    }

    #[test]
    fn bad_values_are_typed_errors() {
        let with = |key: &str, value: serde_json::Value| {
            let mut map = ConfigMap::parse(SD_V1_5_VAE_JSON, "test").unwrap();
            map.set(key, value);
            AutoencoderKLConfig::from_config_map(&map)
        };
        let err = with("down_block_types", json!(vec!["AttnDownEncoderBlock2D"; 4])).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
        for (key, value) in [
            ("block_out_channels", json!([128, 256])),
            ("norm_num_groups", json!(24)),
            ("scaling_factor", json!(0)),
            ("layers_per_block", json!(0)),
            ("act_fn", json!("nope")),
        ] {
            let err = with(key, value).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig { .. }), "{key}: {err}");
        }
        let config = with("shift_factor", json!(0.0609)).unwrap();
        assert_eq!(config.shift_factor, Some(0.0609));
        let config = with("use_quant_conv", json!(null)).unwrap();
        assert!(!config.use_quant_conv);
    }
}
