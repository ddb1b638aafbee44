//! `UNet2DConditionConfig`: the U-Net's `unet/config.json`, with diffusers' defaults and
//! validation, and presets equal to the published Stable Diffusion configs.

use diffusion_core::{ConfigMap, Error, Result};
use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::nn::{Activation, TimeEmbeddingNorm};

/// A value given once for every block, or once per block (`attention_head_dim: 8` or
/// `attention_head_dim: [5, 10, 20, 20]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    One(T),
    /// One value per down block (in down-block order).
    Each(Vec<T>),
}

impl<T: Default> Default for PerBlock<T> {
    fn default() -> Self {
        Self::One(T::default())
    }
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks; a list of the wrong length is an error on `key`.
    pub fn resolve(&self, n: usize, key: &str) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Each(v) if v.len() == n => Ok(v.clone()),
            Self::Each(v) => Err(Error::config(
                key,
                format!("has {} entries but there are {n} down blocks", v.len()),
            )),
        }
    }
}

/// `transformer_layers_per_block`: one count for everything, one per block, or (for
/// asymmetric U-Nets) one list of per-layer counts per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TransformerLayers {
    /// The same count for every attention layer.
    One(usize),
    /// One count per down block.
    Each(Vec<usize>),
    /// One count per attention layer of each down block (requires
    /// `reverse_transformer_layers_per_block` for the up blocks).
    Nested(Vec<Vec<usize>>),
}

/// `sample_size`: one number, or `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// Square samples.
    Square(usize),
    /// `[height, width]`.
    HeightWidth([usize; 2]),
}

impl SampleSize {
    /// `[height, width]`.
    pub fn dims(&self) -> [usize; 2] {
        match *self {
            Self::Square(s) => [s, s],
            Self::HeightWidth(hw) => hw,
        }
    }
}

/// Deserialises `null` as the type's default (diffusers writes `"upcast_attention": null`).
pub(crate) fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Deserialises an integer or float JSON number as `f64` (Python writes `1` for `1.0`).
pub(crate) fn number<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| D::Error::custom("number out of range")),
        other => Err(D::Error::custom(format!(
            "expected a number, found {other}"
        ))),
    }
}

