//! T5's layer norm: RMS normalisation with a learned scale, no mean subtraction, no bias.
//!
//! burn-nn's `RmsNorm` computes the same function but names its scale `gamma`, and
//! burn-store's PyTorch adapter only renames `weight` to `gamma` for `LayerNorm`,
//! `GroupNorm` and `BatchNorm`; this module keeps transformers' key (`layer_norm.weight`)
//! so checkpoints load by a direct path match.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// Configuration of a [`T5LayerNorm`].
#[derive(Config, Debug)]
pub struct T5LayerNormConfig {
    /// Width of the normalised (last) dimension.
    pub hidden_size: usize,
    /// Added to the mean square before the square root.
    #[config(default = 1e-6)]
    pub epsilon: f64,
}

impl T5LayerNormConfig {
    /// Builds the layer with a unit scale.
    pub fn init<B: Backend>(&self, device: &B::Device) -> T5LayerNorm<B> {
        T5LayerNorm {
            weight: Param::from_tensor(Tensor::ones([self.hidden_size], device)),
            epsilon: self.epsilon,
        }
    }
}

/// transformers' `T5LayerNorm`: `weight * x / sqrt(mean(x^2, last dim) + eps)`.
///
/// The statistics and the normalisation are computed in `f32` whatever the input dtype, and
/// the result is cast to the dtype of `weight` before scaling, as transformers does.
#[derive(Module, Debug)]
pub struct T5LayerNorm<B: Backend> {
    /// The learned per-feature scale (`weight` in the state dict).
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square before the square root.
    pub epsilon: f64,
}

impl<B: Backend> T5LayerNorm<B> {
    /// Normalises over the last dimension.
    ///
    /// # Shapes
    ///
    /// - input: `[..., hidden_size]`
    /// - output: `[..., hidden_size]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x32 = if dtype == DType::F32 {
            x
        } else {
            x.cast(DType::F32)
        };
        let variance = x32.clone().square().mean_dim(D - 1);
        let normalized = x32 * variance.add_scalar(self.epsilon).sqrt().recip();
        let weight = self.weight.val();
        let normalized = if weight.dtype() == DType::F32 {
            normalized
        } else {
            normalized.cast(weight.dtype())
        };
        normalized * weight.unsqueeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn matches_transformers_t5_layer_norm() {
        let device = Default::default();
        let mut norm = T5LayerNormConfig::new(4).init::<B>(&device);
        norm.weight = Param::from_tensor(Tensor::from_floats([0.5, -1.0, 2.0, 1.5], &device));
        let x =
            Tensor::<B, 2>::from_floats([[1.0, -2.0, 3.0, 0.5], [0.0, 0.1, -0.2, 0.3]], &device);
        // transformers.models.t5.modeling_t5.T5LayerNorm(4, eps=1e-6) with the weight above.
        let expected = [
            [
                0.2649064362049103,
                1.0596257448196411,
                3.178877353668213,
                0.3973596692085266,
            ],
            [
                0.0,
                -0.534514844417572,
                -2.138059377670288,
                2.4053168296813965,
            ],
        ];
        let got: Vec<f32> = norm.forward(x).into_data().to_vec().unwrap();
        for (g, w) in got.iter().zip(expected.iter().flatten()) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn output_has_the_weight_dtype() {
        let device = Default::default();
        let mut norm = T5LayerNormConfig::new(3).init::<B>(&device);
        norm.weight = Param::from_tensor(Tensor::<B, 1>::ones([3], &device).cast(DType::F64));
        let x = Tensor::<B, 3>::ones([1, 2, 3], &device);
        let y = norm.forward(x);
        assert_eq!(y.dtype(), DType::F64);
        assert_eq!(y.dims(), [1, 2, 3]);
        let values: Vec<f64> = y.into_data().to_vec().unwrap();
        assert!(values.iter().all(|v| (v - 1.0).abs() < 1e-6));
    }
}
