//! Reading a diffusers model folder: `model_index.json`, per-component configs and the
//! weight files of each component.
//!
//! A diffusers pipeline folder looks like
//!
//! ```text
//! model_index.json              {"_class_name": "StableDiffusionPipeline",
//!                                "unet": ["diffusers", "UNet2DConditionModel"],
//!                                "safety_checker": [null, null], ...}
//! unet/config.json
//! unet/diffusion_pytorch_model.safetensors        (or .fp16.safetensors, or shards)
//! text_encoder/config.json
//! text_encoder/model.safetensors
//! tokenizer/vocab.json, merges.txt, tokenizer_config.json, ...
//! scheduler/scheduler_config.json
//! ```
//!
//! A folder holding a single model (e.g. just a U-Net, with `config.json` and weights at its
//! top level) is read the same way: [`ModelDir::open`] does not require `model_index.json`,
//! and the component name [`ROOT`] (`""`) stands for the folder itself.
//!
//! Weight files are resolved in diffusers' order of preference (see
//! [`ModelDir::weight_files`]); only safetensors files are read. A component that only has
//! pickled `.bin` weights is reported as [`Error::Unsupported`].
//!
//! ```no_run
//! use diffusion_core::model_dir::ModelDir;
//!
//! let dir = ModelDir::open("stable-diffusion-v1-5")?;
//! assert_eq!(dir.class_name(), Some("StableDiffusionPipeline"));
//! let unet_config = dir.config("unet")?;
//! let weights = dir.weight_files("unet", Some("fp16"))?;
//! println!("{:?} (variant {:?})", weights.files, weights.variant);
//! # Ok::<(), diffusion_core::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::ConfigMap;
use crate::error::{Error, Result};

/// The component name that stands for the model folder itself (a single-model folder with
/// `config.json` and weights at its top level).
pub const ROOT: &str = "";

/// Name of the pipeline index file.
pub const MODEL_INDEX: &str = "model_index.json";

/// Base names of weight files, in the order they are tried: diffusers models
/// (`diffusion_pytorch_model.*`), then transformers models (`model.*`).
pub const WEIGHT_BASE_NAMES: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// Config file names, in the order [`ModelDir::config`] tries them.
pub const CONFIG_FILE_NAMES: [&str; 4] = [
    "config.json",
    "scheduler_config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
];

/// The library and class a pipeline component was saved with, e.g.
/// `["diffusers", "UNet2DConditionModel"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentSpec {
    /// Python library (`diffusers`, `transformers`, ...).
    pub library: String,
    /// Python class name within that library.
    pub class_name: String,
}

/// The parsed `model_index.json` of a pipeline folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelIndex {
    /// The pipeline class (`_class_name`).
    pub class_name: String,
    /// The diffusers version that wrote the file (`_diffusers_version`), if recorded.
    pub diffusers_version: Option<String>,
    /// Every component entry: `Some(spec)` for a present component, `None` for a component
    /// saved as `[null, null]` or `null` (e.g. a removed safety checker).
    pub components: BTreeMap<String, Option<ComponentSpec>>,
    /// The remaining keys: pipeline options such as `requires_safety_checker` or
    /// `force_zeros_for_empty_prompt`.
    pub options: ConfigMap,
}

impl ModelIndex {
    /// Parses the text of a `model_index.json`; `context` names it in errors.
    pub fn parse(text: &str, context: &str) -> Result<Self> {
        let map = ConfigMap::parse(text, context)?;
        let class_name = map
            .class_name()
            .ok_or_else(|| Error::Json {
                context: context.to_string(),
                message: "missing `_class_name`".to_string(),
            })?
            .to_string();
        let diffusers_version = map
            .get("_diffusers_version")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut components = BTreeMap::new();
        let mut options = ConfigMap::new();
        for (key, value) in &map.0 {
            if key.starts_with('_') {
                continue;
            }
            match value {
                Value::Null => {
                    components.insert(key.clone(), None);
                }
                Value::Array(items) if items.len() == 2 => {
                    let spec = match (&items[0], &items[1]) {
                        (Value::String(library), Value::String(class_name)) => {
                            Some(ComponentSpec {
                                library: library.clone(),
                                class_name: class_name.clone(),
                            })
                        }
                        (Value::Null | Value::String(_), Value::Null) => None,
                        _ => {
                            return Err(Error::Json {
                                context: context.to_string(),
                                message: format!(
                                    "component `{key}` must be [library, class] or [null, null], found {value}"
                                ),
                            });
                        }
                    };
                    components.insert(key.clone(), spec);
                }
                other => options.set(key, other.clone()),
            }
        }
        Ok(Self {
            class_name,
            diffusers_version,
            components,
            options,
        })
    }
}

