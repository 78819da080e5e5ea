#!/usr/bin/env bash
# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
#
# Distils the shapes teacher into a streaming Hybrid Forcing student with the project's recipe:
#   training prompts -> ODE initialisation -> stage 1 (dense DMD) -> stage 2 (hybrid DMD + reflow)
# and leaves a StreamingHybridPipeline folder in OUTPUT_DIR/final. One GPU: ~10 minutes on an H100 with the
# configs' step counts (see training/README_shapes.md for measured times); flags for every stage go in EXTRA_ARGS,
# flags for one stage in ODE_INIT_ARGS / STAGE1_ARGS / STAGE2_ARGS (e.g. STAGE1_ARGS="--max_train_time 200");
# STAGES="stage2" runs only the stages named (each needs the previous stage's output in OUTPUT_DIR).
#
#   bash training/run_shapes_student.sh OUTPUT_DIR [TEACHER_DIR]     (TEACHER_DIR defaults to pretrained/shapes/teacher)
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash training/run_shapes_student.sh OUTPUT_DIR [TEACHER_DIR]" >&2
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
export OUTPUT_DIR="$(cd "$1" && pwd)"
export SHAPES_TEACHER="$(cd "${2:-$HERE/../pretrained/shapes/teacher}" && pwd)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$HERE/accelerate_configs/single_gpu.yaml}"
NUM_PROMPTS="${NUM_PROMPTS:-4096}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

# training-split captions only: the held-out colour/shape pairs stay unseen, as for the teacher
"$PYTHON" -m diffusers_hybrid.shapes prompts --split train --num "$NUM_PROMPTS" --seed 1 > "$OUTPUT_DIR/prompts_train.txt"

for stage in ${STAGES:-ode_init stage1 stage2}; do
  case $stage in
    ode_init) read -r -a STAGE <<< "${ODE_INIT_ARGS:-}" ;;
    stage1) read -r -a STAGE <<< "${STAGE1_ARGS:-}" ;;
    stage2) read -r -a STAGE <<< "${STAGE2_ARGS:-}" ;;
    *) echo "unknown stage '$stage' in STAGES (ode_init, stage1, stage2)" >&2; exit 2 ;;
  esac
  echo "== $stage"
  "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
    "$HERE/train_hybrid_forcing.py" --config "$HERE/configs/shapes/$stage.yaml" "${EXTRA[@]}" "${STAGE[@]}"
done
echo "== done: $OUTPUT_DIR/final"
