//! The one weight-loading entry point every model of this crate uses.
//!
//! [`load_module`] fills a Burn module from diffusers / transformers safetensors files:
//!
//! - **Direct key match.** Module field names mirror the PyTorch state-dict keys, so a key
//!   such as `text_model.encoder.layers.3.mlp.fc1.weight` lands on the field of the same
//!   path. burn-store's [`PyTorchToBurnAdapter`] transposes `Linear` weights
//!   (PyTorch `[out, in]` to Burn `[in, out]`) and maps the `weight` / `bias` of `LayerNorm`,
//!   `GroupNorm` and `BatchNorm` to Burn's `gamma` / `beta`. Where a diffusers key cannot be
//!   a Rust path, [`LoadOptions::remap`] renames it with a regex first.
//! - **Memory mapping.** Each file is opened with burn-store's [`SafetensorsStore`], which
//!   memory-maps it (`memmap2`) and parses only the header up front. A tensor's bytes are
//!   read from the mapping when that tensor is applied, copied once into the backend's
//!   buffer (plus one temporary for a transposed `Linear` weight or a dtype conversion),
//!   and released before the next tensor is read. The file is never read into memory as a
//!   whole, and tensors the module does not use are never touched.
//! - **Dtypes.** f32, f16, bf16 and f64 files are accepted. Every tensor is converted on the
//!   host to the dtype of the parameter it loads into (the module's dtype: the dtype of an
//!   initialised parameter, or the device's default float dtype for a lazily initialised
//!   one) *before* it reaches the backend, so an f16 checkpoint loads into an f32 module on
//!   a backend without f16 support. (burn-store alone would create the tensor in the
//!   file's dtype, which aborts the process on such a backend.) Integer or bool tensors
//!   for float parameters are an error.
//! - **Strictness.** Every parameter of the module must be loaded and every tensor of the
//!   files must be used, with the right shape; otherwise [`Error::Weights`] lists the first
//!   few missing, unexpected and mis-shaped keys. Nothing is silently left at its random
//!   initialisation. Keys diffusers itself ignores (for example CLIP's
//!   `text_model.embeddings.position_ids` buffer) can be named in
//!   [`LoadOptions::ignore_unexpected`]; parameters that legitimately have no tensor in
//!   [`LoadOptions::allow_missing`].
//! - **Shards.** Several files (the shards of a `*.safetensors.index.json`, see
//!   [`diffusion_core::ModelDir::weight_files`]) are loaded as one state dict; a key present
//!   in two files is an error.
//!
//! Malformed files (truncated data, a corrupt header) are reported as [`Error::Weights`]
//! naming the file; a missing file as [`Error::Io`].
//!
//! ```no_run
//! # use burn::backend::NdArray;
//! # use burn::nn::{Linear, LinearConfig};
//! use diffusion_models::loading::{LoadOptions, load_module};
//!
//! let device = Default::default();
//! let module: Linear<NdArray<f32>> = LinearConfig::new(4, 8).init(&device);
//! let module = load_module(module, &["linear.safetensors"], &LoadOptions::new())?;
//! # Ok::<(), diffusion_core::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor, get_device_settings};
use burn_store::{
    Applier, ApplyError, ApplyResult, IdentityAdapter, KeyRemapper, ModuleAdapter, ModuleStore,
    PyTorchToBurnAdapter, SafetensorsStore, SafetensorsStoreError, TensorSnapshot,
    TensorSnapshotError,
};
use diffusion_core::{Error, ModelDir, Result};
use regex::Regex;

/// How many keys of each kind (missing, unexpected, mis-shaped) an error message lists.
pub const KEYS_IN_ERRORS: usize = 5;