/// The configuration of a [`UNet2DConditionModel`](super::UNet2DConditionModel), as written
/// in diffusers' `unet/config.json`.
///
/// Every key of diffusers' `UNet2DConditionModel.__init__` is read, with diffusers' default
/// when absent; unknown keys (`_class_name`, ...) are ignored. Values this crate does not
/// implement (other block types, `dual_cross_attention`, Fourier time embeddings, ...) are
/// rejected by [`validate`](Self::validate) with [`Error::Unsupported`], never ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    /// Default latent height/width (informational: the model accepts any size).
    pub sample_size: Option<SampleSize>,
    /// Channels of the input sample (4; 9 for inpainting: latents + mask + masked image).
    pub in_channels: usize,
    /// Channels of the output.
    pub out_channels: usize,
    /// Maps the input from `[0, 1]` to `[-1, 1]` first (`2 x - 1`).
    pub center_input_sample: bool,
    /// Cosines first in the timestep embedding.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep embedding.
    #[serde(deserialize_with = "number")]
    pub freq_shift: f64,
    /// `CrossAttnDownBlock2D` or `DownBlock2D`, one per resolution.
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn`, `UNetMidBlock2D` or `null` (no mid block).
    pub mid_block_type: Option<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D`, one per resolution (lowest first).
    pub up_block_types: Vec<String>,
    /// Whether the transformer blocks' first attention attends to the text instead of the
    /// image tokens (per down block; mirrored for the up blocks).
    #[serde(deserialize_with = "null_as_default")]
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per down block (up blocks have one more).
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: usize,
    /// `output_scale_factor` of the mid block's ResNets.
    #[serde(deserialize_with = "number")]
    pub mid_block_scale_factor: f64,
    /// Dropout probability (training only).
    #[serde(deserialize_with = "number")]
    pub dropout: f64,
    /// Activation of the ResNets and time embedding (`silu`, `swish`, `mish`, `gelu`, `relu`).
    pub act_fn: String,
    /// Groups of every group norm (`null` is unsupported).
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the ResNet and output group norms.
    #[serde(deserialize_with = "number")]
    pub norm_eps: f64,
    /// Width of the text embeddings (`encoder_hidden_states`), per block or for all.
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per attention layer.
    pub transformer_layers_per_block: TransformerLayers,
    /// Per-layer counts for the up blocks when `transformer_layers_per_block` is nested.
    pub reverse_transformer_layers_per_block: Option<Vec<Vec<usize>>>,
    /// Input width of `encoder_hid_proj` (unsupported when set).
    pub encoder_hid_dim: Option<usize>,
    /// Type of `encoder_hid_proj` (unsupported when set).
    pub encoder_hid_dim_type: Option<String>,
    /// Despite its name, the number of attention **heads** per block (diffusers' historic
    /// naming; the head width is `channels / heads`).
    pub attention_head_dim: PerBlock<usize>,
    /// Must be `null`: diffusers' `UNet2DConditionModel` rejects it.
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Two transformers per attention layer (unsupported when `true`).
    #[serde(deserialize_with = "null_as_default")]
    pub dual_cross_attention: bool,
    /// Linear `proj_in`/`proj_out` in the transformers instead of 1x1 convolutions.
    #[serde(deserialize_with = "null_as_default")]
    pub use_linear_projection: bool,
    /// `null` (an `nn.Embedding` when `num_class_embeds` is set), `"timestep"`,
    /// `"identity"`, `"projection"` or `"simple_projection"`.
    pub class_embed_type: Option<String>,
    /// `null` or `"text_time"` (SDXL's pooled text + size conditioning).
    pub addition_embed_type: Option<String>,
    /// Width of each sinusoidal `time_ids` embedding for `"text_time"`.
    pub addition_time_embed_dim: Option<usize>,
    /// Number of classes of the class embedding table.
    pub num_class_embeds: Option<usize>,
    /// Upcasts attention to `f32` for half-precision inputs.
    #[serde(deserialize_with = "null_as_default")]
    pub upcast_attention: bool,
    /// `"default"` or `"scale_shift"`.
    pub resnet_time_scale_shift: String,
    /// Only used by block types this crate does not implement (accepted, no effect).
    #[serde(deserialize_with = "null_as_default")]
    pub resnet_skip_time_act: bool,
    /// Only used by block types this crate does not implement (accepted, no effect).
    #[serde(deserialize_with = "number")]
    pub resnet_out_scale_factor: f64,
    /// `"positional"` (sinusoidal); `"fourier"` is unsupported.
    pub time_embedding_type: String,
    /// Width of the time embedding (default `4 * block_out_channels[0]`).
    pub time_embedding_dim: Option<usize>,
    /// Activation applied once to the summed embeddings.
    pub time_embedding_act_fn: Option<String>,
    /// Activation after the time embedding's `linear_2`.
    pub timestep_post_act: Option<String>,
    /// Width of the `timestep_cond` input (LCM's guidance embedding).
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel size of `conv_in` (odd).
    pub conv_in_kernel: usize,
    /// Kernel size of `conv_out` (odd).
    pub conv_out_kernel: usize,
    /// Input width of the `"projection"`/`"simple_projection"` class embedding, and of
    /// `add_embedding` for `"text_time"`.
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Must be `"default"`.
    pub attention_type: String,
    /// Concatenates the class embedding to the time embedding instead of adding it.
    #[serde(deserialize_with = "null_as_default")]
    pub class_embeddings_concat: bool,
    /// Only used by `UNetMidBlock2DSimpleCrossAttn` (accepted, no effect).
    pub mid_block_only_cross_attention: Option<bool>,
    /// Must be `null`.
    pub cross_attention_norm: Option<String>,
    /// Only used by `addition_embed_type: "text"` (accepted, no effect).
    pub addition_embed_type_num_heads: usize,
}

