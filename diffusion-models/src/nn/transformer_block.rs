//! diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`: self-attention,
//! cross-attention and a feed-forward layer, each pre-normed and residual.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::{
    Attention, AttentionChunking, AttentionConfig, FeedForward, FeedForwardActivation,
    FeedForwardConfig, layer_norm,
};

/// Configuration of a [`BasicTransformerBlock`]; defaults are diffusers'.
#[derive(Config, Debug)]
pub struct BasicTransformerBlockConfig {
    /// Width of the token features.
    pub dim: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of one head.
    pub attention_head_dim: usize,
    /// Width of the cross-attention context; `None` (with `double_self_attention` off)
    /// builds no `norm2`/`attn2`.
    #[config(default = "None")]
    pub cross_attention_dim: Option<usize>,
    /// Bias on the q/k/v projections.
    #[config(default = false)]
    pub attention_bias: bool,
    /// `attn1` attends to the context instead of to the tokens themselves.
    #[config(default = false)]
    pub only_cross_attention: bool,
    /// `attn2` is a second self-attention.
    #[config(default = false)]
    pub double_self_attention: bool,
    /// Upcasts attention to `f32` for half-precision inputs.
    #[config(default = false)]
    pub upcast_attention: bool,
    /// Epsilon of the layer norms.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// The feed-forward activation.
    #[config(default = "FeedForwardActivation::Geglu")]
    pub activation_fn: FeedForwardActivation,
    /// How attention is evaluated.
    #[config(default = "AttentionChunking::Off")]
    pub chunking: AttentionChunking,
}

/// diffusers' `BasicTransformerBlock` (layer-norm variant).
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    /// Norm before `attn1`.
    pub norm1: LayerNorm<B>,
    /// Self-attention (cross-attention with `only_cross_attention`).
    pub attn1: Attention<B>,
    /// Norm before `attn2`.
    pub norm2: Option<LayerNorm<B>>,
    /// Cross-attention to the context.
    pub attn2: Option<Attention<B>>,
    /// Norm before `ff`.
    pub norm3: LayerNorm<B>,
    /// The feed-forward layer.
    pub ff: FeedForward<B>,
    /// `attn1` attends to the context.
    pub only_cross_attention: bool,
}

impl BasicTransformerBlockConfig {
    /// Builds the block with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> BasicTransformerBlock<B> {
        let norm = || {
            LayerNormConfig::new(self.dim)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        let attention = |cross: Option<usize>| {
            AttentionConfig::new(self.dim)
                .with_cross_attention_dim(cross)
                .with_heads(self.num_attention_heads)
                .with_dim_head(self.attention_head_dim)
                .with_bias(self.attention_bias)
                .with_upcast_attention(self.upcast_attention)
                .with_chunking(self.chunking)
                .init(device)
        };
        let attn1 = attention(if self.only_cross_attention {
            self.cross_attention_dim
        } else {
            None
        });
        let has_attn2 = self.cross_attention_dim.is_some() || self.double_self_attention;
        let attn2 = has_attn2.then(|| {
            attention(if self.double_self_attention {
                None
            } else {
                self.cross_attention_dim
            })
        });
        BasicTransformerBlock {
            norm1: norm(),
            attn1,
            norm2: has_attn2.then(norm),
            attn2,
            norm3: norm(),
            ff: FeedForwardConfig::new(self.dim)
                .with_activation(self.activation_fn)
                .init(device),
            only_cross_attention: self.only_cross_attention,
        }
    }
}

impl<B: Backend> BasicTransformerBlock<B> {
    /// Applies the block.
    ///
    /// # Shapes
    ///
    /// - hidden: `[batch, tokens, dim]`
    /// - context: `[batch, context_tokens, cross_attention_dim]`
    /// - output: `[batch, tokens, dim]`
    pub fn forward(&self, hidden: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let normed = layer_norm(&self.norm1, hidden.clone());
        let ctx1 = if self.only_cross_attention {
            context.clone()
        } else {
            None
        };
        let mut hidden = self.attn1.forward(normed, ctx1) + hidden;
        if let (Some(norm2), Some(attn2)) = (&self.norm2, &self.attn2) {
            let normed = layer_norm(norm2, hidden.clone());
            hidden = attn2.forward(normed, context) + hidden;
        }
        let normed = layer_norm(&self.norm3, hidden.clone());
        self.ff.forward(normed) + hidden
    }

    /// Sets how the block's attention layers are evaluated.
    pub fn set_chunking(&mut self, chunking: AttentionChunking) {
        self.attn1.chunking = chunking;
        if let Some(attn2) = &mut self.attn2 {
            attn2.chunking = chunking;
        }
    }

    /// Sets whether the block's attention layers run in `f32` for `f16` / `bf16` inputs
    /// (see [`Attention::upcast`]).
    pub fn set_upcast(&mut self, upcast: bool) {
        self.attn1.upcast = upcast;
        if let Some(attn2) = &mut self.attn2 {
            attn2.upcast = upcast;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn block_equals_its_parts_composed() {
        let device = Default::default();
        let block = BasicTransformerBlockConfig::new(16, 2, 8)
            .with_cross_attention_dim(Some(12))
            .init::<B>(&device);
        let x = Tensor::<B, 3>::random([2, 6, 16], Distribution::Normal(0.0, 1.0), &device);
        let ctx = Tensor::<B, 3>::random([2, 4, 12], Distribution::Normal(0.0, 1.0), &device);
        let h = block.attn1.forward(block.norm1.forward(x.clone()), None) + x.clone();
        let h = block.attn2.as_ref().unwrap().forward(
            block.norm2.as_ref().unwrap().forward(h.clone()),
            Some(ctx.clone()),
        ) + h;
        let expect = block.ff.forward(block.norm3.forward(h.clone())) + h;
        let got = block.forward(x, Some(ctx));
        let diff: f32 = (got - expect).abs().max().into_scalar();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn only_cross_attention_projects_the_context_in_attn1() {
        let device = Default::default();
        let block = BasicTransformerBlockConfig::new(16, 2, 8)
            .with_cross_attention_dim(Some(12))
            .with_only_cross_attention(true)
            .init::<B>(&device);
        assert_eq!(block.attn1.to_k.weight.val().dims(), [12, 16]);
        let no_cross = BasicTransformerBlockConfig::new(16, 2, 8).init::<B>(&device);
        assert!(no_cross.attn2.is_none() && no_cross.norm2.is_none());
    }
}
