//! Training checkpoints on disk: crash-safe writing, integrity-checked reading.
//!
//! A run folder holds one folder per checkpoint and a pointer to the newest:
//!
//! ```text
//! run/
//!   latest                      "checkpoint-00001000\n"
//!   checkpoint-00000500/
//!   checkpoint-00001000/
//!     manifest.json             format, kind, step, training config, RNG states,
//!                               caller data, and the size + SHA-256 of every file below
//!     model.mpk                 the trained module (Burn record, f32, named MessagePack)
//!     optimizer.mpk             AdamW moments and step counts (Burn record)
//!     ema.mpk                   the EMA module, when EMA is on
//! ```
//!
//! **Writing** ([`write_checkpoint`]) happens in a hidden temporary folder next to the
//! target: every file is written and `fsync`ed, `manifest.json` last, the folder itself is
//! synced, and only then renamed to `checkpoint-<step>`; `latest` is replaced atomically
//! afterwards. A crash or an error at any point leaves the previous checkpoints and `latest`
//! as they were (an interrupted write leaves at most a `.tmp-checkpoint-*` folder, which the
//! next write removes).
//!
//! **Reading** ([`read_checkpoint`]) checks the manifest's format and version, then the size
//! and SHA-256 of every file before anything is decoded: a truncated or corrupt checkpoint
//! is an [`Error::Weights`] (an unreadable manifest an [`Error::Json`], a missing file an
//! [`Error::Io`]), never a panic.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use diffusion_core::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::image_io::write_atomically;
use crate::train::rng::RngState;

/// The `format` value of every manifest.
pub const CHECKPOINT_FORMAT: &str = "diffusion-rs-training-checkpoint";
/// The manifest version this code writes and reads.
pub const CHECKPOINT_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The name of the pointer file in a run folder.
pub const LATEST: &str = "latest";

/// Size and digest of one checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Length in bytes.
    pub bytes: u64,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

/// `manifest.json`: everything about a checkpoint except the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    /// Always [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// Always [`CHECKPOINT_VERSION`].
    pub version: u32,
    /// What was trained (`"denoiser"`, `"vae"`).
    pub kind: String,
    /// Optimizer steps taken.
    pub step: usize,
    /// The trainer's configuration (its own serde form).
    pub training_config: serde_json::Value,
    /// The trainer's random generators, by name.
    pub rng: BTreeMap<String, RngState>,
    /// EMA updates applied so far (`None` without EMA).
    pub ema_updates: Option<usize>,
    /// Whatever the caller stores with the checkpoint (model configs, data-stream state,
    /// the loss history, ...).
    pub extra: serde_json::Value,
    /// Every data file of the checkpoint with its size and digest.
    pub files: BTreeMap<String, FileEntry>,
}

/// A file to write into a checkpoint: its name and a function producing its bytes (called
/// while writing, so a serialisation failure aborts the write cleanly).
pub type FileProducer<'a> = (&'a str, Box<dyn FnOnce() -> Result<Vec<u8>> + 'a>);

/// The folder name of the checkpoint at `step`.
pub fn checkpoint_name(step: usize) -> String {
    format!("checkpoint-{step:08}")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))?;
    Ok(())
}

fn sync_dir(path: &Path) {
    // Directory fsync makes the renames durable; it is not supported everywhere (and
    // not needed for correctness of the contents), so failures are ignored.
    if let Ok(d) = std::fs::File::open(path) {
        let _ = d.sync_all();
    }
}

