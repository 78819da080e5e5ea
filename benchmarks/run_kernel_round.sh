#!/usr/bin/env bash
# Issue 3 kernel tuning rounds on the GPU machine, in one process: `--round2` (launch variants of the forward kernel,
# selection, absorption; ~4-5 min on an H100), `--round3` (radix-4 top-k search, pipelining knobs, read-out state
# forms and chunked contraction, absorption variants; ~2 min) `--round4` (the sort-based top-k), `--round5` (programmatic dependent launch), `--round6` (the read-out parked in the output tile) or `--round7` (the top-k in the attention prologue) or `--round8` (the pooling in the RoPE step) or `--round9` (the memory read-out accumulated into the attention
# accumulator, its denominators from the RoPE step). Every new variant is first run in child processes (a
# crash or hang there cannot spoil the measurements), then checked against the naive / float32 references (forward
# and backward where it has one) and timed with triton.testing.do_bench_cudagraph next to the defaults and cuDNN dense
# attention. Prints a table last; writes the round's JSON to $OUT.
#   OUT=/path bash benchmarks/run_kernel_round.sh 2|3|4|5|6|7|8|9|9b [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUND="${1:?usage: bash benchmarks/run_kernel_round.sh 2|3|4|5|6|7|8|9|9b [args]}"; shift
OUT="${OUT:-benchmarks/raw/round$ROUND}"
mkdir -p "$OUT"
export BENCH_COMMIT="${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)+wip}"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python3 benchmarks/bench_attention.py "--round$ROUND" --out "$OUT" "$@" 2>&1 | tee "$OUT/round$ROUND.log"
