//! Timestep embeddings: diffusers' sinusoidal `Timesteps` projection and the
//! `TimestepEmbedding` MLP (`linear_1`, `linear_2`, optional `cond_proj`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use super::Activation;

/// diffusers' `Timesteps`: the sinusoidal embedding of (possibly fractional) timesteps.
///
/// For `half = num_channels / 2`, frequency `i` is
/// `exp(-ln(10000) * i / (half - downscale_freq_shift))`; the output is
/// `[sin(t f), cos(t f)]`, or `[cos, sin]` with `flip_sin_to_cos`, zero-padded by one
/// column when `num_channels` is odd. Computed in `f32` like diffusers.
#[derive(Config, Debug, PartialEq)]
pub struct Timesteps {
    /// Output width.
    pub num_channels: usize,
    /// Puts the cosines first.
    pub flip_sin_to_cos: bool,
    /// Shift of the frequency denominator (`freq_shift` in U-Net configs).
    pub downscale_freq_shift: f64,
    /// Factor applied to `t * f` before the sine/cosine.
    #[config(default = 1.0)]
    pub scale: f64,
    /// Period of the slowest frequency.
    #[config(default = 10000.0)]
    pub max_period: f64,
}

impl Timesteps {
    /// The frequencies `f_i`, computed in `f32` in the same order of operations as diffusers.
    pub fn frequencies(&self) -> Vec<f32> {
        let half = self.num_channels / 2;
        let log_period = -(self.max_period.ln() as f32);
        let denom = (half as f64 - self.downscale_freq_shift) as f32;
        (0..half)
            .map(|i| (log_period * i as f32 / denom).exp())
            .collect()
    }

    /// Embeds one timestep per batch element, returning an `f32` tensor.
    ///
    /// # Shapes
    ///
    /// - timesteps: `[batch]`
    /// - output: `[batch, num_channels]`
    pub fn forward<B: Backend>(&self, timesteps: Tensor<B, 1>) -> Tensor<B, 2> {
        let device = timesteps.device();
        let half = self.num_channels / 2;
        let freqs = Tensor::<B, 2>::from_data(
            TensorData::new(self.frequencies(), [1, half]),
            (&device, DType::F32),
        );
        let t = super::cast_to(timesteps, DType::F32).unsqueeze_dim::<2>(1);
        let mut args = t * freqs;
        if self.scale != 1.0 {
            args = args.mul_scalar(self.scale);
        }
        let (sin, cos) = (args.clone().sin(), args.cos());
        let mut emb = if self.flip_sin_to_cos {
            Tensor::cat(vec![cos, sin], 1)
        } else {
            Tensor::cat(vec![sin, cos], 1)
        };
        if self.num_channels % 2 == 1 {
            emb = emb.pad([(0, 0), (0, 1)], burn::tensor::ops::PadMode::Constant(0.0));
        }
        emb
    }
}

/// Configuration of a [`TimestepEmbedding`]; defaults are diffusers'.
#[derive(Config, Debug)]
pub struct TimestepEmbeddingConfig {
    /// Width of the input (the sinusoidal embedding).
    pub in_channels: usize,
    /// Width of the hidden layer (and of the output unless `out_dim` is set).
    pub time_embed_dim: usize,
    /// The activation between the two linear layers.
    #[config(default = "Activation::Silu")]
    pub act_fn: Activation,
    /// Output width (default: `time_embed_dim`).
    #[config(default = "None")]
    pub out_dim: Option<usize>,
    /// Activation applied after `linear_2`.
    #[config(default = "None")]
    pub post_act_fn: Option<Activation>,
    /// Width of the condition projected by `cond_proj` and added to the input (LCM's
    /// guidance-scale embedding, `time_cond_proj_dim`).
    #[config(default = "None")]
    pub cond_proj_dim: Option<usize>,
}

