//! The MLP activations CLIP text configs name in `hidden_act`.

use burn::tensor::Tensor;
use burn::tensor::activation;
use burn::tensor::backend::Backend;
use diffusion_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// The activation of a CLIP MLP, as transformers' `ACT2FN[hidden_act]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`: `"quick_gelu"` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// Exact (erf) GELU: `"gelu"` (OpenCLIP, SD 2.x, SDXL's second encoder).
    Gelu,
    /// Tanh-approximated GELU: `"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`.
    GeluTanh,
}

impl ClipActivation {
    /// Parses a transformers activation name; unknown names are an
    /// [`Error::InvalidConfig`] for `hidden_act`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            other => Err(Error::config(
                "hidden_act",
                format!("unsupported activation `{other}` (expected quick_gelu, gelu or gelu_new)"),
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
            Self::QuickGelu => x.clone() * activation::sigmoid(x.mul_scalar(1.702)),
            Self::Gelu => activation::gelu(x),
            Self::GeluTanh => activation::gelu_approximate(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn matches_closed_forms() {
        let xs = [-3.0f64, -1.0, -0.25, 0.0, 0.5, 2.0];
        let x = Tensor::<B, 1>::from_floats(xs.map(|v| v as f32), &Default::default());
        let run =
            |a: ClipActivation| -> Vec<f32> { a.forward(x.clone()).into_data().to_vec().unwrap() };
        let quick = run(ClipActivation::QuickGelu);
        let tanh = run(ClipActivation::GeluTanh);
        let exact = run(ClipActivation::Gelu);
        // torch.nn.functional.gelu(x) (erf form) at xs.
        let gelu_ref = [
            -0.00404969409489031,
            -0.15865525393145702,
            -0.10032341857926907,
            0.0,
            0.34573123063700656,
            1.9544997361036416,
        ];
        for (i, &v) in xs.iter().enumerate() {
            let q = v / (1.0 + (-1.702 * v).exp());
            let t = 0.5
                * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
            assert!((quick[i] as f64 - q).abs() < 1e-6, "quick_gelu({v})");
            assert!((tanh[i] as f64 - t).abs() < 1e-6, "gelu_new({v})");
            assert!(
                (exact[i] as f64 - gelu_ref[i]).abs() < 1e-6,
                "gelu({v}) = {}",
                exact[i]
            );
        }
    }

    #[test]
    fn names() {
        assert_eq!(
            ClipActivation::from_name("gelu_pytorch_tanh").unwrap(),
            ClipActivation::GeluTanh
        );
        assert!(matches!(
            ClipActivation::from_name("relu"),
            Err(Error::InvalidConfig { key, .. }) if key == "hidden_act"
        ));
    }
}