/// Options of [`load_module`]: key remapping and the keys that may be left out.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    remap: Vec<(String, String)>,
    ignore_unexpected: Vec<String>,
    allow_missing: Vec<String>,
    pytorch_layout: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadOptions {
    /// Strict loading of a PyTorch-layout state dict: no remapping, nothing ignored.
    pub fn new() -> Self {
        Self {
            remap: Vec::new(),
            ignore_unexpected: Vec::new(),
            allow_missing: Vec::new(),
            pytorch_layout: true,
        }
    }

    /// Renames file keys matching the regex `from` to `to` (with `$1`-style capture
    /// references) before they are matched against the module. Patterns apply in the order
    /// they were added, each to the result of the previous one.
    pub fn remap(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.remap.push((from.into(), to.into()));
        self
    }

    /// File keys matching this regex (anchored at both ends) are skipped without error when
    /// the module has no parameter for them.
    pub fn ignore_unexpected(mut self, pattern: impl Into<String>) -> Self {
        self.ignore_unexpected.push(pattern.into());
        self
    }

    /// Module parameters whose PyTorch-style key matches this regex (anchored at both ends)
    /// may be absent from the files; they keep their initial value.
    pub fn allow_missing(mut self, pattern: impl Into<String>) -> Self {
        self.allow_missing.push(pattern.into());
        self
    }

    /// Whether the files use PyTorch's layout (the default): `Linear` weights are then
    /// transposed and normalisation `weight`/`bias` mapped to `gamma`/`beta`. Set `false`
    /// for files written by Burn itself.
    pub fn pytorch_layout(mut self, pytorch_layout: bool) -> Self {
        self.pytorch_layout = pytorch_layout;
        self
    }
}

/// What [`load_module_with_report`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Number of tensors loaded into the module.
    pub applied: usize,
    /// File keys skipped because they matched [`LoadOptions::ignore_unexpected`].
    pub ignored: Vec<String>,
    /// Module keys left at their initial value because they matched
    /// [`LoadOptions::allow_missing`].
    pub allowed_missing: Vec<String>,
    /// Dtype conversions performed: `(file dtype, module dtype) -> number of tensors`.
    pub conversions: BTreeMap<(String, String), usize>,
}

/// Loads `files` (one safetensors file, or all shards of a sharded checkpoint) into
/// `module`. See the [module documentation](self) for the rules.
pub fn load_module<B, M>(module: M, files: &[impl AsRef<Path>], options: &LoadOptions) -> Result<M>
where
    B: Backend,
    M: Module<B>,
{
    load_module_with_report(module, files, options).map(|(m, _)| m)
}

/// Resolves the weights of `component` in `dir` (see [`ModelDir::weight_files`]) and loads
/// them into `module`.
pub fn load_component<B, M>(
    module: M,
    dir: &ModelDir,
    component: &str,
    variant: Option<&str>,
    options: &LoadOptions,
) -> Result<M>
where
    B: Backend,
    M: Module<B>,
{
    let weights = dir.weight_files(component, variant)?;
    load_module(module, &weights.files, options)
}

