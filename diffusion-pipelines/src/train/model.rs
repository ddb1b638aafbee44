//! What the trainers train: the denoiser with its text encoder ([`TextToImageModel`]), and
//! the description of a whole latent text-to-image model ([`ModelArchitecture`]), including
//! the project's small default model for the procedural shapes dataset
//! ([`ModelArchitecture::shapes`]).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use diffusion_core::{ConfigMap, Error, Result};
use diffusion_models::clip::{ClipTextConfig, ClipTextModel};
use diffusion_models::tokenizer::ClipTokenizer;
use diffusion_models::unet::{
    PerBlock, SampleSize, UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning,
};
use diffusion_models::vae::AutoencoderKLConfig;
use diffusion_schedulers::{BetaSchedule, NoiseSchedule, PredictionType};
use serde::{Deserialize, Serialize};

/// The denoiser and its text encoder, trained together (the text encoder can be frozen).
///
/// Field names are the diffusers component names, so the module's parameter paths are
/// `unet.<diffusers key>` and `text_encoder.<transformers key>`.
#[derive(Module, Debug)]
pub struct TextToImageModel<B: Backend> {
    /// The conditional U-Net.
    pub unet: UNet2DConditionModel<B>,
    /// The CLIP text encoder.
    pub text_encoder: ClipTextModel<B>,
}

impl<B: Backend> TextToImageModel<B> {
    /// Builds both networks with fresh weights.
    pub fn init(
        unet: &UNet2DConditionConfig,
        text_encoder: &ClipTextConfig,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(Self {
            unet: unet.init(device)?,
            text_encoder: text_encoder.init(device)?,
        })
    }

    /// Encodes token ids to the U-Net's `encoder_hidden_states` (the last hidden state).
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, tokens]`
    /// - output: `[batch, tokens, hidden_size]`
    pub fn encode_text(&self, input_ids: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>> {
        Ok(self.text_encoder.forward(input_ids)?.last_hidden_state)
    }

    /// The U-Net's prediction for noisy latents conditioned on token ids.
    ///
    /// # Shapes
    ///
    /// - noisy_latents: `[batch, channels, height, width]`
    /// - timesteps: `[batch]`
    /// - input_ids: `[batch, tokens]`
    /// - output: `[batch, channels, height, width]`
    pub fn forward(
        &self,
        noisy_latents: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        input_ids: Tensor<B, 2, Int>,
    ) -> Result<Tensor<B, 4>> {
        let text = self.encode_text(input_ids)?;
        self.unet
            .forward(noisy_latents, timesteps, text, &UNetConditioning::default())
    }
}

/// The files of a CLIP BPE tokenizer folder, by name (`vocab.json`, `merges.txt`,
/// `tokenizer_config.json`, `special_tokens_map.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerFiles(pub BTreeMap<String, String>);

/// The 1000-token CLIP BPE vocabulary of the project's tiny test models.
const BPE_1000_VOCAB: &str = include_str!("assets/clip-bpe-1000/vocab.json");
/// Its merges.
const BPE_1000_MERGES: &str = include_str!("assets/clip-bpe-1000/merges.txt");

impl TokenizerFiles {
    /// CLIP's byte-level BPE with a given vocabulary and merges, SD 1.x special tokens
    /// (`<|startoftext|>`, `<|endoftext|>` also as pad) and `model_max_length`.
    pub fn clip(vocab_json: &str, merges_txt: &str, model_max_length: usize) -> Self {
        let token = |content: &str| {
            serde_json::json!({
                "__type": "AddedToken", "content": content, "lstrip": false,
                "normalized": true, "rstrip": false, "single_word": false
            })
        };
        let config = serde_json::json!({
            "add_prefix_space": false,
            "bos_token": token("<|startoftext|>"),
            "clean_up_tokenization_spaces": true,
            "do_lower_case": true,
            "eos_token": token("<|endoftext|>"),
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": token("<|endoftext|>"),
        });
        let plain = |content: &str| {
            serde_json::json!({
                "content": content, "lstrip": false, "normalized": true,
                "rstrip": false, "single_word": false
            })
        };
        let special = serde_json::json!({
            "bos_token": plain("<|startoftext|>"),
            "eos_token": plain("<|endoftext|>"),
            "pad_token": "<|endoftext|>",
            "unk_token": plain("<|endoftext|>"),
        });
        let pretty =
            |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON values serialise");
        Self(BTreeMap::from([
            ("vocab.json".to_string(), vocab_json.to_string()),
            ("merges.txt".to_string(), merges_txt.to_string()),
            ("tokenizer_config.json".to_string(), pretty(&config)),
            ("special_tokens_map.json".to_string(), pretty(&special)),
        ]))
    }

