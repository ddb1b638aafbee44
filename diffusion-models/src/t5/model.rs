//! transformers' `T5EncoderModel`: token embedding, pre-norm self-attention / feed-forward
//! blocks with a shared relative-position bias, final RMS norm.
//!
//! Field names are the state-dict keys (`shared`, `encoder.block.N.layer.0.SelfAttention.q`,
//! `encoder.block.N.layer.1.DenseReluDense.wi_0`, ...). A block's `layer` is PyTorch's
//! two-element `ModuleList` of different layer types; here it is a Rust tuple, whose
//! elements Burn names `0` and `1`, giving the same keys.

// `SelfAttention` and `DenseReluDense` are transformers' attribute names, kept verbatim so
// that the weights load by a direct key match.
#![allow(non_snake_case)]

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

use super::config::{T5Activation, T5Config};
use super::layer_norm::{T5LayerNorm, T5LayerNormConfig};

/// transformers' `T5Attention._relative_position_bucket` for a bidirectional (encoder)
/// attention: the bucket of `relative_position = key_position - query_position`.
///
/// Half of the buckets are for positive offsets; within each half, offsets below
/// `num_buckets / 4` get their own bucket and larger ones share logarithmically wider
/// buckets up to `max_distance`. The logarithm is evaluated in `f32` in the same order as
/// PyTorch, so bucket boundaries agree exactly.
pub fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let half = num_buckets / 2;
    let offset = if relative_position > 0 { half } else { 0 };
    let distance = relative_position.unsigned_abs() as usize;
    let max_exact = half / 2;
    if distance < max_exact {
        return offset + distance;
    }
    // torch: log(float32(d) / max_exact) / float32(log(max_distance / max_exact)) * (n - e)
    let ratio = distance as f32 / max_exact as f32;
    let log_range = (max_distance as f64 / max_exact as f64).ln() as f32;
    let scaled = ratio.ln() / log_range * (half - max_exact) as f32;
    let large = max_exact + scaled as usize;
    offset + large.min(half - 1)
}

/// The `[query_len * key_len]` row-major bucket indices of an encoder self-attention.
pub fn relative_position_buckets(
    query_len: usize,
    key_len: usize,
    num_buckets: usize,
    max_distance: usize,
) -> Vec<i64> {
    let mut buckets = Vec::with_capacity(query_len * key_len);
    for q in 0..query_len {
        for k in 0..key_len {
            let relative = k as i64 - q as i64;
            buckets.push(relative_position_bucket(relative, num_buckets, max_distance) as i64);
        }
    }
    buckets
}

/// Configuration of a [`T5Attention`].
#[derive(Config, Debug)]
pub struct T5AttentionConfig {
    /// Width of the hidden states.
    pub d_model: usize,
    /// Width of one head.
    pub d_kv: usize,
    /// Number of heads.
    pub num_heads: usize,
    /// Whether this layer owns the relative-position bias table (the first block only).
    pub has_relative_attention_bias: bool,
    /// Number of relative-position buckets.
    #[config(default = 32)]
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which relative positions share a bucket.
    #[config(default = 128)]
    pub relative_attention_max_distance: usize,
}

impl T5AttentionConfig {
    /// Builds the layer (bias-free projections, optional bias table).
    pub fn init<B: Backend>(&self, device: &B::Device) -> T5Attention<B> {
        let inner = self.num_heads * self.d_kv;
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        T5Attention {
            q: linear(self.d_model, inner),
            k: linear(self.d_model, inner),
            v: linear(self.d_model, inner),
            o: linear(inner, self.d_model),
            relative_attention_bias: self.has_relative_attention_bias.then(|| {
                EmbeddingConfig::new(self.relative_attention_num_buckets, self.num_heads)
                    .init(device)
            }),
            num_heads: self.num_heads,
            d_kv: self.d_kv,
            num_buckets: self.relative_attention_num_buckets,
            max_distance: self.relative_attention_max_distance,
        }
    }
}

/// transformers' `T5Attention` (encoder self-attention): multi-head attention without the
/// `1/sqrt(d)` scaling, with an additive relative-position bias.
#[derive(Module, Debug)]
pub struct T5Attention<B: Backend> {
    /// Query projection (no bias).
    pub q: Linear<B>,
    /// Key projection (no bias).
    pub k: Linear<B>,
    /// Value projection (no bias).
    pub v: Linear<B>,
    /// Output projection (no bias).
    pub o: Linear<B>,
    /// `[num_buckets, num_heads]` bias table; only the first block has one.
    pub relative_attention_bias: Option<Embedding<B>>,
    /// Number of heads.
    pub num_heads: usize,
    /// Width of one head.
    pub d_kv: usize,
    /// Number of relative-position buckets.
    pub num_buckets: usize,
    /// Distance beyond which relative positions share a bucket.
    pub max_distance: usize,
}

