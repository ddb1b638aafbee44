//! The blocks of diffusers' `UNet2DModel`: `DownBlock2D` / `AttnDownBlock2D`,
//! `UNetMidBlock2D` and `UpBlock2D` / `AttnUpBlock2D`, built from the shared layers of
//! [`crate::nn`]. The attention layers are diffusers' `Attention` with a group norm, a
//! residual connection and biased projections (the "deprecated attention block" form the
//! VAE mid-block also uses).

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::config::SamplerType;
use crate::nn::{
    Activation, Attention, AttentionChunking, AttentionConfig, Downsample2D, Downsample2DConfig,
    ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm, Upsample2D, Upsample2DConfig,
    group_norm,
};

/// Settings shared by the ResNets and attention layers of one block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSettings {
    /// Width of the time embedding.
    pub temb_channels: usize,
    /// Group-norm groups of the ResNets and attention layers.
    pub groups: usize,
    /// Group-norm epsilon.
    pub eps: f64,
    /// ResNet activation.
    pub act: Activation,
    /// ResNet time-embedding mode.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// ResNet dropout.
    pub dropout: f64,
    /// `output_scale_factor` of the ResNets and `rescale_output_factor` of the attention.
    pub output_scale_factor: f64,
    /// Width of one attention head (`None`: one head over all channels).
    pub attention_head_dim: Option<usize>,
}

impl BlockSettings {
    fn resnet<B: Backend>(&self, cin: usize, cout: usize, device: &B::Device) -> ResnetBlock2D<B> {
        ResnetBlock2DConfig::new(cin)
            .with_out_channels(Some(cout))
            .with_temb_channels(Some(self.temb_channels))
            .with_groups(self.groups)
            .with_eps(self.eps)
            .with_non_linearity(self.act)
            .with_time_embedding_norm(self.time_embedding_norm)
            .with_output_scale_factor(self.output_scale_factor)
            .with_dropout(self.dropout)
            .init(device)
    }

    fn attention<B: Backend>(
        &self,
        channels: usize,
        groups: Option<usize>,
        device: &B::Device,
    ) -> Attention<B> {
        let dim_head = self.attention_head_dim.unwrap_or(channels);
        AttentionConfig::new(channels)
            .with_heads(channels / dim_head)
            .with_dim_head(dim_head)
            .with_bias(true)
            .with_upcast_softmax(true)
            .with_norm_num_groups(groups)
            .with_eps(self.eps)
            .with_residual_connection(true)
            .with_rescale_output_factor(self.output_scale_factor)
            .init(device)
    }
}

/// The downsampler of a down block (`downsamplers.0`).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Downsampler<B: Backend> {
    /// `Downsample2D`: a stride-2 3x3 convolution (`downsample_type: "conv"`).
    Conv(Downsample2D<B>),
    /// `ResnetBlock2D(down=True)`: 2x2 average pooling after the first norm
    /// (`downsample_type: "resnet"`).
    Resnet(ResnetBlock2D<B>),
}

/// The upsampler of an up block (`upsamplers.0`).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Upsampler<B: Backend> {
    /// `Upsample2D`: nearest 2x then a 3x3 convolution (`upsample_type: "conv"`).
    Conv(Upsample2D<B>),
    /// `ResnetBlock2D(up=True)`: nearest 2x after the first norm (`upsample_type:
    /// "resnet"`).
    Resnet(ResnetBlock2D<B>),
}

/// Where a resampling ResNet changes resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resample {
    Down,
    Up,
}

