//! Shared code of the example programs: the `diffusion` command's subcommands.
#![warn(missing_docs)]

pub mod cli;
pub mod embedded;
pub mod quality;
pub mod train_cli;
pub mod weights;
