//! diffusers' `Upsample2D`: nearest-neighbour 2x (or to a given size) then a 3x3 `conv`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

/// Configuration of an [`Upsample2D`]; defaults are diffusers'.
#[derive(Config, Debug)]
pub struct Upsample2DConfig {
    /// Input channels.
    pub channels: usize,
    /// Follows the interpolation with a 3x3 convolution.
    #[config(default = true)]
    pub use_conv: bool,
    /// Output channels of the convolution (default: `channels`).
    #[config(default = "None")]
    pub out_channels: Option<usize>,
}

/// diffusers' `Upsample2D` (nearest interpolation, optional convolution).
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    /// The 3x3 convolution after interpolation.
    pub conv: Option<Conv2d<B>>,
}

impl Upsample2DConfig {
    /// Builds the layer with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Upsample2D<B> {
        Upsample2D {
            conv: self.use_conv.then(|| {
                Conv2dConfig::new(
                    [self.channels, self.out_channels.unwrap_or(self.channels)],
                    [3, 3],
                )
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
            }),
        }
    }
}

impl<B: Backend> Upsample2D<B> {
    /// Upsamples by two, or to `output_size` (`[height, width]`) when given (the U-Net
    /// passes the skip connection's size when the input is not a multiple of 2^levels).
    ///
    /// Nearest-neighbour reads input pixel `floor(i * in / out)` like PyTorch's `nearest`.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, channels, height, width]`
    /// - output: `[batch, out_channels, 2 height, 2 width]` or `[batch, out_channels,
    ///   output_size[0], output_size[1]]`
    pub fn forward(&self, x: Tensor<B, 4>, output_size: Option<[usize; 2]>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let size = output_size.unwrap_or([2 * h, 2 * w]);
        let x = interpolate(x, size, InterpolateOptions::new(InterpolateMode::Nearest));
        match &self.conv {
            Some(conv) => super::conv_forward(conv, x),
            None => x,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray<f32>;

    #[test]
    fn nearest_doubling_and_explicit_size() {
        let device = Default::default();
        let up = Upsample2DConfig::new(1)
            .with_use_conv(false)
            .init::<B>(&device);
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 2, 2]),
            &device,
        );
        let y: Vec<f32> = up.forward(x.clone(), None).into_data().to_vec().unwrap();
        assert_eq!(
            y,
            vec![
                1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.
            ]
        );
        // torch: F.interpolate(x, size=(3, 5), mode="nearest") reads rows [0, 0, 1] and
        // columns [0, 0, 0, 1, 1].
        let y: Vec<f32> = up.forward(x, Some([3, 5])).into_data().to_vec().unwrap();
        assert_eq!(
            y,
            vec![1., 1., 1., 2., 2., 1., 1., 1., 2., 2., 3., 3., 3., 4., 4.]
        );
        let conv = Upsample2DConfig::new(2)
            .with_out_channels(Some(3))
            .init::<B>(&device);
        let x = Tensor::<B, 4>::zeros([1, 2, 3, 4], &device);
        assert_eq!(conv.forward(x, None).dims(), [1, 3, 6, 8]);
    }
}
