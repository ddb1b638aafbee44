//! [`ClipTextConfig`]: the `config.json` of a transformers `CLIPTextModel` /
//! `CLIPTextModelWithProjection`.

use burn::tensor::backend::Backend;
use diffusion_core::config::lenient_opt_f64;
use diffusion_core::{ConfigMap, Error, Result};
use serde::{Deserialize, Deserializer, Serialize};

use super::activation::ClipActivation;
use super::model::{ClipTextModel, ClipTextModelWithProjection};

/// transformers' `CLIPTextConfig`, read straight from a `config.json`.
///
/// Unknown keys are ignored and absent keys take transformers' defaults (those of
/// `openai/clip-vit-base-patch32`). A CLIP text encoder saved on its own has these keys at the
/// top level; a full `CLIPModel` config nests them under `text_config`, which
/// [`ClipTextConfig::from_config_map`] also accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Number of token embeddings.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Output width of `text_projection` (`CLIPTextModelWithProjection` only).
    pub projection_dim: Option<usize>,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Number of position embeddings: the longest accepted sequence (77 for all SD models).
    pub max_position_embeddings: usize,
    /// MLP activation: `quick_gelu`, `gelu`, `gelu_new` (also `gelu_pytorch_tanh`).
    pub hidden_act: String,
    /// LayerNorm epsilon (`null` means the default 1e-5).
    #[serde(deserialize_with = "lenient_opt_f64")]
    pub layer_norm_eps: Option<f64>,
    /// Padding token id (not used by the model itself).
    #[serde(deserialize_with = "first_id")]
    pub pad_token_id: Option<i64>,
    /// Start-of-text token id (not used by the model itself).
    #[serde(deserialize_with = "first_id")]
    pub bos_token_id: Option<i64>,
    /// End-of-text token id, which selects the pooled token. A list keeps its first entry.
    ///
    /// transformers' rule, reproduced here: when this is `2` (the legacy value in the SD
    /// checkpoints' configs) the pooled token is at `argmax(input_ids)` (the end-of-text token
    /// has the highest id of CLIP's vocabulary); otherwise at the first position holding
    /// `eos_token_id`.
    #[serde(deserialize_with = "first_id")]
    pub eos_token_id: Option<i64>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: Some(512),
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: Some(1e-5),
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
        }
    }
}

/// Accepts an integer, a list of integers (first entry) or `null`.
fn first_id<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        One(i64),
        Many(Vec<i64>),
    }
    Ok(match Option::<Id>::deserialize(d)? {
        None => None,
        Some(Id::One(id)) => Some(id),
        Some(Id::Many(ids)) => ids.first().copied(),
    })
}