/// Writes a checkpoint into `run_dir` (created if needed) as `checkpoint-<step>`, points
/// `latest` at it and removes all but the newest `keep_last` checkpoints (the new one is
/// always kept). `manifest.files` is filled in here. Returns the checkpoint's path.
///
/// On any error nothing visible changes: the previous checkpoints and `latest` stay valid.
pub fn write_checkpoint(
    run_dir: &Path,
    mut manifest: CheckpointManifest,
    files: Vec<FileProducer<'_>>,
    keep_last: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    remove_stale_temporaries(run_dir);
    let name = checkpoint_name(manifest.step);
    let target = run_dir.join(&name);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{name}-"))
        .tempdir_in(run_dir)
        .map_err(|e| Error::io(run_dir, e))?;
    manifest.format = CHECKPOINT_FORMAT.to_string();
    manifest.version = CHECKPOINT_VERSION;
    manifest.files.clear();
    for (file, produce) in files {
        if file == MANIFEST || file.contains(['/', '\\']) || file.starts_with('.') {
            return Err(Error::InvalidArgument(format!(
                "`{file}` is not a valid checkpoint file name"
            )));
        }
        let bytes = produce()?;
        write_synced(&tmp.path().join(file), &bytes)?;
        manifest.files.insert(
            file.to_string(),
            FileEntry {
                bytes: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
            },
        );
    }
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Json {
        context: MANIFEST.into(),
        message: e.to_string(),
    })?;
    write_synced(&tmp.path().join(MANIFEST), &json)?;
    sync_dir(tmp.path());

    // A checkpoint of the same step may exist (a run resumed from an older checkpoint):
    // move it aside first; it is deleted once the new one is in place.
    let aside = if target.exists() {
        let aside = run_dir.join(format!(".old-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&target, &aside).map_err(|e| Error::io(&target, e))?;
        Some(aside)
    } else {
        None
    };
    let tmp_path = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp_path, &target) {
        if let Some(aside) = &aside {
            let _ = std::fs::rename(aside, &target);
        }
        let _ = std::fs::remove_dir_all(&tmp_path);
        return Err(Error::io(&target, e));
    }
    sync_dir(run_dir);
    write_atomically(&run_dir.join(LATEST), |w| writeln!(w, "{name}"))?;
    sync_dir(run_dir);
    if let Some(aside) = aside {
        let _ = std::fs::remove_dir_all(aside);
    }
    prune(run_dir, keep_last.max(1), &name);
    Ok(target)
}

fn remove_stale_temporaries(run_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if (n.starts_with(".tmp-checkpoint-") || n.starts_with(".old-checkpoint-"))
                && e.path().is_dir()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Checkpoint folders of `run_dir` with a manifest, as `(step, path)` sorted by step.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(run_dir).map_err(|e| Error::io(run_dir, e))?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if let Some(step) = n
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<usize>().ok())
            && e.path().join(MANIFEST).is_file()
        {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn prune(run_dir: &Path, keep_last: usize, keep: &str) {
    let Ok(all) = list_checkpoints(run_dir) else {
        return;
    };
    let n = all.len();
    for (i, (_, path)) in all.into_iter().enumerate() {
        let is_new = path.file_name().is_some_and(|f| f == keep);
        if i + keep_last < n && !is_new {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// The checkpoint a path names: a checkpoint folder itself (it has a `manifest.json`), or a
/// run folder, whose `latest` pointer is followed (or, when `latest` is missing or points
/// nowhere, its highest-step checkpoint). `Ok(None)` for a run folder without checkpoints.
pub fn resolve_checkpoint(path: &Path) -> Result<Option<PathBuf>> {
    if path.join(MANIFEST).is_file() {
        return Ok(Some(path.to_path_buf()));
    }
    if !path.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such checkpoint or run folder",
            ),
        ));
    }
    if let Ok(text) = std::fs::read_to_string(path.join(LATEST)) {
        let candidate = path.join(text.trim());
        if !text.trim().is_empty() && candidate.join(MANIFEST).is_file() {
            return Ok(Some(candidate));
        }
    }
    Ok(list_checkpoints(path)?.pop().map(|(_, p)| p))
}

/// A checkpoint read back and verified: its manifest and the bytes of each file.
#[derive(Debug, Clone)]
pub struct CheckpointData {
    /// The checkpoint folder.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: CheckpointManifest,
    /// File contents by name (every file listed in the manifest, verified).
    pub files: BTreeMap<String, Vec<u8>>,
}

impl CheckpointData {
    /// The bytes of `name`, or an [`Error::Weights`] when the checkpoint has no such file.
    pub fn file(&self, name: &str) -> Result<&[u8]> {
        self.files.get(name).map(Vec::as_slice).ok_or_else(|| {
            Error::Weights(format!(
                "checkpoint {} has no `{name}`",
                self.path.display()
            ))
        })
    }
}