impl<B: Backend> T5Attention<B> {
    /// The relative-position bias from this layer's table, `None` without a table.
    ///
    /// # Shapes
    ///
    /// - output: `[1, num_heads, query_len, key_len]`
    pub fn compute_bias(
        &self,
        query_len: usize,
        key_len: usize,
        device: &B::Device,
    ) -> Option<Tensor<B, 4>> {
        let table = self.relative_attention_bias.as_ref()?;
        let buckets =
            relative_position_buckets(query_len, key_len, self.num_buckets, self.max_distance);
        let buckets =
            Tensor::<B, 2, Int>::from_data(TensorData::new(buckets, [query_len, key_len]), device);
        // [q, k, heads] -> [1, heads, q, k]
        Some(table.forward(buckets).permute([2, 0, 1]).unsqueeze_dim(0))
    }

    /// Self-attention of `x` with an additive `position_bias` and an optional key mask
    /// (`true` = the key is padding and is ignored).
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, d_model]`
    /// - position_bias: `[1, num_heads, seq, seq]`
    /// - mask: `[batch, num_heads, seq, seq]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        position_bias: Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (heads, d) = (self.num_heads, self.d_kv);
        let split = |t: Tensor<B, 3>| t.reshape([batch, seq, heads, d]).swap_dims(1, 2);
        let q = split(self.q.forward(x.clone()));
        let k = split(self.k.forward(x.clone()));
        let v = split(self.v.forward(x));
        let bias = position_bias.expand([batch, heads, seq, seq]);
        let options = AttentionModuleOptions {
            scale: Some(1.0),
            softcap: None,
            is_causal: false,
        };
        let out = attention(q, k, v, mask, Some(bias), options);
        self.o
            .forward(out.swap_dims(1, 2).reshape([batch, seq, heads * d]))
    }
}

/// transformers' `T5LayerSelfAttention`: `x + SelfAttention(layer_norm(x))`.
#[derive(Module, Debug)]
pub struct T5LayerSelfAttention<B: Backend> {
    /// The attention.
    pub SelfAttention: T5Attention<B>,
    /// The pre-norm.
    pub layer_norm: T5LayerNorm<B>,
}

impl<B: Backend> T5LayerSelfAttention<B> {
    /// Applies the residual self-attention sub-layer.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, d_model]`
    /// - position_bias: `[1, num_heads, seq, seq]`
    /// - mask: `[batch, num_heads, seq, seq]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        position_bias: Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
    ) -> Tensor<B, 3> {
        let normed = self.layer_norm.forward(x.clone());
        x + self.SelfAttention.forward(normed, position_bias, mask)
    }
}

/// transformers' `T5DenseActDense` (`wi`, `wo`) or `T5DenseGatedActDense`
/// (`wi_0`, `wi_1`, `wo`), selected by the config's `feed_forward_proj`.
#[derive(Module, Debug)]
pub struct T5DenseReluDense<B: Backend> {
    /// Input projection of the plain variant.
    pub wi: Option<Linear<B>>,
    /// Activated input projection of the gated variant.
    pub wi_0: Option<Linear<B>>,
    /// Linear (gate) input projection of the gated variant.
    pub wi_1: Option<Linear<B>>,
    /// Output projection.
    pub wo: Linear<B>,
    /// The activation.
    pub activation: T5Activation,
}

impl<B: Backend> T5DenseReluDense<B> {
    /// `wo(act(wi(x)))`, or `wo(act(wi_0(x)) * wi_1(x))` for the gated variant.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = match (&self.wi, &self.wi_0, &self.wi_1) {
            (_, Some(wi_0), Some(wi_1)) => {
                self.activation.forward(wi_0.forward(x.clone())) * wi_1.forward(x)
            }
            (Some(wi), _, _) => self.activation.forward(wi.forward(x)),
            _ => unreachable!("T5DenseReluDense is built with wi or with wi_0 and wi_1"),
        };
        self.wo.forward(hidden)
    }
}

/// transformers' `T5LayerFF`: `x + DenseReluDense(layer_norm(x))`.
#[derive(Module, Debug)]
pub struct T5LayerFF<B: Backend> {
    /// The feed-forward network.
    pub DenseReluDense: T5DenseReluDense<B>,
    /// The pre-norm.
    pub layer_norm: T5LayerNorm<B>,
}

