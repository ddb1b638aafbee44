//! `T5Config`: the `config.json` of a transformers T5 checkpoint.

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::activation;
use burn::tensor::backend::Backend;
use diffusion_core::{ConfigMap, Error, Result};
use serde::{Deserialize, Serialize};

/// The hyper-parameters of a T5 encoder, read from a transformers `config.json`.
///
/// Defaults are transformers' `T5Config` defaults (t5-small); unknown keys are ignored.
/// transformers' attribute aliases `hidden_size`, `num_attention_heads`,
/// `num_hidden_layers` and `head_dim` are accepted for `d_model`, `num_heads`, `num_layers`
/// and `d_kv`.
///
/// The dense activation is derived from [`feed_forward_proj`](Self::feed_forward_proj)
/// exactly as transformers does (see [`T5Config::dense_act_fn`]); a `dense_act_fn` key in the
/// file is ignored, as transformers ignores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct T5Config {
    /// Size of the token embedding table (`shared`).
    pub vocab_size: usize,
    /// Width of the hidden states.
    #[serde(alias = "hidden_size")]
    pub d_model: usize,
    /// Width of one attention head's query/key/value.
    #[serde(alias = "head_dim")]
    pub d_kv: usize,
    /// Width of the feed-forward layer.
    pub d_ff: usize,
    /// Number of encoder blocks.
    #[serde(alias = "num_hidden_layers")]
    pub num_layers: usize,
    /// Number of attention heads.
    #[serde(alias = "num_attention_heads")]
    pub num_heads: usize,
    /// Number of relative-position buckets (split in half between the two directions).
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which all relative positions share one bucket.
    pub relative_attention_max_distance: usize,
    /// Epsilon of the RMS layer norms.
    pub layer_norm_epsilon: f64,
    /// `"relu"` (original T5), `"gated-gelu"` (T5 v1.1, Flan-T5) or any `"[gated-]ACT"`.
    pub feed_forward_proj: String,
    /// Padding token id (informational; the encoder does not use it).
    pub pad_token_id: Option<i64>,
    /// End-of-sequence token id (informational; the encoder does not use it).
    pub eos_token_id: Option<i64>,
}

impl Default for T5Config {
    fn default() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".to_string(),
            pad_token_id: Some(0),
            eos_token_id: Some(1),
        }
    }
}

impl T5Config {
    /// Reads and validates a config from a parsed `config.json`.
    pub fn from_config_map(map: &ConfigMap) -> Result<Self> {
        // `eos_token_id` may be a list in some checkpoints; keep the first entry.
        let mut map = map.clone();
        if let Some(serde_json::Value::Array(ids)) = map.get("eos_token_id") {
            let first = ids.first().cloned().unwrap_or(serde_json::Value::Null);
            map.set("eos_token_id", first);
        }
        let config: Self = map.deserialize("T5 config")?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_config_map(&ConfigMap::from_file(path)?)
    }

    /// Checks that every value is usable; the first problem is reported as
    /// [`Error::InvalidConfig`].
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(key, "must be positive"));
            }
        }
        // Bidirectional buckets: half per direction, half of those exact.
        let max_exact = self.relative_attention_num_buckets / 2 / 2;
        if max_exact == 0 {
            return Err(Error::config(
                "relative_attention_num_buckets",
                format!(
                    "{} is too small (at least 4 are needed)",
                    self.relative_attention_num_buckets
                ),
            ));
        }
        if self.relative_attention_max_distance <= max_exact {
            return Err(Error::config(
                "relative_attention_max_distance",
                format!(
                    "{} must exceed the {max_exact} exact buckets",
                    self.relative_attention_max_distance
                ),
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(Error::config(
                "layer_norm_epsilon",
                format!("{} must be positive and finite", self.layer_norm_epsilon),
            ));
        }
        self.activation()?;
        Ok(())
    }

    /// Whether the feed-forward layer is gated (`wi_0`, `wi_1`) rather than plain (`wi`).
    pub fn is_gated_act(&self) -> bool {
        self.feed_forward_proj.split('-').next() == Some("gated")
    }

    /// transformers' `dense_act_fn`: the last `-`-separated part of `feed_forward_proj`,
    /// except that `"gated-gelu"` means `"gelu_new"` (the tanh approximation).
    pub fn dense_act_fn(&self) -> &str {
        if self.feed_forward_proj == "gated-gelu" {
            "gelu_new"
        } else {
            self.feed_forward_proj
                .rsplit('-')
                .next()
                .unwrap_or(&self.feed_forward_proj)
        }
    }

    /// The feed-forward activation; an error for a malformed `feed_forward_proj` or an
    /// activation this crate does not implement.
    pub fn activation(&self) -> Result<T5Activation> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        if parts.len() > 2 || (parts.len() == 2 && parts[0] != "gated") {
            return Err(Error::config(
                "feed_forward_proj",
                format!(
                    "`{}` is not of the form `gated-ACT` or `ACT`",
                    self.feed_forward_proj
                ),
            ));
        }
        T5Activation::from_name(self.dense_act_fn())
            .map_err(|message| Error::config("feed_forward_proj", message))
    }

    /// Width of the concatenated attention heads (`num_heads * d_kv`).
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// The feed-forward activations of transformers' `ACT2FN` that T5 checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum T5Activation {
    /// `max(x, 0)` (`"relu"`, original T5).
    Relu,
    /// Exact erf GELU (`"gelu"`).
    Gelu,
    /// tanh-approximated GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`; T5 v1.1).
    GeluTanh,
    /// `x * sigmoid(x)` (`"silu"`, `"swish"`).
    Silu,
}

