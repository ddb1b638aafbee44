//! The one error type shared by every diffusion crate.

use std::path::PathBuf;

/// Result alias used across the diffusion crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when configuring, loading or running a diffusion model.
///
/// Bad input is always reported through one of these variants, never by a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON document could not be parsed or did not have the expected structure.
    #[error("{context}: invalid JSON: {message}")]
    Json {
        /// Where the JSON came from (a path or a description).
        context: String,
        /// What the parser said.
        message: String,
    },
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid config value `{key}`: {message}")]
    InvalidConfig {
        /// The offending key, as written in the config file.
        key: String,
        /// Why it was rejected.
        message: String,
    },
    /// A scheduler name that the registry does not know.
    #[error("unknown scheduler `{name}` (known: {known})")]
    UnknownScheduler {
        /// The name that was asked for.
        name: String,
        /// The names that would have been accepted, comma separated.
        known: String,
    },
    /// A call that is not valid in the object's current state (e.g. stepping before
    /// `set_timesteps`).
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// An argument has the wrong shape or length.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// An argument is out of its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A model directory or weight file is missing something or does not match the model.
    #[error("{0}")]
    Weights(String),
    /// An operation is not supported by this component or backend.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The run was interrupted by the caller (a callback or Ctrl-C).
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::InvalidConfig`].
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidConfig {
            key: key.into(),
            message: message.into(),
        }
    }
}