/// [`load_module`], also returning what was loaded, ignored and converted.
pub fn load_module_with_report<B, M>(
    module: M,
    files: &[impl AsRef<Path>],
    options: &LoadOptions,
) -> Result<(M, LoadReport)>
where
    B: Backend,
    M: Module<B>,
{
    let files: Vec<PathBuf> = files.iter().map(|f| f.as_ref().to_path_buf()).collect();
    if files.is_empty() {
        return Err(Error::InvalidArgument("no weight files to load".into()));
    }
    let context = describe_files(&files);
    let ignore = compile_patterns(&options.ignore_unexpected, "ignore_unexpected")?;
    let allow = compile_patterns(&options.allow_missing, "allow_missing")?;
    let remapper = if options.remap.is_empty() {
        None
    } else {
        Some(
            KeyRemapper::from_patterns(options.remap.clone()).map_err(|e| {
                Error::InvalidArgument(format!("invalid key remapping pattern: {e}"))
            })?,
        )
    };

    // 1. Tensor headers of every file; the data stays in the memory mappings.
    let mut snapshots: Vec<TensorSnapshot> = Vec::new();
    let mut original_keys: HashMap<String, String> = HashMap::new();
    let mut origin: HashMap<String, PathBuf> = HashMap::new();
    for file in &files {
        let mut store = SafetensorsStore::from_file(file.clone());
        let file_snapshots: Vec<TensorSnapshot> = store
            .get_all_snapshots()
            .map_err(|e| store_error(file, e))?
            .values()
            .cloned()
            .collect();
        let pairs: Vec<(String, String)> = match &remapper {
            Some(r) => {
                let (remapped, pairs) = r.remap(file_snapshots);
                snapshots.extend(remapped);
                pairs
            }
            None => {
                let pairs = file_snapshots
                    .iter()
                    .map(|s| (s.full_path(), s.full_path()))
                    .collect();
                snapshots.extend(file_snapshots);
                pairs
            }
        };
        for (new, old) in pairs {
            if let Some(previous) = origin.insert(new.clone(), file.clone()) {
                return Err(Error::Weights(format!(
                    "key `{new}` appears in both {} and {}",
                    previous.display(),
                    file.display()
                )));
            }
            original_keys.insert(new, old);
        }
    }

    // 2. Apply through burn-store's Applier, casting each tensor to its parameter's dtype.
    let target = Arc::new(Mutex::new(TargetInfo::default()));
    let layout: Box<dyn ModuleAdapter> = if options.pytorch_layout {
        Box::new(PyTorchToBurnAdapter)
    } else {
        Box::new(IdentityAdapter)
    };
    let adapter = CastAdapter {
        layout,
        target: Arc::clone(&target),
        conversions: Arc::new(Mutex::new(BTreeMap::new())),
    };
    let conversions = Arc::clone(&adapter.conversions);
    let mut mapper = DtypeAwareMapper {
        // PyTorch keys never name Burn enum variants: a module held in an enum (a ModuleList
        // of mixed layers such as `ff.net`, or a `Conv2d`-or-`Linear` projection) is matched
        // without the variant segment.
        inner: Applier::<B>::new(
            snapshots,
            None,
            Some(Box::new(adapter)),
            options.pytorch_layout,
        ),
        skip_enum_variants: options.pytorch_layout,
        target,
        path: Vec::new(),
        containers: Vec::new(),
        params: HashMap::new(),
    };
    let module = module.map(&mut mapper);
    let params = mapper.params;
    let result = mapper.inner.into_result();

    // 3. Check the outcome.
    let report = check_result(&result, &params, &original_keys, &ignore, &allow, &context)?;
    let conversions = conversions.lock().map(|c| c.clone()).unwrap_or_default();
    Ok((
        module,
        LoadReport {
            conversions,
            ..report
        },
    ))
}

fn describe_files(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        [first, ..] => format!("{} (+{} more shards)", first.display(), files.len() - 1),
        [] => String::new(),
    }
}

fn compile_patterns(patterns: &[String], what: &str) -> Result<Vec<Regex>> {
    patterns
        .iter()
        .map(|p| {
            Regex::new(&format!("^(?:{p})$"))
                .map_err(|e| Error::InvalidArgument(format!("invalid {what} pattern `{p}`: {e}")))
        })
        .collect()
}

fn store_error(file: &Path, e: SafetensorsStoreError) -> Error {
    match e {
        SafetensorsStoreError::Io(io) => Error::io(file, io),
        SafetensorsStoreError::Safetensors(inner) => Error::Weights(format!(
            "{}: not a valid safetensors file: {inner}",
            file.display()
        )),
        other => Error::Weights(format!("{}: {other}", file.display())),
    }
}

/// What the parameter currently being loaded looks like.
#[derive(Debug, Clone, Copy)]
struct TargetInfo {
    dtype: DType,
}

impl Default for TargetInfo {
    fn default() -> Self {
        Self { dtype: DType::F32 }
    }
}