    /// The 1000-token CLIP BPE vocabulary (a subset of CLIP's merges; rare words split into
    /// several tokens) with `model_max_length`.
    pub fn clip_bpe_1000(model_max_length: usize) -> Self {
        Self::clip(BPE_1000_VOCAB, BPE_1000_MERGES, model_max_length)
    }

    /// Reads every regular file of a tokenizer folder.
    pub fn read(dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            if entry.path().is_file() {
                let text = std::fs::read_to_string(entry.path())
                    .map_err(|e| Error::io(entry.path(), e))?;
                files.insert(entry.file_name().to_string_lossy().to_string(), text);
            }
        }
        Ok(Self(files))
    }

    /// Writes the files into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for (name, text) in &self.0 {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Loads the tokenizer these files describe.
    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        self.write(dir.path())?;
        ClipTokenizer::from_folder(dir.path())
    }
}

/// A complete latent text-to-image model's architecture: the configs of its components,
/// its noise schedule (`scheduler_config.json`) and its tokenizer files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelArchitecture {
    /// `unet/config.json`.
    pub unet: UNet2DConditionConfig,
    /// `vae/config.json`.
    pub vae: AutoencoderKLConfig,
    /// `text_encoder/config.json`.
    pub text_encoder: ClipTextConfig,
    /// `scheduler/scheduler_config.json` (also defines the training noise schedule).
    pub scheduler: serde_json::Value,
    /// `tokenizer/`.
    pub tokenizer: TokenizerFiles,
}

impl ModelArchitecture {
    /// The project's default model for the 64x64 shapes dataset (about 2.5 M parameters,
    /// ~10 MB in f32): a 3-level VAE (`[32, 32, 64]` channels, latents 4x16x16), a 4-layer
    /// 64-wide CLIP text encoder over the 1000-token BPE vocabulary with 32 positions (the
    /// longest shapes caption is 32 tokens under that vocabulary), and a 3-level U-Net
    /// (`[32, 64, 64]` channels, cross-attention at the two upper levels).
    pub fn shapes() -> Self {
        let text_encoder = ClipTextConfig {
            vocab_size: 1000,
            hidden_size: 64,
            intermediate_size: 256,
            projection_dim: Some(64),
            num_hidden_layers: 4,
            num_attention_heads: 4,
            max_position_embeddings: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: Some(1e-5),
            pad_token_id: Some(999),
            bos_token_id: Some(998),
            eos_token_id: Some(999),
        };
        let unet = UNet2DConditionConfig {
            sample_size: Some(SampleSize::Square(16)),
            block_out_channels: vec![32, 64, 64],
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            up_block_types: strings(&["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
            layers_per_block: PerBlock::One(1),
            norm_num_groups: Some(16),
            cross_attention_dim: PerBlock::One(64),
            attention_head_dim: PerBlock::One(4),
            ..UNet2DConditionConfig::default()
        };
        let vae = AutoencoderKLConfig {
            block_out_channels: vec![32, 32, 64],
            down_block_types: vec!["DownEncoderBlock2D".into(); 3],
            up_block_types: vec!["UpDecoderBlock2D".into(); 3],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 16,
            sample_size: SampleSize::Square(64),
            scaling_factor: 1.0,
            ..AutoencoderKLConfig::default()
        };
        Self {
            unet,
            vae,
            text_encoder,
            scheduler: trailing(sd_scheduler_config(PredictionType::Epsilon)),
            tokenizer: TokenizerFiles::clip_bpe_1000(32),
        }
    }

    /// A very small architecture for tests and smoke runs: 16x16 images, latents 4x8x8,
    /// a 1-layer 16-wide text encoder, a 2-level 8/16-channel U-Net.
    pub fn tiny() -> Self {
        let text_encoder = ClipTextConfig {
            vocab_size: 1000,
            hidden_size: 16,
            intermediate_size: 32,
            projection_dim: Some(16),
            num_hidden_layers: 1,
            num_attention_heads: 2,
            max_position_embeddings: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: Some(1e-5),
            pad_token_id: Some(999),
            bos_token_id: Some(998),
            eos_token_id: Some(999),
        };
        let unet = UNet2DConditionConfig {
            sample_size: Some(SampleSize::Square(8)),
            block_out_channels: vec![8, 16],
            down_block_types: strings(&["CrossAttnDownBlock2D", "DownBlock2D"]),
            up_block_types: strings(&["UpBlock2D", "CrossAttnUpBlock2D"]),
            layers_per_block: PerBlock::One(1),
            norm_num_groups: Some(4),
            cross_attention_dim: PerBlock::One(16),
            attention_head_dim: PerBlock::One(2),
            ..UNet2DConditionConfig::default()
        };
        let vae = AutoencoderKLConfig {
            block_out_channels: vec![8, 8],
            down_block_types: vec!["DownEncoderBlock2D".into(); 2],
            up_block_types: vec!["UpDecoderBlock2D".into(); 2],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 4,
            sample_size: SampleSize::Square(16),
            scaling_factor: 1.0,
            ..AutoencoderKLConfig::default()
        };
        Self {
            unet,
            vae,
            text_encoder,
            scheduler: sd_scheduler_config(PredictionType::Epsilon),
            tokenizer: TokenizerFiles::clip_bpe_1000(32),
        }
    }

    /// Image side in pixels (the U-Net's sample size times the VAE's downsampling).
    pub fn image_size(&self) -> usize {
        let latent = self.unet.sample_size.map(|s| s.dims()[0]).unwrap_or(64);
        latent * self.vae.downsampling_factor()
    }

    /// Checks that the components fit together.
    pub fn validate(&self) -> Result<()> {
        self.unet.plan()?;
        self.vae.validate()?;
        self.text_encoder.validate()?;
        if self.unet.in_channels != self.vae.latent_channels
            || self.unet.out_channels != self.vae.latent_channels
        {
            return Err(Error::config(
                "unet.in_channels",
                format!(
                    "the U-Net maps {} to {} channels, the VAE has {} latent channels",
                    self.unet.in_channels, self.unet.out_channels, self.vae.latent_channels
                ),
            ));
        }
        let cross = self
            .unet
            .cross_attention_dim
            .resolve(self.unet.block_out_channels.len(), "cross_attention_dim")?;
        if cross.iter().any(|&c| c != self.text_encoder.hidden_size) {
            return Err(Error::config(
                "unet.cross_attention_dim",
                format!(
                    "{cross:?} does not match the text encoder's hidden size {}",
                    self.text_encoder.hidden_size
                ),
            ));
        }
        self.noise_schedule()?;
        Ok(())
    }

    /// The scheduler config as a [`ConfigMap`].
    pub fn scheduler_config(&self) -> Result<ConfigMap> {
        ConfigMap::from_value(self.scheduler.clone(), "scheduler_config.json")
    }

    /// The training noise schedule of the scheduler config.
    pub fn noise_schedule(&self) -> Result<NoiseSchedule> {
        noise_schedule_from_config(&self.scheduler_config()?)
    }

    /// The `prediction_type` of the scheduler config.
    pub fn prediction_type(&self) -> Result<PredictionType> {
        Ok(self
            .scheduler_config()?
            .deserialize::<ScheduleKeys>("scheduler_config.json")?
            .prediction_type)
    }

    /// Sets the scheduler config's `prediction_type` (what the model is trained to predict).
    pub fn set_prediction_type(&mut self, prediction_type: PredictionType) {
        if let Some(map) = self.scheduler.as_object_mut() {
            map.insert(
                "prediction_type".into(),
                serde_json::to_value(prediction_type).expect("enum serialises"),
            );
        }
    }
}

/// "trailing" timestep spacing with no offset (Lin et al. 2023, Table 2): inference
/// timesteps end at 999, and any step count up to all 1000 training timesteps is valid
/// (with SD's "leading" + `steps_offset: 1`, 1000 DDPM steps would ask for timestep 1000).
/// The training schedule is unchanged.
fn trailing(mut config: serde_json::Value) -> serde_json::Value {
    if let Some(map) = config.as_object_mut() {
        map.insert("timestep_spacing".into(), "trailing".into());
        map.insert("steps_offset".into(), 0.into());
    }
    config
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Stable Diffusion's noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps) as
/// a `DDIMScheduler` config, with `prediction_type` set.
pub fn sd_scheduler_config(prediction_type: PredictionType) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.42.1",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
        "rescale_betas_zero_snr": false
    })
}

