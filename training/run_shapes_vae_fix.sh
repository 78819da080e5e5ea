#!/usr/bin/env bash
# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
#
# Retrains the shapes models on a VAE that codes every background colour in every latent frame (the shipped VAE codes
# dark blue, dark green and brown almost only in the first one: training/README_shapes.md item 10, benchmarks/RESULTS.md
# session 15). Stages, in order; each reads the earlier stages' outputs in OUTPUT_DIR, so that one device call can run
# one or two of them (STAGES="vae check", then STAGES="teacher", ...):
#   vae      the shipped VAE trained on on whole 81-frame streams, encoder included (configs/teacher/vae_long.yaml)
#   check    benchmarks/shapes_vae_horizon.py on it; stops the chain (status 1) unless every background colour stays
#            right through 81 frames
#   teacher  the shipped teacher trained on on the new latents: its folder with the new VAE is the starting point
#   student  training/run_shapes_student.sh from the new teacher, with session 5's time boxes unless ODE_INIT_ARGS,
#            STAGE1_ARGS or STAGE2_ARGS say otherwise; STUDENT_STAGES (ode_init stage1 stage2) picks its stages
#   eval     the held-out evaluation (64 prompts) of the new teacher and student, and of the shipped ones (BASELINES=0
#            skips them), then the new and the shipped student's 81-frame videos on every background
#   pack     what the stages so far made that a later stage or the repository needs (the new VAE, teacher, the
#            student's stage-1 and final pipelines, the measurements; no checkpoints) as one tar archive split into 15 MB
#            parts in OUTPUT_DIR/pack, for a device that returns files of at most 16 MiB and forgets the rest between
#            calls: `cat PACK/shapes_vae_fix.tar.part-* | tar -x -C OUTPUT_DIR` restores them for the next call
#
#   bash training/run_shapes_vae_fix.sh OUTPUT_DIR
#
# Training time boxes, in seconds (setup not counted): VAE_TIME (240), TEACHER_TIME (370). More flags: VAE_ARGS,
# TEACHER_ARGS, EVAL_ARGS (for `python -m diffusers_hybrid.shapes evaluate`); DEVICE (cuda) runs the evaluations;
# HORIZON_FRAMES (81) is the length of the background check's videos; SHIPPED (pretrained/shapes) holds the models
# to start from.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash training/run_shapes_vae_fix.sh OUTPUT_DIR" >&2
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
SHIPPED="$(cd "${SHIPPED:-$ROOT/pretrained/shapes}" && pwd)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python}"
export PYTHON
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$HERE/accelerate_configs/single_gpu.yaml}"
export ACCELERATE_CONFIG
DEVICE="${DEVICE:-cuda}"
HORIZON_FRAMES="${HORIZON_FRAMES:-81}"
read -r -a VAE_EXTRA <<< "${VAE_ARGS:-}"
read -r -a TEACHER_EXTRA <<< "${TEACHER_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
LAUNCH=("$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG")

need() {  # a stage's input from an earlier stage
  if [ ! -e "$1" ]; then
    echo "stage $stage needs $1 (run stage $2 first, with the same OUTPUT_DIR)" >&2
    exit 2
  fi
}

evaluate() {  # evaluate NAME PIPELINE
  "$PYTHON" -m diffusers_hybrid.shapes evaluate --pipeline "$2" --classifier "$SHIPPED/classifier" --device "$DEVICE" \
    --split heldout --num-prompts 64 --steps 50 --guidance-scale 5 --batch-size 32 --no-baselines \
    --out "$OUT/eval_$1.json" "${EVAL_EXTRA[@]}"
}

