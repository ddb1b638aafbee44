//! Export of trained models to diffusers-format folders, loadable by this project's loaders
//! and by diffusers / transformers themselves:
//!
//! ```text
//! model/
//!   model_index.json                 StableDiffusionPipeline, component classes
//!   unet/config.json                 UNet2DConditionModel config
//!   unet/diffusion_pytorch_model.safetensors
//!   vae/config.json                  AutoencoderKL config
//!   vae/diffusion_pytorch_model.safetensors
//!   text_encoder/config.json         transformers CLIPTextModel config
//!   text_encoder/model.safetensors
//!   tokenizer/                       vocab.json, merges.txt, tokenizer_config.json, ...
//!   scheduler/scheduler_config.json
//! ```
//!
//! Weights are written by burn-store with its Burn-to-PyTorch adapter (`Linear` weights
//! transposed to `[out, in]`, norm `gamma`/`beta` renamed to `weight`/`bias`, enum variant
//! names dropped), in f32, with the `{"format": "pt"}` metadata transformers expects. The
//! whole folder is assembled in a temporary folder beside the target and renamed into
//! place, so an existing export is only replaced by a complete one.
//!
//! [`export_pipeline_sharded`] splits each weight file larger than a given size into
//! diffusers' / transformers' sharded layout (`NAME-00001-of-0000N.safetensors` and
//! `NAME.safetensors.index.json` mapping every tensor to its shard), tensors unchanged;
//! both this project's loaders and diffusers read it.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use diffusion_core::{Error, Result};
use diffusion_models::clip::{ClipTextConfig, ClipTextModel};
use diffusion_models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffusion_models::vae::{AutoencoderKL, AutoencoderKLConfig};
use safetensors::tensor::TensorView;
use safetensors::{SafeTensorError, SafeTensors};
use serde_json::{Value, json};

use crate::train::model::ModelArchitecture;

/// The diffusers version written into configs (the version the export is tested with).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// A module's parameters as safetensors bytes with PyTorch key names and layouts.
pub fn safetensors_bytes<B: Backend, M: Module<B>>(module: &M) -> Result<Vec<u8>> {
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .skip_enum_variants(true)
        .metadata("format", "pt");
    module
        .save_into(&mut store)
        .map_err(|e| Error::Weights(format!("cannot serialise weights: {e}")))?;
    store
        .get_bytes()
        .map_err(|e| Error::Weights(format!("cannot serialise weights: {e}")))
}

/// Writes the safetensors `bytes` as `dir/STEM.safetensors`, or, when they are larger than
/// `max_shard_bytes`, as shards of at most that size (a tensor larger than it gets a shard of
/// its own) named `STEM-0000i-of-0000n.safetensors` with `STEM.safetensors.index.json`, the
/// layout diffusers' `save_pretrained(max_shard_size=...)` writes. Tensors are assigned to
/// shards in name order. Returns the names of the files written.
pub fn write_weights(
    dir: &Path,
    stem: &str,
    bytes: &[u8],
    max_shard_bytes: Option<usize>,
) -> Result<Vec<String>> {
    let single = format!("{stem}.safetensors");
    let limit = match max_shard_bytes {
        Some(limit) if bytes.len() > limit => limit,
        _ => {
            write_file(&dir.join(&single), bytes)?;
            return Ok(vec![single]);
        }
    };
    let bad = |e: SafeTensorError| Error::Weights(format!("cannot shard {single}: {e}"));
    let tensors = SafeTensors::deserialize(bytes).map_err(bad)?;
    // `SafeTensors` keeps the header's `__metadata__` private; read it for the shards.
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    let mut views: Vec<(&str, TensorView<'_>)> = tensors.iter().collect();
    views.sort_unstable_by_key(|(name, _)| *name);
    let mut shards: Vec<Vec<(&str, TensorView<'_>)>> = Vec::new();
    let mut size = 0;
    for (name, view) in views {
        let len = view.data().len();
        match shards.last_mut() {
            Some(shard) if size + len <= limit => shard.push((name, view)),
            _ => {
                shards.push(vec![(name, view)]);
                size = 0;
            }
        }
        size += len;
    }
    let count = shards.len();
    let mut files = Vec::with_capacity(count + 1);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("{stem}-{:05}-of-{count:05}.safetensors", i + 1);
        for (name, view) in &shard {
            weight_map.insert(name.to_string(), Value::String(file.clone()));
            total += view.data().len();
        }
        let data = safetensors::serialize(shard, header.metadata().clone()).map_err(bad)?;
        write_file(&dir.join(&file), &data)?;
        files.push(file);
    }
    let index = format!("{single}.index.json");
    write_json(
        &dir.join(&index),
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )?;
    files.push(index);
    Ok(files)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Json {
        context: path.display().to_string(),
        message: e.to_string(),
    })?;
    text.push('\n');
    write_file(path, text.as_bytes())
}

fn with_class(value: Value, class: &str, extra: &[(&str, Value)]) -> Value {
    let mut map = serde_json::Map::new();
    map.insert("_class_name".into(), json!(class));
    map.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
    if let Value::Object(fields) = value {
        map.extend(fields);
    }
    for (k, v) in extra {
        map.insert((*k).to_string(), v.clone());
    }
    Value::Object(map)
}

fn to_value<T: serde::Serialize>(v: &T, what: &str) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Json {
        context: what.into(),
        message: e.to_string(),
    })
}

/// `unet/config.json` for `config`.
pub fn unet_config_json(config: &UNet2DConditionConfig) -> Result<Value> {
    Ok(with_class(
        to_value(config, "unet config")?,
        "UNet2DConditionModel",
        &[],
    ))
}

