//! CLIP's pre-norm transformer encoder (`CLIPEncoderLayer`, `CLIPEncoder`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::activation::ClipActivation;
use super::attention::{ClipAttention, ClipAttentionConfig};
use super::mlp::{ClipMlp, ClipMlpConfig};
use crate::nn::layer_norm;

/// Configuration of [`ClipEncoderLayer`] and [`ClipEncoder`].
#[derive(Config, Debug)]
pub struct ClipEncoderConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Number of layers (for [`ClipEncoder`]).
    pub num_layers: usize,
    /// MLP activation.
    pub activation: ClipActivation,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
}

impl ClipEncoderConfig {
    /// Builds one encoder layer with random weights.
    pub fn init_layer<B: Backend>(&self, device: &B::Device) -> ClipEncoderLayer<B> {
        let norm = || {
            LayerNormConfig::new(self.hidden_size)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        ClipEncoderLayer {
            self_attn: ClipAttentionConfig::new(self.hidden_size, self.num_heads).init(device),
            layer_norm1: norm(),
            mlp: ClipMlpConfig::new(self.hidden_size, self.intermediate_size, self.activation)
                .init(device),
            layer_norm2: norm(),
        }
    }

    /// Builds the `num_layers`-layer encoder with random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipEncoder<B> {
        ClipEncoder {
            layers: (0..self.num_layers)
                .map(|_| self.init_layer(device))
                .collect(),
        }
    }
}

/// One pre-norm block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
///
/// Keys: `self_attn.*`, `layer_norm1`, `mlp.*`, `layer_norm2`.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    /// Causal self-attention.
    pub self_attn: ClipAttention<B>,
    /// Norm before the attention.
    pub layer_norm1: LayerNorm<B>,
    /// The MLP.
    pub mlp: ClipMlp<B>,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    /// Applies the block.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, hidden_size]`
    /// - output: `[batch, seq, hidden_size]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(layer_norm(&self.layer_norm1, x));
        x.clone() + self.mlp.forward(layer_norm(&self.layer_norm2, x))
    }
}

/// The stack of encoder layers. Keys: `layers.N.*`.
#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    /// The layers, applied in order.
    pub layers: Vec<ClipEncoderLayer<B>>,
}

impl<B: Backend> ClipEncoder<B> {
    /// Runs every layer and returns the hidden states in transformers' convention: the input
    /// followed by the output of each layer (`num_layers + 1` tensors; the last one is the
    /// encoder output, before the model's final LayerNorm).
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, hidden_size]`
    /// - output: `num_layers + 1` tensors of `[batch, seq, hidden_size]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Vec<Tensor<B, 3>> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        let mut h = x;
        for layer in &self.layers {
            states.push(h.clone());
            h = layer.forward(h);
        }
        states.push(h);
        states
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn layer_is_pre_norm_residual() {
        let device = Default::default();
        let config = ClipEncoderConfig::new(8, 12, 2, 2, ClipActivation::Gelu);
        let layer = config.init_layer::<B>(&device);
        let x = Tensor::<B, 3>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), &device);
        let h = x.clone()
            + layer
                .self_attn
                .forward(layer.layer_norm1.forward(x.clone()));
        let want = h.clone() + layer.mlp.forward(layer.layer_norm2.forward(h));
        let got = layer.forward(x);
        assert!((got - want).abs().max().into_scalar() < 1e-6);
    }

    #[test]
    fn encoder_returns_every_hidden_state() {
        let device = Default::default();
        let encoder =
            ClipEncoderConfig::new(8, 12, 2, 3, ClipActivation::QuickGelu).init::<B>(&device);
        let x = Tensor::<B, 3>::random([1, 4, 8], Distribution::Normal(0.0, 1.0), &device);
        let states = encoder.forward(x.clone());
        assert_eq!(states.len(), 4);
        assert!((states[0].clone() - x).abs().max().into_scalar() == 0.0);
        let second = encoder.layers[1].forward(states[1].clone());
        assert!((states[2].clone() - second).abs().max().into_scalar() == 0.0);
    }
}
