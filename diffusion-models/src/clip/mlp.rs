//! CLIP's two-layer MLP (`CLIPMLP`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::activation::ClipActivation;

/// Configuration of [`ClipMlp`].
#[derive(Config, Debug)]
pub struct ClipMlpConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the inner layer.
    pub intermediate_size: usize,
    /// Activation between the two layers.
    pub activation: ClipActivation,
}

impl ClipMlpConfig {
    /// Builds the layer with random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipMlp<B> {
        ClipMlp {
            fc1: LinearConfig::new(self.hidden_size, self.intermediate_size).init(device),
            fc2: LinearConfig::new(self.intermediate_size, self.hidden_size).init(device),
            activation: self.activation,
        }
    }
}

/// `fc2(act(fc1(x)))`. Keys: `fc1`, `fc2`.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    /// Input projection to `intermediate_size`.
    pub fc1: Linear<B>,
    /// Output projection back to `hidden_size`.
    pub fc2: Linear<B>,
    /// The activation (`hidden_act`).
    #[module(skip)]
    pub activation: ClipActivation,
}

impl<B: Backend> ClipMlp<B> {
    /// Applies the MLP to every token.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, hidden_size]`
    /// - output: `[batch, seq, hidden_size]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2
            .forward(self.activation.forward(self.fc1.forward(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn composes_fc1_activation_fc2() {
        let device = Default::default();
        let mlp = ClipMlpConfig::new(4, 6, ClipActivation::QuickGelu).init::<B>(&device);
        let x = Tensor::<B, 3>::random([1, 3, 4], Distribution::Normal(0.0, 1.0), &device);
        let h = mlp.fc1.forward(x.clone());
        let h = h.clone() * burn::tensor::activation::sigmoid(h * 1.702);
        let want = mlp.fc2.forward(h);
        let got = mlp.forward(x);
        assert_eq!(got.dims(), [1, 3, 4]);
        assert!((got - want).abs().max().into_scalar() < 1e-6);
    }
}