impl Default for UNet2DConditionConfig {
    /// diffusers' defaults (`UNet2DConditionModel.__init__`).
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: TransformerLayers::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Kind of a down block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockType {
    /// `CrossAttnDownBlock2D`: ResNets interleaved with transformers.
    CrossAttn,
    /// `DownBlock2D`: ResNets only.
    Plain,
}

/// Kind of an up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockType {
    /// `CrossAttnUpBlock2D`: ResNets interleaved with transformers.
    CrossAttn,
    /// `UpBlock2D`: ResNets only.
    Plain,
}

/// Kind of the mid block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidBlockType {
    /// `UNetMidBlock2DCrossAttn`: ResNet, transformer, ResNet.
    CrossAttn,
    /// `UNetMidBlock2D` as the U-Net builds it: a single ResNet.
    Plain,
}

/// The class-conditioning input layer (`class_embedding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassEmbedType {
    /// `nn.Embedding(num_class_embeds, time_embed_dim)` on integer labels.
    Embedding(usize),
    /// `"timestep"`: the labels are embedded like timesteps, then by a `TimestepEmbedding`.
    Timestep,
    /// `"identity"`: the labels are already `time_embed_dim`-wide vectors.
    Identity,
    /// `"projection"`: a `TimestepEmbedding` MLP on `[batch, input_dim]` vectors.
    Projection(usize),
    /// `"simple_projection"`: a single linear layer on `[batch, input_dim]` vectors.
    SimpleProjection(usize),
}

/// The validated, per-block form of a [`UNet2DConditionConfig`], from which the model is
/// built.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetPlan {
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Down block kinds.
    pub down_types: Vec<DownBlockType>,
    /// Up block kinds (lowest resolution first).
    pub up_types: Vec<UpBlockType>,
    /// Mid block kind (`None`: no mid block).
    pub mid_type: Option<MidBlockType>,
    /// ResNets per down block.
    pub layers_per_block: Vec<usize>,
    /// Attention heads per down block.
    pub heads: Vec<usize>,
    /// Cross-attention width per down block.
    pub cross_attention_dim: Vec<usize>,
    /// `only_cross_attention` per down block.
    pub only_cross_attention: Vec<bool>,
    /// Transformer blocks per attention layer of each down block.
    pub down_transformer_layers: Vec<Vec<usize>>,
    /// Transformer blocks per attention layer of each up block.
    pub up_transformer_layers: Vec<Vec<usize>>,
    /// Transformer blocks of the mid block's attention layer.
    pub mid_transformer_layers: usize,
    /// Group-norm groups.
    pub norm_num_groups: usize,
    /// ResNet activation.
    pub act: Activation,
    /// ResNet time-embedding mode.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// Width of the time embedding.
    pub time_embed_dim: usize,
    /// Width of the time embedding seen by the blocks (doubled by `class_embeddings_concat`).
    pub blocks_time_embed_dim: usize,
    /// The class embedding, if any.
    pub class_embed: Option<ClassEmbedType>,
    /// `(addition_time_embed_dim, projection input width)` for `"text_time"`.
    pub text_time: Option<(usize, usize)>,
    /// Activation applied to the summed embeddings.
    pub time_embed_act: Option<Activation>,
    /// Activation after the time embedding's `linear_2`.
    pub timestep_post_act: Option<Activation>,
}

impl UNet2DConditionConfig {
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