/// diffusers' `ResnetBlock2D` with `down=True` / `up=True` (and the default kernel): the
/// input and the activated first norm are both resampled (2x2 average pooling or nearest
/// 2x) before the first convolution; the rest is [`ResnetBlock2D::forward`].
///
/// # Shapes
///
/// - input: `[batch, in_channels, height, width]`
/// - temb: `[batch, temb_channels]`
/// - output: `[batch, out_channels, height / 2, width / 2]` (down) or `[batch, out_channels,
///   2 height, 2 width]` (up)
fn resample_resnet<B: Backend>(
    block: &ResnetBlock2D<B>,
    input: Tensor<B, 4>,
    temb: &Tensor<B, 2>,
    resample: Resample,
) -> Tensor<B, 4> {
    let act = block.nonlinearity;
    let h = act.forward(group_norm(&block.norm1, input.clone()));
    let (input, h) = match resample {
        Resample::Down => {
            let pool = Downsample2D { conv: None };
            (pool.forward(input), pool.forward(h))
        }
        Resample::Up => {
            let nearest = Upsample2D { conv: None };
            (nearest.forward(input, None), nearest.forward(h, None))
        }
    };
    let h = block.conv1.forward(h);
    let temb = block.time_emb_proj.as_ref().map(|proj| {
        let t = if block.skip_time_act {
            temb.clone()
        } else {
            act.forward(temb.clone())
        };
        proj.forward(t).unsqueeze_dims::<4>(&[2, 3])
    });
    let h = match (block.time_embedding_norm, temb) {
        (TimeEmbeddingNorm::Default, Some(t)) => group_norm(&block.norm2, h + t),
        (TimeEmbeddingNorm::ScaleShift, Some(t)) => {
            let [scale, shift] = <[Tensor<B, 4>; 2]>::try_from(t.chunk(2, 1))
                .expect("chunk(2) of an even width yields two tensors");
            group_norm(&block.norm2, h) * scale.add_scalar(1.0) + shift
        }
        (_, None) => group_norm(&block.norm2, h),
    };
    let h = block.conv2.forward(block.dropout.forward(act.forward(h)));
    let residual = match &block.conv_shortcut {
        Some(conv) => conv.forward(input),
        None => input,
    };
    let out = residual + h;
    if block.output_scale_factor == 1.0 {
        out
    } else {
        out.div_scalar(block.output_scale_factor)
    }
}

/// `DownBlock2D` (no `attentions`) or `AttnDownBlock2D` (one self-attention after each
/// ResNet).
#[derive(Module, Debug)]
pub struct DownBlock<B: Backend> {
    /// The ResNets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The self-attention layers (empty for `DownBlock2D`).
    pub attentions: Vec<Attention<B>>,
    /// The downsampler, absent in the last block.
    pub downsamplers: Vec<Downsampler<B>>,
}

impl<B: Backend> DownBlock<B> {
    /// Builds the block with freshly initialised weights.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: &BlockSettings,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        attention: bool,
        downsampler: Option<SamplerType>,
        downsample_padding: usize,
        device: &B::Device,
    ) -> Self {
        let resnets = (0..num_layers)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { out_channels };
                settings.resnet(cin, out_channels, device)
            })
            .collect();
        let attentions = if attention {
            (0..num_layers)
                .map(|_| settings.attention(out_channels, Some(settings.groups), device))
                .collect()
        } else {
            Vec::new()
        };
        let downsamplers = downsampler
            .map(|kind| match kind {
                SamplerType::Conv => Downsampler::Conv(
                    Downsample2DConfig::new(out_channels)
                        .with_out_channels(Some(out_channels))
                        .with_padding(downsample_padding)
                        .init(device),
                ),
                SamplerType::Resnet => {
                    Downsampler::Resnet(settings.resnet(out_channels, out_channels, device))
                }
            })
            .into_iter()
            .collect();
        Self {
            resnets,
            attentions,
            downsamplers,
        }
    }

    /// Applies the block, returning the output and the states for the skip connections
    /// (one per ResNet, plus the downsampled output).
    ///
    /// # Shapes
    ///
    /// - x: `[batch, in_channels, height, width]`
    /// - temb: `[batch, temb_channels]`
    /// - output: `[batch, out_channels, height', width']` (halved with a downsampler)
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
    ) -> (Tensor<B, 4>, Vec<Tensor<B, 4>>) {
        let mut x = x;
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward_spatial(x);
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = match down {
                Downsampler::Conv(d) => d.forward(x),
                Downsampler::Resnet(r) => resample_resnet(r, x, temb, Resample::Down),
            };
            skips.push(x.clone());
        }
        (x, skips)
    }

    fn set_chunking(&mut self, chunking: AttentionChunking) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.chunking = chunking);
    }
}

