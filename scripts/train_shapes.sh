#!/usr/bin/env bash
# Trains the project's embedded default model (models/shapes) from scratch with
# `diffusion train`, exports it, and scores it (docs/QUALITY.md).
#
#   cargo build --release -p diffusion-examples --features diffusion-examples/cuda --bin diffusion
#   scripts/train_shapes.sh target/release/diffusion cuda runs/shapes
#
# Arguments: the `diffusion` binary, the device (cpu | wgpu | cuda), the run folder.
# Every stage resumes from its run folder's latest checkpoint when re-run (so the stages
# can be run in pieces, e.g. `timeout -s INT ...`: Ctrl-C / SIGINT saves a checkpoint).
set -euo pipefail
BIN=${1:-target/release/diffusion}
DEVICE=${2:-cuda}
RUN=${3:-runs/shapes}
EXPORT=${EXPORT:-models/shapes}
# Step counts. The committed model stopped at VAE_STEPS=278 UNET_STEPS=2862 (GPU time ran
# out; docs/QUALITY.md); learning rates are constant after warm-up, so a shorter or longer
# run follows the same trajectory up to its end.
VAE_STEPS=${VAE_STEPS:-4000}
UNET_STEPS=${UNET_STEPS:-12000}
# How convolutions are computed: `backend` made the committed model; `gemm` (im2col +
# matmul, same numbers up to float rounding) avoids the CubeCL backends' slow direct
# weight-gradient kernel (docs/training.md).
CONV=${CONV:-backend}

resume_flag() { [ -e "$1/latest" ] && echo --resume || true; }

# Stage 1: the VAE (64x64 RGB <-> 4x16x16 latents), L1 reconstruction + 1e-6 KL.
if [ ! -e "$RUN/vae-export/config.json" ]; then
  "$BIN" train --stage vae --out "$RUN/vae" $(resume_flag "$RUN/vae") \
    --steps "$VAE_STEPS" --batch-size 64 --lr 2e-4 --warmup 200 --lr-schedule constant \
    --seed 0 --device "$DEVICE" --sample-every 1000 --checkpoint-every 500 --conv "$CONV" \
    --export "$RUN/vae-export"
fi

# Stage 2: U-Net + CLIP text encoder from scratch on the frozen VAE's latents
# (epsilon objective, min-SNR-5 weighting, 10% caption dropout, EMA 0.999).
"$BIN" train --stage unet --out "$RUN/unet" $(resume_flag "$RUN/unet") \
  --vae "$RUN/vae-export" \
  --steps "$UNET_STEPS" --batch-size 128 --lr 3e-4 --warmup 500 --lr-schedule constant \
  --min-snr-gamma 5 --condition-dropout 0.1 --ema-decay 0.999 \
  --seed 0 --device "$DEVICE" --sample-every 2000 --checkpoint-every 500 --conv "$CONV" \
  --max-shard-mb 4 --export "$EXPORT"

# The quality table of docs/QUALITY.md.
"$BIN" evaluate --model "$EXPORT" --device "$DEVICE" --batch 200 \
  --json "$RUN/quality.json" --grids "$RUN/quality-grids"
