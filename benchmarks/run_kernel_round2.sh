#!/usr/bin/env bash
# Issue 3, round 2, on the GPU machine (one process, ~4-5 minutes on an H100): every new forward / selection /
# linear-memory variant is first run in child processes (a crash or hang there cannot spoil the measurements), then
# checked against the float32 reference (forward and backward) and timed with triton.testing.do_bench_cudagraph
# next to the round-1 default and cuDNN dense attention. Prints a table last; writes $OUT/bench_attention.json.
#   OUT=/path bash benchmarks/run_kernel_round2.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/raw/round2}"
mkdir -p "$OUT"
export BENCH_COMMIT="${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)+wip}"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python3 benchmarks/bench_attention.py --round2 --out "$OUT" "$@" 2>&1 | tee "$OUT/round2.log"
