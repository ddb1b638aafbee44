//! `UNet2DConfig`: the `unet/config.json` of a pixel-space U-Net (diffusers' `UNet2DModel`),
//! with diffusers' defaults and validation.

use diffusion_core::{ConfigMap, Error, Result};
use serde::{Deserialize, Serialize};

use crate::nn::{Activation, TimeEmbeddingNorm};
use crate::unet::SampleSize;
use crate::unet::config::{null_as_default, number};

/// The configuration of a [`UNet2DModel`](super::UNet2DModel), as written in diffusers'
/// `config.json` for `UNet2DModel` (e.g. `google/ddpm-cifar10-32`).
///
/// Every key of diffusers' `UNet2DModel.__init__` is read, with diffusers' default when
/// absent; unknown keys (`_class_name`, ...) are ignored. Values this crate does not implement
/// (skip blocks, `"spatial"` time-scale shift, ...) are rejected by
/// [`validate`](Self::validate) with [`Error::Unsupported`], never ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConfig {
    /// Default sample height/width; the pipelines generate at this size.
    pub sample_size: Option<SampleSize>,
    /// Channels of the input sample.
    pub in_channels: usize,
    /// Channels of the output (twice `in_channels` for learned-variance checkpoints).
    pub out_channels: usize,
    /// Maps the input from `[0, 1]` to `[-1, 1]` first (`2 x - 1`).
    pub center_input_sample: bool,
    /// `"positional"` (sinusoidal), `"fourier"` (Gaussian Fourier features of `log t`; the
    /// output is divided by `t`) or `"learned"` (an embedding table over integer timesteps).
    pub time_embedding_type: String,
    /// Width of the time embedding (default `4 * block_out_channels[0]`).
    pub time_embedding_dim: Option<usize>,
    /// `downscale_freq_shift` of the sinusoidal embedding.
    #[serde(deserialize_with = "number")]
    pub freq_shift: f64,
    /// Cosines first in the sinusoidal embedding.
    pub flip_sin_to_cos: bool,
    /// `DownBlock2D` or `AttnDownBlock2D`, one per resolution (a `UNetRes` prefix is
    /// accepted, as diffusers strips it).
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2D` or `null` (no mid block).
    pub mid_block_type: Option<String>,
    /// `UpBlock2D` or `AttnUpBlock2D`, one per resolution (lowest first).
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// `output_scale_factor` of the mid block's ResNets and attention.
    #[serde(deserialize_with = "number")]
    pub mid_block_scale_factor: f64,
    /// Padding of the downsampling convolutions (`0`: one row/column at the bottom/right).
    pub downsample_padding: usize,
    /// How `AttnDownBlock2D` downsamples: `"conv"` (stride-2 convolution) or `"resnet"` (a
    /// ResNet with 2x2 average pooling). `DownBlock2D` always uses a convolution.
    #[serde(deserialize_with = "null_as_default")]
    pub downsample_type: String,
    /// How `AttnUpBlock2D` upsamples: `"conv"` (nearest 2x then a convolution) or `"resnet"`
    /// (a ResNet with nearest 2x). `UpBlock2D` always uses a convolution.
    #[serde(deserialize_with = "null_as_default")]
    pub upsample_type: String,
    /// Dropout probability (training only).
    #[serde(deserialize_with = "number")]
    pub dropout: f64,
    /// Activation of the ResNets (`silu`, `swish`, `mish`, `gelu`, `relu`); the time
    /// embedding and the output always use SiLU, as in diffusers.
    pub act_fn: String,
    /// Width of one attention head (`null`: one head over all channels). Unlike
    /// `UNet2DConditionModel`, this really is the head width: `heads = channels / dim`.
    pub attention_head_dim: Option<usize>,
    /// Groups of every group norm.
    pub norm_num_groups: Option<usize>,
    /// Groups of the mid block attention's group norm (default: `norm_num_groups` with
    /// `resnet_time_scale_shift: "default"`, no group norm with `"scale_shift"`).
    pub attn_norm_num_groups: Option<usize>,
    /// Epsilon of every group norm.
    #[serde(deserialize_with = "number")]
    pub norm_eps: f64,
    /// `"default"` or `"scale_shift"`.
    pub resnet_time_scale_shift: String,
    /// Whether the mid block has its self-attention.
    pub add_attention: bool,
    /// `null` (an `nn.Embedding` when `num_class_embeds` is set), `"timestep"` (labels
    /// embedded like timesteps) or `"identity"` (labels are `time_embed_dim`-wide vectors).
    pub class_embed_type: Option<String>,
    /// Number of classes of the class embedding table.
    pub num_class_embeds: Option<usize>,
    /// Size of the `"learned"` time embedding table.
    pub num_train_timesteps: Option<usize>,
}

impl Default for UNet2DConfig {
    /// diffusers' defaults (`UNet2DModel.__init__`).
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: strings(&[
                "DownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2D".into()),
            up_block_types: strings(&[
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "UpBlock2D",
            ]),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: Some(32),
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

fn unsupported<T>(what: String) -> Result<T> {
    Err(Error::Unsupported(format!("UNet2DModel: {what}")))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// How timesteps are turned into the input of the time-embedding MLP (`time_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingType {
    /// Sinusoidal features (`Timesteps`), `block_out_channels[0]` wide.
    Positional,
    /// `GaussianFourierProjection(block_out_channels[0], scale 16)`: `[sin, cos]` of
    /// `2 pi log(t) w`, `2 * block_out_channels[0]` wide; the model output is divided by `t`.
    Fourier,
    /// An `nn.Embedding(num_train_timesteps, block_out_channels[0])` over integer timesteps.
    Learned(usize),
}

