//! The U-Net's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D` /
//! `DownBlock2D`, `UNetMidBlock2DCrossAttn` / `UNetMidBlock2D`, `CrossAttnUpBlock2D` /
//! `UpBlock2D`). A block without attention has an empty `attentions` list, which gives it
//! exactly the state-dict keys of the attention-free diffusers block.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::nn::{
    Activation, AttentionChunking, Downsample2D, Downsample2DConfig, ResnetBlock2D,
    ResnetBlock2DConfig, TimeEmbeddingNorm, Transformer2DModel, Transformer2DModelConfig,
    Upsample2D, Upsample2DConfig,
};

/// Settings shared by the ResNets and transformers of one block.
#[derive(Config, Debug)]
pub struct BlockSettings {
    /// Width of the time embedding.
    pub temb_channels: usize,
    /// Group-norm groups.
    pub groups: usize,
    /// ResNet group-norm epsilon.
    pub eps: f64,
    /// ResNet activation.
    pub act: Activation,
    /// ResNet time-embedding mode.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// ResNet output scale factor.
    #[config(default = 1.0)]
    pub output_scale_factor: f64,
    /// Dropout probability (training only).
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Attention heads of the transformers (0 for blocks without attention).
    #[config(default = 1)]
    pub heads: usize,
    /// Width of the cross-attention context.
    #[config(default = 768)]
    pub cross_attention_dim: usize,
    /// Linear transformer projections.
    #[config(default = false)]
    pub use_linear_projection: bool,
    /// `attn1` attends to the context.
    #[config(default = false)]
    pub only_cross_attention: bool,
    /// Upcasts attention for half-precision inputs.
    #[config(default = false)]
    pub upcast_attention: bool,
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

    fn transformer<B: Backend>(
        &self,
        channels: usize,
        layers: usize,
        device: &B::Device,
    ) -> Transformer2DModel<B> {
        Transformer2DModelConfig::new(self.heads, channels / self.heads, channels)
            .with_num_layers(layers)
            .with_cross_attention_dim(Some(self.cross_attention_dim))
            .with_norm_num_groups(self.groups)
            .with_use_linear_projection(self.use_linear_projection)
            .with_only_cross_attention(self.only_cross_attention)
            .with_upcast_attention(self.upcast_attention)
            .init(device)
    }
}

/// A down block: ResNets (each followed by a transformer in `CrossAttnDownBlock2D`) and an
/// optional stride-2 downsampler.
#[derive(Module, Debug)]
pub struct DownBlock2D<B: Backend> {
    /// The ResNets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One transformer per ResNet (`CrossAttnDownBlock2D`), or none (`DownBlock2D`).
    pub attentions: Vec<Transformer2DModel<B>>,
    /// The downsampler (`downsamplers.0`), absent in the last block.
    pub downsamplers: Vec<Downsample2D<B>>,
}

impl<B: Backend> DownBlock2D<B> {
    /// Builds a block; `transformer_layers` has one entry per ResNet for a cross-attention
    /// block and is empty otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: &BlockSettings,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        transformer_layers: &[usize],
        add_downsample: bool,
        downsample_padding: usize,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..num_layers)
                .map(|i| {
                    let cin = if i == 0 { in_channels } else { out_channels };
                    settings.resnet(cin, out_channels, device)
                })
                .collect(),
            attentions: transformer_layers
                .iter()
                .map(|&layers| settings.transformer(out_channels, layers, device))
                .collect(),
            downsamplers: add_downsample
                .then(|| {
                    Downsample2DConfig::new(out_channels)
                        .with_padding(downsample_padding)
                        .init(device)
                })
                .into_iter()
                .collect(),
        }
    }

    /// Applies the block, returning its output and the skip states it contributes (one per
    /// ResNet, plus the downsampled output).
    ///
    /// # Shapes
    ///
    /// - hidden: `[batch, in_channels, height, width]`
    /// - temb: `[batch, temb_channels]`
    /// - context: `[batch, tokens, cross_attention_dim]`
    /// - output: `[batch, out_channels, height', width']` (halved when downsampling)
    pub fn forward(
        &self,
        hidden: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: Option<&Tensor<B, 3>>,
    ) -> (Tensor<B, 4>, Vec<Tensor<B, 4>>) {
        let mut hidden = hidden;
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            hidden = resnet.forward(hidden, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                hidden = attn.forward(hidden, context.cloned());
            }
            skips.push(hidden.clone());
        }
        for down in &self.downsamplers {
            hidden = down.forward(hidden);
            skips.push(hidden.clone());
        }
        (hidden, skips)
    }

    /// Sets how the block's attention layers are evaluated.
    pub fn set_chunking(&mut self, chunking: AttentionChunking) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_chunking(chunking));
    }

    /// Sets whether the block's attention layers run in `f32` for `f16` / `bf16` inputs.
    pub fn set_attention_upcast(&mut self, upcast: bool) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_upcast(upcast));
    }
}

