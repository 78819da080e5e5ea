#!/usr/bin/env bash
# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
#
# The whole Hybrid Forcing distillation on tiny random models, on a CPU, in a few minutes:
#   tiny models -> ODE initialisation -> stage 1 (dense DMD) -> stage 2 (hybrid DMD + reflow)
# and leaves a StreamingHybridPipeline folder in OUTPUT_DIR/final.
#
#   bash training/run_tiny.sh OUTPUT_DIR
#
# Each stage goes through `accelerate launch` with training/configs/tiny/<stage>.yaml (2 optimiser steps each; pass
# extra flags for every stage through TINY_EXTRA_ARGS, e.g. TINY_EXTRA_ARGS="--max_train_steps 20").
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash training/run_tiny.sh OUTPUT_DIR" >&2
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
export OUTPUT_DIR="$(cd "$1" && pwd)"
export TINY_MODELS="${TINY_MODELS:-$OUTPUT_DIR/tiny_models}"
# tiny tensors: one thread per process is much faster than several on a small CPU
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$HERE/accelerate_configs/cpu.yaml}"
read -r -a EXTRA <<< "${TINY_EXTRA_ARGS:-}"

if [ ! -f "$TINY_MODELS/wan_base/model_index.json" ]; then
  echo "== writing tiny models to $TINY_MODELS"
  "$PYTHON" "$HERE/make_tiny_models.py" "$TINY_MODELS"
fi

for stage in ode_init stage1 stage2; do
  echo "== $stage"
  "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
    "$HERE/train_hybrid_forcing.py" --config "$HERE/configs/tiny/$stage.yaml" "${EXTRA[@]}"
done

echo "== generating with the final pipeline"
"$PYTHON" - <<PY
import torch
from diffusers_hybrid import StreamingHybridPipeline

pipe = StreamingHybridPipeline.from_pretrained("$OUTPUT_DIR/final")
pipe.set_progress_bar_config(disable=True)
video = pipe("a red circle moves left", height=32, width=32, num_frames=33, max_sequence_length=16,
             generator=torch.Generator().manual_seed(0)).frames[0]
print(f"final pipeline: {type(pipe.transformer).__name__} ({pipe.transformer.config.attention_mode}), "
      f"video {video.shape}")
PY
echo "== done: $OUTPUT_DIR/final"
