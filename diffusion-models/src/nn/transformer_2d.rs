//! diffusers' `Transformer2DModel` for continuous (feature-map) inputs: group norm,
//! input projection, a stack of [`BasicTransformerBlock`]s, output projection, residual.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::{
    AttentionChunking, BasicTransformerBlock, BasicTransformerBlockConfig, FeedForwardActivation,
    group_norm,
};

/// `proj_in` / `proj_out`: a 1x1 convolution, or a linear layer when
/// `use_linear_projection` is set (SD 2.x, SDXL).
#[derive(Module, Debug)]
pub enum Projection<B: Backend> {
    /// 1x1 convolution applied to the feature map.
    Conv(Conv2d<B>),
    /// Linear layer applied to the token sequence.
    Linear(Linear<B>),
}

/// Configuration of a [`Transformer2DModel`]; defaults are diffusers'.
#[derive(Config, Debug)]
pub struct Transformer2DModelConfig {
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of one head.
    pub attention_head_dim: usize,
    /// Channels of the feature map (input and output).
    pub in_channels: usize,
    /// Number of stacked transformer blocks.
    #[config(default = 1)]
    pub num_layers: usize,
    /// Width of the cross-attention context.
    #[config(default = "None")]
    pub cross_attention_dim: Option<usize>,
    /// Groups of the input group norm.
    #[config(default = 32)]
    pub norm_num_groups: usize,
    /// Linear instead of 1x1-convolution projections.
    #[config(default = false)]
    pub use_linear_projection: bool,
    /// The blocks' `attn1` attends to the context.
    #[config(default = false)]
    pub only_cross_attention: bool,
    /// The blocks' `attn2` is a second self-attention.
    #[config(default = false)]
    pub double_self_attention: bool,
    /// Upcasts attention to `f32` for half-precision inputs.
    #[config(default = false)]
    pub upcast_attention: bool,
    /// Bias on the q/k/v projections.
    #[config(default = false)]
    pub attention_bias: bool,
    /// The feed-forward activation.
    #[config(default = "FeedForwardActivation::Geglu")]
    pub activation_fn: FeedForwardActivation,
    /// How attention is evaluated.
    #[config(default = "AttentionChunking::Off")]
    pub chunking: AttentionChunking,
}

/// diffusers' `Transformer2DModel` (continuous input path).
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    /// Group norm of the input (eps 1e-6).
    pub norm: GroupNorm<B>,
    /// Input projection to `heads * head_dim` channels.
    pub proj_in: Projection<B>,
    /// The transformer blocks (`transformer_blocks.N`).
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    /// Output projection back to `in_channels`.
    pub proj_out: Projection<B>,
}

impl Transformer2DModelConfig {
    /// Builds the model with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Transformer2DModel<B> {
        let inner = self.num_attention_heads * self.attention_head_dim;
        let projection = |cin: usize, cout: usize| {
            if self.use_linear_projection {
                Projection::Linear(LinearConfig::new(cin, cout).init(device))
            } else {
                Projection::Conv(Conv2dConfig::new([cin, cout], [1, 1]).init(device))
            }
        };
        Transformer2DModel {
            norm: GroupNormConfig::new(self.norm_num_groups, self.in_channels)
                .with_epsilon(1e-6)
                .init(device),
            proj_in: projection(self.in_channels, inner),
            transformer_blocks: (0..self.num_layers)
                .map(|_| {
                    BasicTransformerBlockConfig::new(
                        inner,
                        self.num_attention_heads,
                        self.attention_head_dim,
                    )
                    .with_cross_attention_dim(self.cross_attention_dim)
                    .with_attention_bias(self.attention_bias)
                    .with_only_cross_attention(self.only_cross_attention)
                    .with_double_self_attention(self.double_self_attention)
                    .with_upcast_attention(self.upcast_attention)
                    .with_activation_fn(self.activation_fn)
                    .with_chunking(self.chunking)
                    .init(device)
                })
                .collect(),
            proj_out: projection(inner, self.in_channels),
        }
    }
}

impl<B: Backend> Transformer2DModel<B> {
    /// Applies the model.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, in_channels, height, width]`
    /// - context: `[batch, context_tokens, cross_attention_dim]`
    /// - output: `[batch, in_channels, height, width]`
    pub fn forward(&self, input: Tensor<B, 4>, context: Option<Tensor<B, 3>>) -> Tensor<B, 4> {
        let [batch, _, height, width] = input.dims();
        let h = group_norm(&self.norm, input.clone());
        let to_tokens = |x: Tensor<B, 4>| {
            let c = x.dims()[1];
            x.permute([0, 2, 3, 1]).reshape([batch, height * width, c])
        };
        let to_map = |x: Tensor<B, 3>| {
            let c = x.dims()[2];
            x.reshape([batch, height, width, c]).permute([0, 3, 1, 2])
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(super::conv_forward(conv, h)),
            Projection::Linear(layer) => super::linear(layer, to_tokens(h)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context.clone());
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => super::conv_forward(conv, to_map(tokens)),
            Projection::Linear(layer) => to_map(super::linear(layer, tokens)),
        };
        out + input
    }

    /// Sets how every attention layer of the model is evaluated.
    pub fn set_chunking(&mut self, chunking: AttentionChunking) {
        for block in &mut self.transformer_blocks {
            block.set_chunking(chunking);
        }
    }

    /// Sets whether every attention layer runs in `f32` for `f16` / `bf16` inputs.
    pub fn set_upcast(&mut self, upcast: bool) {
        for block in &mut self.transformer_blocks {
            block.set_upcast(upcast);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::module::Param;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn conv_and_linear_projections_agree_with_the_same_weights() {
        let device = Default::default();
        let conv = Transformer2DModelConfig::new(2, 4, 8)
            .with_norm_num_groups(4)
            .with_cross_attention_dim(Some(6))
            .with_num_layers(2)
            .init::<B>(&device);
        let mut linear = Transformer2DModelConfig::new(2, 4, 8)
            .with_norm_num_groups(4)
            .with_cross_attention_dim(Some(6))
            .with_num_layers(2)
            .with_use_linear_projection(true)
            .init::<B>(&device);
        // Parameters are initialised lazily: run the model first so that the clones below
        // copy the values it used.
        let x = Tensor::<B, 4>::random([2, 8, 3, 5], Distribution::Normal(0.0, 1.0), &device);
        let ctx = Tensor::<B, 3>::random([2, 7, 6], Distribution::Normal(0.0, 1.0), &device);
        let a = conv.forward(x.clone(), Some(ctx.clone()));
        // Copy every weight, turning the 1x1 conv kernels [out, in, 1, 1] into [in, out].
        let to_linear = |p: &Projection<B>| match p {
            Projection::Conv(c) => {
                let [o, i, _, _] = c.weight.val().dims();
                Projection::Linear(Linear {
                    weight: Param::from_tensor(c.weight.val().reshape([o, i]).transpose()),
                    bias: c.bias.clone(),
                })
            }
            Projection::Linear(_) => unreachable!(),
        };
        linear.proj_in = to_linear(&conv.proj_in);
        linear.proj_out = to_linear(&conv.proj_out);
        linear.norm = conv.norm.clone();
        linear.transformer_blocks = conv.transformer_blocks.clone();

        let b = linear.forward(x, Some(ctx));
        let diff: f32 = (a - b).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }
}