/// `vae/config.json` for `config`.
pub fn vae_config_json(config: &AutoencoderKLConfig) -> Result<Value> {
    Ok(with_class(
        to_value(config, "vae config")?,
        "AutoencoderKL",
        &[],
    ))
}

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`) for `config`.
pub fn text_encoder_config_json(config: &ClipTextConfig) -> Result<Value> {
    let mut v = to_value(config, "text encoder config")?;
    if let Value::Object(map) = &mut v {
        for (k, x) in [
            ("architectures", json!(["CLIPTextModel"])),
            ("model_type", json!("clip_text_model")),
            ("dtype", json!("float32")),
            ("attention_dropout", json!(0.0)),
            ("dropout", json!(0.0)),
            ("initializer_factor", json!(1.0)),
            ("initializer_range", json!(0.02)),
            ("transformers_version", json!("5.24.0")),
        ] {
            map.insert(k.into(), x);
        }
    }
    Ok(v)
}

/// Builds a folder atomically: `fill` writes into a fresh temporary folder beside `dir`,
/// which then replaces `dir` (an existing `dir` is moved aside first and deleted after).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = dir
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{}: not a folder name", dir.display())))?
        .to_string_lossy()
        .to_string();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{name}-"))
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    fill(tmp.path())?;
    let aside = if dir.exists() {
        let aside = parent.join(format!(".old-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(dir, &aside).map_err(|e| Error::io(dir, e))?;
        Some(aside)
    } else {
        None
    };
    let tmp_path = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp_path, dir) {
        if let Some(aside) = &aside {
            let _ = std::fs::rename(aside, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp_path);
        return Err(Error::io(dir, e));
    }
    if let Some(aside) = aside {
        let _ = std::fs::remove_dir_all(aside);
    }
    Ok(())
}

/// Writes a VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`) into `dir`
/// (not atomically; see [`export_vae`]). The config's `scaling_factor` and `shift_factor`
/// are the model's.
pub fn write_vae_files<B: Backend>(
    dir: &Path,
    config: &AutoencoderKLConfig,
    vae: &AutoencoderKL<B>,
) -> Result<()> {
    write_vae_folder(dir, config, vae, None)
}

fn write_vae_folder<B: Backend>(
    dir: &Path,
    config: &AutoencoderKLConfig,
    vae: &AutoencoderKL<B>,
    max_shard_bytes: Option<usize>,
) -> Result<()> {
    let mut config = config.clone();
    config.scaling_factor = vae.scaling_factor;
    config.shift_factor = (vae.shift_factor != 0.0).then_some(vae.shift_factor);
    write_json(&dir.join("config.json"), &vae_config_json(&config)?)?;
    write_weights(
        dir,
        "diffusion_pytorch_model",
        &safetensors_bytes(vae)?,
        max_shard_bytes,
    )?;
    Ok(())
}

/// Exports a VAE on its own as a diffusers `AutoencoderKL` folder, atomically.
pub fn export_vae<B: Backend>(
    dir: &Path,
    config: &AutoencoderKLConfig,
    vae: &AutoencoderKL<B>,
) -> Result<()> {
    write_dir_atomically(dir, |tmp| write_vae_files(tmp, config, vae))
}

/// The components of a pipeline to export.
#[derive(Debug)]
pub struct PipelineExport<'a, B: Backend> {
    /// Configs, scheduler config and tokenizer files.
    pub architecture: &'a ModelArchitecture,
    /// The denoiser.
    pub unet: &'a UNet2DConditionModel<B>,
    /// The autoencoder.
    pub vae: &'a AutoencoderKL<B>,
    /// The text encoder.
    pub text_encoder: &'a ClipTextModel<B>,
}

impl<B: Backend> Clone for PipelineExport<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for PipelineExport<'_, B> {}

/// `model_index.json` of an exported `StableDiffusionPipeline`.
pub fn model_index_json(scheduler_class: &str) -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

/// Exports a whole text-to-image pipeline as a diffusers folder at `dir`, atomically (see
/// the [module documentation](self)), one weight file per component.
pub fn export_pipeline<B: Backend>(dir: &Path, parts: PipelineExport<'_, B>) -> Result<()> {
    export_pipeline_sharded(dir, parts, None)
}

/// [`export_pipeline`], with each component's weights split into shards of at most
/// `max_shard_bytes` when larger ([`write_weights`]; `None`: one file each).
pub fn export_pipeline_sharded<B: Backend>(
    dir: &Path,
    parts: PipelineExport<'_, B>,
    max_shard_bytes: Option<usize>,
) -> Result<()> {
    let arch = parts.architecture;
    arch.validate()?;
    let scheduler_class = arch
        .scheduler
        .get("_class_name")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::config("_class_name", "the scheduler config names no class"))?
        .to_string();
    write_dir_atomically(dir, |tmp| {
        write_json(
            &tmp.join("model_index.json"),
            &model_index_json(&scheduler_class),
        )?;
        write_json(
            &tmp.join("unet/config.json"),
            &unet_config_json(&arch.unet)?,
        )?;
        write_weights(
            &tmp.join("unet"),
            "diffusion_pytorch_model",
            &safetensors_bytes(parts.unet)?,
            max_shard_bytes,
        )?;
        write_vae_folder(&tmp.join("vae"), &arch.vae, parts.vae, max_shard_bytes)?;
        write_json(
            &tmp.join("text_encoder/config.json"),
            &text_encoder_config_json(&arch.text_encoder)?,
        )?;
        write_weights(
            &tmp.join("text_encoder"),
            "model",
            &safetensors_bytes(parts.text_encoder)?,
            max_shard_bytes,
        )?;
        arch.tokenizer.write(&tmp.join("tokenizer"))?;
        write_json(
            &tmp.join("scheduler/scheduler_config.json"),
            &arch.scheduler,
        )?;
        Ok(())
    })
}
