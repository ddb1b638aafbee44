//! [`ClipTextModel`] and [`ClipTextModelWithProjection`]: the text encoders of Stable
//! Diffusion 1.x / 2.x and both encoders of SDXL.

use std::path::Path;

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use diffusion_core::{Error, ModelDir, Result};

use super::activation::ClipActivation;
use super::config::ClipTextConfig;
use super::embeddings::{ClipTextEmbeddings, ClipTextEmbeddingsConfig};
use super::encoder::{ClipEncoder, ClipEncoderConfig};
use crate::loading::{LoadOptions, load_module};
use crate::nn::layer_norm;

/// The `eos_token_id` of legacy CLIP configs, for which transformers pools at
/// `argmax(input_ids)` instead of at the first end-of-text token.
pub const LEGACY_EOS_TOKEN_ID: i64 = 2;

/// What a CLIP text encoder returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput<B: Backend> {
    /// The encoder output after `final_layer_norm`: `[batch, seq, hidden]`. SD 1.x/2.x use
    /// this as the U-Net's `encoder_hidden_states` when no clip skip is set.
    pub last_hidden_state: Tensor<B, 3>,
    /// transformers' `hidden_states`: the embeddings followed by the output of every layer
    /// (`num_hidden_layers + 1` tensors of `[batch, seq, hidden]`, without the final LayerNorm).
    /// See [`ClipTextOutput::hidden_state_from_end`].
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// `last_hidden_state` at the pooled (end-of-text) token: `[batch, hidden]`
    /// (transformers' `pooler_output`).
    pub pooler_output: Tensor<B, 2>,
    /// `text_projection(pooler_output)`: `[batch, projection_dim]`, for
    /// [`ClipTextModelWithProjection`] only (SDXL's pooled `text_embeds`).
    pub text_embeds: Option<Tensor<B, 2>>,
}

impl<B: Backend> ClipTextOutput<B> {
    /// `hidden_states[-n]` in Python's indexing: `n = 1` is the last layer's output, `n = 2`
    /// the penultimate one.
    ///
    /// diffusers' `clip_skip` convention: SD 1.x/2.x take `hidden_states[-(clip_skip + 1)]` and
    /// apply the model's `final_layer_norm` to it ([`ClipTextModel::final_layer_norm`]); SDXL
    /// takes `hidden_states[-(clip_skip + 2)]` (`-2` without clip skip) and does not.
    ///
    /// Errors when `n` is 0 or larger than the number of hidden states.
    pub fn hidden_state_from_end(&self, n: usize) -> Result<Tensor<B, 3>> {
        let len = self.hidden_states.len();
        if n == 0 || n > len {
            return Err(Error::InvalidArgument(format!(
                "hidden_states[-{n}] does not exist ({len} hidden states)"
            )));
        }
        Ok(self.hidden_states[len - n].clone())
    }
}

/// transformers' `CLIPTextModel`: embeddings, a causal pre-norm transformer encoder and a
/// final LayerNorm.
///
/// Parameter keys are those transformers 5 writes: `embeddings.token_embedding.weight`,
/// `embeddings.position_embedding.weight`,
/// `encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.{fc1,fc2}, layer_norm2}`,
/// `final_layer_norm`. Checkpoints written by transformers 4 and the SD repositories prefix
/// them with `text_model.`; [`ClipTextModel::load`] accepts both.
#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    /// Token and position embeddings.
    pub embeddings: ClipTextEmbeddings<B>,
    /// The transformer layers.
    pub encoder: ClipEncoder<B>,
    /// LayerNorm applied to the encoder output.
    pub final_layer_norm: LayerNorm<B>,
    /// End-of-text token id, which selects the pooled token.
    #[module(skip)]
    pub eos_token_id: i64,
    /// Number of position embeddings (the longest accepted sequence).
    #[module(skip)]
    pub max_position_embeddings: usize,
}

impl<B: Backend> ClipTextModel<B> {
    /// Builds the model with random weights (use [`ClipTextConfig::init`], which validates
    /// the config and resolves the activation).
    pub(crate) fn new(
        config: &ClipTextConfig,
        activation: ClipActivation,
        device: &B::Device,
    ) -> Self {
        Self {
            embeddings: ClipTextEmbeddingsConfig::new(
                config.vocab_size,
                config.max_position_embeddings,
                config.hidden_size,
            )
            .init(device),
            encoder: ClipEncoderConfig::new(
                config.hidden_size,
                config.intermediate_size,
                config.num_attention_heads,
                config.num_hidden_layers,
                activation,
            )
            .with_layer_norm_eps(config.layer_norm_eps())
            .init(device),
            final_layer_norm: LayerNormConfig::new(config.hidden_size)
                .with_epsilon(config.layer_norm_eps())
                .init(device),
            eos_token_id: config.eos_token_id.unwrap_or(LEGACY_EOS_TOKEN_ID),
            max_position_embeddings: config.max_position_embeddings,
        }
    }