    /// Validates the config and resolves every per-block value.
    pub fn plan(&self) -> Result<UNetPlan> {
        let unsupported = |what: String| Err(Error::Unsupported(format!("U-Net config: {what}")));
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::config("block_out_channels", "must not be empty"));
        }
        if self.block_out_channels.contains(&0) {
            return Err(Error::config(
                "block_out_channels",
                "channel counts must be positive",
            ));
        }
        if self.down_block_types.len() != n {
            return Err(Error::config(
                "down_block_types",
                format!(
                    "has {} entries, block_out_channels has {n}",
                    self.down_block_types.len()
                ),
            ));
        }
        if self.up_block_types.len() != n {
            return Err(Error::config(
                "up_block_types",
                format!(
                    "has {} entries, down_block_types has {n}",
                    self.up_block_types.len()
                ),
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            return Err(Error::config(
                "in_channels",
                "channel counts must be positive",
            ));
        }
        let down_types = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(DownBlockType::CrossAttn),
                "DownBlock2D" => Ok(DownBlockType::Plain),
                other => Err(Error::Unsupported(format!(
                    "U-Net config: down block type `{other}` (supported: CrossAttnDownBlock2D, \
                     DownBlock2D)"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_types = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(UpBlockType::CrossAttn),
                "UpBlock2D" => Ok(UpBlockType::Plain),
                other => Err(Error::Unsupported(format!(
                    "U-Net config: up block type `{other}` (supported: CrossAttnUpBlock2D, \
                     UpBlock2D)"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_type = match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => Some(MidBlockType::CrossAttn),
            Some("UNetMidBlock2D") => Some(MidBlockType::Plain),
            None => None,
            Some(other) => {
                return unsupported(format!(
                    "mid block type `{other}` (supported: UNetMidBlock2DCrossAttn, \
                     UNetMidBlock2D, null)"
                ));
            }
        };
        if self.num_attention_heads.is_some() {
            return unsupported(
                "`num_attention_heads` must be null (diffusers' UNet2DConditionModel rejects it; \
                 `attention_head_dim` holds the head counts)"
                    .into(),
            );
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention = true".into());
        }
        if self.encoder_hid_dim.is_some() || self.encoder_hid_dim_type.is_some() {
            return unsupported("encoder_hid_dim / encoder_hid_dim_type (encoder_hid_proj)".into());
        }
        if self.attention_type != "default" {
            return unsupported(format!("attention_type `{}`", self.attention_type));
        }
        if let Some(norm) = &self.cross_attention_norm {
            return unsupported(format!("cross_attention_norm `{norm}`"));
        }
        if self.time_embedding_type != "positional" {
            return unsupported(format!(
                "time_embedding_type `{}` (supported: positional)",
                self.time_embedding_type
            ));
        }
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
        for &c in &self.block_out_channels {
            if c % norm_num_groups != 0 {
                return Err(Error::config(
                    "norm_num_groups",
                    format!("{norm_num_groups} does not divide block_out_channels entry {c}"),
                ));
            }
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return Err(Error::config("norm_eps", "must be positive"));
        }
        for (key, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(Error::config(key, format!("must be odd, got {k}")));
            }
        }
        if self.mid_block_scale_factor.is_nan() || self.mid_block_scale_factor <= 0.0 {
            return Err(Error::config("mid_block_scale_factor", "must be positive"));
        }
        let act = Activation::from_name(&self.act_fn, "act_fn")?;
        let layers_per_block = self.layers_per_block.resolve(n, "layers_per_block")?;
        let heads = self.attention_head_dim.resolve(n, "attention_head_dim")?;
        let cross_attention_dim = self.cross_attention_dim.resolve(n, "cross_attention_dim")?;
        let only_cross_attention = self
            .only_cross_attention
            .resolve(n, "only_cross_attention")?;
        if let Some(i) = layers_per_block.iter().position(|&l| l == 0) {
            return Err(Error::config(
                "layers_per_block",
                format!("block {i} has no layers"),
            ));
        }
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(Error::config(
                    "attention_head_dim",
                    format!("{h} heads do not divide the {c} channels of block {i}"),
                ));
            }
        }
        if cross_attention_dim.contains(&0) {
            return Err(Error::config("cross_attention_dim", "must be positive"));
        }

        // Transformer depth per attention layer.
        let (down_transformer_layers, up_transformer_layers, mid_transformer_layers) =
            match &self.transformer_layers_per_block {
                TransformerLayers::Nested(nested) => {
                    let Some(reverse) = &self.reverse_transformer_layers_per_block else {
                        return Err(Error::config(
                            "reverse_transformer_layers_per_block",
                            "is required when transformer_layers_per_block is nested",
                        ));
                    };
                    if nested.len() != n || reverse.len() != n {
                        return Err(Error::config(
                            "transformer_layers_per_block",
                            format!("needs {n} lists (and as many reversed)"),
                        ));
                    }
                    for i in 0..n {
                        if nested[i].len() != layers_per_block[i]
                            || reverse[i].len() != layers_per_block[n - 1 - i] + 1
                        {
                            return Err(Error::config(
                                "transformer_layers_per_block",
                                format!("block {i}: one count per layer is required"),
                            ));
                        }
                    }
                    let mid = nested[n - 1].first().copied().unwrap_or(1);
                    (nested.clone(), reverse.clone(), mid)
                }
                other => {
                    let per_block = match other {
                        TransformerLayers::One(v) => vec![*v; n],
                        TransformerLayers::Each(v) if v.len() == n => v.clone(),
                        TransformerLayers::Each(v) => {
                            return Err(Error::config(
                                "transformer_layers_per_block",
                                format!("has {} entries but there are {n} down blocks", v.len()),
                            ));
                        }
                        TransformerLayers::Nested(_) => unreachable!(),
                    };
                    let down = (0..n)
                        .map(|i| vec![per_block[i]; layers_per_block[i]])
                        .collect();
                    let up = (0..n)
                        .map(|i| vec![per_block[n - 1 - i]; layers_per_block[n - 1 - i] + 1])
                        .collect();
                    (down, up, per_block[n - 1])
                }
            };
        if self.reverse_transformer_layers_per_block.is_some()
            && !matches!(
                self.transformer_layers_per_block,
                TransformerLayers::Nested(_)
            )
        {
            return Err(Error::config(
                "reverse_transformer_layers_per_block",
                "is only used with a nested transformer_layers_per_block",
            ));
        }

        let time_embed_dim = self.time_embed_dim();
        let class_embed = match (self.class_embed_type.as_deref(), self.num_class_embeds) {
            (None, None) => None,
            (None, Some(0)) => {
                return Err(Error::config("num_class_embeds", "must be positive"));
            }
            (None, Some(classes)) => Some(ClassEmbedType::Embedding(classes)),
            (Some("timestep"), _) => Some(ClassEmbedType::Timestep),
            (Some("identity"), _) => Some(ClassEmbedType::Identity),
            (Some(kind @ ("projection" | "simple_projection")), _) => {
                let Some(dim) = self.projection_class_embeddings_input_dim else {
                    return Err(Error::config(
                        "projection_class_embeddings_input_dim",
                        format!("is required by class_embed_type `{kind}`"),
                    ));
                };
                Some(if kind == "projection" {
                    ClassEmbedType::Projection(dim)
                } else {
                    ClassEmbedType::SimpleProjection(dim)
                })
            }
            (Some(other), _) => {
                return unsupported(format!(
                    "class_embed_type `{other}` (supported: null, timestep, identity, \
                     projection, simple_projection)"
                ));
            }
        };
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let Some(time_dim) = self.addition_time_embed_dim else {
                    return Err(Error::config(
                        "addition_time_embed_dim",
                        "is required by addition_embed_type `text_time`",
                    ));
                };
                let Some(input_dim) = self.projection_class_embeddings_input_dim else {
                    return Err(Error::config(
                        "projection_class_embeddings_input_dim",
                        "is required by addition_embed_type `text_time`",
                    ));
                };
                if input_dim <= 6 * time_dim {
                    return Err(Error::config(
                        "projection_class_embeddings_input_dim",
                        format!(
                            "{input_dim} leaves no room for the pooled text embedding next to \
                             six {time_dim}-wide time_ids embeddings"
                        ),
                    ));
                }
                Some((time_dim, input_dim))
            }
            Some(other) => {
                return unsupported(format!(
                    "addition_embed_type `{other}` (supported: null, text_time)"
                ));
            }
        };
        let parse_act = |v: &Option<String>, key: &str| {
            v.as_deref()
                .map(|name| Activation::from_name(name, key))
                .transpose()
        };
        let time_embed_act = parse_act(&self.time_embedding_act_fn, "time_embedding_act_fn")?;
        let timestep_post_act = parse_act(&self.timestep_post_act, "timestep_post_act")?;
        let blocks_time_embed_dim = if self.class_embeddings_concat {
            if class_embed.is_none() {
                return Err(Error::config(
                    "class_embeddings_concat",
                    "requires a class embedding",
                ));
            }
            2 * time_embed_dim
        } else {
            time_embed_dim
        };
        Ok(UNetPlan {
            block_out_channels: self.block_out_channels.clone(),
            down_types,
            up_types,
            mid_type,
            layers_per_block,
            heads,
            cross_attention_dim,
            only_cross_attention,
            down_transformer_layers,
            up_transformer_layers,
            mid_transformer_layers,
            norm_num_groups,
            act,
            time_embedding_norm,
            time_embed_dim,
            blocks_time_embed_dim,
            class_embed,
            text_time,
            time_embed_act,
            timestep_post_act,
        })
    }

    /// `runwayml/stable-diffusion-v1-5`'s `unet/config.json` ([`SD_V1_5_JSON`]).
    pub fn sd_v1_5() -> Self {
        Self {
            sample_size: Some(SampleSize::Square(64)),
            cross_attention_dim: PerBlock::One(768),
            ..Self::default()
        }
    }

    /// `stabilityai/stable-diffusion-2-1`'s `unet/config.json` ([`SD_V2_1_JSON`]).
    pub fn sd_v2_1() -> Self {
        Self {
            sample_size: Some(SampleSize::Square(96)),
            cross_attention_dim: PerBlock::One(1024),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::default()
        }
    }

    /// `stabilityai/stable-diffusion-xl-base-1.0`'s `unet/config.json` ([`SDXL_BASE_JSON`]).
    pub fn sdxl_base() -> Self {
        Self {
            sample_size: Some(SampleSize::Square(128)),
            down_block_types: strings(&[
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
            ]),
            up_block_types: strings(&["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
            block_out_channels: vec![320, 640, 1280],
            cross_attention_dim: PerBlock::One(2048),
            transformer_layers_per_block: TransformerLayers::Each(vec![1, 2, 10]),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            ..Self::default()
        }
    }
}

/// `unet/config.json` of `runwayml/stable-diffusion-v1-5` (diffusers 0.6.0 format), as
/// published on the Hugging Face Hub.
pub const SD_V1_5_JSON: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": [
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D"
  ],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": [
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D"
  ]
}"#;