for stage in ${STAGES:-vae check teacher student eval pack}; do
  echo "== $stage"
  case $stage in
    vae)
      "${LAUNCH[@]}" "$HERE/train_shapes_vae.py" --config "$HERE/configs/teacher/vae_long.yaml" \
        --pretrained_model_name_or_path "$SHIPPED/teacher/vae" --output_dir "$OUT/vae_long" \
        --max_train_time "${VAE_TIME:-240}" "${VAE_EXTRA[@]}"
      ;;
    check)
      need "$OUT/vae_long/vae" vae
      "$PYTHON" "$ROOT/benchmarks/shapes_vae_horizon.py" "$OUT/vae_long/vae" --frames "$HORIZON_FRAMES" \
        --out "$OUT/vae_horizon.json" --require-all-backgrounds
      ;;
    teacher)
      need "$OUT/vae_long/vae" vae  # (the teacher's folder keeps its copy: a later call may lack vae_long/vae)
      rm -rf "$OUT/teacher_base"
      cp -r "$SHIPPED/teacher" "$OUT/teacher_base"
      rm -rf "$OUT/teacher_base/vae"
      cp -r "$OUT/vae_long/vae" "$OUT/teacher_base/vae"
      # the settings of the shipped teacher's continuations (benchmarks/RESULTS.md, sessions 10-14)
      "${LAUNCH[@]}" "$HERE/train_teacher.py" --config "$HERE/configs/teacher/teacher.yaml" \
        --pretrained_model_name_or_path "$OUT/teacher_base" --output_dir "$OUT/teacher" --train_batch_size 128 \
        --learning_rate 2e-4 --lr_warmup_steps 50 --max_train_time "${TEACHER_TIME:-370}" --latent_cache_size 8192 \
        --latent_cache_refresh_every 2 --validation_steps 0 --checkpointing_steps 0 --use_ema --ema_decay 0.95 \
        "${TEACHER_EXTRA[@]}"
      ;;
    student)
      need "$OUT/teacher/model_index.json" teacher
      # session 5's settings for the shipped student (benchmarks/RESULTS.md), unless given
      ODE_INIT_ARGS="${ODE_INIT_ARGS:---max_train_time 60 --ode_num_pairs 512 --ode_num_steps 30}" \
        STAGE1_ARGS="${STAGE1_ARGS:---max_train_time 200}" STAGE2_ARGS="${STAGE2_ARGS:---max_train_time 420}" \
        STAGES="${STUDENT_STAGES:-ode_init stage1 stage2}" bash "$HERE/run_shapes_student.sh" "$OUT/student" "$OUT/teacher"
      ;;
    eval)
      need "$OUT/student/final/model_index.json" student
      evaluate teacher "$OUT/teacher"
      evaluate student "$OUT/student/final"
      pipelines=("$OUT/student/final")
      if [ "${BASELINES:-1}" = 1 ]; then
        evaluate shipped_teacher "$SHIPPED/teacher"
        evaluate shipped_student "$SHIPPED/student"
        pipelines+=("$SHIPPED/student")
      fi
      # reported, not a gate: the student may still miss a colour the VAE keeps
      "$PYTHON" "$ROOT/benchmarks/shapes_vae_horizon.py" "$OUT/teacher/vae" --frames "$HORIZON_FRAMES" \
        --pipeline "${pipelines[@]}" --device "$DEVICE" --out "$OUT/student_horizon.json" || true
      ;;
    pack)
      # whatever the stages so far made that a later stage or the repository needs (no checkpoints, no ODE pairs)
      rm -rf "$OUT/pack" && mkdir -p "$OUT/pack"
      # (what a later stage reads only: the VAE once it is in the teacher's folder, stage 1 once the student is final;
      # the device returns at most 64 MiB)
      kept=()
      for path in vae_long/measurements.json teacher student/prompts_train.txt student/final vae_horizon.json \
                  student_horizon.json eval_teacher.json eval_student.json eval_shipped_teacher.json \
                  eval_shipped_student.json; do
        if [ -e "$OUT/$path" ]; then kept+=("$path"); fi
      done
      if [ ! -e "$OUT/teacher" ] && [ -e "$OUT/vae_long/vae" ]; then kept+=(vae_long/vae); fi
      if [ ! -e "$OUT/student/final" ] && [ -e "$OUT/student/stage1/final" ]; then kept+=(student/stage1/final); fi
      if [ ${#kept[@]} -eq 0 ]; then
        echo "stage pack: nothing to pack in $OUT" >&2
        exit 2
      fi
      tar -C "$OUT" -cf - --exclude='checkpoint-*' --exclude='logs' --exclude='validation' "${kept[@]}" \
        | split -b 15M - "$OUT/pack/shapes_vae_fix.tar.part-"
      echo "packed ${kept[*]}; unpack with: cat PACK/shapes_vae_fix.tar.part-* | tar -x -C OUTPUT_DIR"
      ls -l "$OUT/pack"
      ;;
    *)
      echo "unknown stage '$stage' in STAGES (vae, check, teacher, student, eval, pack)" >&2
      exit 2
      ;;
  esac
done
echo "== done: $OUT"