/// The mid block: ResNet, then (transformer, ResNet) pairs for `UNetMidBlock2DCrossAttn`;
/// a single ResNet for the U-Net's `UNetMidBlock2D`.
#[derive(Module, Debug)]
pub struct MidBlock2D<B: Backend> {
    /// The ResNets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The transformers (one fewer than the ResNets, or none).
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> MidBlock2D<B> {
    /// Builds the mid block; `transformer_layers` is `Some(depth)` for the cross-attention
    /// variant.
    pub fn new(
        settings: &BlockSettings,
        channels: usize,
        transformer_layers: Option<usize>,
        device: &B::Device,
    ) -> Self {
        let mut resnets = vec![settings.resnet(channels, channels, device)];
        let mut attentions = Vec::new();
        if let Some(layers) = transformer_layers {
            attentions.push(settings.transformer(channels, layers, device));
            resnets.push(settings.resnet(channels, channels, device));
        }
        Self {
            resnets,
            attentions,
        }
    }

    /// Applies the block.
    ///
    /// # Shapes
    ///
    /// - hidden: `[batch, channels, height, width]`
    /// - output: `[batch, channels, height, width]`
    pub fn forward(
        &self,
        hidden: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: Option<&Tensor<B, 3>>,
    ) -> Tensor<B, 4> {
        let mut hidden = self.resnets[0].forward(hidden, Some(temb.clone()));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            hidden = attn.forward(hidden, context.cloned());
            hidden = resnet.forward(hidden, Some(temb.clone()));
        }
        hidden
    }

    /// Sets how the block's attention layers are evaluated.
    pub fn set_chunking(&mut self, chunking: AttentionChunking) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_chunking(chunking));
    }

    /// Sets whether the block's attention layers run in `f32` for `f16` / `bf16` inputs.
    pub fn set_attention_upcast(&mut self, upcast: bool) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_upcast(upcast));
    }
}

/// An up block: ResNets on the concatenation of the hidden state and a skip state (each
/// followed by a transformer in `CrossAttnUpBlock2D`) and an optional upsampler.
#[derive(Module, Debug)]
pub struct UpBlock2D<B: Backend> {
    /// The ResNets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One transformer per ResNet (`CrossAttnUpBlock2D`), or none (`UpBlock2D`).
    pub attentions: Vec<Transformer2DModel<B>>,
    /// The upsampler (`upsamplers.0`), absent in the last block.
    pub upsamplers: Vec<Upsample2D<B>>,
}

impl<B: Backend> UpBlock2D<B> {
    /// Builds a block with `transformer_layers.len()` (or `num_layers` when empty) ResNets.
    ///
    /// `in_channels` is the width of the last skip state, `prev_output_channel` the width of
    /// the incoming hidden state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: &BlockSettings,
        in_channels: usize,
        out_channels: usize,
        prev_output_channel: usize,
        num_layers: usize,
        transformer_layers: &[usize],
        add_upsample: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..num_layers)
                .map(|i| {
                    let skip = if i == num_layers - 1 {
                        in_channels
                    } else {
                        out_channels
                    };
                    let cin = if i == 0 {
                        prev_output_channel
                    } else {
                        out_channels
                    };
                    settings.resnet(cin + skip, out_channels, device)
                })
                .collect(),
            attentions: transformer_layers
                .iter()
                .map(|&layers| settings.transformer(out_channels, layers, device))
                .collect(),
            upsamplers: add_upsample
                .then(|| Upsample2DConfig::new(out_channels).init(device))
                .into_iter()
                .collect(),
        }
    }

    /// Applies the block, consuming skip states from the end of `skips` (one per ResNet).
    ///
    /// `upsample_size` overrides the 2x upsampling (used when the input size is not a
    /// multiple of the U-Net's total downsampling factor).
    ///
    /// # Shapes
    ///
    /// - hidden: `[batch, prev_output_channel, height, width]`
    /// - output: `[batch, out_channels, 2 height, 2 width]` (or `upsample_size`; unchanged
    ///   size without an upsampler)
    pub fn forward(
        &self,
        hidden: Tensor<B, 4>,
        skips: &mut Vec<Tensor<B, 4>>,
        temb: &Tensor<B, 2>,
        context: Option<&Tensor<B, 3>>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<B, 4> {
        let mut hidden = hidden;
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .expect("the U-Net provides one skip state per up-block ResNet");
            hidden = Tensor::cat(vec![hidden, skip], 1);
            hidden = resnet.forward(hidden, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                hidden = attn.forward(hidden, context.cloned());
            }
        }
        for up in &self.upsamplers {
            hidden = up.forward(hidden, upsample_size);
        }
        hidden
    }

    /// Sets how the block's attention layers are evaluated.
    pub fn set_chunking(&mut self, chunking: AttentionChunking) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_chunking(chunking));
    }

    /// Sets whether the block's attention layers run in `f32` for `f16` / `bf16` inputs.
    pub fn set_attention_upcast(&mut self, upcast: bool) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_upcast(upcast));
    }
}