/// `UNetMidBlock2D` as `UNet2DModel` builds it: ResNet, self-attention (unless
/// `add_attention` is off), ResNet.
#[derive(Module, Debug)]
pub struct MidBlock<B: Backend> {
    /// The two ResNets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The self-attention (empty with `add_attention: false`).
    pub attentions: Vec<Attention<B>>,
}

impl<B: Backend> MidBlock<B> {
    /// Builds the block with freshly initialised weights; `attention_groups` are the groups
    /// of the attention's group norm (`None`: no group norm).
    pub fn new(
        settings: &BlockSettings,
        channels: usize,
        attention: bool,
        attention_groups: Option<usize>,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: vec![
                settings.resnet(channels, channels, device),
                settings.resnet(channels, channels, device),
            ],
            attentions: attention
                .then(|| settings.attention(channels, attention_groups, device))
                .into_iter()
                .collect(),
        }
    }

    /// Applies the block.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, channels, height, width]`
    /// - temb: `[batch, temb_channels]`
    /// - output: `[batch, channels, height, width]`
    pub fn forward(&self, x: Tensor<B, 4>, temb: &Tensor<B, 2>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, Some(temb.clone()));
        for (i, resnet) in self.resnets[1..].iter().enumerate() {
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward_spatial(x);
            }
            x = resnet.forward(x, Some(temb.clone()));
        }
        x
    }

    fn set_chunking(&mut self, chunking: AttentionChunking) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.chunking = chunking);
    }
}

/// `UpBlock2D` (no `attentions`) or `AttnUpBlock2D` (one self-attention after each ResNet).
#[derive(Module, Debug)]
pub struct UpBlock<B: Backend> {
    /// The ResNets; each takes the running state concatenated with one skip state.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The self-attention layers (empty for `UpBlock2D`).
    pub attentions: Vec<Attention<B>>,
    /// The upsampler, absent in the last block.
    pub upsamplers: Vec<Upsampler<B>>,
}

impl<B: Backend> UpBlock<B> {
    /// Builds the block with freshly initialised weights. `in_channels` is the width of the
    /// deepest skip state this block consumes, `prev_output_channels` that of the running
    /// state it receives.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: &BlockSettings,
        in_channels: usize,
        out_channels: usize,
        prev_output_channels: usize,
        num_layers: usize,
        attention: bool,
        upsampler: Option<SamplerType>,
        device: &B::Device,
    ) -> Self {
        let resnets = (0..num_layers)
            .map(|i| {
                let skip = if i == num_layers - 1 {
                    in_channels
                } else {
                    out_channels
                };
                let cin = if i == 0 {
                    prev_output_channels
                } else {
                    out_channels
                };
                settings.resnet(cin + skip, out_channels, device)
            })
            .collect();
        let attentions = if attention {
            (0..num_layers)
                .map(|_| settings.attention(out_channels, Some(settings.groups), device))
                .collect()
        } else {
            Vec::new()
        };
        let upsamplers = upsampler
            .map(|kind| match kind {
                SamplerType::Conv => Upsampler::Conv(
                    Upsample2DConfig::new(out_channels)
                        .with_out_channels(Some(out_channels))
                        .init(device),
                ),
                SamplerType::Resnet => {
                    Upsampler::Resnet(settings.resnet(out_channels, out_channels, device))
                }
            })
            .into_iter()
            .collect();
        Self {
            resnets,
            attentions,
            upsamplers,
        }
    }

    /// Applies the block, popping one skip state per ResNet from the end of `skips`.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, prev_output_channels, height, width]`
    /// - skips: states of the same height and width
    /// - temb: `[batch, temb_channels]`
    /// - output: `[batch, out_channels, height', width']` (doubled with an upsampler)
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        skips: &mut Vec<Tensor<B, 4>>,
        temb: &Tensor<B, 2>,
    ) -> Tensor<B, 4> {
        let mut x = x;
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .expect("the down path leaves one skip state per up-block ResNet");
            x = resnet.forward(Tensor::cat(vec![x, skip], 1), Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward_spatial(x);
            }
        }
        for up in &self.upsamplers {
            x = match up {
                Upsampler::Conv(u) => u.forward(x, None),
                Upsampler::Resnet(r) => resample_resnet(r, x, temb, Resample::Up),
            };
        }
        x
    }

    fn set_chunking(&mut self, chunking: AttentionChunking) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.chunking = chunking);
    }
}

