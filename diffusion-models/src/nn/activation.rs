//! The activation functions named by diffusers configs (`act_fn`).

use burn::config::Config;
use burn::tensor::Tensor;
use burn::tensor::activation;
use burn::tensor::backend::Backend;
use diffusion_core::{Error, Result};

/// An element-wise activation, as selected by diffusers' `get_activation(name)`.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`; diffusers' `"silu"` and `"swish"`.
    Silu,
    /// `x * tanh(softplus(x))`; diffusers' `"mish"`.
    Mish,
    /// Exact (erf) GELU; diffusers' `"gelu"`.
    Gelu,
    /// `max(x, 0)`; diffusers' `"relu"`.
    Relu,
}

impl Activation {
    /// Parses a diffusers activation name (`"silu"`, `"swish"`, `"mish"`, `"gelu"`, `"relu"`).
    ///
    /// `key` names the config key the value came from, for the error message.
    pub fn from_name(name: &str, key: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "mish" => Ok(Self::Mish),
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            other => Err(Error::config(
                key,
                format!("unknown activation `{other}` (expected silu, swish, mish, gelu or relu)"),
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
            Self::Silu => activation::silu(x),
            Self::Mish => activation::mish(x),
            Self::Gelu => activation::gelu(x),
            Self::Relu => activation::relu(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn names_map_to_functions_and_unknown_is_an_error() {
        assert_eq!(
            Activation::from_name("swish", "act_fn").unwrap(),
            Activation::Silu
        );
        assert_eq!(
            Activation::from_name("silu", "act_fn").unwrap(),
            Activation::Silu
        );
        assert_eq!(
            Activation::from_name("gelu", "act_fn").unwrap(),
            Activation::Gelu
        );
        let err = Activation::from_name("tanhh", "act_fn").unwrap_err();
        assert!(err.to_string().contains("act_fn"), "{err}");
    }

    #[test]
    fn values_match_closed_forms() {
        let device = Default::default();
        let x = Tensor::<B, 1>::from_floats([-2.0, -0.5, 0.0, 1.0, 3.0], &device);
        let xs = [-2.0f64, -0.5, 0.0, 1.0, 3.0];
        let silu: Vec<f32> = Activation::Silu
            .forward(x.clone())
            .into_data()
            .to_vec()
            .unwrap();
        let mish: Vec<f32> = Activation::Mish
            .forward(x.clone())
            .into_data()
            .to_vec()
            .unwrap();
        let relu: Vec<f32> = Activation::Relu
            .forward(x.clone())
            .into_data()
            .to_vec()
            .unwrap();
        let gelu: Vec<f32> = Activation::Gelu.forward(x).into_data().to_vec().unwrap();
        // GELU reference values (torch.nn.functional.gelu, exact erf form).
        let gelu_ref = [-0.04550026f64, -0.15426877, 0.0, 0.8413447, 2.9959502];
        for (i, &v) in xs.iter().enumerate() {
            let s = v / (1.0 + (-v).exp());
            let m = v * (1.0 + v.exp()).ln().tanh();
            assert!((silu[i] as f64 - s).abs() < 1e-6);
            assert!((mish[i] as f64 - m).abs() < 1e-6);
            assert!((relu[i] as f64 - v.max(0.0)).abs() < 1e-7);
            assert!((gelu[i] as f64 - gelu_ref[i]).abs() < 1e-6);
        }
    }
}
