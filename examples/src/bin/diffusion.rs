//! `diffusion`: generate images, tokenize prompts and inspect diffusers-format models.
//!
//! ```text
//! diffusion generate --model DIR --prompt TEXT [--negative-prompt TEXT] [--scheduler NAME]
//!     [--steps N] [--guidance F] [--seed N] [--height H] [--width W] [--num-images N]
//!     [--latents FILE.npy] [--init-image FILE --strength F] [--mask FILE]
//!     [--output OUT.png|.jpg|.webp] [--jpeg-quality N] [--output-npy OUT.npy]
//!     [--device cpu|wgpu|cuda] [--dtype f32|f16|bf16]
//! diffusion train --stage vae|unet --out RUN [...]
//! diffusion evaluate [--model DIR] [--guidance 1,3,7.5] [--samplers ddpm:1000,...]
//! diffusion tokenize --model DIR TEXT
//! diffusion info --model DIR
//! ```

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use diffusion_examples::cli::{self, GenerateArgs};

#[derive(Parser)]
#[command(
    name = "diffusion",
    version,
    about = "Latent diffusion in Rust, on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt (text-to-image, image-to-image, inpainting).
    Generate(GenerateArgs),
    /// Train a small latent text-to-image model (VAE stage, then U-Net + text encoder).
    Train(diffusion_examples::train_cli::TrainArgs),
    /// Score prompt adherence of a shapes model per sampler and guidance (docs/QUALITY.md).
    Evaluate(diffusion_examples::quality::EvaluateArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize {
        /// A diffusers-format model folder (default: the embedded model).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// The text to tokenize.
        text: String,
    },
    /// Show a model folder's components, configs, dtypes and parameter counts.
    Info {
        /// A diffusers-format model folder (default: the embedded model).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => cli::generate(&args),
        Command::Train(args) => diffusion_examples::train_cli::train(&args),
        Command::Evaluate(args) => diffusion_examples::quality::evaluate(&args),
        Command::Tokenize { model, text } => cli::tokenize(model.as_deref(), &text),
        Command::Info { model } => cli::info(model.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if matches!(e, diffusion_pipelines::core::Error::Interrupted) {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