/// The keys of a scheduler config that define the training noise schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct ScheduleKeys {
    num_train_timesteps: usize,
    #[serde(deserialize_with = "diffusion_core::config::lenient_f64")]
    beta_start: f64,
    #[serde(deserialize_with = "diffusion_core::config::lenient_f64")]
    beta_end: f64,
    beta_schedule: BetaSchedule,
    trained_betas: Option<Vec<f64>>,
    rescale_betas_zero_snr: bool,
    prediction_type: PredictionType,
}

impl Default for ScheduleKeys {
    fn default() -> Self {
        // diffusers' defaults (DDPMScheduler / DDIMScheduler).
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
            prediction_type: PredictionType::Epsilon,
        }
    }
}

/// The training noise schedule a `scheduler_config.json` defines (`num_train_timesteps`,
/// `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`, `rescale_betas_zero_snr`,
/// with diffusers' defaults), as every diffusers scheduler builds it.
pub fn noise_schedule_from_config(config: &ConfigMap) -> Result<NoiseSchedule> {
    let k: ScheduleKeys = config.deserialize("scheduler_config.json")?;
    NoiseSchedule::new(
        k.num_train_timesteps,
        k.beta_start,
        k.beta_end,
        k.beta_schedule,
        k.trained_betas.as_deref(),
        k.rescale_betas_zero_snr,
    )
}