    /// Reads `component/config.json` of a model folder, builds the model and loads its
    /// weights (single file, fp16 `variant` or shards; see [`ModelDir::weight_files`]).
    pub fn load(
        dir: &ModelDir,
        component: &str,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<Self> {
        let config = ClipTextConfig::from_config_map(&dir.config(component)?)?;
        let weights = dir.weight_files(component, variant)?;
        Self::load_files(&config, &weights.files, device)
    }

    /// Builds the model for `config` and loads `files` (one file or all shards).
    pub fn load_files(
        config: &ClipTextConfig,
        files: &[impl AsRef<Path>],
        device: &B::Device,
    ) -> Result<Self> {
        load_module(config.init(device)?, files, &Self::load_options())
    }

    /// The loading rules for a `CLIPTextModel` state dict: the legacy `text_model.` prefix is
    /// stripped, and the `position_ids` buffer old checkpoints carry is ignored (as
    /// transformers does).
    pub fn load_options() -> LoadOptions {
        LoadOptions::new()
            .remap(r"^text_model\.", "")
            .ignore_unexpected(r"(text_model\.)?embeddings\.position_ids")
    }

    /// Encodes token ids.
    ///
    /// Returns [`Error::Shape`] when the sequence is empty or longer than
    /// `max_position_embeddings`.
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, seq]`
    /// - output: see [`ClipTextOutput`] (`text_embeds` is `None`)
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Result<ClipTextOutput<B>> {
        let [batch, seq] = input_ids.dims();
        if seq == 0 || batch == 0 || seq > self.max_position_embeddings {
            return Err(Error::Shape(format!(
                "CLIP input_ids must be [batch >= 1, 1..={}], got [{batch}, {seq}]",
                self.max_position_embeddings
            )));
        }
        let embedded = self.embeddings.forward(input_ids.clone());
        let hidden_states = self.encoder.forward(embedded);
        let last = hidden_states
            .last()
            .cloned()
            .expect("the encoder returns at least its input");
        let last_hidden_state = layer_norm(&self.final_layer_norm, last);
        let pooler_output = self.pool(last_hidden_state.clone(), input_ids);
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooler_output,
            text_embeds: None,
        })
    }

    /// The hidden state at the pooled token of each sequence.
    ///
    /// transformers' rule: with the legacy `eos_token_id == 2` the token at `argmax(input_ids)`
    /// (the first occurrence of the largest id); otherwise the first position holding
    /// `eos_token_id` (position 0 when there is none). Computed on the device: the score
    /// `key * seq + (seq - 1 - position)` has its maximum at exactly that position.
    ///
    /// # Shapes
    ///
    /// - last_hidden_state: `[batch, seq, hidden]`
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, hidden]`
    pub fn pool(
        &self,
        last_hidden_state: Tensor<B, 3>,
        input_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        let [batch, seq, hidden] = last_hidden_state.dims();
        let device = input_ids.device();
        let key = if self.eos_token_id == LEGACY_EOS_TOKEN_ID {
            input_ids
        } else {
            input_ids.equal_elem(self.eos_token_id).int()
        };
        let tie_break = Tensor::<B, 1, Int>::arange(0..seq as i64, &device)
            .neg()
            .add_scalar(seq as i64 - 1)
            .reshape([1, seq]);
        let index = (key.mul_scalar(seq as i64) + tie_break)
            .argmax(1)
            .reshape([batch, 1, 1])
            .repeat_dim(2, hidden);
        last_hidden_state.gather(1, index).reshape([batch, hidden])
    }
}

/// transformers' `CLIPTextModelWithProjection`: a [`ClipTextModel`] plus a bias-free
/// `text_projection` of the pooled output (SDXL's `text_encoder_2`).
///
/// Keys: `text_model.*` (as [`ClipTextModel`]) and `text_projection.weight`.
#[derive(Module, Debug)]
pub struct ClipTextModelWithProjection<B: Backend> {
    /// The text transformer.
    pub text_model: ClipTextModel<B>,
    /// Projection of the pooled output, without bias.
    pub text_projection: Linear<B>,
}

impl<B: Backend> ClipTextModelWithProjection<B> {
    pub(crate) fn new(
        config: &ClipTextConfig,
        activation: ClipActivation,
        projection_dim: usize,
        device: &B::Device,
    ) -> Self {
        Self {
            text_model: ClipTextModel::new(config, activation, device),
            text_projection: LinearConfig::new(config.hidden_size, projection_dim)
                .with_bias(false)
                .init(device),
        }
    }

