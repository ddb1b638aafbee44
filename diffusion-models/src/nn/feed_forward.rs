//! diffusers' `FeedForward` (`ff.net.0.proj`, `ff.net.2`) with its gated (GEGLU) or
//! plain GELU input projection.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::backend::Backend;
use diffusion_core::{Error, Result};

/// The input projection type of a [`FeedForward`] (`activation_fn`).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum FeedForwardActivation {
    /// `"geglu"`: `proj` to twice the inner width, `a * gelu(gate)`.
    Geglu,
    /// `"gelu"`: `gelu(proj(x))` with the exact GELU.
    Gelu,
    /// `"gelu-approximate"`: `gelu(proj(x))` with the tanh approximation.
    GeluApproximate,
}

impl FeedForwardActivation {
    /// Parses diffusers' `activation_fn` value.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "geglu" => Ok(Self::Geglu),
            "gelu" => Ok(Self::Gelu),
            "gelu-approximate" => Ok(Self::GeluApproximate),
            other => Err(Error::Unsupported(format!(
                "feed-forward activation `{other}` (supported: geglu, gelu, gelu-approximate)"
            ))),
        }
    }
}

/// Configuration of a [`FeedForward`]; defaults are diffusers'.
#[derive(Config, Debug)]
pub struct FeedForwardConfig {
    /// Input width.
    pub dim: usize,
    /// Output width (default: `dim`).
    #[config(default = "None")]
    pub dim_out: Option<usize>,
    /// Inner width = `mult * dim` unless `inner_dim` is given.
    #[config(default = 4)]
    pub mult: usize,
    /// Explicit inner width.
    #[config(default = "None")]
    pub inner_dim: Option<usize>,
    /// The input projection type.
    #[config(default = "FeedForwardActivation::Geglu")]
    pub activation: FeedForwardActivation,
    /// Dropout probability (training only).
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Bias on both linear layers.
    #[config(default = true)]
    pub bias: bool,
}

/// The gated GELU input projection (`net.0`), also used for the ungated GELU variants.
#[derive(Module, Debug)]
pub struct GeGlu<B: Backend> {
    /// The projection (`net.0.proj`).
    pub proj: Linear<B>,
    /// Which activation follows the projection.
    pub activation: FeedForwardActivation,
}

impl<B: Backend> GeGlu<B> {
    /// Projects and gates.
    ///
    /// # Shapes
    ///
    /// - input: `[..., dim]`
    /// - output: `[..., inner_dim]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let h = super::linear(&self.proj, x);
        match self.activation {
            FeedForwardActivation::Geglu => {
                let [a, gate] = <[Tensor<B, D>; 2]>::try_from(h.chunk(2, D - 1))
                    .expect("GEGLU projection width is even");
                a * gelu(gate)
            }
            FeedForwardActivation::Gelu => gelu(h),
            FeedForwardActivation::GeluApproximate => gelu_approximate(h),
        }
    }
}

/// One entry of `ff.net` (PyTorch's `ModuleList` of mixed layers).
#[derive(Module, Debug)]
pub enum FeedForwardLayer<B: Backend> {
    /// `net.0`: the input projection and activation.
    Act(GeGlu<B>),
    /// `net.1`: dropout (no parameters).
    Dropout(Dropout),
    /// `net.2`: the output projection.
    Linear(Linear<B>),
}

/// diffusers' `FeedForward`: `net = [GEGLU, Dropout, Linear]`.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// The layers, in PyTorch's order.
    pub net: Vec<FeedForwardLayer<B>>,
}

impl FeedForwardConfig {
    /// Builds the layer with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> FeedForward<B> {
        let inner = self.inner_dim.unwrap_or(self.dim * self.mult);
        let proj_width = match self.activation {
            FeedForwardActivation::Geglu => 2 * inner,
            _ => inner,
        };
        FeedForward {
            net: vec![
                FeedForwardLayer::Act(GeGlu {
                    proj: LinearConfig::new(self.dim, proj_width)
                        .with_bias(self.bias)
                        .init(device),
                    activation: self.activation,
                }),
                FeedForwardLayer::Dropout(DropoutConfig::new(self.dropout).init()),
                FeedForwardLayer::Linear(
                    LinearConfig::new(inner, self.dim_out.unwrap_or(self.dim))
                        .with_bias(self.bias)
                        .init(device),
                ),
            ],
        }
    }
}

impl<B: Backend> FeedForward<B> {
    /// Applies the layers in order.
    ///
    /// # Shapes
    ///
    /// - input: `[..., dim]`
    /// - output: `[..., dim_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.net.iter().fold(x, |x, layer| match layer {
            FeedForwardLayer::Act(act) => act.forward(x),
            FeedForwardLayer::Dropout(dropout) => dropout.forward(x),
            FeedForwardLayer::Linear(layer) => super::linear(layer, x),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::module::Param;
    use burn::tensor::TensorData;

    type B = NdArray<f32>;

    #[test]
    fn geglu_gates_the_first_half_with_gelu_of_the_second() {
        let device = Default::default();
        let ff = FeedForwardConfig::new(1)
            .with_inner_dim(Some(1))
            .init::<B>(&device);
        let mut ff = ff;
        // proj: x -> [2x, x]; output linear: identity.
        if let FeedForwardLayer::Act(act) = &mut ff.net[0] {
            act.proj.weight = Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![2.0f32, 1.0], [1, 2]),
                &device,
            ));
            act.proj.bias = Some(Param::from_tensor(Tensor::zeros([2], &device)));
        }
        if let FeedForwardLayer::Linear(lin) = &mut ff.net[2] {
            lin.weight = Param::from_tensor(Tensor::ones([1, 1], &device));
            lin.bias = Some(Param::from_tensor(Tensor::zeros([1], &device)));
        }
        let x = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, -0.5], [2, 1]), &device);
        let y: Vec<f32> = ff.forward(x).into_data().to_vec().unwrap();
        // 2x * gelu(x): gelu(1) = 0.8413447, gelu(-0.5) = -0.15426877.
        assert!((y[0] - 2.0 * 0.841_344_7).abs() < 1e-6);
        assert!((y[1] - (-1.0) * -0.154_268_77).abs() < 1e-6);
    }

    #[test]
    fn widths_follow_diffusers() {
        let device = Default::default();
        let ff = FeedForwardConfig::new(32).init::<B>(&device);
        match (&ff.net[0], &ff.net[2]) {
            (FeedForwardLayer::Act(act), FeedForwardLayer::Linear(out)) => {
                assert_eq!(act.proj.weight.val().dims(), [32, 256]);
                assert_eq!(out.weight.val().dims(), [128, 32]);
            }
            _ => panic!("unexpected layer order"),
        }
        assert!(FeedForwardActivation::from_name("swiglu").is_err());
    }
}
