//! diffusers' `Attention` as used by the U-Net's transformer blocks (self- and
//! cross-attention) and by the VAE mid-block (with `group_norm` and a residual).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::kernels::{flash_applies, linear, scaled_dot_product};
use super::{cast_to, group_norm, upcast_dtype};

/// How attention is evaluated.
///
/// Both paths go through [`burn::tensor::module::attention`], so backends with a fused
/// kernel use it; the chunked path calls it once per block of query rows, which bounds
/// the `[batch, heads, queries, keys]` score matrix of unfused backends to
/// `chunk x keys` per head (the VAE's mid-block at 1024x1024 has 16384 queries).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum AttentionChunking {
    /// One call over all queries.
    Off,
    /// Queries are processed `n` rows at a time (`n > 0`).
    QueryChunks(usize),
}

// `#[derive(Default)]` does not combine with burn's `Config` derive on enums.
#[allow(clippy::derivable_impls)]
impl Default for AttentionChunking {
    fn default() -> Self {
        Self::Off
    }
}

/// Configuration of an [`Attention`] layer; defaults are diffusers'.
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Width of the queries (and of the output).
    pub query_dim: usize,
    /// Width of the keys/values source for cross-attention (default: `query_dim`).
    #[config(default = "None")]
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    #[config(default = 8)]
    pub heads: usize,
    /// Width of one head.
    #[config(default = 64)]
    pub dim_head: usize,
    /// Bias on `to_q`, `to_k`, `to_v`.
    #[config(default = false)]
    pub bias: bool,
    /// Bias on `to_out.0`.
    #[config(default = true)]
    pub out_bias: bool,
    /// Computes `QK^T` in `f32` for half-precision inputs.
    #[config(default = false)]
    pub upcast_attention: bool,
    /// Computes the softmax in `f32` for half-precision inputs.
    #[config(default = false)]
    pub upcast_softmax: bool,
    /// Groups of the input `group_norm` (the VAE's attention); `None`: no norm.
    #[config(default = "None")]
    pub norm_num_groups: Option<usize>,
    /// Epsilon of `group_norm`.
    #[config(default = 1e-5)]
    pub eps: f64,
    /// Adds the input to the output.
    #[config(default = false)]
    pub residual_connection: bool,
    /// The output (after the residual) is divided by this factor.
    #[config(default = 1.0)]
    pub rescale_output_factor: f64,
    /// How attention is evaluated.
    #[config(default = "AttentionChunking::Off")]
    pub chunking: AttentionChunking,
}

/// diffusers' `Attention` with the default processor (`AttnProcessor2_0`).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Group norm over the input channels (VAE attention only).
    pub group_norm: Option<GroupNorm<B>>,
    /// Query projection.
    pub to_q: Linear<B>,
    /// Key projection.
    pub to_k: Linear<B>,
    /// Value projection.
    pub to_v: Linear<B>,
    /// Output projection (`to_out.0`; PyTorch's `to_out.1` is a parameterless dropout).
    pub to_out: Vec<Linear<B>>,
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub dim_head: usize,
    /// Runs the attention product in `f32` for half-precision inputs.
    pub upcast: bool,
    /// Adds the input to the output.
    pub residual_connection: bool,
    /// The output is divided by this factor.
    pub rescale_output_factor: f64,
    /// How attention is evaluated.
    pub chunking: AttentionChunking,
}

