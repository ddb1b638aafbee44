//! CLIP's token + position embeddings (`CLIPTextEmbeddings`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Configuration of [`ClipTextEmbeddings`].
#[derive(Config, Debug)]
pub struct ClipTextEmbeddingsConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of positions.
    pub max_position_embeddings: usize,
    /// Embedding width.
    pub hidden_size: usize,
}

impl ClipTextEmbeddingsConfig {
    /// Builds the embeddings with random (N(0, 0.02)) weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipTextEmbeddings<B> {
        let init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        ClipTextEmbeddings {
            token_embedding: EmbeddingConfig::new(self.vocab_size, self.hidden_size)
                .with_initializer(init.clone())
                .init(device),
            position_embedding: EmbeddingConfig::new(
                self.max_position_embeddings,
                self.hidden_size,
            )
            .with_initializer(init)
            .init(device),
        }
    }
}

/// `token_embedding(ids) + position_embedding(0..seq)`.
///
/// Keys: `token_embedding.weight`, `position_embedding.weight`. The `position_ids` buffer of
/// older checkpoints is not a parameter here (positions are always `0..seq`, as transformers
/// uses them when no `position_ids` are passed).
#[derive(Module, Debug)]
pub struct ClipTextEmbeddings<B: Backend> {
    /// Token embedding table `[vocab_size, hidden_size]`.
    pub token_embedding: Embedding<B>,
    /// Position embedding table `[max_position_embeddings, hidden_size]`.
    pub position_embedding: Embedding<B>,
}

impl<B: Backend> ClipTextEmbeddings<B> {
    /// Embeds token ids. `seq` must not exceed the number of position embeddings (checked by
    /// the caller, [`ClipTextModel::forward`](super::ClipTextModel::forward)).
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden_size]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, seq] = input_ids.dims();
        let device = input_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device).reshape([1, seq]);
        self.token_embedding.forward(input_ids) + self.position_embedding.forward(positions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn adds_token_and_position_rows() {
        let device = Default::default();
        let emb = ClipTextEmbeddingsConfig::new(10, 5, 3).init::<B>(&device);
        let ids = Tensor::<B, 2, Int>::from_ints([[7, 2], [0, 0]], &device);
        let out = emb.forward(ids);
        assert_eq!(out.dims(), [2, 2, 3]);
        let tok = emb.token_embedding.weight.val();
        let pos = emb.position_embedding.weight.val();
        let want = tok.clone().slice([2..3, 0..3]) + pos.slice([1..2, 0..3]);
        let got = out.slice([0..1, 1..2, 0..3]).reshape([1, 3]);
        assert!((got - want).abs().max().into_scalar() < 1e-7);
    }
}