/// Where a component's weights are: one safetensors file, or the shards listed by an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFiles {
    /// The safetensors files to load, in a stable (sorted) order; more than one only for a
    /// sharded checkpoint.
    pub files: Vec<PathBuf>,
    /// The `*.safetensors.index.json` the shards were listed in, for a sharded checkpoint.
    pub index: Option<PathBuf>,
    /// The variant actually used (`Some("fp16")`), or `None` for the default files (also when a
    /// requested variant was not present and the default files were used instead).
    pub variant: Option<String>,
}

impl WeightFiles {
    /// Whether the weights are split over several shard files (an index file was used).
    pub fn is_sharded(&self) -> bool {
        self.index.is_some()
    }
}

/// A diffusers model folder (a pipeline with `model_index.json`, or a single model).
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    index: Option<ModelIndex>,
}

impl ModelDir {
    /// Opens the folder at `path`, reading `model_index.json` when present.
    ///
    /// Errors: [`Error::Io`] naming the path when it does not exist or is not a directory,
    /// [`Error::Json`] when `model_index.json` is malformed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let root = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&root).map_err(|e| Error::io(&root, e))?;
        if !meta.is_dir() {
            return Err(Error::io(
                &root,
                std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        let index_path = root.join(MODEL_INDEX);
        let index = if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            Some(ModelIndex::parse(&text, &index_path.display().to_string())?)
        } else {
            None
        };
        Ok(Self { root, index })
    }

    /// The folder this was opened on.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The parsed `model_index.json`, if the folder has one.
    pub fn index(&self) -> Option<&ModelIndex> {
        self.index.as_ref()
    }

    /// The pipeline class from `model_index.json` (`None` for a single-model folder; its
    /// class is `config(ROOT)?.class_name()`).
    pub fn class_name(&self) -> Option<&str> {
        self.index.as_ref().map(|i| i.class_name.as_str())
    }

    /// The component entries of `model_index.json` (empty for a single-model folder):
    /// name and `Some(spec)`, or `None` for a null component.
    pub fn components(&self) -> impl Iterator<Item = (&str, Option<&ComponentSpec>)> {
        self.index
            .iter()
            .flat_map(|i| i.components.iter())
            .map(|(name, spec)| (name.as_str(), spec.as_ref()))
    }

    /// The `[library, class]` of a component, `Ok(None)` when `model_index.json` lists it as
    /// null, and an [`Error::Weights`] when the index does not list it at all.
    ///
    /// Without `model_index.json` nothing is known about classes and `Ok(None)` is returned
    /// for components whose folder exists.
    pub fn component_spec(&self, component: &str) -> Result<Option<&ComponentSpec>> {
        match &self.index {
            Some(index) => match index.components.get(component) {
                Some(spec) => Ok(spec.as_ref()),
                None => Err(Error::Weights(format!(
                    "{}: no component `{component}` in {MODEL_INDEX} (components: {})",
                    self.root.display(),
                    index
                        .components
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            },
            None => {
                self.component_path(component)?;
                Ok(None)
            }
        }
    }

    /// Whether `model_index.json` lists `component` as null (`[null, null]`).
    pub fn is_null_component(&self, component: &str) -> bool {
        self.index
            .as_ref()
            .and_then(|i| i.components.get(component))
            .is_some_and(Option::is_none)
    }

    /// The folder of a component (`root/component`, or the root for [`ROOT`]).
    ///
    /// Errors: [`Error::Weights`] when the index lists the component as null, [`Error::Io`]
    /// naming the path when the folder does not exist.
    pub fn component_path(&self, component: &str) -> Result<PathBuf> {
        if component == ROOT {
            return Ok(self.root.clone());
        }
        if self.is_null_component(component) {
            return Err(Error::Weights(format!(
                "{}: component `{component}` is null in {MODEL_INDEX}",
                self.root.display()
            )));
        }
        let path = self.root.join(component);
        if !path.is_dir() {
            return Err(Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("component folder `{component}` not found"),
                ),
            ));
        }
        Ok(path)
    }

    /// The path of `name` inside a component folder, which must exist.
    pub fn file(&self, component: &str, name: &str) -> Result<PathBuf> {
        let path = self.component_path(component)?.join(name);
        if !path.is_file() {
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            ));
        }
        Ok(path)
    }