impl T5Activation {
    /// Parses a transformers activation name.
    pub fn from_name(name: &str) -> std::result::Result<Self, String> {
        match name {
            "relu" => Ok(Self::Relu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(format!(
                "unsupported activation `{other}` (expected relu, gelu, gelu_new, \
                 gelu_pytorch_tanh, gelu_fast, silu or swish)"
            )),
        }
    }

    /// Applies the activation element-wise.
    ///
    /// # Shapes
    ///
    /// - input: `[...]`
    /// - output: `[...]` (same shape)
    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Relu => activation::relu(x),
            Self::Gelu => activation::gelu(x),
            Self::GeluTanh => activation::gelu_approximate(x),
            Self::Silu => activation::silu(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    fn parse(json: &str) -> Result<T5Config> {
        T5Config::from_config_map(&ConfigMap::parse(json, "test").unwrap())
    }

    #[test]
    fn reads_v1_1_config_and_derives_activation() {
        let c = parse(
            r#"{"architectures": ["T5EncoderModel"], "d_model": 4096, "d_kv": 64, "d_ff": 10240,
                "num_layers": 24, "num_heads": 64, "feed_forward_proj": "gated-gelu",
                "dense_act_fn": "relu", "vocab_size": 32128, "eos_token_id": [1, 2],
                "layer_norm_epsilon": 1e-06, "model_type": "t5"}"#,
        )
        .unwrap();
        assert_eq!(c.d_model, 4096);
        assert!(c.is_gated_act());
        // transformers overrides any dense_act_fn in the file.
        assert_eq!(c.dense_act_fn(), "gelu_new");
        assert_eq!(c.activation().unwrap(), T5Activation::GeluTanh);
        assert_eq!(c.eos_token_id, Some(1));
        assert_eq!(c.inner_dim(), 4096);
        assert_eq!(c.relative_attention_num_buckets, 32);
    }

    #[test]
    fn defaults_are_transformers_defaults() {
        let c = parse("{}").unwrap();
        assert_eq!(c, T5Config::default());
        assert!(!c.is_gated_act());
        assert_eq!(c.activation().unwrap(), T5Activation::Relu);
        let aliased =
            parse(r#"{"hidden_size": 64, "num_attention_heads": 2, "head_dim": 32}"#).unwrap();
        assert_eq!(
            (aliased.d_model, aliased.num_heads, aliased.d_kv),
            (64, 2, 32)
        );
        let silu = parse(r#"{"feed_forward_proj": "gated-silu"}"#).unwrap();
        assert_eq!(silu.activation().unwrap(), T5Activation::Silu);
    }

    #[test]
    fn bad_values_are_typed_errors() {
        let cases = [
            (
                r#"{"feed_forward_proj": "double-gelu"}"#,
                "feed_forward_proj",
            ),
            (
                r#"{"feed_forward_proj": "gated-gelu-x"}"#,
                "feed_forward_proj",
            ),
            (
                r#"{"feed_forward_proj": "tanhshrink"}"#,
                "feed_forward_proj",
            ),
            (r#"{"num_heads": 0}"#, "num_heads"),
            (
                r#"{"relative_attention_num_buckets": 2}"#,
                "relative_attention_num_buckets",
            ),
            (
                r#"{"relative_attention_max_distance": 8}"#,
                "relative_attention_max_distance",
            ),
            (r#"{"layer_norm_epsilon": 0.0}"#, "layer_norm_epsilon"),
        ];
        for (json, key) in cases {
            match parse(json) {
                Err(Error::InvalidConfig { key: k, .. }) => assert_eq!(k, key, "{json}"),
                other => panic!("{json}: expected InvalidConfig for {key}, got {other:?}"),
            }
        }
        assert!(matches!(
            parse(r#"{"d_model": "wide"}"#),
            Err(Error::Json { .. })
        ));
    }

    #[test]
    fn activations_match_closed_forms() {
        let device = Default::default();
        let xs = [-2.0f32, -0.5, 0.0, 1.0, 3.0];
        let x = Tensor::<NdArray<f32>, 1>::from_floats(xs, &device);
        let eval =
            |a: T5Activation| -> Vec<f32> { a.forward(x.clone()).into_data().to_vec().unwrap() };
        let tanh_gelu = |v: f64| {
            0.5 * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
        };
        for (i, &v) in xs.iter().enumerate() {
            let v = f64::from(v);
            assert!((f64::from(eval(T5Activation::GeluTanh)[i]) - tanh_gelu(v)).abs() < 1e-6);
            assert!((f64::from(eval(T5Activation::Relu)[i]) - v.max(0.0)).abs() < 1e-7);
            let silu = v / (1.0 + (-v).exp());
            assert!((f64::from(eval(T5Activation::Silu)[i]) - silu).abs() < 1e-6);
        }
        // torch.nn.functional.gelu(torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0]))
        let gelu: [f32; 5] = [-0.045_500_28, -0.154_268_77, 0.0, 0.841_344_7, 2.995_95];
        for (got, want) in eval(T5Activation::Gelu).iter().zip(gelu) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }
}