/// `unet/config.json` of `stabilityai/stable-diffusion-2-1` (768-v), as published on the
/// Hugging Face Hub.
pub const SD_V2_1_JSON: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.10.0.dev0",
  "act_fn": "silu",
  "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 1024,
  "down_block_types": [
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D"
  ],
  "downsample_padding": 1,
  "dual_cross_attention": false,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "num_class_embeds": null,
  "only_cross_attention": false,
  "out_channels": 4,
  "sample_size": 96,
  "up_block_types": [
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D"
  ],
  "upcast_attention": true,
  "use_linear_projection": true
}"#;

/// `unet/config.json` of `stabilityai/stable-diffusion-xl-base-1.0`, as published on the
/// Hugging Face Hub.
pub const SDXL_BASE_JSON: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.19.0.dev0",
  "act_fn": "silu",
  "addition_embed_type": "text_time",
  "addition_embed_type_num_heads": 64,
  "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280],
  "center_input_sample": false,
  "class_embed_type": null,
  "class_embeddings_concat": false,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "cross_attention_dim": 2048,
  "cross_attention_norm": null,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1,
  "dual_cross_attention": false,
  "encoder_hid_dim": null,
  "encoder_hid_dim_type": null,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_only_cross_attention": null,
  "mid_block_scale_factor": 1,
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "num_attention_heads": null,
  "num_class_embeds": null,
  "only_cross_attention": false,
  "out_channels": 4,
  "projection_class_embeddings_input_dim": 2816,
  "resnet_out_scale_factor": 1.0,
  "resnet_skip_time_act": false,
  "resnet_time_scale_shift": "default",
  "sample_size": 128,
  "time_cond_proj_dim": null,
  "time_embedding_act_fn": null,
  "time_embedding_dim": null,
  "time_embedding_type": "positional",
  "timestep_post_act": null,
  "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "upcast_attention": null,
  "use_linear_projection": true
}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_equal_the_published_configs() {
        assert_eq!(
            UNet2DConditionConfig::from_json(SD_V1_5_JSON).unwrap(),
            UNet2DConditionConfig::sd_v1_5()
        );
        assert_eq!(
            UNet2DConditionConfig::from_json(SD_V2_1_JSON).unwrap(),
            UNet2DConditionConfig::sd_v2_1()
        );
        assert_eq!(
            UNet2DConditionConfig::from_json(SDXL_BASE_JSON).unwrap(),
            UNet2DConditionConfig::sdxl_base()
        );
    }

    #[test]
    fn sdxl_plan_resolves_per_block_values() {
        let plan = UNet2DConditionConfig::sdxl_base().plan().unwrap();
        assert_eq!(plan.heads, vec![5, 10, 20]);
        assert_eq!(
            plan.down_transformer_layers,
            vec![vec![1, 1], vec![2, 2], vec![10, 10]]
        );
        assert_eq!(
            plan.up_transformer_layers,
            vec![vec![10, 10, 10], vec![2, 2, 2], vec![1, 1, 1]]
        );
        assert_eq!(plan.mid_transformer_layers, 10);
        assert_eq!(plan.text_time, Some((256, 2816)));
        assert_eq!(plan.time_embed_dim, 1280);
    }

    fn with(key: &str, value: Value) -> Result<UNet2DConditionConfig> {
        let mut map = ConfigMap::parse(SD_V1_5_JSON, "test").unwrap();
        map.set(key, value);
        UNet2DConditionConfig::from_config_map(&map)
    }

    #[test]
    fn unsupported_and_invalid_values_are_typed_errors() {
        use serde_json::json;
        for (key, value) in [
            ("dual_cross_attention", json!(true)),
            ("num_attention_heads", json!(8)),
            ("time_embedding_type", json!("fourier")),
            ("addition_embed_type", json!("text")),
            ("class_embed_type", json!("nonsense")),
            ("mid_block_type", json!("UNetMidBlock2DSimpleCrossAttn")),
            ("resnet_time_scale_shift", json!("spatial")),
            ("encoder_hid_dim", json!(768)),
            ("attention_type", json!("gated")),
            ("norm_num_groups", json!(null)),
        ] {
            let err = with(key, value).unwrap_err();
            assert!(matches!(err, Error::Unsupported(_)), "{key}: {err}");
        }
        for (key, value) in [
            ("attention_head_dim", json!([8, 8])),
            ("attention_head_dim", json!(7)),
            ("norm_num_groups", json!(7)),
            ("conv_in_kernel", json!(4)),
            ("act_fn", json!("tanhh")),
            ("class_embed_type", json!("projection")),
            ("up_block_types", json!(["UpBlock2D"])),
            ("layers_per_block", json!(0)),
        ] {
            let err = with(key, value).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig { .. }), "{key}: {err}");
        }
        let err = with("block_out_channels", json!("wide")).unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err}");
    }

    #[test]
    fn nullable_and_numeric_forms_are_accepted() {
        use serde_json::json;
        let config = with("upcast_attention", json!(null)).unwrap();
        assert!(!config.upcast_attention);
        let config = with("freq_shift", json!(1)).unwrap();
        assert_eq!(config.freq_shift, 1.0);
        let config = with("sample_size", json!([64, 96])).unwrap();
        assert_eq!(config.sample_size.unwrap().dims(), [64, 96]);
        let nested = with(
            "transformer_layers_per_block",
            json!([[1, 1], [1, 1], [2, 2], [2, 2]]),
        );
        assert!(matches!(nested.unwrap_err(), Error::InvalidConfig { .. }));
    }
}
