//! diffusers' `ResnetBlock2D`: two 3x3 convolutions with group norms, an optional
//! time-embedding projection and a 1x1 shortcut when the channel count changes.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    Dropout, DropoutConfig, GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::{Activation, conv_forward, group_norm};

/// How the time embedding enters the block (`resnet_time_scale_shift` in U-Net configs).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// `"default"`: the projected embedding is added before `norm2`.
    Default,
    /// `"scale_shift"`: the projection yields `(scale, shift)`, applied as
    /// `norm2(h) * (1 + scale) + shift`.
    ScaleShift,
}

/// Configuration of a [`ResnetBlock2D`]; defaults are diffusers'.
#[derive(Config, Debug)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels (default: `in_channels`).
    #[config(default = "None")]
    pub out_channels: Option<usize>,
    /// Width of the time embedding; `None` builds no `time_emb_proj` (the VAE's blocks).
    #[config(default = "Some(512)")]
    pub temb_channels: Option<usize>,
    /// Groups of `norm1` (and of `norm2` unless `groups_out` is set).
    #[config(default = 32)]
    pub groups: usize,
    /// Groups of `norm2` (default: `groups`).
    #[config(default = "None")]
    pub groups_out: Option<usize>,
    /// Epsilon of both group norms.
    #[config(default = 1e-6)]
    pub eps: f64,
    /// The nonlinearity (`resnet_act_fn`).
    #[config(default = "Activation::Silu")]
    pub non_linearity: Activation,
    /// How the time embedding is applied.
    #[config(default = "TimeEmbeddingNorm::Default")]
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// The output is divided by this factor.
    #[config(default = 1.0)]
    pub output_scale_factor: f64,
    /// Dropout probability between `norm2` and `conv2` (training only).
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Forces (or forbids) the 1x1 `conv_shortcut`; default: present when the channel
    /// count changes.
    #[config(default = "None")]
    pub use_in_shortcut: Option<bool>,
    /// Whether `conv_shortcut` has a bias.
    #[config(default = true)]
    pub conv_shortcut_bias: bool,
    /// Skips the nonlinearity on the time embedding before `time_emb_proj`.
    #[config(default = false)]
    pub skip_time_act: bool,
}

/// diffusers' `ResnetBlock2D` (pre-norm, no up/down sampling inside the block).
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    /// First group norm, over the input channels.
    pub norm1: GroupNorm<B>,
    /// First 3x3 convolution.
    pub conv1: Conv2d<B>,
    /// Projection of the time embedding (absent in the VAE).
    pub time_emb_proj: Option<Linear<B>>,
    /// Second group norm, over the output channels.
    pub norm2: GroupNorm<B>,
    /// Dropout before `conv2`.
    pub dropout: Dropout,
    /// Second 3x3 convolution.
    pub conv2: Conv2d<B>,
    /// 1x1 convolution on the residual path when the channel count changes.
    pub conv_shortcut: Option<Conv2d<B>>,
    /// The nonlinearity.
    pub nonlinearity: Activation,
    /// How the time embedding is applied.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// The output is divided by this factor.
    pub output_scale_factor: f64,
    /// Skips the nonlinearity on the time embedding.
    pub skip_time_act: bool,
}