impl<B: Backend> T5LayerFF<B> {
    /// Applies the residual feed-forward sub-layer.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let normed = self.layer_norm.forward(x.clone());
        x + self.DenseReluDense.forward(normed)
    }
}

/// transformers' `T5Block` of an encoder: self-attention then feed-forward.
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    /// `layer.0` (self-attention) and `layer.1` (feed-forward).
    pub layer: (T5LayerSelfAttention<B>, T5LayerFF<B>),
}

impl<B: Backend> T5Block<B> {
    /// Applies the block.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, d_model]`
    /// - position_bias: `[1, num_heads, seq, seq]`
    /// - mask: `[batch, num_heads, seq, seq]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        position_bias: Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
    ) -> Tensor<B, 3> {
        let x = clamp_half(self.layer.0.forward(x, position_bias, mask));
        clamp_half(self.layer.1.forward(x))
    }
}

/// transformers clamps float16 hidden states after every sub-layer to keep them finite.
/// (transformers uses `max - 1000` only when an infinity is present and `max` otherwise;
/// this always uses `max - 1000`, which differs only for values within 1000 of the
/// float16 maximum.)
fn clamp_half<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    if x.dtype() == DType::F16 {
        let limit = f64::from(half_max()) - 1000.0;
        x.clamp(-limit, limit)
    } else {
        x
    }
}

fn half_max() -> f32 {
    65504.0
}

/// transformers' `T5Stack` used as an encoder (the `encoder` prefix of the state dict).
#[derive(Module, Debug)]
pub struct T5Stack<B: Backend> {
    /// The blocks; `block.0` owns the relative-position bias table.
    pub block: Vec<T5Block<B>>,
    /// The final RMS norm.
    pub final_layer_norm: T5LayerNorm<B>,
}

/// transformers' `T5EncoderModel`: the text encoder of SD3, Flux, PixArt, DeepFloyd IF, ...
#[derive(Module, Debug)]
pub struct T5EncoderModel<B: Backend> {
    /// The token embedding table (`shared.weight`, `[vocab_size, d_model]`).
    pub shared: Embedding<B>,
    /// The encoder stack.
    pub encoder: T5Stack<B>,
}

impl T5Config {
    /// Builds a randomly initialised encoder with this configuration.
    ///
    /// Errors: the config's [`validate`](Self::validate) errors.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> diffusion_core::Result<T5EncoderModel<B>> {
        self.validate()?;
        let activation = self.activation()?;
        let norm = || {
            T5LayerNormConfig::new(self.d_model)
                .with_epsilon(self.layer_norm_epsilon)
                .init(device)
        };
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let gated = self.is_gated_act();
        let block = (0..self.num_layers)
            .map(|i| T5Block {
                layer: (
                    T5LayerSelfAttention {
                        SelfAttention: T5AttentionConfig::new(
                            self.d_model,
                            self.d_kv,
                            self.num_heads,
                            i == 0,
                        )
                        .with_relative_attention_num_buckets(self.relative_attention_num_buckets)
                        .with_relative_attention_max_distance(self.relative_attention_max_distance)
                        .init(device),
                        layer_norm: norm(),
                    },
                    T5LayerFF {
                        DenseReluDense: T5DenseReluDense {
                            wi: (!gated).then(|| linear(self.d_model, self.d_ff)),
                            wi_0: gated.then(|| linear(self.d_model, self.d_ff)),
                            wi_1: gated.then(|| linear(self.d_model, self.d_ff)),
                            wo: linear(self.d_ff, self.d_model),
                            activation,
                        },
                        layer_norm: norm(),
                    },
                ),
            })
            .collect();
        Ok(T5EncoderModel {
            shared: EmbeddingConfig::new(self.vocab_size, self.d_model).init(device),
            encoder: T5Stack {
                block,
                final_layer_norm: norm(),
            },
        })
    }
}

