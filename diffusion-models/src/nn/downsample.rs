//! diffusers' `Downsample2D`: a stride-2 convolution (`conv`), or 2x2 average pooling.

use burn::config::Config;
use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::backend::Backend;
use burn::tensor::module::{avg_pool2d, conv2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor, get_device_settings};

use super::{cast_to, conv_forward, upcast_dtype};

/// Configuration of a [`Downsample2D`]; defaults are diffusers'.
#[derive(Config, Debug)]
pub struct Downsample2DConfig {
    /// Input channels.
    pub channels: usize,
    /// Convolution (`true`) or 2x2 average pooling (`false`, no parameters).
    #[config(default = true)]
    pub use_conv: bool,
    /// Output channels of the convolution (default: `channels`).
    #[config(default = "None")]
    pub out_channels: Option<usize>,
    /// Symmetric padding of the 3x3 convolution. `0` pads one row/column at the bottom/right
    /// only, as diffusers does for the VAE encoder (`downsample_padding=0`).
    #[config(default = 1)]
    pub padding: usize,
}

/// diffusers' `Downsample2D` (halves height and width).
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    /// The stride-2 3x3 convolution; `None` means average pooling.
    pub conv: Option<Conv2d<B>>,
}

impl Downsample2DConfig {
    /// Builds the layer with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Downsample2D<B> {
        let padding = if self.padding == 0 {
            // F.pad(x, (0, 1, 0, 1)) followed by an unpadded convolution.
            PaddingConfig2d::Explicit(0, 0, 1, 1)
        } else {
            let p = self.padding;
            PaddingConfig2d::Explicit(p, p, p, p)
        };
        Downsample2D {
            conv: self.use_conv.then(|| {
                Conv2dConfig::new(
                    [self.channels, self.out_channels.unwrap_or(self.channels)],
                    [3, 3],
                )
                .with_stride([2, 2])
                .with_padding(padding)
                .init(device)
            }),
        }
    }
}

impl<B: Backend> Downsample2D<B> {
    /// Downsamples by two.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, channels, height, width]`
    /// - output: `[batch, out_channels, height', width']`, with `height' = floor((height
    ///   + 2 padding - 3) / 2) + 1` for the convolution and `floor(height / 2)` for pooling
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match &self.conv {
            Some(conv) => match conv.padding {
                // Burn 0.21 pads an asymmetrically padded convolution with `Tensor::pad`, whose
                // fill tensor has the device's default float dtype: an input of another dtype
                // then fails to be assigned into it. Pad in the input's dtype instead (and, as
                // `conv_forward`, convolve f16 / bf16 in f32).
                PaddingConfig2d::Explicit(top, left, bottom, right)
                    if (top, left) != (bottom, right)
                        && x.dtype()
                            != DType::from(get_device_settings::<B>(&x.device()).float_dtype) =>
                {
                    let dtype = x.dtype();
                    let wide = upcast_dtype(dtype);
                    let [b, c, h, w] = x.dims();
                    let padded = Tensor::<B, 4>::zeros(
                        [b, c, h + top + bottom, w + left + right],
                        (&x.device(), dtype),
                    )
                    .slice_assign([0..b, 0..c, top..top + h, left..left + w], x);
                    let out = conv2d(
                        cast_to(padded, wide),
                        cast_to(conv.weight.val(), wide),
                        conv.bias.as_ref().map(|bias| cast_to(bias.val(), wide)),
                        ConvOptions::new(conv.stride, [0, 0], conv.dilation, conv.groups),
                    );
                    cast_to(out, dtype)
                }
                _ => conv_forward(conv, x),
            },
            None => avg_pool2d(x, [2, 2], [2, 2], [0, 0], true, false),
        }
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
    fn average_pooling_halves() {
        let device = Default::default();
        let down = Downsample2DConfig::new(1)
            .with_use_conv(false)
            .init::<B>(&device);
        let x = Tensor::<B, 4>::from_data(
            TensorData::new((0..16).map(|v| v as f32).collect(), [1, 1, 4, 4]),
            &device,
        );
        let y: Vec<f32> = down.forward(x).into_data().to_vec().unwrap();
        assert_eq!(y, vec![2.5, 4.5, 10.5, 12.5]);
    }

    #[test]
    fn zero_padding_pads_bottom_right_only() {
        // A kernel that picks the top-left tap shows which input pixel each output reads:
        // without top/left padding, output (i, j) reads input (2i, 2j).
        let device = Default::default();
        let mut down = Downsample2DConfig::new(1)
            .with_padding(0)
            .init::<B>(&device);
        let conv = down.conv.as_mut().unwrap();
        let mut w = vec![0.0f32; 9];
        w[0] = 1.0;
        conv.weight =
            Param::from_tensor(Tensor::from_data(TensorData::new(w, [1, 1, 3, 3]), &device));
        conv.bias = Some(Param::from_tensor(Tensor::zeros([1], &device)));
        let x = Tensor::<B, 4>::from_data(
            TensorData::new((0..16).map(|v| v as f32).collect(), [1, 1, 4, 4]),
            &device,
        );
        let y = down.forward(x);
        assert_eq!(y.dims(), [1, 1, 2, 2]);
        let y: Vec<f32> = y.into_data().to_vec().unwrap();
        assert_eq!(y, vec![0.0, 2.0, 8.0, 10.0]);

        let sym = Downsample2DConfig::new(1).init::<B>(&device);
        let x = Tensor::<B, 4>::zeros([1, 1, 5, 5], &device);
        assert_eq!(sym.forward(x).dims(), [1, 1, 3, 3]);
    }
}