/// The class-conditioning input layer of a [`UNet2DModel`](super::UNet2DModel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UNet2DClassEmbedding {
    /// `nn.Embedding(num_class_embeds, time_embed_dim)` on integer labels.
    Embedding(usize),
    /// `"timestep"`: the labels go through `time_proj`, then a `TimestepEmbedding` MLP.
    Timestep,
    /// `"identity"`: the labels are already `time_embed_dim`-wide vectors.
    Identity,
}

/// How a block changes resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerType {
    /// A (strided or following) 3x3 convolution: `Downsample2D` / `Upsample2D`.
    Conv,
    /// A `ResnetBlock2D` resampling between its first norm and first convolution.
    Resnet,
}

/// The validated, per-block form of a [`UNet2DConfig`], from which the model is built.
#[derive(Debug, Clone, PartialEq)]
pub struct UNet2DPlan {
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Whether each down block has attention (`AttnDownBlock2D`).
    pub down_attention: Vec<bool>,
    /// Whether each up block has attention (`AttnUpBlock2D`), lowest resolution first.
    pub up_attention: Vec<bool>,
    /// Downsampler kind of each down block (`None` for the last).
    pub down_samplers: Vec<Option<SamplerType>>,
    /// Upsampler kind of each up block (`None` for the last).
    pub up_samplers: Vec<Option<SamplerType>>,
    /// Whether there is a mid block.
    pub mid_block: bool,
    /// Groups of the mid block attention's group norm (`None`: no group norm).
    pub mid_attention_groups: Option<usize>,
    /// Group-norm groups.
    pub norm_num_groups: usize,
    /// ResNet activation.
    pub act: Activation,
    /// ResNet time-embedding mode.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// Time projection.
    pub time_embedding_type: TimeEmbeddingType,
    /// Width of the time projection (the MLP's input).
    pub time_proj_dim: usize,
    /// Width of the time embedding.
    pub time_embed_dim: usize,
    /// The class embedding, if any.
    pub class_embed: Option<UNet2DClassEmbedding>,
}