/// Reads and verifies the checkpoint folder `path` (see the [module documentation](self)).
pub fn read_checkpoint(path: &Path) -> Result<CheckpointData> {
    let manifest_path = path.join(MANIFEST);
    let text = std::fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    let manifest: CheckpointManifest = serde_json::from_slice(&text).map_err(|e| Error::Json {
        context: manifest_path.display().to_string(),
        message: e.to_string(),
    })?;
    if manifest.format != CHECKPOINT_FORMAT || manifest.version != CHECKPOINT_VERSION {
        return Err(Error::Unsupported(format!(
            "{}: checkpoint format `{}` version {} (this build reads `{CHECKPOINT_FORMAT}` \
             version {CHECKPOINT_VERSION})",
            manifest_path.display(),
            manifest.format,
            manifest.version
        )));
    }
    let mut files = BTreeMap::new();
    for (name, entry) in &manifest.files {
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(Error::Weights(format!(
                "{}: invalid file name `{name}`",
                manifest_path.display()
            )));
        }
        let file = path.join(name);
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(Error::Weights(format!(
                "{} is corrupt: {} bytes, the manifest says {} (truncated write?)",
                file.display(),
                bytes.len(),
                entry.bytes
            )));
        }
        let digest = sha256_hex(&bytes);
        if digest != entry.sha256 {
            return Err(Error::Weights(format!(
                "{} is corrupt: SHA-256 {digest}, the manifest says {}",
                file.display(),
                entry.sha256
            )));
        }
        files.insert(name.clone(), bytes);
    }
    Ok(CheckpointData {
        path: path.to_path_buf(),
        manifest,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(step: usize) -> CheckpointManifest {
        CheckpointManifest {
            format: String::new(),
            version: 0,
            kind: "test".into(),
            step,
            training_config: serde_json::json!({"lr": 1e-4}),
            rng: BTreeMap::new(),
            ema_updates: None,
            extra: serde_json::Value::Null,
            files: BTreeMap::new(),
        }
    }

    fn bytes(v: &'static [u8]) -> Box<dyn FnOnce() -> Result<Vec<u8>>> {
        Box::new(move || Ok(v.to_vec()))
    }

    #[test]
    fn writes_prunes_and_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        for step in [1, 2, 3] {
            write_checkpoint(&run, manifest(step), vec![("a.bin", bytes(b"hello"))], 2).unwrap();
        }
        let steps: Vec<usize> = list_checkpoints(&run)
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(steps, vec![2, 3]);
        let latest = resolve_checkpoint(&run).unwrap().unwrap();
        assert!(latest.ends_with("checkpoint-00000003"));
        let data = read_checkpoint(&latest).unwrap();
        assert_eq!(data.file("a.bin").unwrap(), b"hello");
        assert_eq!(data.manifest.step, 3);
        assert!(matches!(data.file("b.bin"), Err(Error::Weights(_))));
        // Rewriting an existing step replaces it.
        write_checkpoint(&run, manifest(2), vec![("a.bin", bytes(b"again"))], 5).unwrap();
        let data = read_checkpoint(&resolve_checkpoint(&run).unwrap().unwrap()).unwrap();
        assert_eq!(
            (data.manifest.step, data.file("a.bin").unwrap()),
            (2, &b"again"[..])
        );
        assert!(resolve_checkpoint(&dir.path().join("missing")).is_err());
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        assert!(
            resolve_checkpoint(&dir.path().join("empty"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn failed_writes_leave_the_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().to_path_buf();
        write_checkpoint(&run, manifest(1), vec![("a.bin", bytes(b"one"))], 3).unwrap();
        let failing: Box<dyn FnOnce() -> Result<Vec<u8>>> =
            Box::new(|| Err(Error::InvalidState("serialisation failed".into())));
        let err = write_checkpoint(
            &run,
            manifest(2),
            vec![("a.bin", bytes(b"two")), ("b.bin", failing)],
            3,
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidState(_)));
        let latest = resolve_checkpoint(&run).unwrap().unwrap();
        assert!(latest.ends_with("checkpoint-00000001"));
        assert_eq!(
            read_checkpoint(&latest).unwrap().file("a.bin").unwrap(),
            b"one"
        );
        // No temporary folder is left behind.
        let names: Vec<String> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
    }

    #[test]
    fn corruption_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(
            dir.path(),
            manifest(1),
            vec![("a.bin", bytes(b"abcdef"))],
            1,
        )
        .unwrap();
        std::fs::write(path.join("a.bin"), b"abc").unwrap();
        assert!(matches!(read_checkpoint(&path), Err(Error::Weights(_))));
        std::fs::write(path.join("a.bin"), b"abcdeg").unwrap();
        assert!(matches!(read_checkpoint(&path), Err(Error::Weights(_))));
        std::fs::remove_file(path.join("a.bin")).unwrap();
        assert!(matches!(read_checkpoint(&path), Err(Error::Io { .. })));
        std::fs::write(path.join(MANIFEST), b"{\"format\": ").unwrap();
        assert!(matches!(read_checkpoint(&path), Err(Error::Json { .. })));
    }
}