impl ClipTextConfig {
    /// The text encoder of Stable Diffusion 1.x and SDXL's first text encoder: OpenAI
    /// `clip-vit-large-patch14` (768 wide, 12 layers, 12 heads, MLP 3072, quick_gelu), with
    /// the legacy special-token ids of the SD checkpoints (bos 0, pad 1, eos 2).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: Some(768),
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: Some(1e-5),
            pad_token_id: Some(1),
            bos_token_id: Some(0),
            eos_token_id: Some(2),
        }
    }

    /// The text encoder of Stable Diffusion 2.x: OpenCLIP ViT-H/14's text tower as diffusers
    /// ships it (1024 wide, 23 layers (the 24th is dropped), 16 heads, MLP 4096, gelu,
    /// projection 512).
    pub fn sd21() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: Some(512),
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: "gelu".to_string(),
            ..Self::sd15()
        }
    }

    /// SDXL's second text encoder (`text_encoder_2`, a `CLIPTextModelWithProjection`): OpenCLIP
    /// ViT-bigG/14's text tower (1280 wide, 32 layers, 20 heads, MLP 5120, gelu, projection
    /// 1280).
    pub fn sdxl_text_encoder_2() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            projection_dim: Some(1280),
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: "gelu".to_string(),
            ..Self::sd15()
        }
    }

    /// Reads the config from a parsed `config.json` (top level, or nested under
    /// `text_config` for a full `CLIPModel`) and validates it.
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        let config: Self = match map.get("text_config") {
            Some(nested @ serde_json::Value::Object(_)) => {
                ConfigMap::from_value(nested.clone(), "text_config")?
                    .deserialize("CLIPTextConfig")?
            }
            _ => map.deserialize("CLIPTextConfig")?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates a `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::from_config_map(&ConfigMap::parse(text, "CLIPTextConfig")?)
    }

    /// Checks that the values describe a buildable model.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(key, "must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::config(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.projection_dim == Some(0) {
            return Err(Error::config("projection_dim", "must be positive"));
        }
        let eps = self.layer_norm_eps();
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::config(
                "layer_norm_eps",
                format!("must be positive, got {eps}"),
            ));
        }
        ClipActivation::from_name(&self.hidden_act)?;
        match self.eos_token_id {
            None => Err(Error::config(
                "eos_token_id",
                "required: it selects the pooled token",
            )),
            Some(id) if id < 0 || id as u64 >= self.vocab_size as u64 => Err(Error::config(
                "eos_token_id",
                format!("{id} is outside the vocabulary (size {})", self.vocab_size),
            )),
            Some(_) => Ok(()),
        }
    }

    /// The LayerNorm epsilon, 1e-5 when unset.
    pub fn layer_norm_eps(&self) -> f64 {
        self.layer_norm_eps.unwrap_or(1e-5)
    }

    /// The MLP activation. Errors on an unknown `hidden_act`.
    pub fn activation(&self) -> Result<ClipActivation> {
        ClipActivation::from_name(&self.hidden_act)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Builds a `CLIPTextModel` with random weights (load real ones with
    /// [`ClipTextModel::load`](super::ClipTextModel::load) or
    /// [`crate::loading::load_module`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ClipTextModel<B>> {
        self.validate()?;
        Ok(ClipTextModel::new(self, self.activation()?, device))
    }

    /// Builds a `CLIPTextModelWithProjection` with random weights. Errors when
    /// `projection_dim` is unset.
    pub fn init_with_projection<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<ClipTextModelWithProjection<B>> {
        self.validate()?;
        let projection_dim = self
            .projection_dim
            .ok_or_else(|| Error::config("projection_dim", "required for text_projection"))?;
        Ok(ClipTextModelWithProjection::new(
            self,
            self.activation()?,
            projection_dim,
            device,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_transformers_config_json() {
        let text = r#"{
            "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
            "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
            "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
            "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
            "projection_dim": 768, "torch_dtype": "float32", "transformers_version": "4.22.0.dev0",
            "vocab_size": 49408
        }"#;
        assert_eq!(
            ClipTextConfig::from_json(text).unwrap(),
            ClipTextConfig::sd15()
        );
    }

    #[test]
    fn defaults_nesting_and_lists() {
        let c = ClipTextConfig::from_json("{}").unwrap();
        assert_eq!(c, ClipTextConfig::default());
        let c = ClipTextConfig::from_json(
            r#"{"text_config": {"hidden_size": 64, "num_attention_heads": 4, "eos_token_id": [7, 8],
                "layer_norm_eps": null}, "vision_config": {}}"#,
        )
        .unwrap();
        assert_eq!(c.hidden_size, 64);
        assert_eq!(c.eos_token_id, Some(7));
        assert_eq!(c.layer_norm_eps(), 1e-5);
        assert_eq!(c.head_dim(), 16);
    }

    #[test]
    fn presets_are_valid() {
        for c in [
            ClipTextConfig::sd15(),
            ClipTextConfig::sd21(),
            ClipTextConfig::sdxl_text_encoder_2(),
        ] {
            c.validate().unwrap();
        }
        assert_eq!(ClipTextConfig::sd21().head_dim(), 64);
        assert_eq!(ClipTextConfig::sdxl_text_encoder_2().head_dim(), 64);
    }

    #[test]
    fn bad_values_are_typed_errors() {
        let cases = [
            (
                r#"{"hidden_size": 30, "num_attention_heads": 4}"#,
                "num_attention_heads",
            ),
            (r#"{"hidden_act": "swish"}"#, "hidden_act"),
            (r#"{"num_hidden_layers": 0}"#, "num_hidden_layers"),
            (r#"{"eos_token_id": null}"#, "eos_token_id"),
            (r#"{"eos_token_id": 50000}"#, "eos_token_id"),
            (r#"{"layer_norm_eps": -1.0}"#, "layer_norm_eps"),
            (r#"{"projection_dim": 0}"#, "projection_dim"),
        ];
        for (text, key) in cases {
            match ClipTextConfig::from_json(text) {
                Err(Error::InvalidConfig { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected InvalidConfig({key}), got {other:?}"),
            }
        }
        assert!(matches!(
            ClipTextConfig::from_json(r#"{"hidden_size": "wide"}"#),
            Err(Error::Json { .. })
        ));
    }
}