/// diffusers' `TimestepEmbedding`: `linear_2(act(linear_1(x + cond_proj(c))))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    /// First linear layer.
    pub linear_1: Linear<B>,
    /// Projection of the optional condition (no bias).
    pub cond_proj: Option<Linear<B>>,
    /// Second linear layer.
    pub linear_2: Linear<B>,
    /// Activation between the linear layers.
    pub act: Activation,
    /// Activation after `linear_2`.
    pub post_act: Option<Activation>,
}

impl TimestepEmbeddingConfig {
    /// Builds the layer with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> TimestepEmbedding<B> {
        TimestepEmbedding {
            linear_1: LinearConfig::new(self.in_channels, self.time_embed_dim).init(device),
            cond_proj: self.cond_proj_dim.map(|d| {
                LinearConfig::new(d, self.in_channels)
                    .with_bias(false)
                    .init(device)
            }),
            linear_2: LinearConfig::new(
                self.time_embed_dim,
                self.out_dim.unwrap_or(self.time_embed_dim),
            )
            .init(device),
            act: self.act_fn,
            post_act: self.post_act_fn,
        }
    }
}

impl<B: Backend> TimestepEmbedding<B> {
    /// Embeds `sample`, adding `cond_proj(condition)` first when a condition is given.
    ///
    /// # Shapes
    ///
    /// - sample: `[batch, in_channels]`
    /// - condition: `[batch, cond_proj_dim]`
    /// - output: `[batch, out_dim]`
    pub fn forward(&self, sample: Tensor<B, 2>, condition: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        let sample = match (condition, &self.cond_proj) {
            (Some(c), Some(proj)) => sample + proj.forward(c),
            _ => sample,
        };
        let h = self
            .linear_2
            .forward(self.act.forward(self.linear_1.forward(sample)));
        match self.post_act {
            Some(act) => act.forward(h),
            None => h,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn sinusoids_match_the_closed_form() {
        let device = Default::default();
        let proj = Timesteps::new(6, false, 1.0);
        let t = Tensor::<B, 1>::from_floats([0.0, 10.5, 999.0], &device);
        let e: Vec<f32> = proj.forward(t).into_data().to_vec().unwrap();
        let half = 3;
        for (b, &t) in [0.0f64, 10.5, 999.0].iter().enumerate() {
            for i in 0..half {
                let f = (-(10000f64.ln()) * i as f64 / (half as f64 - 1.0)).exp();
                assert!((e[b * 6 + i] as f64 - (t * f).sin()).abs() < 2e-4);
                assert!((e[b * 6 + half + i] as f64 - (t * f).cos()).abs() < 2e-4);
            }
        }
    }

    #[test]
    fn flip_and_odd_width_padding() {
        let device = Default::default();
        let t = Tensor::<B, 1>::from_floats([3.0], &device);
        let plain: Vec<f32> = Timesteps::new(4, false, 0.0)
            .forward(t.clone())
            .into_data()
            .to_vec()
            .unwrap();
        let flipped: Vec<f32> = Timesteps::new(4, true, 0.0)
            .forward(t.clone())
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(&plain[..2], &flipped[2..]);
        assert_eq!(&plain[2..], &flipped[..2]);
        let odd: Vec<f32> = Timesteps::new(5, true, 0.0)
            .forward(t)
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(odd.len(), 5);
        assert_eq!(odd[4], 0.0);
    }

    #[test]
    fn condition_is_projected_and_added() {
        let device = Default::default();
        let emb = TimestepEmbeddingConfig::new(4, 8)
            .with_cond_proj_dim(Some(3))
            .init::<B>(&device);
        let x = Tensor::<B, 2>::ones([2, 4], &device);
        let c = Tensor::<B, 2>::ones([2, 3], &device);
        let expect = emb.forward(
            x.clone() + emb.cond_proj.as_ref().unwrap().forward(c.clone()),
            None,
        );
        let got = emb.forward(x, Some(c));
        let diff: f32 = (got - expect).abs().max().into_scalar();
        assert_eq!(diff, 0.0);
    }
}
