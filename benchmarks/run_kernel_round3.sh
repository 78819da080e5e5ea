#!/usr/bin/env bash
# Issue 3, round 3, on the GPU machine (one process, ~5 minutes on an H100): the selection's radix-4 top-k search and
# pipelining variants, the memory read-out's state forms (float32 / hi+lo / bf16 kept by the caller) and chunked
# contraction, absorption variants; each new one first run in child processes (a crash or hang there cannot spoil
# the measurements), then checked against the naive / float32 references and timed with
# triton.testing.do_bench_cudagraph next to the round-2 defaults and cuDNN dense attention. Prints a table last;
# writes $OUT/bench_attention_round3.json.
#   OUT=/path bash benchmarks/run_kernel_round3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/raw/round3}"
mkdir -p "$OUT"
export BENCH_COMMIT="${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)+wip}"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python3 benchmarks/bench_attention.py --round3 --out "$OUT" "$@" 2>&1 | tee "$OUT/round3.log"