    /// Reads `component/config.json`, builds the model and loads its weights.
    pub fn load(
        dir: &ModelDir,
        component: &str,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<Self> {
        let config = ClipTextConfig::from_config_map(&dir.config(component)?)?;
        let weights = dir.weight_files(component, variant)?;
        Self::load_files(&config, &weights.files, device)
    }

    /// Builds the model for `config` and loads `files` (one file or all shards).
    pub fn load_files(
        config: &ClipTextConfig,
        files: &[impl AsRef<Path>],
        device: &B::Device,
    ) -> Result<Self> {
        load_module(
            config.init_with_projection(device)?,
            files,
            &Self::load_options(),
        )
    }

    /// The loading rules: `position_ids` buffers are ignored.
    pub fn load_options() -> LoadOptions {
        LoadOptions::new().ignore_unexpected(r"text_model\.embeddings\.position_ids")
    }

    /// Encodes token ids; `text_embeds` is set.
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, seq]`
    /// - output: see [`ClipTextOutput`]
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Result<ClipTextOutput<B>> {
        let mut out = self.text_model.forward(input_ids)?;
        out.text_embeds = Some(self.text_projection.forward(out.pooler_output.clone()));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    fn tiny(eos: i64) -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 20,
            hidden_size: 8,
            intermediate_size: 12,
            projection_dim: Some(6),
            num_hidden_layers: 2,
            num_attention_heads: 2,
            max_position_embeddings: 7,
            hidden_act: "gelu".into(),
            layer_norm_eps: Some(1e-5),
            pad_token_id: Some(1),
            bos_token_id: Some(0),
            eos_token_id: Some(eos),
        }
    }

    fn row(t: &Tensor<B, 3>, b: usize, s: usize) -> Vec<f32> {
        let [_, _, h] = t.dims();
        t.clone()
            .slice([b..b + 1, s..s + 1, 0..h])
            .into_data()
            .to_vec()
            .unwrap()
    }

    #[test]
    fn pools_like_transformers() {
        let device = Default::default();
        let ids = Tensor::<B, 2, Int>::from_ints([[0, 5, 19, 19, 19], [0, 19, 3, 17, 17]], &device);
        // Legacy eos 2: first argmax of the ids.
        let legacy = tiny(2).init::<B>(&device).unwrap();
        let out = legacy.forward(ids.clone()).unwrap();
        let pooled: Vec<f32> = out.pooler_output.clone().into_data().to_vec().unwrap();
        assert_eq!(pooled[..8], row(&out.last_hidden_state, 0, 2)[..]);
        assert_eq!(pooled[8..], row(&out.last_hidden_state, 1, 1)[..]);
        // eos 17: first position of 17 (none in row 0 -> position 0).
        let eos = tiny(17).init::<B>(&device).unwrap();
        let out = eos.forward(ids).unwrap();
        let pooled: Vec<f32> = out.pooler_output.clone().into_data().to_vec().unwrap();
        assert_eq!(pooled[..8], row(&out.last_hidden_state, 0, 0)[..]);
        assert_eq!(pooled[8..], row(&out.last_hidden_state, 1, 3)[..]);
    }

    #[test]
    fn outputs_and_shapes() {
        let device = Default::default();
        let model = tiny(2).init_with_projection::<B>(&device).unwrap();
        let ids = Tensor::<B, 2, Int>::from_ints([[0, 4, 2, 1]], &device);
        let out = model.forward(ids).unwrap();
        assert_eq!(out.hidden_states.len(), 3);
        assert_eq!(out.last_hidden_state.dims(), [1, 4, 8]);
        assert_eq!(out.text_embeds.as_ref().unwrap().dims(), [1, 6]);
        let last = out.hidden_state_from_end(1).unwrap();
        let normed = model.text_model.final_layer_norm.forward(last);
        assert!(
            (normed - out.last_hidden_state.clone())
                .abs()
                .max()
                .into_scalar()
                < 1e-6
        );
        assert!(out.hidden_state_from_end(0).is_err());
        assert!(out.hidden_state_from_end(4).is_err());
        assert!(out.hidden_state_from_end(3).is_ok());
    }

    #[test]
    fn rejects_bad_sequences() {
        let device = Default::default();
        let model = tiny(2).init::<B>(&device).unwrap();
        let long = Tensor::<B, 2, Int>::zeros([1, 8], &device);
        assert!(matches!(model.forward(long), Err(Error::Shape(_))));
        let empty = Tensor::<B, 2, Int>::zeros([1, 0], &device);
        assert!(matches!(model.forward(empty), Err(Error::Shape(_))));
        let mut no_projection = tiny(2);
        no_projection.projection_dim = None;
        assert!(matches!(
            no_projection.init_with_projection::<B>(&device),
            Err(Error::InvalidConfig { .. })
        ));
    }
}
