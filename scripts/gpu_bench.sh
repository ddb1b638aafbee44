#!/usr/bin/env bash
# The side-by-side GPU benchmark: diffusers (PyTorch) and this repository's `sd-bench` and
# `diffusion` on the same card, in the same run, on the same random SD1.5 weights.
#
# Run on a CUDA machine from the repository root:
#   scripts/gpu_bench.sh PHASE...
# Phases (each writes PHASE.txt under $OUT, default /tmp/gpu-bench):
#   diffusers  make the random SD1.5 folder ($MODEL) and time diffusers fp16 and fp32
#              (scripts/bench_diffusers.py; writes diffusers.json too)
#   model      only make the folder (when the diffusers phase is not run)
#   sweep-f16  sd-bench --sweep in f16: U-Net and VAE under every kernel choice
#   sweep-f32  the same in f32
#   ours-f16   sd-bench components and the whole pipeline (20 and 50 steps) on $MODEL in f16,
#              with the kernels of $KERNELS (default: the `auto` choice of `diffusion`)
#   ours-f32   the same in f32
#   first      `diffusion generate --model $MODEL` in a new process, cold and then warm kernel
#              cache, in each of $FIRST_DTYPES (default "f16 f32"): wall time of the command
# Every phase samples nvidia-smi every 100 ms and prints its peak memory minus the idle figure.
#
# Needs: the release CUDA builds of `sd-bench` and `diffusion`, stripped and xz-compressed in
# .carry/ (the device tool carries that folder), and diffusers in .whl/ (see
# scripts/bench_diffusers.py). Build here, then carry:
#   cargo build --release -p diffusion-benches -p diffusion-examples --features cuda \
#     --bin sd-bench --bin diffusion --target-dir target-cuda
#   for b in sd-bench diffusion; do strip -o .carry/$b target-cuda/release/$b; xz -f .carry/$b; done
set -uo pipefail
OUT=${OUT:-/tmp/gpu-bench}
MODEL=${MODEL:-/tmp/sd15-random}
BIN=/tmp/gpu-bench-bin
KERNELS=${KERNELS:-}
# Optional sd-bench --sweep-conv/--sweep-attention/--sweep-matmul lists for the sweeps.
SWEEP=${SWEEP:-}
mkdir -p "$OUT" "$BIN"
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
export DIFFUSION_KERNEL_CACHE=/tmp/diffusion-kernel-cache

if [ -d .whl ] && ! python3 -c 'import diffusers' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
for b in sd-bench diffusion; do
  [ -x "$BIN/$b" ] || { [ -f ".carry/$b.xz" ] && xz -dc ".carry/$b.xz" >"$BIN/$b" && chmod +x "$BIN/$b"; }
done

idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)

# phase NAME COMMAND...: runs the command, its output to $OUT/NAME.txt, and the GPU memory
# peak (nvidia-smi, MiB) above the idle figure.
phase() {
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$OUT/$name.mem" &
  local sampler=$!
  local t0=$(date +%s.%N)
  "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
  local peak=$(sort -n "$OUT/$name.mem" | tail -1)
  printf '\n[%s] exit %s, %.1f s wall, peak GPU memory %s MiB above idle (%s MiB)\n' \
    "$name" "$rc" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b - a}')" "$((${peak:-0} - idle))" "$idle" | tee -a "$OUT/$name.txt"
}

make_model() {
  [ -f "$MODEL/model_index.json" ] || python3 scripts/bench_diffusers.py --make-model "$MODEL" \
    --tokenizer diffusion-models/tests/fixtures/clip-tokenizer-full
}

for p in "$@"; do
  case $p in
    diffusers)
      make_model
      phase diffusers python3 scripts/bench_diffusers.py --bench "$MODEL" --json "$OUT/diffusers.json" ;;
    model) make_model ;;
    sweep-f16) phase sweep-f16 "$BIN/sd-bench" --device cuda --dtype f16 --sweep --iters 5 $SWEEP ;;
    sweep-f32) phase sweep-f32 "$BIN/sd-bench" --device cuda --dtype f32 --sweep --iters 3 $SWEEP ;;
    ours-f16|ours-f32)
      dt=${p#ours-}
      phase "$p-components" "$BIN/sd-bench" --device cuda --dtype "$dt" --iters 10 $KERNELS
      phase "$p-pipeline" "$BIN/sd-bench" --device cuda --dtype "$dt" --model "$MODEL" \
        --steps 20,50 --pipeline-iters ${PIPELINE_ITERS:-3} $KERNELS ;;
    first)
      for dt in ${FIRST_DTYPES:-f16 f32}; do
        rm -rf "$DIFFUSION_KERNEL_CACHE"
        for cache in cold warm; do
          phase "first-$dt-$cache" "$BIN/diffusion" generate --model "$MODEL" --device cuda \
            --dtype "$dt" --steps 20 --prompt "a photograph of an astronaut riding a horse" \
            --width 512 --height 512 --output "$OUT/first-$dt-$cache.png" $KERNELS
        done
      done ;;
    *) echo "unknown phase $p" >&2; exit 2 ;;
  esac
done