    /// The path of `name` inside a component folder if that file exists.
    pub fn optional_file(&self, component: &str, name: &str) -> Result<Option<PathBuf>> {
        let path = self.component_path(component)?.join(name);
        Ok(path.is_file().then_some(path))
    }

    /// The component's configuration: the first of [`CONFIG_FILE_NAMES`] that exists
    /// (`config.json`, `scheduler_config.json`, `tokenizer_config.json`,
    /// `preprocessor_config.json`).
    pub fn config(&self, component: &str) -> Result<ConfigMap> {
        let dir = self.component_path(component)?;
        for name in CONFIG_FILE_NAMES {
            let path = dir.join(name);
            if path.is_file() {
                return ConfigMap::from_file(&path);
            }
        }
        Err(Error::io(
            &dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no config file ({})", CONFIG_FILE_NAMES.join(", ")),
            ),
        ))
    }

    /// Reads a named JSON file of a component (e.g. `tokenizer_config.json`,
    /// `special_tokens_map.json`).
    pub fn json_file(&self, component: &str, name: &str) -> Result<ConfigMap> {
        ConfigMap::from_file(self.file(component, name)?)
    }

    /// Resolves the safetensors weights of a component, in diffusers' order of preference.
    ///
    /// For each base name of [`WEIGHT_BASE_NAMES`] (`diffusion_pytorch_model`, then `model`):
    ///
    /// 1. with a `variant` (e.g. `"fp16"`): the sharded index
    ///    `{base}.safetensors.index.{variant}.json`, the legacy index name
    ///    `{base}.safetensors.{variant}.index.json`, then the single file
    ///    `{base}.{variant}.safetensors`;
    /// 2. then (also as the fallback when the variant is absent, as diffusers' pipeline
    ///    loader does) the index `{base}.safetensors.index.json` and the single file
    ///    `{base}.safetensors`.
    ///
    /// For a sharded checkpoint the shard list is the sorted set of files in the index's
    /// `weight_map`; every shard must be a plain file name inside the component folder and
    /// must exist.
    ///
    /// Errors: [`Error::Io`] naming the folder when no weights are found,
    /// [`Error::Unsupported`] when only pickled `.bin` weights exist, [`Error::Json`] /
    /// [`Error::Weights`] for a malformed index or a missing shard.
    pub fn weight_files(&self, component: &str, variant: Option<&str>) -> Result<WeightFiles> {
        let dir = self.component_path(component)?;
        resolve_weight_files(&dir, variant)
    }
}

/// [`ModelDir::weight_files`] for a bare folder path.
pub fn resolve_weight_files(dir: &Path, variant: Option<&str>) -> Result<WeightFiles> {
    let mut passes: Vec<Option<&str>> = Vec::new();
    if let Some(v) = variant {
        passes.push(Some(v));
    }
    passes.push(None);
    for pass in passes {
        for base in WEIGHT_BASE_NAMES {
            let (indexes, single) = match pass {
                Some(v) => (
                    vec![
                        format!("{base}.safetensors.index.{v}.json"),
                        format!("{base}.safetensors.{v}.index.json"),
                    ],
                    format!("{base}.{v}.safetensors"),
                ),
                None => (
                    vec![format!("{base}.safetensors.index.json")],
                    format!("{base}.safetensors"),
                ),
            };
            for index_name in indexes {
                let index_path = dir.join(&index_name);
                if index_path.is_file() {
                    let files = read_shard_index(dir, &index_path)?;
                    return Ok(WeightFiles {
                        files,
                        index: Some(index_path),
                        variant: pass.map(str::to_string),
                    });
                }
            }
            let single_path = dir.join(&single);
            if single_path.is_file() {
                return Ok(WeightFiles {
                    files: vec![single_path],
                    index: None,
                    variant: pass.map(str::to_string),
                });
            }
        }
    }
    // Nothing usable: say why as precisely as possible.
    let pickled: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".bin") || name.ends_with(".ckpt") || name.ends_with(".pt"))
        .collect();
    if !pickled.is_empty() {
        return Err(Error::Unsupported(format!(
            "{}: only pickled weights ({}) found; convert them to safetensors",
            dir.display(),
            pickled.join(", ")
        )));
    }
    let wanted = match variant {
        Some(v) => {
            format!("{{diffusion_pytorch_model,model}}[.{v}].safetensors or a sharded index")
        }
        None => "{diffusion_pytorch_model,model}.safetensors or a sharded index".to_string(),
    };
    Err(Error::io(
        dir,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no weight file ({wanted})"),
        ),
    ))
}