/// Where a parameter sits: its container type (e.g. `Struct:Linear`) and rank.
#[derive(Debug, Clone)]
struct ParamInfo {
    container: String,
    rank: usize,
}

/// Wraps burn-store's [`Applier`], recording before each parameter its dtype (read by
/// [`CastAdapter`]) and its container type (used to word error messages in PyTorch terms).
struct DtypeAwareMapper<B: Backend> {
    inner: Applier<B>,
    skip_enum_variants: bool,
    target: Arc<Mutex<TargetInfo>>,
    path: Vec<String>,
    containers: Vec<String>,
    params: HashMap<String, ParamInfo>,
}

impl<B: Backend> DtypeAwareMapper<B> {
    fn record(&mut self, dtype: DType, rank: usize) {
        if let Ok(mut t) = self.target.lock() {
            t.dtype = dtype;
        }
        let container = self
            .containers
            .iter()
            .rev()
            .find(|c| c.starts_with("Struct:") || c.starts_with("Enum:"))
            .cloned()
            .unwrap_or_default();
        let key = self
            .path
            .iter()
            .zip(&self.containers)
            .filter(|(_, c)| !(self.skip_enum_variants && c.starts_with("Enum:")))
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>()
            .join(".");
        self.params.insert(key, ParamInfo { container, rank });
    }
}

/// The dtype a parameter has, or will have once lazily initialised, without initialising it.
fn param_dtype<B: Backend, const D: usize>(param: &Param<Tensor<B, D>>) -> DType {
    if param.is_initialized() {
        param.val().dtype()
    } else {
        get_device_settings::<B>(&param.lazy_device())
            .float_dtype
            .into()
    }
}

impl<B: Backend> ModuleMapper<B> for DtypeAwareMapper<B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
        self.inner.enter_module(name, container_type);
    }

    fn exit_module(&mut self, name: &str, container_type: &str) {
        self.path.pop();
        self.containers.pop();
        self.inner.exit_module(name, container_type);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        self.record(param_dtype(&param), D);
        self.inner.map_float(param)
    }

    fn map_int<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Int>>,
    ) -> Param<Tensor<B, D, Int>> {
        let dtype = get_device_settings::<B>(&param.lazy_device())
            .int_dtype
            .into();
        self.record(dtype, D);
        self.inner.map_int(param)
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Bool>>,
    ) -> Param<Tensor<B, D, Bool>> {
        let dtype = get_device_settings::<B>(&param.lazy_device())
            .bool_dtype
            .into();
        self.record(dtype, D);
        self.inner.map_bool(param)
    }
}

/// Applies the layout adapter, then converts the tensor to the dtype of the parameter being
/// loaded (set by [`DtypeAwareMapper`] just before).
#[derive(Clone)]
struct CastAdapter {
    layout: Box<dyn ModuleAdapter>,
    target: Arc<Mutex<TargetInfo>>,
    conversions: Arc<Mutex<BTreeMap<(String, String), usize>>>,
}