fn conv3x3<B: Backend>(cin: usize, cout: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([cin, cout], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

impl ResnetBlock2DConfig {
    /// Builds the block with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResnetBlock2D<B> {
        let out = self.out_channels.unwrap_or(self.in_channels);
        let groups_out = self.groups_out.unwrap_or(self.groups);
        let time_emb_proj = self.temb_channels.map(|t| {
            let width = match self.time_embedding_norm {
                TimeEmbeddingNorm::Default => out,
                TimeEmbeddingNorm::ScaleShift => 2 * out,
            };
            LinearConfig::new(t, width).init(device)
        });
        let use_shortcut = self.use_in_shortcut.unwrap_or(self.in_channels != out);
        let conv_shortcut = use_shortcut.then(|| {
            Conv2dConfig::new([self.in_channels, out], [1, 1])
                .with_bias(self.conv_shortcut_bias)
                .init(device)
        });
        ResnetBlock2D {
            norm1: GroupNormConfig::new(self.groups, self.in_channels)
                .with_epsilon(self.eps)
                .init(device),
            conv1: conv3x3(self.in_channels, out, device),
            time_emb_proj,
            norm2: GroupNormConfig::new(groups_out, out)
                .with_epsilon(self.eps)
                .init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            conv2: conv3x3(out, out, device),
            conv_shortcut,
            nonlinearity: self.non_linearity,
            time_embedding_norm: self.time_embedding_norm,
            output_scale_factor: self.output_scale_factor,
            skip_time_act: self.skip_time_act,
        }
    }
}

impl<B: Backend> ResnetBlock2D<B> {
    /// Applies the block.
    ///
    /// `temb` is ignored when the block has no `time_emb_proj`.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, in_channels, height, width]`
    /// - temb: `[batch, temb_channels]`
    /// - output: `[batch, out_channels, height, width]`
    pub fn forward(&self, input: Tensor<B, 4>, temb: Option<Tensor<B, 2>>) -> Tensor<B, 4> {
        let act = self.nonlinearity;
        let h = act.forward(group_norm(&self.norm1, input.clone()));
        let mut h = conv_forward(&self.conv1, h);

        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let temb = if self.skip_time_act {
                    temb
                } else {
                    act.forward(temb)
                };
                Some(proj.forward(temb).unsqueeze_dims::<4>(&[2, 3]))
            }
            _ => None,
        };
        h = match (self.time_embedding_norm, temb) {
            (TimeEmbeddingNorm::Default, Some(temb)) => group_norm(&self.norm2, h + temb),
            (TimeEmbeddingNorm::ScaleShift, Some(temb)) => {
                let [scale, shift] = <[Tensor<B, 4>; 2]>::try_from(temb.chunk(2, 1))
                    .expect("chunk(2) of an even width yields two tensors");
                group_norm(&self.norm2, h) * (scale.add_scalar(1.0)) + shift
            }
            (_, None) => group_norm(&self.norm2, h),
        };
        let h = self.dropout.forward(act.forward(h));
        let h = conv_forward(&self.conv2, h);

        let residual = match &self.conv_shortcut {
            Some(conv) => conv_forward(conv, input),
            None => input,
        };
        let out = residual + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out.div_scalar(self.output_scale_factor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::module::Param;
    use burn::tensor::{Distribution, TensorData};

    type B = NdArray<f32>;

    fn set_conv(conv: &mut Conv2d<B>, w: f32, b: f32) {
        let shape = conv.weight.val().shape();
        conv.weight = Param::from_tensor(Tensor::full(shape, w, &Default::default()));
        if let Some(bias) = &conv.bias {
            let shape = bias.val().shape();
            conv.bias = Some(Param::from_tensor(Tensor::full(
                shape,
                b,
                &Default::default(),
            )));
        }
    }

    #[test]
    fn shortcut_present_only_when_channels_change() {
        let device = Default::default();
        let same = ResnetBlock2DConfig::new(8)
            .with_groups(4)
            .init::<B>(&device);
        assert!(same.conv_shortcut.is_none());
        let wider = ResnetBlock2DConfig::new(8)
            .with_out_channels(Some(16))
            .with_groups(4)
            .init::<B>(&device);
        assert!(wider.conv_shortcut.is_some());
        let x = Tensor::<B, 4>::random([2, 8, 5, 6], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<B, 2>::random([2, 512], Distribution::Normal(0.0, 1.0), &device);
        assert_eq!(wider.forward(x, Some(t)).dims(), [2, 16, 5, 6]);
    }

    #[test]
    fn zero_convolutions_reduce_to_the_scaled_identity() {
        // With conv2 = 0 the residual branch vanishes: output = input / output_scale_factor.
        let device = Default::default();
        let mut block = ResnetBlock2DConfig::new(4)
            .with_groups(2)
            .with_temb_channels(None)
            .with_output_scale_factor(2.0)
            .init::<B>(&device);
        set_conv(&mut block.conv2, 0.0, 0.0);
        let x = Tensor::<B, 4>::random([1, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
        let y = block.forward(x.clone(), None);
        let diff: f32 = (y - x.div_scalar(2.0)).abs().max().into_scalar();
        assert!(diff < 1e-7, "{diff}");
    }

    #[test]
    fn hand_computed_single_channel_block() {
        // One channel, one group, 1x2 image, conv kernels with only a centre tap of 1,
        // zero biases, no time embedding: h = silu(gn(silu(gn(x)))), out = x + h.
        let device = Default::default();
        let mut block = ResnetBlock2DConfig::new(1)
            .with_groups(1)
            .with_temb_channels(None)
            .init::<B>(&device);
        for conv in [&mut block.conv1, &mut block.conv2] {
            let mut w = vec![0.0f32; 9];
            w[4] = 1.0;
            conv.weight =
                Param::from_tensor(Tensor::from_data(TensorData::new(w, [1, 1, 3, 3]), &device));
            conv.bias = Some(Param::from_tensor(Tensor::zeros([1], &device)));
        }
        let x =
            Tensor::<B, 4>::from_data(TensorData::new(vec![1.0f32, 3.0], [1, 1, 1, 2]), &device);
        let y: Vec<f32> = block.forward(x, None).into_data().to_vec().unwrap();
        // gn([1, 3]) = [-1, 1] (eps 1e-6 negligible); silu(-1) = -0.268941, silu(1) = 0.731059;
        // gn of that = [-1, 1] again, then silu.
        let silu = |v: f64| v / (1.0 + (-v).exp());
        let gn1 = 1.0f64 / (1.0 + 1e-6f64).sqrt();
        let a = [silu(-gn1), silu(gn1)];
        let m = (a[0] + a[1]) / 2.0;
        let s = (((a[0] - m).powi(2) + (a[1] - m).powi(2)) / 2.0 + 1e-6).sqrt();
        let expect = [1.0 + silu((a[0] - m) / s), 3.0 + silu((a[1] - m) / s)];
        for i in 0..2 {
            assert!(
                (y[i] as f64 - expect[i]).abs() < 1e-5,
                "{y:?} vs {expect:?}"
            );
        }
    }

    #[test]
    fn scale_shift_uses_twice_the_projection_width() {
        let device = Default::default();
        let block = ResnetBlock2DConfig::new(4)
            .with_groups(2)
            .with_temb_channels(Some(8))
            .with_time_embedding_norm(TimeEmbeddingNorm::ScaleShift)
            .init::<B>(&device);
        assert_eq!(
            block.time_emb_proj.as_ref().unwrap().weight.val().dims(),
            [8, 8]
        );
        let x = Tensor::<B, 4>::random([2, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<B, 2>::random([2, 8], Distribution::Normal(0.0, 1.0), &device);
        assert_eq!(block.forward(x, Some(t)).dims(), [2, 4, 3, 3]);
    }
}