/// Reads a `*.safetensors.index.json` and returns the sorted, de-duplicated shard paths.
pub fn read_shard_index(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    let context = index_path.display().to_string();
    let index = ConfigMap::from_file(index_path)?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Json {
            context: context.clone(),
            message: "missing object `weight_map`".to_string(),
        })?;
    let mut names: Vec<&str> = Vec::with_capacity(map.len());
    for (key, value) in map {
        let name = value.as_str().ok_or_else(|| Error::Json {
            context: context.clone(),
            message: format!("`weight_map.{key}` is not a file name"),
        })?;
        names.push(name);
    }
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return Err(Error::Weights(format!("{context}: empty `weight_map`")));
    }
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let plain = Path::new(name).file_name().is_some_and(|f| f == name);
        if !plain {
            return Err(Error::Weights(format!(
                "{context}: shard `{name}` is not a plain file name"
            )));
        }
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("shard listed in {context} not found"),
                ),
            ));
        }
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(path: &Path, text: &str) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, text).unwrap();
    }

    const INDEX: &str = r#"{
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "requires_safety_checker": false,
        "safety_checker": null,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    }"#;

    fn pipeline() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(&root.join(MODEL_INDEX), INDEX);
        write(
            &root.join("unet/config.json"),
            r#"{"_class_name": "UNet2DConditionModel", "sample_size": 64}"#,
        );
        write(&root.join("unet/diffusion_pytorch_model.safetensors"), "x");
        write(
            &root.join("unet/diffusion_pytorch_model.fp16.safetensors"),
            "x",
        );
        write(
            &root.join("scheduler/scheduler_config.json"),
            r#"{"beta_end": 0.012}"#,
        );
        write(&root.join("text_encoder/config.json"), "{}");
        write(&root.join("text_encoder/model.safetensors"), "x");
        write(
            &root.join("tokenizer/tokenizer_config.json"),
            r#"{"model_max_length": 77}"#,
        );
        write(&root.join("vae/config.json"), "{}");
        tmp
    }

    #[test]
    fn reads_model_index() {
        let tmp = pipeline();
        let dir = ModelDir::open(tmp.path()).unwrap();
        assert_eq!(dir.class_name(), Some("StableDiffusionPipeline"));
        let index = dir.index().unwrap();
        assert_eq!(index.diffusers_version.as_deref(), Some("0.42.1"));
        assert_eq!(
            dir.component_spec("unet").unwrap(),
            Some(&ComponentSpec {
                library: "diffusers".into(),
                class_name: "UNet2DConditionModel".into()
            })
        );
        assert_eq!(dir.component_spec("safety_checker").unwrap(), None);
        assert_eq!(dir.component_spec("feature_extractor").unwrap(), None);
        assert!(dir.is_null_component("safety_checker"));
        assert!(!dir.is_null_component("unet"));
        assert!(matches!(
            dir.component_spec("controlnet"),
            Err(Error::Weights(_))
        ));
        assert_eq!(
            index.options.get("requires_safety_checker"),
            Some(&Value::Bool(false))
        );
        let names: Vec<&str> = dir.components().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 7);
        assert!(names.contains(&"vae"));
    }

    #[test]
    fn reads_component_configs() {
        let tmp = pipeline();
        let dir = ModelDir::open(tmp.path()).unwrap();
        let unet = dir.config("unet").unwrap();
        assert_eq!(unet.class_name(), Some("UNet2DConditionModel"));
        assert_eq!(unet.get("sample_size").and_then(Value::as_u64), Some(64));
        let sched = dir.config("scheduler").unwrap();
        assert_eq!(sched.get("beta_end").and_then(Value::as_f64), Some(0.012));
        let tok = dir.config("tokenizer").unwrap();
        assert_eq!(
            tok.get("model_max_length").and_then(Value::as_u64),
            Some(77)
        );
        // A null component and a missing one are typed errors naming the problem.
        let err = dir.config("safety_checker").unwrap_err();
        assert!(
            matches!(err, Error::Weights(ref m) if m.contains("null")),
            "{err}"
        );
        match dir.config("controlnet").unwrap_err() {
            Error::Io { path, .. } => assert!(path.ends_with("controlnet")),
            other => panic!("unexpected {other}"),
        }
        // A folder without any config file.
        fs::create_dir_all(tmp.path().join("empty")).unwrap();
        assert!(matches!(dir.config("empty"), Err(Error::Io { .. })));
    }

    #[test]
    fn resolves_single_and_variant_weights() {
        let tmp = pipeline();
        let dir = ModelDir::open(tmp.path()).unwrap();
        let unet = dir.weight_files("unet", None).unwrap();
        assert_eq!(
            unet.files,
            vec![tmp.path().join("unet/diffusion_pytorch_model.safetensors")]
        );
        assert!(!unet.is_sharded());
        assert_eq!(unet.variant, None);

        let fp16 = dir.weight_files("unet", Some("fp16")).unwrap();
        assert_eq!(
            fp16.files,
            vec![
                tmp.path()
                    .join("unet/diffusion_pytorch_model.fp16.safetensors")
            ]
        );
        assert_eq!(fp16.variant.as_deref(), Some("fp16"));

        // A missing variant falls back to the default file and says so.
        let te = dir.weight_files("text_encoder", Some("fp16")).unwrap();
        assert_eq!(
            te.files,
            vec![tmp.path().join("text_encoder/model.safetensors")]
        );
        assert_eq!(te.variant, None);

        // No weights at all: an I/O error naming the folder.
        match dir.weight_files("vae", None).unwrap_err() {
            Error::Io { path, source } => {
                assert!(path.ends_with("vae"));
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn resolves_sharded_weights() {
        let tmp = pipeline();
        let root = tmp.path();
        let index = r#"{"metadata": {"total_size": 10}, "weight_map": {
            "a.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
            "b.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "c.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#;
        write(
            &root.join("vae/diffusion_pytorch_model.safetensors.index.json"),
            index,
        );
        write(
            &root.join("vae/diffusion_pytorch_model-00001-of-00002.safetensors"),
            "x",
        );
        write(
            &root.join("vae/diffusion_pytorch_model-00002-of-00002.safetensors"),
            "x",
        );
        let dir = ModelDir::open(root).unwrap();
        let w = dir.weight_files("vae", None).unwrap();
        assert!(w.is_sharded());
        assert_eq!(
            w.files,
            vec![
                root.join("vae/diffusion_pytorch_model-00001-of-00002.safetensors"),
                root.join("vae/diffusion_pytorch_model-00002-of-00002.safetensors"),
            ]
        );
        // The sharded index wins over a single file, as in diffusers.
        write(&root.join("vae/diffusion_pytorch_model.safetensors"), "x");
        assert!(dir.weight_files("vae", None).unwrap().is_sharded());

        // fp16 sharded index, current and legacy names.
        let fp16_index = index.replace("model-", "model.fp16-");
        write(
            &root.join("vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors"),
            "x",
        );
        write(
            &root.join("vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors"),
            "x",
        );
        write(
            &root.join("vae/diffusion_pytorch_model.safetensors.fp16.index.json"),
            &fp16_index,
        );
        let w = dir.weight_files("vae", Some("fp16")).unwrap();
        assert_eq!(w.variant.as_deref(), Some("fp16"));
        assert!(
            w.index
                .as_ref()
                .unwrap()
                .ends_with("diffusion_pytorch_model.safetensors.fp16.index.json")
        );
        write(
            &root.join("vae/diffusion_pytorch_model.safetensors.index.fp16.json"),
            &fp16_index,
        );
        let w = dir.weight_files("vae", Some("fp16")).unwrap();
        assert!(
            w.index
                .as_ref()
                .unwrap()
                .ends_with("diffusion_pytorch_model.safetensors.index.fp16.json")
        );
        assert_eq!(w.files.len(), 2);
        assert!(w.files[0].to_string_lossy().contains(".fp16-00001"));
    }

    #[test]
    fn bad_shard_indexes_are_typed_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let index_path = root.join("model.safetensors.index.json");
        write(
            &index_path,
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
        );
        match resolve_weight_files(root, None).unwrap_err() {
            Error::Io { path, .. } => assert!(path.ends_with("model-00001-of-00002.safetensors")),
            other => panic!("unexpected {other}"),
        }
        write(
            &index_path,
            r#"{"weight_map": {"a": "../escape.safetensors"}}"#,
        );
        assert!(matches!(
            resolve_weight_files(root, None),
            Err(Error::Weights(_))
        ));
        write(&index_path, r#"{"weight_map": {}}"#);
        assert!(matches!(
            resolve_weight_files(root, None),
            Err(Error::Weights(_))
        ));
        write(&index_path, r#"{"metadata": {}}"#);
        assert!(matches!(
            resolve_weight_files(root, None),
            Err(Error::Json { .. })
        ));
        write(&index_path, r#"{"weight_map": {"a": 3}}"#);
        assert!(matches!(
            resolve_weight_files(root, None),
            Err(Error::Json { .. })
        ));
    }

    #[test]
    fn single_model_folder_and_pickled_weights() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(
            &root.join("config.json"),
            r#"{"_class_name": "AutoencoderKL"}"#,
        );
        write(&root.join("diffusion_pytorch_model.bin"), "x");
        let dir = ModelDir::open(root).unwrap();
        assert!(dir.index().is_none());
        assert_eq!(
            dir.config(ROOT).unwrap().class_name(),
            Some("AutoencoderKL")
        );
        assert!(matches!(
            dir.weight_files(ROOT, None),
            Err(Error::Unsupported(_))
        ));
        write(&root.join("diffusion_pytorch_model.safetensors"), "x");
        assert_eq!(
            dir.weight_files(ROOT, None).unwrap().files,
            vec![root.join("diffusion_pytorch_model.safetensors")]
        );
        assert_eq!(dir.component_spec(ROOT).unwrap(), None);
    }

    #[test]
    fn missing_folder_and_bad_index() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        match ModelDir::open(&missing).unwrap_err() {
            Error::Io { path, .. } => assert_eq!(path, missing),
            other => panic!("unexpected {other}"),
        }
        let file = tmp.path().join("file");
        write(&file, "x");
        assert!(matches!(ModelDir::open(&file), Err(Error::Io { .. })));

        write(
            &tmp.path().join(MODEL_INDEX),
            r#"{"unet": ["diffusers", "X"]}"#,
        );
        assert!(matches!(
            ModelDir::open(tmp.path()),
            Err(Error::Json { .. })
        ));
        write(
            &tmp.path().join(MODEL_INDEX),
            r#"{"_class_name": "P", "unet": ["diffusers", 3]}"#,
        );
        assert!(matches!(
            ModelDir::open(tmp.path()),
            Err(Error::Json { .. })
        ));
        write(&tmp.path().join(MODEL_INDEX), "{not json");
        assert!(matches!(
            ModelDir::open(tmp.path()),
            Err(Error::Json { .. })
        ));
    }

    #[test]
    fn files_inside_components() {
        let tmp = pipeline();
        let dir = ModelDir::open(tmp.path()).unwrap();
        assert!(dir.file("tokenizer", "tokenizer_config.json").is_ok());
        assert!(matches!(
            dir.file("tokenizer", "vocab.json"),
            Err(Error::Io { .. })
        ));
        assert_eq!(dir.optional_file("tokenizer", "vocab.json").unwrap(), None);
        let cfg = dir.json_file("tokenizer", "tokenizer_config.json").unwrap();
        assert_eq!(
            cfg.get("model_max_length").and_then(Value::as_u64),
            Some(77)
        );
    }
}