impl AttentionConfig {
    /// Builds the layer with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let inner = self.heads * self.dim_head;
        let kv_dim = self.cross_attention_dim.unwrap_or(self.query_dim);
        Attention {
            group_norm: self.norm_num_groups.map(|g| {
                GroupNormConfig::new(g, self.query_dim)
                    .with_epsilon(self.eps)
                    .init(device)
            }),
            to_q: LinearConfig::new(self.query_dim, inner)
                .with_bias(self.bias)
                .init(device),
            to_k: LinearConfig::new(kv_dim, inner)
                .with_bias(self.bias)
                .init(device),
            to_v: LinearConfig::new(kv_dim, inner)
                .with_bias(self.bias)
                .init(device),
            to_out: vec![
                LinearConfig::new(inner, self.query_dim)
                    .with_bias(self.out_bias)
                    .init(device),
            ],
            heads: self.heads,
            dim_head: self.dim_head,
            upcast: self.upcast_attention || self.upcast_softmax,
            residual_connection: self.residual_connection,
            rescale_output_factor: self.rescale_output_factor,
            chunking: self.chunking,
        }
    }
}

impl<B: Backend> Attention<B> {
    /// Self-attention (`context = None`) or cross-attention over a sequence.
    ///
    /// # Shapes
    ///
    /// - hidden: `[batch, seq_q, query_dim]`
    /// - context: `[batch, seq_k, cross_attention_dim]`
    /// - output: `[batch, seq_q, query_dim]`
    pub fn forward(&self, hidden: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let residual = self.residual_connection.then(|| hidden.clone());
        let hidden = match &self.group_norm {
            Some(norm) => group_norm(norm, hidden.swap_dims(1, 2)).swap_dims(1, 2),
            None => hidden,
        };
        let [batch, seq_q, _] = hidden.dims();
        let context = context.unwrap_or_else(|| hidden.clone());
        let seq_k = context.dims()[1];

        let split = |x: Tensor<B, 3>, seq: usize| {
            x.reshape([batch, seq, self.heads, self.dim_head])
                .swap_dims(1, 2)
        };
        let q = split(linear(&self.to_q, hidden), seq_q);
        let k = split(linear(&self.to_k, context.clone()), seq_k);
        let v = split(linear(&self.to_v, context), seq_k);

        let out = self.attend(q, k, v);
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, seq_q, self.heads * self.dim_head]);
        let mut out = linear(&self.to_out[0], out);
        if let Some(residual) = residual {
            out = out + residual;
        }
        if self.rescale_output_factor != 1.0 {
            out = out.div_scalar(self.rescale_output_factor);
        }
        out
    }

    /// Self-attention over the pixels of a feature map (the VAE mid-block).
    ///
    /// # Shapes
    ///
    /// - input: `[batch, channels, height, width]` with `channels = query_dim`
    /// - output: `[batch, channels, height, width]`
    pub fn forward_spatial(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, channels, height, width] = x.dims();
        let seq = x.reshape([batch, channels, height * width]).swap_dims(1, 2);
        self.forward(seq, None)
            .swap_dims(1, 2)
            .reshape([batch, channels, height, width])
    }

    /// `softmax(q k^T / sqrt(dim_head)) v`, per head, in chunks of queries if configured.
    ///
    /// # Shapes
    ///
    /// - q: `[batch, heads, seq_q, dim_head]`
    /// - k, v: `[batch, heads, seq_k, dim_head]`
    /// - output: `[batch, heads, seq_q, dim_head]`
    pub fn attend(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
        let dtype = q.dtype();
        let wide = upcast_dtype(dtype);
        // The flash kernels accumulate the scores, the softmax and the output in f32.
        let (q, k, v) = if self.upcast && wide != dtype && !flash_applies::<B>() {
            (cast_to(q, wide), cast_to(k, wide), cast_to(v, wide))
        } else {
            (q, k, v)
        };
        let scale = Some(1.0 / (self.dim_head as f64).sqrt());
        let seq_q = q.dims()[2];
        let out = match self.chunking {
            AttentionChunking::QueryChunks(n) if n > 0 && n < seq_q => {
                let chunks = q
                    .split(n, 2)
                    .into_iter()
                    .map(|qc| scaled_dot_product(qc, k.clone(), v.clone(), scale))
                    .collect();
                Tensor::cat(chunks, 2)
            }
            _ => scaled_dot_product(q, k, v, scale),
        };
        cast_to(out, dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, TensorData};

    type B = NdArray<f32>;

    fn max_abs(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Naive reference: per batch and head, softmax(q k^T * scale) v with f64 arithmetic.
    fn reference(attn: &Attention<B>, x: &Tensor<B, 3>, ctx: &Tensor<B, 3>) -> Vec<f64> {
        let q: Vec<f32> = attn.to_q.forward(x.clone()).into_data().to_vec().unwrap();
        let k: Vec<f32> = attn.to_k.forward(ctx.clone()).into_data().to_vec().unwrap();
        let v: Vec<f32> = attn.to_v.forward(ctx.clone()).into_data().to_vec().unwrap();
        let [b, sq, _] = x.dims();
        let sk = ctx.dims()[1];
        let (h, d) = (attn.heads, attn.dim_head);
        let inner = h * d;
        let mut out = vec![0.0f64; b * sq * inner];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..sq {
                    let scores: Vec<f64> = (0..sk)
                        .map(|j| {
                            (0..d)
                                .map(|c| {
                                    q[(bi * sq + i) * inner + hi * d + c] as f64
                                        * k[(bi * sk + j) * inner + hi * d + c] as f64
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        out[(bi * sq + i) * inner + hi * d + c] = (0..sk)
                            .map(|j| e[j] / z * v[(bi * sk + j) * inner + hi * d + c] as f64)
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn cross_attention_matches_a_naive_reference() {
        let device = Default::default();
        let attn = AttentionConfig::new(8)
            .with_cross_attention_dim(Some(6))
            .with_heads(2)
            .with_dim_head(4)
            .init::<B>(&device);
        let x = Tensor::<B, 3>::random([2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        let ctx = Tensor::<B, 3>::random([2, 3, 6], Distribution::Normal(0.0, 1.0), &device);
        let inner = reference(&attn, &x, &ctx);
        let inner = Tensor::<B, 3>::from_data(
            TensorData::new(inner.iter().map(|&v| v as f32).collect(), [2, 5, 8]),
            &device,
        );
        let expect = attn.to_out[0].forward(inner);
        let got = attn.forward(x, Some(ctx));
        assert!(max_abs(got, expect) < 1e-5);
    }

    #[test]
    fn chunked_equals_unchunked() {
        let device = Default::default();
        let mut attn = AttentionConfig::new(16)
            .with_heads(2)
            .with_dim_head(8)
            .with_norm_num_groups(Some(4))
            .with_residual_connection(true)
            .with_rescale_output_factor(2.0)
            .init::<B>(&device);
        let x = Tensor::<B, 4>::random([2, 16, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        let full = attn.forward_spatial(x.clone());
        for n in [1, 4, 7, 34, 35, 100] {
            attn.chunking = AttentionChunking::QueryChunks(n);
            let chunked = attn.forward_spatial(x.clone());
            let diff: f32 = (chunked - full.clone()).abs().max().into_scalar();
            assert!(diff < 1e-5, "chunk {n}: {diff}");
        }
    }

    #[test]
    fn spatial_residual_and_rescale() {
        // With to_out zeroed, the output is (input + bias) / factor = input / factor.
        let device = Default::default();
        let mut attn = AttentionConfig::new(4)
            .with_heads(1)
            .with_dim_head(4)
            .with_norm_num_groups(Some(2))
            .with_residual_connection(true)
            .with_rescale_output_factor(4.0)
            .init::<B>(&device);
        let out = &mut attn.to_out[0];
        out.weight = burn::module::Param::from_tensor(Tensor::zeros([4, 4], &device));
        out.bias = Some(burn::module::Param::from_tensor(Tensor::zeros(
            [4],
            &device,
        )));
        let x = Tensor::<B, 4>::random([1, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
        let y = attn.forward_spatial(x.clone());
        let diff: f32 = (y - x.div_scalar(4.0)).abs().max().into_scalar();
        assert!(diff < 1e-7);
    }
}