impl UNet2DConfig {
    /// Reads the typed config from a parsed `config.json`.
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        let config: Self = map.deserialize("unet/config.json")?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::from_config_map(&ConfigMap::parse(text, "unet/config.json")?)
    }

    /// Reads and validates a `config.json` file.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::from_config_map(&ConfigMap::from_file(path)?)
    }

    /// Checks every value, returning the first bad or unsupported one.
    pub fn validate(&self) -> Result<()> {
        self.plan().map(|_| ())
    }

    /// Width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// `[height, width]` of the samples the model was trained on, if the config says.
    pub fn sample_dims(&self) -> Option<[usize; 2]> {
        self.sample_size.map(|s| s.dims())
    }

    /// Validates the config and resolves every per-block value.
    pub fn plan(&self) -> Result<UNet2DPlan> {
        let channels = &self.block_out_channels;
        let n = channels.len();
        if n == 0 {
            return Err(Error::config("block_out_channels", "must not be empty"));
        }
        if channels.contains(&0) {
            return Err(Error::config(
                "block_out_channels",
                "channel counts must be positive",
            ));
        }
        for (key, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            if len != n {
                return Err(Error::config(
                    key,
                    format!("has {len} entries, block_out_channels has {n}"),
                ));
            }
        }
        if self.in_channels == 0 {
            return Err(Error::config("in_channels", "must be positive"));
        }
        if self.out_channels == 0 {
            return Err(Error::config("out_channels", "must be positive"));
        }
        if self.layers_per_block == 0 {
            return Err(Error::config("layers_per_block", "must be positive"));
        }
        if let Some(SampleSize::Square(0)) | Some(SampleSize::HeightWidth([0, _] | [_, 0])) =
            self.sample_size
        {
            return Err(Error::config("sample_size", "must be positive"));
        }

        let strip = |t: &str| t.strip_prefix("UNetRes").unwrap_or(t).to_string();
        let down_attention = self
            .down_block_types
            .iter()
            .map(|t| match strip(t).as_str() {
                "DownBlock2D" => Ok(false),
                "AttnDownBlock2D" => Ok(true),
                _ => unsupported(format!(
                    "down block type `{t}` (supported: DownBlock2D, AttnDownBlock2D)"
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_attention = self
            .up_block_types
            .iter()
            .map(|t| match strip(t).as_str() {
                "UpBlock2D" => Ok(false),
                "AttnUpBlock2D" => Ok(true),
                _ => unsupported(format!(
                    "up block type `{t}` (supported: UpBlock2D, AttnUpBlock2D)"
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let sampler = |key: &str, value: &str| match value {
            "" | "conv" => Ok(SamplerType::Conv),
            "resnet" => Ok(SamplerType::Resnet),
            other => Err(Error::config(
                key,
                format!("`{other}` (expected conv or resnet)"),
            )),
        };
        let down_kind = sampler("downsample_type", &self.downsample_type)?;
        let up_kind = sampler("upsample_type", &self.upsample_type)?;
        // Only the attention blocks read downsample_type / upsample_type.
        let down_samplers = (0..n)
            .map(|i| {
                (i + 1 < n).then_some(if down_attention[i] {
                    down_kind
                } else {
                    SamplerType::Conv
                })
            })
            .collect();
        let up_samplers = (0..n)
            .map(|i| {
                (i + 1 < n).then_some(if up_attention[i] {
                    up_kind
                } else {
                    SamplerType::Conv
                })
            })
            .collect();

        let mid_block = match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2D") => true,
            None => false,
            Some(other) => {
                return unsupported(format!(
                    "mid block type `{other}` (supported: UNetMidBlock2D, null)"
                ));
            }
        };

        let time_embedding_norm = match self.resnet_time_scale_shift.as_str() {
            "default" => TimeEmbeddingNorm::Default,
            "scale_shift" => TimeEmbeddingNorm::ScaleShift,
            other => {
                return unsupported(format!(
                    "resnet_time_scale_shift `{other}` (supported: default, scale_shift)"
                ));
            }
        };
        let Some(norm_num_groups) = self.norm_num_groups else {
            return unsupported("norm_num_groups = null".into());
        };
        if norm_num_groups == 0 {
            return Err(Error::config("norm_num_groups", "must be positive"));
        }
        if let Some(&c) = channels
            .iter()
            .find(|&&c| !c.is_multiple_of(norm_num_groups))
        {
            return Err(Error::config(
                "norm_num_groups",
                format!("{norm_num_groups} groups do not divide {c} channels"),
            ));
        }
        let last = channels[n - 1];
        let mid_attention_groups = match (self.attn_norm_num_groups, time_embedding_norm) {
            (Some(0), _) => return Err(Error::config("attn_norm_num_groups", "must be positive")),
            (Some(g), _) if !last.is_multiple_of(g) => {
                return Err(Error::config(
                    "attn_norm_num_groups",
                    format!("{g} groups do not divide {last} channels"),
                ));
            }
            (Some(g), _) => Some(g),
            (None, TimeEmbeddingNorm::Default) => Some(norm_num_groups),
            (None, TimeEmbeddingNorm::ScaleShift) => None,
        };
        if let Some(d) = self.attention_head_dim {
            let attention_channels = channels
                .iter()
                .enumerate()
                .filter(|&(i, _)| down_attention[i] || up_attention[n - 1 - i])
                .map(|(_, &c)| c)
                .chain((mid_block && self.add_attention).then_some(last));
            if d == 0 {
                return Err(Error::config("attention_head_dim", "must be positive"));
            }
            if let Some(c) = attention_channels.into_iter().find(|&c| c < d) {
                return Err(Error::config(
                    "attention_head_dim",
                    format!("{d} is wider than an attention layer's {c} channels (no heads)"),
                ));
            }
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return Err(Error::config("norm_eps", "must be positive and finite"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config("dropout", "must lie in [0, 1)"));
        }
        if !(self.mid_block_scale_factor.is_finite() && self.mid_block_scale_factor != 0.0) {
            return Err(Error::config(
                "mid_block_scale_factor",
                "must be finite and non-zero",
            ));
        }
        if !self.freq_shift.is_finite() {
            return Err(Error::config("freq_shift", "must be finite"));
        }
        let act = Activation::from_name(&self.act_fn, "act_fn")?;

        let c0 = channels[0];
        let (time_embedding_type, time_proj_dim) = match self.time_embedding_type.as_str() {
            "positional" => {
                if c0 / 2 > 0 && (c0 / 2) as f64 == self.freq_shift {
                    return Err(Error::config(
                        "freq_shift",
                        format!(
                            "a sinusoidal embedding of width {c0} with freq_shift {} divides by \
                             zero",
                            self.freq_shift
                        ),
                    ));
                }
                (TimeEmbeddingType::Positional, c0)
            }
            "fourier" => (TimeEmbeddingType::Fourier, 2 * c0),
            "learned" => match self.num_train_timesteps {
                Some(t) if t > 0 => (TimeEmbeddingType::Learned(t), c0),
                _ => {
                    return Err(Error::config(
                        "num_train_timesteps",
                        "a positive count is needed for time_embedding_type `learned`",
                    ));
                }
            },
            other => {
                return unsupported(format!(
                    "time_embedding_type `{other}` (supported: positional, fourier, learned)"
                ));
            }
        };
        let time_embed_dim = self.time_embed_dim();
        if time_embed_dim == 0 {
            return Err(Error::config("time_embedding_dim", "must be positive"));
        }
        let class_embed = match (self.class_embed_type.as_deref(), self.num_class_embeds) {
            (None, None) => None,
            (None, Some(0)) => return Err(Error::config("num_class_embeds", "must be positive")),
            (None, Some(classes)) => Some(UNet2DClassEmbedding::Embedding(classes)),
            (Some("timestep"), _) => Some(UNet2DClassEmbedding::Timestep),
            (Some("identity"), _) => Some(UNet2DClassEmbedding::Identity),
            (Some(other), _) => {
                return unsupported(format!(
                    "class_embed_type `{other}` (UNet2DModel knows null, timestep, identity)"
                ));
            }
        };

        Ok(UNet2DPlan {
            block_out_channels: channels.clone(),
            down_attention,
            up_attention,
            down_samplers,
            up_samplers,
            mid_block,
            mid_attention_groups,
            norm_num_groups,
            act,
            time_embedding_norm,
            time_embedding_type,
            time_proj_dim,
            time_embed_dim,
            class_embed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// google/ddpm-cifar10-32's `unet/config.json` (diffusers 0.x writes these keys).
    const DDPM_CIFAR10: &str = r#"{
        "_class_name": "UNet2DModel",
        "_diffusers_version": "0.1.1",
        "act_fn": "silu",
        "attention_head_dim": null,
        "block_out_channels": [128, 256, 256, 256],
        "center_input_sample": false,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0,
        "flip_sin_to_cos": false,
        "freq_shift": 1,
        "in_channels": 3,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 32,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    }"#;

    #[test]
    fn reads_a_published_config() {
        let config = UNet2DConfig::from_json(DDPM_CIFAR10).unwrap();
        assert_eq!(config.block_out_channels, vec![128, 256, 256, 256]);
        assert_eq!(config.attention_head_dim, None);
        assert_eq!(config.sample_dims(), Some([32, 32]));
        let plan = config.plan().unwrap();
        assert_eq!(plan.down_attention, vec![false, true, false, false]);
        assert_eq!(plan.up_attention, vec![false, false, true, false]);
        assert_eq!(plan.time_embed_dim, 512);
        assert_eq!(plan.mid_attention_groups, Some(32));
        assert_eq!(
            plan.down_samplers,
            vec![
                Some(SamplerType::Conv),
                Some(SamplerType::Conv),
                Some(SamplerType::Conv),
                None
            ]
        );
        assert_eq!(plan.class_embed, None);
    }

    #[test]
    fn defaults_are_diffusers() {
        let config = UNet2DConfig::from_json("{}").unwrap();
        assert_eq!(config, UNet2DConfig::default());
        let plan = config.plan().unwrap();
        assert_eq!(plan.time_embedding_type, TimeEmbeddingType::Positional);
        assert_eq!(plan.time_proj_dim, 224);
    }

    #[test]
    fn class_embeddings_and_time_projections() {
        let plan = |json: &str| UNet2DConfig::from_json(json).unwrap().plan().unwrap();
        assert_eq!(
            plan(r#"{"num_class_embeds": 10}"#).class_embed,
            Some(UNet2DClassEmbedding::Embedding(10))
        );
        assert_eq!(
            plan(r#"{"class_embed_type": "timestep"}"#).class_embed,
            Some(UNet2DClassEmbedding::Timestep)
        );
        let fourier = plan(r#"{"time_embedding_type": "fourier"}"#);
        assert_eq!(fourier.time_embedding_type, TimeEmbeddingType::Fourier);
        assert_eq!(fourier.time_proj_dim, 448);
        assert_eq!(
            plan(r#"{"time_embedding_type": "learned", "num_train_timesteps": 7}"#)
                .time_embedding_type,
            TimeEmbeddingType::Learned(7)
        );
        let shift = plan(r#"{"resnet_time_scale_shift": "scale_shift"}"#);
        assert_eq!(shift.mid_attention_groups, None);
        let resnet = plan(r#"{"downsample_type": "resnet", "upsample_type": "resnet"}"#);
        // DownBlock2D / UpBlock2D ignore the setting.
        assert_eq!(
            resnet.down_samplers,
            vec![
                Some(SamplerType::Conv),
                Some(SamplerType::Resnet),
                Some(SamplerType::Resnet),
                None
            ]
        );
        assert_eq!(
            resnet.up_samplers,
            vec![
                Some(SamplerType::Resnet),
                Some(SamplerType::Resnet),
                Some(SamplerType::Resnet),
                None
            ]
        );
    }

    #[test]
    fn bad_and_unsupported_values_are_typed_errors() {
        let err = |json: &str| UNet2DConfig::from_json(json).unwrap_err();
        let config_error = |json: &str, key: &str| {
            let e = err(json);
            assert!(
                matches!(e, Error::InvalidConfig { .. }) && e.to_string().contains(key),
                "{json}: {e}"
            );
        };
        config_error(r#"{"block_out_channels": []}"#, "block_out_channels");
        config_error(
            r#"{"down_block_types": ["DownBlock2D"]}"#,
            "down_block_types",
        );
        config_error(r#"{"norm_num_groups": 5}"#, "norm_num_groups");
        config_error(r#"{"attn_norm_num_groups": 5}"#, "attn_norm_num_groups");
        config_error(r#"{"attention_head_dim": 0}"#, "attention_head_dim");
        config_error(r#"{"attention_head_dim": 4096}"#, "attention_head_dim");
        config_error(r#"{"act_fn": "tanhh"}"#, "act_fn");
        config_error(r#"{"downsample_type": "fir"}"#, "downsample_type");
        config_error(
            r#"{"time_embedding_type": "learned"}"#,
            "num_train_timesteps",
        );
        config_error(r#"{"num_class_embeds": 0}"#, "num_class_embeds");
        config_error(r#"{"dropout": 1.5}"#, "dropout");
        config_error(r#"{"layers_per_block": 0}"#, "layers_per_block");
        config_error(r#"{"sample_size": 0}"#, "sample_size");
        for json in [
            r#"{"down_block_types": ["SkipDownBlock2D", "AttnSkipDownBlock2D",
                "AttnDownBlock2D", "AttnDownBlock2D"]}"#,
            r#"{"up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                "SkipUpBlock2D"]}"#,
            r#"{"mid_block_type": "UNetMidBlock2DCrossAttn"}"#,
            r#"{"resnet_time_scale_shift": "spatial"}"#,
            r#"{"time_embedding_type": "radial"}"#,
            r#"{"class_embed_type": "projection"}"#,
            r#"{"norm_num_groups": null}"#,
        ] {
            assert!(matches!(err(json), Error::Unsupported(_)), "{json}");
        }
        // Wrong JSON types are config errors too, never panics.
        assert!(UNet2DConfig::from_json(r#"{"layers_per_block": "two"}"#).is_err());
    }
}