impl ModuleAdapter for CastAdapter {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let snapshot = self.layout.adapt(snapshot);
        let target = self.target.lock().map(|t| t.dtype).unwrap_or(DType::F32);
        let source = snapshot.dtype;
        if source == target {
            return snapshot;
        }
        let convertible = is_float(source) && is_float(target);
        if convertible && let Ok(mut c) = self.conversions.lock() {
            *c.entry((format!("{source:?}"), format!("{target:?}")))
                .or_insert(0) += 1;
        }
        let data_fn = snapshot.clone_data_fn();
        let cast_fn = Rc::new(move || {
            if !convertible {
                return Err(TensorSnapshotError::DataError(format!(
                    "the file stores {source:?}, the parameter is {target:?}; only \
                     floating-point tensors are converted"
                )));
            }
            Ok(data_fn()?.convert_dtype(target))
        });
        TensorSnapshot::from_closure(
            cast_fn,
            target,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn get_alternative_param_name(&self, param_name: &str, container_type: &str) -> Option<String> {
        self.layout
            .get_alternative_param_name(param_name, container_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

fn is_float(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F64 | DType::F32 | DType::Flex32 | DType::F16 | DType::BF16
    )
}

/// The PyTorch-style name of a Burn parameter path (`norm.gamma` -> `norm.weight`).
fn pytorch_key(path: &str, params: &HashMap<String, ParamInfo>) -> String {
    let is_norm = params.get(path).is_some_and(|p| {
        matches!(
            p.container.as_str(),
            "Struct:LayerNorm" | "Struct:GroupNorm" | "Struct:BatchNorm"
        )
    });
    if is_norm {
        if let Some(stem) = path.strip_suffix(".gamma") {
            return format!("{stem}.weight");
        }
        if let Some(stem) = path.strip_suffix(".beta") {
            return format!("{stem}.bias");
        }
    }
    path.to_string()
}

fn list(keys: &[String]) -> String {
    let mut out = keys
        .iter()
        .take(KEYS_IN_ERRORS)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > KEYS_IN_ERRORS {
        out.push_str(&format!(", ... ({} more)", keys.len() - KEYS_IN_ERRORS));
    }
    out
}

fn check_result(
    result: &ApplyResult,
    params: &HashMap<String, ParamInfo>,
    original_keys: &HashMap<String, String>,
    ignore: &[Regex],
    allow: &[Regex],
    context: &str,
) -> Result<LoadReport> {
    let file_key = |burn_path: &str| -> String {
        let key = pytorch_key(burn_path, params);
        original_keys.get(&key).cloned().unwrap_or(key)
    };

    let mut missing = Vec::new();
    let mut allowed_missing = Vec::new();
    for (path, _) in &result.missing {
        let key = pytorch_key(path, params);
        if allow.iter().any(|r| r.is_match(&key)) {
            allowed_missing.push(key);
        } else {
            missing.push(key);
        }
    }
    // burn-store lists a tensor found under its alternative name (`norm.weight` for the
    // parameter `norm.gamma`) as unused as well; those were consumed.
    let error_path = |e: &ApplyError| match e {
        ApplyError::ShapeMismatch { path, .. }
        | ApplyError::DTypeMismatch { path, .. }
        | ApplyError::AdapterError { path, .. }
        | ApplyError::LoadError { path, .. } => path.clone(),
    };
    let consumed: HashSet<String> = result
        .applied
        .iter()
        .cloned()
        .chain(result.errors.iter().map(error_path))
        .map(|p| pytorch_key(&p, params))
        .collect();
    let mut unexpected = Vec::new();
    let mut ignored = Vec::new();
    for key in result.unused.iter().filter(|k| !consumed.contains(*k)) {
        let original = original_keys.get(key).unwrap_or(key);
        if ignore
            .iter()
            .any(|r| r.is_match(key) || r.is_match(original))
        {
            ignored.push(original.clone());
        } else {
            unexpected.push(original.clone());
        }
    }
    let mut mismatched = Vec::new();
    let mut failed = Vec::new();
    for error in &result.errors {
        match error {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => {
                let info = params.get(path);
                let transposed = info.is_some_and(|p| {
                    p.container == "Struct:Linear" && p.rank == 2 && path.ends_with(".weight")
                });
                let (mut expected, mut found) = (expected.to_vec(), found.to_vec());
                if transposed {
                    // Report both in PyTorch's [out, in] layout, as the file stores them.
                    expected.reverse();
                    found.reverse();
                }
                mismatched.push(format!(
                    "{}: file {found:?}, model {expected:?}",
                    file_key(path)
                ));
            }
            ApplyError::DTypeMismatch {
                path,
                expected,
                found,
            } => failed.push(format!(
                "{}: file dtype {found:?}, model {expected:?}",
                file_key(path)
            )),
            ApplyError::AdapterError { path, message }
            | ApplyError::LoadError { path, message } => {
                failed.push(format!("{}: {message}", file_key(path)))
            }
        }
    }
    if missing.is_empty() && unexpected.is_empty() && mismatched.is_empty() && failed.is_empty() {
        return Ok(LoadReport {
            applied: result.applied.len(),
            ignored,
            allowed_missing,
            conversions: BTreeMap::new(),
        });
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "{} missing key(s) (in the model, not in the file): {}",
            missing.len(),
            list(&missing)
        ));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "{} unexpected key(s) (in the file, not in the model): {}",
            unexpected.len(),
            list(&unexpected)
        ));
    }
    if !mismatched.is_empty() {
        parts.push(format!(
            "{} mis-shaped key(s): {}",
            mismatched.len(),
            list(&mismatched)
        ));
    }
    if !failed.is_empty() {
        parts.push(format!(
            "{} unreadable tensor(s): {}",
            failed.len(),
            list(&failed)
        ));
    }
    Err(Error::Weights(format!(
        "{context}: weights do not match the model: {}",
        parts.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
    use burn::tensor::f16;
    use safetensors::tensor::{Dtype, TensorView};

    type B = NdArray<f32>;

    #[derive(Module, Debug)]
    struct Block<B: Backend> {
        proj: Linear<B>,
        norm: LayerNorm<B>,
    }

    #[derive(Module, Debug)]
    struct Net<B: Backend> {
        layers: Vec<Block<B>>,
        head: Linear<B>,
    }

    fn net(device: &burn::backend::ndarray::NdArrayDevice) -> Net<B> {
        Net {
            layers: (0..2)
                .map(|_| Block {
                    proj: LinearConfig::new(3, 2).init(device),
                    norm: LayerNormConfig::new(2).init(device),
                })
                .collect(),
            head: LinearConfig::new(2, 4).with_bias(false).init(device),
        }
    }

    /// A PyTorch state dict for [`Net`], values `i * 0.5 + offset` per tensor.
    fn state_dict() -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        for l in 0..2 {
            let p = format!("layers.{l}");
            out.push((format!("{p}.proj.weight"), vec![2, 3], ramp(6, l as f32)));
            out.push((format!("{p}.proj.bias"), vec![2], ramp(2, 10.0)));
            out.push((format!("{p}.norm.weight"), vec![2], ramp(2, 20.0)));
            out.push((format!("{p}.norm.bias"), vec![2], ramp(2, 30.0)));
        }
        out.push(("head.weight".into(), vec![4, 2], ramp(8, 40.0)));
        out
    }

    fn ramp(n: usize, offset: f32) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.5 + offset).collect()
    }

    fn write(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| match dtype {
                Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F16 => v
                    .iter()
                    .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                    .collect(),
                Dtype::BF16 => v
                    .iter()
                    .flat_map(|x| burn::tensor::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                Dtype::I64 => v.iter().flat_map(|x| (*x as i64).to_le_bytes()).collect(),
                other => panic!("test writer does not handle {other:?}"),
            })
            .collect();
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                (
                    name.clone(),
                    TensorView::new(dtype, shape.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    fn load(path: &Path, options: &LoadOptions) -> Result<Net<B>> {
        load_module(net(&Default::default()), &[path], options)
    }

    fn weights_error(r: Result<Net<B>>) -> String {
        match r {
            Err(Error::Weights(m)) => m,
            Err(other) => panic!("expected Error::Weights, got {other:?}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn loads_pytorch_layout_in_f32_f16_bf16() {
        let tmp = tempfile::tempdir().unwrap();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let path = tmp.path().join(format!("{dtype:?}.safetensors"));
            write(&path, &state_dict(), dtype);
            let (m, report) =
                load_module_with_report(net(&Default::default()), &[&path], &LoadOptions::new())
                    .unwrap();
            assert_eq!(report.applied, 9);
            // Linear weight [out=2, in=3] in the file, [in, out] in Burn.
            let w = m.layers[1].proj.weight.val();
            assert_eq!(w.dims(), [3, 2]);
            assert_eq!(values(w), vec![1.0, 2.5, 1.5, 3.0, 2.0, 3.5]);
            assert_eq!(values(m.layers[0].norm.gamma.val()), vec![20.0, 20.5]);
            assert_eq!(
                values(m.layers[0].norm.beta.clone().unwrap().val()),
                vec![30.0, 30.5]
            );
            assert_eq!(m.head.weight.val().dtype(), DType::F32);
            if dtype == Dtype::F32 {
                assert!(report.conversions.is_empty());
            } else {
                let key = (format!("{:?}", dtype_of(dtype)), "F32".to_string());
                assert_eq!(report.conversions.get(&key), Some(&9), "{report:?}");
            }
        }
    }

    fn dtype_of(d: Dtype) -> DType {
        match d {
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            _ => DType::F32,
        }
    }

    #[test]
    fn missing_key_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.safetensors");
        let mut sd = state_dict();
        sd.retain(|(k, _, _)| k != "layers.1.norm.weight" && k != "head.weight");
        write(&path, &sd, Dtype::F32);
        let msg = weights_error(load(&path, &LoadOptions::new()));
        assert!(msg.contains("2 missing"), "{msg}");
        assert!(msg.contains("`layers.1.norm.weight`"), "{msg}");
        assert!(msg.contains("`head.weight`"), "{msg}");
        assert!(msg.contains("m.safetensors"), "{msg}");
        // Explicitly allowed, the same file loads and reports what was left out.
        let options = LoadOptions::new()
            .allow_missing(r"layers\.\d+\.norm\.weight")
            .allow_missing("head.weight");
        let (_, report) =
            load_module_with_report(net(&Default::default()), &[&path], &options).unwrap();
        assert_eq!(report.allowed_missing.len(), 2);
    }

    #[test]
    fn extra_key_is_named_unless_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.safetensors");
        let mut sd = state_dict();
        sd.push((
            "text_model.embeddings.position_ids".into(),
            vec![1, 3],
            vec![0.0, 1.0, 2.0],
        ));
        write(&path, &sd, Dtype::F32);
        let msg = weights_error(load(&path, &LoadOptions::new()));
        assert!(msg.contains("1 unexpected"), "{msg}");
        assert!(
            msg.contains("`text_model.embeddings.position_ids`"),
            "{msg}"
        );
        let options = LoadOptions::new().ignore_unexpected(r".*\.position_ids");
        let (_, report) =
            load_module_with_report(net(&Default::default()), &[&path], &options).unwrap();
        assert_eq!(
            report.ignored,
            vec!["text_model.embeddings.position_ids".to_string()]
        );
    }

    #[test]
    fn wrong_shape_is_named_in_pytorch_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.safetensors");
        let mut sd = state_dict();
        sd[0] = ("layers.0.proj.weight".into(), vec![2, 4], ramp(8, 0.0));
        sd[2] = ("layers.0.norm.weight".into(), vec![3], ramp(3, 0.0));
        write(&path, &sd, Dtype::F32);
        let msg = weights_error(load(&path, &LoadOptions::new()));
        assert!(msg.contains("2 mis-shaped"), "{msg}");
        assert!(
            msg.contains("layers.0.proj.weight: file [2, 4], model [2, 3]"),
            "{msg}"
        );
        assert!(
            msg.contains("layers.0.norm.weight: file [3], model [2]"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_and_corrupt_files_are_typed_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.safetensors");
        write(&path, &state_dict(), Dtype::F32);
        let bytes = std::fs::read(&path).unwrap();

        let truncated = tmp.path().join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
        let msg = weights_error(load(&truncated, &LoadOptions::new()));
        assert!(msg.contains("truncated.safetensors"), "{msg}");
        assert!(msg.contains("not a valid safetensors file"), "{msg}");

        let corrupt = tmp.path().join("corrupt.safetensors");
        let mut bad = bytes.clone();
        bad[8] = b'#'; // the header's opening brace
        std::fs::write(&corrupt, &bad).unwrap();
        let msg = weights_error(load(&corrupt, &LoadOptions::new()));
        assert!(msg.contains("corrupt.safetensors"), "{msg}");

        let tiny = tmp.path().join("tiny.safetensors");
        std::fs::write(&tiny, [1u8, 2, 3]).unwrap();
        weights_error(load(&tiny, &LoadOptions::new()));

        let huge_header = tmp.path().join("huge.safetensors");
        let mut hh = bytes.clone();
        hh[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&huge_header, &hh).unwrap();
        weights_error(load(&huge_header, &LoadOptions::new()));

        match load(&tmp.path().join("absent.safetensors"), &LoadOptions::new()) {
            Err(Error::Io { path, .. }) => assert!(path.ends_with("absent.safetensors")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn integer_tensor_for_float_parameter_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.safetensors");
        let sd = state_dict();
        let (ints, floats): (Vec<_>, Vec<_>) =
            sd.into_iter().partition(|(k, _, _)| k == "head.weight");
        let float_path = tmp.path().join("f.safetensors");
        write(&float_path, &floats, Dtype::F32);
        write(&path, &ints, Dtype::I64);
        let r = load_module(
            net(&Default::default()),
            &[&float_path, &path],
            &LoadOptions::new(),
        );
        let msg = weights_error(r);
        assert!(msg.contains("head.weight"), "{msg}");
        assert!(msg.contains("I64"), "{msg}");
    }

    #[test]
    fn shards_load_as_one_state_dict() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = state_dict();
        let (a, b): (Vec<_>, Vec<_>) = sd
            .into_iter()
            .partition(|(k, _, _)| k.starts_with("layers.0"));
        let pa = tmp.path().join("model-00001-of-00002.safetensors");
        let pb = tmp.path().join("model-00002-of-00002.safetensors");
        write(&pa, &a, Dtype::F16);
        write(&pb, &b, Dtype::F32);
        let m = load_module(net(&Default::default()), &[&pa, &pb], &LoadOptions::new()).unwrap();
        assert_eq!(values(m.head.weight.val())[..2], [40.0, 41.0]);
        // A shard alone misses the other's keys.
        let msg = weights_error(load_module(
            net(&Default::default()),
            &[&pa],
            &LoadOptions::new(),
        ));
        assert!(msg.contains("missing"), "{msg}");
        // The same key in two shards is an error.
        let r = load_module(net(&Default::default()), &[&pa, &pa], &LoadOptions::new());
        assert!(matches!(r, Err(Error::Weights(m)) if m.contains("appears in both")));
    }

    #[test]
    fn remapping_renames_file_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.safetensors");
        let sd: Vec<_> = state_dict()
            .into_iter()
            .map(|(k, s, v)| (k.replace("layers.", "blocks."), s, v))
            .collect();
        write(&path, &sd, Dtype::F32);
        let msg = weights_error(load(&path, &LoadOptions::new()));
        assert!(
            msg.contains("unexpected") && msg.contains("`blocks.0.proj.weight`"),
            "{msg}"
        );
        let options = LoadOptions::new().remap(r"^blocks\.", "layers.");
        let m = load(&path, &options).unwrap();
        assert_eq!(values(m.layers[1].norm.gamma.val()), vec![20.0, 20.5]);
        assert!(matches!(
            load(&path, &LoadOptions::new().remap("(", "x")),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            load(&path, &LoadOptions::new().ignore_unexpected("(")),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn no_files_is_an_error() {
        let none: [&Path; 0] = [];
        assert!(matches!(
            load_module(net(&Default::default()), &none, &LoadOptions::new()),
            Err(Error::InvalidArgument(_))
        ));
    }
}
