//! CLIP's causal multi-head self-attention (`CLIPAttention`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::nn::{cast_to, upcast_dtype};

/// Configuration of [`ClipAttention`].
#[derive(Config, Debug)]
pub struct ClipAttentionConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of heads; must divide `hidden_size`.
    pub num_heads: usize,
}

impl ClipAttentionConfig {
    /// Builds the layer with random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipAttention<B> {
        let linear = || LinearConfig::new(self.hidden_size, self.hidden_size).init(device);
        ClipAttention {
            q_proj: linear(),
            k_proj: linear(),
            v_proj: linear(),
            out_proj: linear(),
            num_heads: self.num_heads,
        }
    }
}

/// Multi-head self-attention with a causal mask: token `i` attends to tokens `0..=i`.
/// In a model running in `f16` / `bf16`, the attention itself is computed in `f32`.
///
/// Keys: `q_proj`, `k_proj`, `v_proj`, `out_proj` (each `weight` and `bias`). The attention
/// itself is Burn's fused [`attention`] op (scale `1/sqrt(head_dim)`, `is_causal`), which
/// backends may accelerate.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    /// Query projection.
    pub q_proj: Linear<B>,
    /// Key projection.
    pub k_proj: Linear<B>,
    /// Value projection.
    pub v_proj: Linear<B>,
    /// Output projection.
    pub out_proj: Linear<B>,
    /// Number of heads.
    #[module(skip)]
    pub num_heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    /// Causal self-attention.
    ///
    /// # Shapes
    ///
    /// - hidden_states: `[batch, seq, hidden_size]`
    /// - output: `[batch, seq, hidden_size]`
    pub fn forward(&self, hidden_states: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, width] = hidden_states.dims();
        let head_dim = width / self.num_heads;
        let heads = |x: Tensor<B, 3>| {
            x.reshape([batch, seq, self.num_heads, head_dim])
                .swap_dims(1, 2)
        };
        let q = heads(self.q_proj.forward(hidden_states.clone()));
        let k = heads(self.k_proj.forward(hidden_states.clone()));
        let v = heads(self.v_proj.forward(hidden_states));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        // f16 / bf16: the scores and the softmax run in f32 (cast back after).
        let dtype = q.dtype();
        let wide = upcast_dtype(dtype);
        let out = attention(
            cast_to(q, wide),
            cast_to(k, wide),
            cast_to(v, wide),
            None,
            None,
            options,
        );
        let out = cast_to(out, dtype)
            .swap_dims(1, 2)
            .reshape([batch, seq, width]);
        self.out_proj.forward(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, activation::softmax};

    type B = NdArray<f32>;

    /// The same computation written out: per-head softmax(QKᵀ/√d + causal mask) V.
    fn reference(layer: &ClipAttention<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, width] = x.dims();
        let h = layer.num_heads;
        let d = width / h;
        let split = |t: Tensor<B, 3>| t.reshape([batch, seq, h, d]).swap_dims(1, 2);
        let q = split(layer.q_proj.forward(x.clone()));
        let k = split(layer.k_proj.forward(x.clone()));
        let v = split(layer.v_proj.forward(x));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((d as f64).sqrt());
        let mask = Tensor::<B, 2>::ones([seq, seq], &Default::default())
            .triu(1)
            .bool()
            .reshape([1, 1, seq, seq])
            .expand([batch, h, seq, seq]);
        let scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        let out = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq, width]);
        layer.out_proj.forward(out)
    }

    #[test]
    fn matches_explicit_causal_softmax() {
        let device = Default::default();
        let layer = ClipAttentionConfig::new(12, 3).init::<B>(&device);
        let x = Tensor::<B, 3>::random([2, 5, 12], Distribution::Normal(0.0, 1.0), &device);
        let got = layer.forward(x.clone());
        let want = reference(&layer, x);
        let diff = (got - want).abs().max().into_scalar();
        assert!(diff < 1e-5, "max diff {diff}");
    }

    #[test]
    fn is_causal() {
        // Changing the last token must not change the outputs at earlier positions.
        let device = Default::default();
        let layer = ClipAttentionConfig::new(8, 2).init::<B>(&device);
        let x = Tensor::<B, 3>::random([1, 4, 8], Distribution::Normal(0.0, 1.0), &device);
        let mut y = x.clone();
        y = y.slice_assign([0..1, 3..4, 0..8], Tensor::ones([1, 1, 8], &device));
        let a = layer.forward(x).slice([0..1, 0..3, 0..8]);
        let b = layer.forward(y).slice([0..1, 0..3, 0..8]);
        assert!((a - b).abs().max().into_scalar() < 1e-6);
    }
}