impl<B: Backend> T5EncoderModel<B> {
    /// Encodes token ids; returns transformers' `last_hidden_state`.
    ///
    /// `attention_mask` is transformers' mask: `1` for real tokens, `0` for padding keys,
    /// which no position attends to. Padding positions still get an output (computed from
    /// the real tokens), as in transformers. A row without any real token attends to
    /// nothing and its attention output is zero (transformers would spread it uniformly);
    /// such rows carry no information either way.
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, seq]`
    /// - attention_mask: `[batch, seq]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let first = &self.encoder.block[0].layer.0.SelfAttention;
        let heads = first.num_heads;
        let position_bias = first
            .compute_bias(seq, seq, &device)
            .expect("block 0 of a T5 encoder owns the relative attention bias");
        let mask = attention_mask.map(|m| {
            m.equal_elem(0)
                .reshape([batch, 1, 1, seq])
                .expand([batch, heads, seq, seq])
        });
        let mut x = self.shared.forward(input_ids);
        for block in &self.encoder.block {
            x = block.forward(x, position_bias.clone(), mask.clone());
        }
        self.encoder.final_layer_norm.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn buckets_match_transformers() {
        // transformers T5Attention._relative_position_bucket(rp, bidirectional=True, ...)
        let rp = [
            -1000, -200, -128, -127, -100, -64, -33, -32, -31, -17, -16, -15, -12, -9, -8, -7, -3,
            -1, 0, 1, 2, 7, 8, 9, 11, 12, 15, 16, 17, 23, 24, 31, 32, 33, 45, 46, 63, 64, 65, 90,
            91, 127, 128, 129, 500,
        ];
        let cases: [(usize, usize, [usize; 45]); 3] = [
            (
                32,
                128,
                [
                    15, 15, 15, 15, 15, 14, 12, 12, 11, 10, 10, 9, 9, 8, 8, 7, 3, 1, 0, 17, 18, 23,
                    24, 24, 24, 25, 25, 26, 26, 27, 27, 27, 28, 28, 28, 29, 29, 30, 30, 30, 31, 31,
                    31, 31, 31,
                ],
            ),
            (
                64,
                256,
                [
                    31, 30, 28, 27, 26, 24, 20, 20, 19, 16, 16, 15, 12, 9, 8, 7, 3, 1, 0, 33, 34,
                    39, 40, 41, 43, 44, 47, 48, 48, 50, 50, 51, 52, 52, 53, 54, 55, 56, 56, 57, 58,
                    59, 60, 60, 63,
                ],
            ),
            (
                8,
                20,
                [
                    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 1, 0, 5, 6, 7, 7, 7, 7, 7,
                    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
                ],
            ),
        ];
        for (num_buckets, max_distance, expected) in cases {
            for (r, want) in rp.iter().zip(expected) {
                assert_eq!(
                    relative_position_bucket(*r, num_buckets, max_distance),
                    want,
                    "rp {r}, {num_buckets} buckets, max distance {max_distance}"
                );
            }
        }
        assert_eq!(
            relative_position_buckets(2, 3, 32, 128),
            vec![0, 17, 18, 1, 0, 17]
        );
    }

    fn tiny_config(feed_forward_proj: &str) -> T5Config {
        T5Config {
            vocab_size: 50,
            d_model: 16,
            d_kv: 4,
            d_ff: 24,
            num_layers: 2,
            num_heads: 2,
            feed_forward_proj: feed_forward_proj.to_string(),
            ..T5Config::default()
        }
    }

    #[test]
    fn shapes_and_variants() {
        let device = Default::default();
        for proj in ["gated-gelu", "relu"] {
            let model = tiny_config(proj).init::<B>(&device).unwrap();
            let ff = &model.encoder.block[1].layer.1.DenseReluDense;
            assert_eq!(ff.wi.is_some(), proj == "relu");
            assert_eq!(ff.wi_0.is_some(), proj != "relu");
            assert!(
                model.encoder.block[0]
                    .layer
                    .0
                    .SelfAttention
                    .relative_attention_bias
                    .is_some()
            );
            assert!(
                model.encoder.block[1]
                    .layer
                    .0
                    .SelfAttention
                    .relative_attention_bias
                    .is_none()
            );
            let ids = Tensor::<B, 2, Int>::from_data([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]], &device);
            let out = model.forward(ids, None);
            assert_eq!(out.dims(), [2, 5, 16]);
        }
        let bad = T5Config {
            num_heads: 0,
            ..tiny_config("relu")
        };
        assert!(bad.init::<B>(&device).is_err());
    }

    #[test]
    fn masked_keys_do_not_influence_real_tokens() {
        let device = Default::default();
        let model = tiny_config("gated-gelu").init::<B>(&device).unwrap();
        let a = Tensor::<B, 2, Int>::from_data([[5, 9, 13, 2, 0, 0]], &device);
        let b = Tensor::<B, 2, Int>::from_data([[5, 9, 13, 2, 7, 31]], &device);
        let mask = Tensor::<B, 2, Int>::from_data([[1, 1, 1, 1, 0, 0]], &device);
        let out_a = model.forward(a, Some(mask.clone())).narrow(1, 0, 4);
        let out_b = model.forward(b, Some(mask)).narrow(1, 0, 4);
        let diff: f32 = (out_a - out_b).abs().max().into_scalar();
        assert!(
            diff < 1e-6,
            "padding tokens leaked into real tokens: {diff}"
        );
    }
}