/// Sets the attention chunking of every block of a model.
pub(super) fn set_chunking<B: Backend>(
    down: &mut [DownBlock<B>],
    mid: Option<&mut MidBlock<B>>,
    up: &mut [UpBlock<B>],
    chunking: AttentionChunking,
) {
    down.iter_mut().for_each(|b| b.set_chunking(chunking));
    if let Some(mid) = mid {
        mid.set_chunking(chunking);
    }
    up.iter_mut().for_each(|b| b.set_chunking(chunking));
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    fn settings() -> BlockSettings {
        BlockSettings {
            temb_channels: 8,
            groups: 2,
            eps: 1e-5,
            act: Activation::Silu,
            time_embedding_norm: TimeEmbeddingNorm::Default,
            dropout: 0.0,
            output_scale_factor: 1.0,
            attention_head_dim: Some(2),
        }
    }

    #[test]
    fn upsampling_resnet_of_a_single_pixel_equals_the_plain_block_on_the_upsampled_input() {
        // Nearest 2x of a 1x1 map is constant per channel, so the group norm's statistics
        // and the activation are the same before and after upsampling: resampling after
        // `norm1` (diffusers' `up=True`) equals upsampling the input of the plain block.
        let device = Default::default();
        let block = settings().resnet::<B>(4, 6, &device);
        let temb = Tensor::<B, 2>::random([2, 8], Distribution::Normal(0.0, 1.0), &device);
        let x = Tensor::<B, 4>::random([2, 4, 1, 1], Distribution::Normal(0.0, 1.0), &device);
        let up = resample_resnet(&block, x.clone(), &temb, Resample::Up);
        let plain = block.forward(
            Upsample2D { conv: None }.forward(x, None),
            Some(temb.clone()),
        );
        assert_eq!(up.dims(), [2, 6, 2, 2]);
        let diff: f32 = (up - plain).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn blocks_produce_the_documented_shapes() {
        let device = Default::default();
        let s = settings();
        let temb = Tensor::<B, 2>::random([2, 8], Distribution::Normal(0.0, 1.0), &device);
        let x = Tensor::<B, 4>::random([2, 4, 8, 6], Distribution::Normal(0.0, 1.0), &device);
        for kind in [SamplerType::Conv, SamplerType::Resnet] {
            let down = DownBlock::<B>::new(&s, 4, 6, 2, true, Some(kind), 1, &device);
            let (y, mut skips) = down.forward(x.clone(), &temb);
            assert_eq!(y.dims(), [2, 6, 4, 3]);
            assert_eq!(skips.len(), 3);
            // The up block of the same level consumes the downsampled skip state.
            let up = UpBlock::<B>::new(&s, 6, 6, 6, 1, true, Some(kind), &device);
            let z = up.forward(y, &mut skips, &temb);
            assert_eq!(z.dims(), [2, 6, 8, 6]);
            assert_eq!(skips.len(), 2);
        }
        let mid = MidBlock::<B>::new(&s, 4, true, None, &device);
        assert!(mid.attentions[0].group_norm.is_none());
        assert_eq!(mid.forward(x, &temb).dims(), [2, 4, 8, 6]);
    }
}
