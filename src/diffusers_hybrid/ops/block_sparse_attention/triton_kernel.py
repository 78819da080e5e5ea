# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Triton kernels for block selection and block-sparse softmax attention (forward and backward).

Everything works in the model's `(B, L, H, D)` layout (any strides with a contiguous last dimension), no transposes.

Forward, three or four launches:

1. `_pool_heads_kernel`: mean-pools every `block_size`-token block of the queries and of the keys, one program per
   token block looping over the heads (one wide (block, D) load per head), fp32, partial last block averaged over
   its valid rows; for keys it subtracts the mean over heads ("heads" key centring: pooling and the head mean
   commute). With a `pooled_key_prefix` (the pooled blocks of the first keys, e.g. kept by a cache for the part of
   the window that is the same in every pass) only the remaining key blocks are pooled. With `pooled_blocks` (the
   model's cached passes: `rope_chunk_into_window`, `ops/rotary/`, pools while it RoPEs the chunk) this launch is
   skipped, and the forward chain is top-k -> attention.
2. `_select_row_kernel`: per (batch, head, query block), fp32 scores against all pooled key blocks (prefix and
   freshly pooled ones), then the k-th largest score by a 32-step binary search over the scores' order-preserving
   int32 image, or (`SELECT_CONFIG["search"] = "radix4"`, `_topk_rows`) a 16-step search of two bits per step, or
   ("sort") a partial bitonic sort of distinct (score, block) keys (ties go to the lower block index); writes the
   selected indices in ascending order (the LUT) and, for the backward, a dense int8 map.
3. `_attn_fwd_kernel`: FlashAttention-style online softmax (exp2, fp32 accumulators) of one query block over its
   selected key blocks (or every key block when `dense`), K/V tiles gathered through the LUT with bulk-tensor (TMA)
   copies, only the last iteration masked (the partial last key block is last: the LUT is ascending); stores the
   output and the log-sum-exp (base 2) for the backward. The work items of the last, partial wave are split over
   key ranges and merged by `_attn_fwd_combine_kernel` (or by the last part to finish, `fused_combine`), so that
   the last wave does not run mostly idle. Optionally (`block_sparse_attention_with_memory_triton`, inference) the
   linear-memory read-out, with the output projection folded into the state, is added to the output.

   The launch configuration (`_config`, `CONFIG_OVERRIDES`, keys in `FWD_KEYS`) selects variants of the same kernel:
   tiles and warps, kernel- or loop-level pipelining (`num_stages`, `loop_stages`, `unroll`), automatic warp
   specialisation of the main loop (`ws`, with `single_loop`), two selected blocks per online-softmax step
   (`group`), descriptors built on the host or in the kernel (`tma`), resident programs (`persistent`,
   `flatten`), the fused split merge, and where and how the memory read-out runs (`mem_mode`, `mem_state`,
   `mem_kc`). `benchmarks/bench_attention.py --round2` / `--round3` check and time them all.

Backward: `_attn_bwd_dq_kernel` (also computes `delta = rowsum(dO * O)`), `_reverse_lut_kernel` (for every key block
the list of query blocks that selected it), `_attn_bwd_dkdv_kernel`. The selection is not differentiated.

The launchers are wrapped in `torch.library.custom_op`s with fake implementations and a registered autograd formula,
so `torch.compile` and CUDA graphs trace through them; eager calls that need no gradient skip the dispatcher.
Launch parameters were measured on an H100 (benchmarks/bench_attention.py, benchmarks/RESULTS.md).
"""

import math
import os
from typing import Optional

import torch

if not torch.cuda.is_available():  # CPU only: run the kernels through Triton's interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ..linear_memory.naive import check_memory_query, check_memory_state, check_state_without_grad  # noqa: E402
from ..utils import last_contiguous, new_empty, new_empty_like  # noqa: E402
from .naive import (  # noqa: E402
    check_block_index,
    check_key_length,
    check_pool_out,
    check_pooled_blocks,
    check_pooled_key_prefix,
    num_selected_blocks,
)

try:  # Hopper bulk-tensor copies (TMA); optional.
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover
    TensorDescriptor = None

LOG2E = 1.4426950408889634

# Kernel launch configurations, overridable (benchmarks / tuning) by updating this dict. Keys are
# "fwd_sparse", "fwd_sparse_memory" (with the fused read-out), "fwd_dense", "bwd_sparse", "bwd_dense"; see `_config`.
CONFIG_OVERRIDES: dict = {}
# Selection implementation and launch parameters (benchmarks override): impl "row" (1 query block per program) |
# "rows" (G per program) | "group" (tl.dot scores) | "torch"; pool "heads" (loop over heads) | "tok";
# search (rows / group): the top-k threshold search of `_topk_rows`, "binary" (32 steps) | "radix4" (16 steps) |
# "sort" (partial bitonic sort, `tl.topk`);
# pool_stages / select_stages: software-pipelining depth of the pooling kernel's loop over heads / the selection
# kernel's loop over D chunks (1: none).
# Measured on an H100 (benchmarks/RESULTS.md, round 2): pool "heads" with 2 warps, scores of 8 query blocks per
# program with tl.dot (35.4 us with the cached pooled prefix vs 49.3 us for one query block per program).
SELECT_CONFIG: dict = {"impl": "group", "G": 8, "pool": "heads", "pool_warps": 2, "num_warps": 4}
# SELECT_CONFIG["fused"] = True: no top-k launch; the attention kernel selects its query block's key blocks in its
# prologue (`_select_one_row`), from the pooled blocks of the pooling launch ("fused_dc": the
# score loop's column chunk).


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Programmatic dependent launch (Hopper and later) for the forward chain pool -> select -> attention -> combine: each
# kernel waits for its predecessor's writes at entry and at once lets its successor launch, so the successor's launch
# and ramp-up overlap the predecessor's tail. None: off; "entry": the successor may launch as soon as every program
# has started; "late": once every program has written its results. Off: "entry" measured ~10 us slower on an H100
# (benchmarks/RESULTS.md, round 5).
USE_PDL: str | None = None
PDL_MODES = {None: 0, "entry": 1, "late": 2}


def _pdl_launch(x: torch.Tensor) -> dict:
    """Kernel arguments of a PDL-capable launch: the PDL mode and, when it is on, the launch attribute."""
    if USE_PDL not in PDL_MODES:
        raise ValueError(f"USE_PDL must be one of {list(PDL_MODES)}, got {USE_PDL!r}")
    mode = PDL_MODES[USE_PDL]
    if mode and not _interpret() and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9:
        return dict(PDL=mode, launch_pdl=True)
    return dict(PDL=0)


@triton.jit
def _pdl_entry(PDL: tl.constexpr):
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pdl_exit(PDL: tl.constexpr):
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


def _config(kind: str, head_dim: int, block_size: int) -> dict:
    """Launch parameters. Tiles in sparse mode are tied to the selection block (`BLOCK_M = block_size`, `BLOCK_N =
    KPI * block_size`: KPI selected key blocks gathered per iteration)."""
    if _interpret():
        base = {
            "fwd_sparse": dict(KPI=1, num_warps=4, num_stages=1, tma=False),
            # the read-out placed as on the GPU (below), so that CPU tests of the default run the shipped path
            "fwd_sparse_memory": dict(KPI=1, num_warps=4, num_stages=1, tma=False, mem_mode=5,
                                      mem_kc=min(32, head_dim)),
            "fwd_dense": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, tma=False),
            "bwd_sparse": dict(KPI=1, num_warps=4, num_stages=1),
            "bwd_dense": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
        }[kind]
    else:
        base = {
            # Measured on an H100 (benchmarks/RESULTS.md, round 2): TMA loads, no software pipelining and 4 resident
            # programs per multiprocessor (0.1995 ms vs 0.2120 ms for 2 stages x 2 programs). With the fused memory
            # read-out (round 9): the same configuration, the read-out accumulated into the attention accumulator in
            # chunks of 32 state rows (+9.6 us in the model's chain vs +19.1 us for the epilogue on 2 stages x 2
            # programs, same inputs; the whole product at once spills there: +63 us).
            "fwd_sparse": dict(KPI=1, num_warps=4, num_stages=1, tma=True, ctas_per_sm=4),
            "fwd_sparse_memory": dict(KPI=1, num_warps=4, num_stages=1, tma=True, ctas_per_sm=4, mem_mode=5,
                                      mem_kc=min(32, head_dim)),
            "fwd_dense": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True, ctas_per_sm=1),
            "bwd_sparse": dict(KPI=1, num_warps=4, num_stages=2, dkv_num_stages=3),
            "bwd_dense": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, DKV_BLOCK_M=64, DKV_BLOCK_N=128,
                              dkv_num_stages=2),
        }[kind]
    base = dict(base)
    base.update(CONFIG_OVERRIDES.get(kind, {}))
    return base


# ----------------------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _pool_block(X, P, blk, dst, L, NB, s_l, s_h,
                H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, TOK: tl.constexpr,
                CENTER: tl.constexpr):
    offs_t = tl.arange(0, TOK)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D)
    start = blk * BLOCK
    acc = tl.zeros((H_PAD, D), dtype=tl.float32)
    for t in range(0, BLOCK, TOK):
        rows = start + t + offs_t
        ptrs = X + rows[:, None, None] * s_l + offs_h[None, :, None] * s_h + offs_d[None, None, :]
        mask = (rows < L)[:, None, None] & (offs_h < H)[None, :, None]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=0)
    count = tl.minimum(L - start, BLOCK).to(tl.float32)
    acc = acc / count
    if CENTER:
        acc = acc - (tl.sum(acc, axis=0) / H)[None, :]
    out = P + offs_h[:, None] * (NB * D) + dst * D + offs_d[None, :]
    tl.store(out, acc, mask=(offs_h < H)[:, None])


@triton.jit
def _pool_kernel(Q, K, PQ, PK, Lq, Lk, Mq, Mk, kb0,
                 s_qb, s_ql, s_qh, s_kb, s_kl, s_kh,
                 H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, TOK: tl.constexpr,
                 CENTER: tl.constexpr):
    """Grid (Mq + Mk, B): one program per query block, or per key block `kb0 + i` (i < Mk; the key blocks before
    `kb0` come pooled already), all heads at once. Outputs (B, H, Mq, D) and (B, H, Mk, D) fp32."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    if pid < Mq:
        _pool_block(Q + b * s_qb, PQ + b * (H * Mq * D), pid, pid, Lq, Mq, s_ql, s_qh, H, H_PAD, D, BLOCK, TOK,
                    False)
    else:
        _pool_block(K + b * s_kb, PK + b * (H * Mk * D), kb0 + pid - Mq, pid - Mq, Lk, Mk, s_kl, s_kh, H, H_PAD, D,
                    BLOCK, TOK, CENTER)


@triton.jit
def _pool_heads_block(X, P, blk, dst, L, NB, s_l, s_h,
                      H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                      CENTER: tl.constexpr):
    """One token block `blk`, all heads: a (BLOCK, D) tile per head (one wide load each), pooled vectors gathered
    in an (H_PAD, D) register tile, head mean subtracted for keys; written as block `dst` of the output."""
    offs_t = tl.arange(0, BLOCK)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D)
    rows = blk * BLOCK + offs_t
    ok = rows < L
    inv = 1.0 / tl.minimum(L - blk * BLOCK, BLOCK).to(tl.float32)
    tile = tl.zeros((H_PAD, D), dtype=tl.float32)
    for h in range(0, H):
        x = tl.load(X + rows[:, None] * s_l + h * s_h + offs_d[None, :], mask=ok[:, None], other=0.0)
        pooled = tl.sum(x.to(tl.float32), axis=0) * inv
        tile = tl.where(offs_h[:, None] == h, pooled[None, :], tile)
    if CENTER:
        tile = tile - (tl.sum(tile, axis=0) / H)[None, :]
    tl.store(P + offs_h[:, None] * (NB * D) + dst * D + offs_d[None, :], tile, mask=(offs_h < H)[:, None])


@triton.jit
def _pool_heads_kernel(Q, K, PQ, PK, Lq, Lk, Mq, Mk, kb0,
                       s_qb, s_ql, s_qh, s_kb, s_kl, s_kh,
                       H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                       CENTER: tl.constexpr, PDL: tl.constexpr):
    _pdl_entry(PDL)
    pid = tl.program_id(0)
    b = tl.program_id(1)
    if pid < Mq:
        _pool_heads_block(Q + b * s_qb, PQ + b * (H * Mq * D), pid, pid, Lq, Mq, s_ql, s_qh, H, H_PAD, D, BLOCK,
                          False)
    else:
        _pool_heads_block(K + b * s_kb, PK + b * (H * Mk * D), kb0 + pid - Mq, pid - Mq, Lk, Mk, s_kl, s_kh, H,
                          H_PAD, D, BLOCK, CENTER)
    _pdl_exit(PDL)


@triton.jit
def _pooled_keys(PK, PKP, bh, NK, NP, offs_k, k_ok, cols, HAS_PRE: tl.constexpr, D: tl.constexpr):
    """Pooled key rows `offs_k`, columns `cols`: blocks `< NP` from the precomputed prefix PKP (B*H, NP, D), the
    others from PK (B*H, NK - NP, D); rows past NK read as 0."""
    if HAS_PRE:
        pre = offs_k < NP
        x = tl.load(PKP + (bh * NP + offs_k[:, None]) * D + cols[None, :], mask=pre[:, None], other=0.0)
        x += tl.load(PK + (bh * (NK - NP) + offs_k[:, None] - NP) * D + cols[None, :],
                     mask=(k_ok & (offs_k >= NP))[:, None], other=0.0)
    else:
        x = tl.load(PK + (bh * NK + offs_k[:, None]) * D + cols[None, :], mask=k_ok[:, None], other=0.0)
    return x


# Top-k threshold searches of `_topk_rows` (SELECT_CONFIG["search"]): dependent row reductions per selection
# ("sort": none, a partial bitonic sort network instead).
SEARCH_STEPS = {"binary": 32, "radix4": 16, "sort": 0}


@triton.jit
def _topk_rows(scores, k_ok, topk, G: tl.constexpr, SEARCH: tl.constexpr, FIELD: tl.constexpr,
               K_TOP: tl.constexpr):
    """(G, K_PAD) mask of the `topk` largest scores of every row (invalid columns hold -inf), ties to the lower
    column. The k-th largest value T is searched on an order-preserving integer image of the float32 scores.
    "binary": 32 dependent steps, each one count (a row reduction) of the values >= the midpoint. "radix4": 16 steps
    of two bits each, counting the values >= three candidate thresholds in one reduction (the three counts packed
    in fields of FIELD bits, `2**FIELD > K_PAD`): half the dependent reductions, the same T. "sort": every column
    gets a distinct int64 key (score image above, reversed column below, so ties order by column), `tl.topk` keeps
    the K_TOP (power of two >= topk) largest keys sorted, and the `topk`-th of them is the threshold."""
    bits = scores.to(tl.int32, bitcast=True)
    if SEARCH == "sort":
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        reversed_col = (tl.arange(0, scores.shape[1]) * -1 + (scores.shape[1] - 1)).to(tl.int64)
        key = (ordered.to(tl.int64) << 32) | tl.expand_dims(reversed_col, 0)
        top = tl.topk(key, K_TOP)
        rank = tl.arange(0, K_TOP)
        thr = tl.max(tl.where(rank[None, :] == topk - 1, top, -9223372036854775807 - 1), axis=1)
        return (key >= thr[:, None]) & k_ok[None, :]
    if SEARCH == "radix4":
        # Unsigned image (sign bit flipped for positives, all bits for negatives); T is built from the top bit pair
        # down as the largest value with count(key >= T) >= topk.
        key = tl.where(bits >= 0, bits ^ (-2147483648), ~bits).to(tl.uint32, bitcast=True)
        one = tl.full((G,), 1, dtype=tl.uint32)
        thr = tl.zeros((G,), dtype=tl.uint32)
        field_mask = (1 << FIELD) - 1
        for step in tl.static_range(16):
            shift = 30 - 2 * step
            c1 = thr | (one << shift)
            c2 = thr | ((one + one) << shift)
            c3 = c1 | c2
            if 3 * FIELD > 31:  # three fields do not fit an int32
                packed = ((key >= c1[:, None]).to(tl.int64) + ((key >= c2[:, None]).to(tl.int64) << FIELD)
                          + ((key >= c3[:, None]).to(tl.int64) << (2 * FIELD)))
            else:
                packed = ((key >= c1[:, None]).to(tl.int32) + ((key >= c2[:, None]).to(tl.int32) << FIELD)
                          + ((key >= c3[:, None]).to(tl.int32) << (2 * FIELD)))
            counts = tl.sum(packed, axis=1)
            digit = (((counts & field_mask) >= topk).to(tl.uint32)
                     + (((counts >> FIELD) & field_mask) >= topk).to(tl.uint32)
                     + ((counts >> (2 * FIELD)) >= topk).to(tl.uint32))
            thr = thr | (digit << shift)
        above = key > thr[:, None]
        tie = key == thr[:, None]
    else:
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        lo = tl.full((G,), -2147483648, dtype=tl.int64)
        hi = tl.full((G,), 2147483647, dtype=tl.int64)
        for _ in range(32):
            mid = (lo + hi + 1) >> 1
            cnt = tl.sum((ordered >= mid[:, None].to(tl.int32)).to(tl.int32), axis=1)
            enough = cnt >= topk
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        thr = lo.to(tl.int32)
        above = ordered > thr[:, None]
        tie = ordered == thr[:, None]
    need = topk - tl.sum(above.to(tl.int32), axis=1)
    return (above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= need[:, None]))) & k_ok[None, :]


@triton.jit
def _select_kernel(PQ, PK, PKP, LUT, BMAP, M, NK, NP, topk,
                   G: tl.constexpr, K_PAD: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
                   WRITE_MAP: tl.constexpr, HAS_PRE: tl.constexpr, SEARCH: tl.constexpr, FIELD: tl.constexpr,
                   K_TOP: tl.constexpr, PDL: tl.constexpr):
    """Grid (cdiv(M, G), B*H). Top-`topk` key blocks per query block (fp32 scores by tl.dot, the threshold search of
    `_topk_rows`), indices ascending."""
    _pdl_entry(PDL)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    offs_g = pid * G + tl.arange(0, G)
    offs_k = tl.arange(0, K_PAD)
    offs_c = tl.arange(0, DC)
    g_ok = offs_g < M
    k_ok = offs_k < NK
    scores = tl.zeros((G, K_PAD), dtype=tl.float32)
    for d0 in range(0, D, DC):
        pq = tl.load(PQ + bh * M * D + offs_g[:, None] * D + d0 + offs_c[None, :], mask=g_ok[:, None], other=0.0)
        pk = _pooled_keys(PK, PKP, bh, NK, NP, offs_k, k_ok, d0 + offs_c, HAS_PRE, D)
        scores = tl.dot(pq, tl.trans(pk), scores, input_precision="ieee")
    scores = tl.where(k_ok[None, :], scores, float("-inf"))
    selected = _topk_rows(scores, k_ok, topk, G, SEARCH, FIELD, K_TOP)
    pos = tl.cumsum(selected.to(tl.int32), axis=1) - 1
    row = bh * M + offs_g
    idx = tl.zeros((G, K_PAD), dtype=tl.int32) + offs_k[None, :]
    tl.store(LUT + row[:, None] * topk + pos, idx, mask=selected & g_ok[:, None])
    if WRITE_MAP:
        tl.store(BMAP + row[:, None] * NK + offs_k[None, :], selected.to(tl.int8), mask=g_ok[:, None] & k_ok[None, :])
    _pdl_exit(PDL)


@triton.jit
def _select_row_kernel(PQ, PK, PKP, LUT, BMAP, M, NK, NP, topk,
                       K_PAD: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, WRITE_MAP: tl.constexpr,
                       HAS_PRE: tl.constexpr):
    """Grid (M, B*H): one query block per program, 1-D vectors (the fastest variant measured on an H100).
    Scores in fp32 (D in chunks of DC), then the topk-th largest by a 32-step binary search over the
    order-preserving int32 image of the scores; ties go to the lower block index; indices stored ascending."""
    m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_k = tl.arange(0, K_PAD)
    offs_c = tl.arange(0, DC)
    k_ok = offs_k < NK
    scores = tl.zeros((K_PAD,), dtype=tl.float32)
    for d0 in tl.static_range(0, D, DC):
        pq = tl.load(PQ + (bh * M + m) * D + d0 + offs_c)
        pk = _pooled_keys(PK, PKP, bh, NK, NP, offs_k, k_ok, d0 + offs_c, HAS_PRE, D)
        scores += tl.sum(pk * pq[None, :], axis=1)
    scores = tl.where(k_ok, scores, float("-inf"))
    bits = scores.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    lo = tl.full((), -2147483648, dtype=tl.int64)
    hi = tl.full((), 2147483647, dtype=tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        cnt = tl.sum((ordered >= mid.to(tl.int32)).to(tl.int32), axis=0)
        enough = cnt >= topk
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    thr = lo.to(tl.int32)
    above = ordered > thr
    tie = ordered == thr
    need = topk - tl.sum(above.to(tl.int32), axis=0)
    selected = (above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))) & k_ok
    pos = tl.cumsum(selected.to(tl.int32), axis=0) - 1
    row = bh * M + m
    tl.store(LUT + row * topk + pos, offs_k, mask=selected)
    if WRITE_MAP:
        tl.store(BMAP + row * NK + offs_k, selected.to(tl.int8), mask=k_ok)


@triton.jit
def _select_rows_kernel(PQ, PK, PKP, LUT, BMAP, M, NK, NP, topk,
                        G: tl.constexpr, K_PAD: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
                        WRITE_MAP: tl.constexpr, HAS_PRE: tl.constexpr, SEARCH: tl.constexpr, FIELD: tl.constexpr,
                   K_TOP: tl.constexpr):
    """Grid (cdiv(M, G), B*H): G query blocks per program (the pooled keys are read once per G rows; the
    selection is latency- and L2-bound). Scores in fp32 (D in chunks of DC, multiply-and-sum), then the topk-th
    largest per row (`_topk_rows`); ties go to the lower block index; indices stored ascending."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    offs_g = pid * G + tl.arange(0, G)
    offs_k = tl.arange(0, K_PAD)
    offs_c = tl.arange(0, DC)
    g_ok = offs_g < M
    k_ok = offs_k < NK
    scores = tl.zeros((G, K_PAD), dtype=tl.float32)
    for d0 in tl.static_range(0, D, DC):
        pq = tl.load(PQ + (bh * M + offs_g[:, None]) * D + d0 + offs_c[None, :], mask=g_ok[:, None], other=0.0)
        pk = _pooled_keys(PK, PKP, bh, NK, NP, offs_k, k_ok, d0 + offs_c, HAS_PRE, D)
        scores += tl.sum(pq[:, None, :] * pk[None, :, :], axis=2)
    scores = tl.where(k_ok[None, :], scores, float("-inf"))
    selected = _topk_rows(scores, k_ok, topk, G, SEARCH, FIELD, K_TOP)
    pos = tl.cumsum(selected.to(tl.int32), axis=1) - 1
    row = bh * M + offs_g
    idx = tl.zeros((G, K_PAD), dtype=tl.int32) + offs_k[None, :]
    tl.store(LUT + row[:, None] * topk + pos, idx, mask=selected & g_ok[:, None])
    if WRITE_MAP:
        tl.store(BMAP + row[:, None] * NK + offs_k[None, :], selected.to(tl.int8), mask=g_ok[:, None] & k_ok[None, :])


@triton.jit
def _select_one_row(PQ, PK, PKP, LUT, BMAP, row, bh, NK, NP, topk,
                    K_PAD: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, WRITE_MAP: tl.constexpr,
                    HAS_PRE: tl.constexpr, SEARCH: tl.constexpr, FIELD: tl.constexpr, K_TOP: tl.constexpr):
    """The selection of one query block (`row` = bh * M + m of the pooled queries PQ), as `_select_rows_kernel`
    computes it (fp32 multiply-and-sum scores, `_topk_rows`): written to its LUT row (and block-map row)."""
    offs_k = tl.arange(0, K_PAD)
    offs_c = tl.arange(0, DC)
    k_ok = offs_k < NK
    scores = tl.zeros((1, K_PAD), dtype=tl.float32)
    for d0 in tl.static_range(0, D, DC):
        pq = tl.load(PQ + row * D + d0 + offs_c)
        pk = _pooled_keys(PK, PKP, bh, NK, NP, offs_k, k_ok, d0 + offs_c, HAS_PRE, D)
        scores += tl.sum(pk * pq[None, :], axis=1)[None, :]
    scores = tl.where(k_ok[None, :], scores, float("-inf"))
    selected = _topk_rows(scores, k_ok, topk, 1, SEARCH, FIELD, K_TOP)
    pos = tl.cumsum(selected.to(tl.int32), axis=1) - 1
    idx = tl.zeros((1, K_PAD), dtype=tl.int32) + offs_k[None, :]
    tl.store(LUT + row * topk + pos, idx, mask=selected)
    if WRITE_MAP:
        tl.store(BMAP + row * NK + offs_k[None, :], selected.to(tl.int8), mask=k_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Attention forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _key_tile(lut_row, it, Lk, topk, offs_n,
              BLOCK_N: tl.constexpr, BS: tl.constexpr, KPI: tl.constexpr, SPARSE: tl.constexpr):
    """Key rows of iteration `it`: (first row, per-row index, per-row validity). Sparse: the LUT's `it`-th block
    (KPI == 1) or KPI blocks gathered row by row."""
    if SPARSE:
        if KPI == 1:
            start = tl.load(lut_row + it) * BS
            cols = start + offs_n
            ok = cols < Lk
        else:
            slot = it * KPI + offs_n // BS
            kb = tl.load(lut_row + slot, mask=slot < topk, other=-1)
            cols = kb * BS + offs_n % BS
            ok = (kb >= 0) & (cols < Lk)
            start = 0
    else:
        start = it * BLOCK_N
        cols = start + offs_n
        ok = cols < Lk
    return start, cols, ok


@triton.jit
def _load_tile(desc, Base, row0, start, col0, cols, ok, s_l, offs_d, USE_TMA: tl.constexpr, MASK: tl.constexpr):
    """One (BLOCK_N, D) key or value tile: a bulk-tensor copy at row `row0 + start`, or a (masked) gather."""
    if USE_TMA:
        x = desc.load([row0 + start, col0])
    elif MASK:
        x = tl.load(Base + cols[:, None] * s_l + offs_d[None, :], mask=ok[:, None], other=0.0)
    else:
        x = tl.load(Base + cols[:, None] * s_l + offs_d[None, :])
    return x


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, K_base, V_base, k_desc, v_desc, lut_row, it0, it1, row0, col0, Lk, topk,
              s_kl, s_vl, qk_scale, offs_n, offs_d,
              BLOCK_N: tl.constexpr, BS: tl.constexpr, KPI: tl.constexpr, SPARSE: tl.constexpr,
              USE_TMA: tl.constexpr, MASK: tl.constexpr, F32: tl.constexpr,
              LOOP_STAGES: tl.constexpr, UNROLL: tl.constexpr, WS: tl.constexpr):
    """Online softmax over iterations [it0, it1). MASK: check key validity (needed only where the partial last key
    block can occur). LOOP_STAGES / UNROLL / WS: the loop's own pipelining depth, unroll factor and automatic warp
    specialisation (`tl.range` attributes; None / False leave the compiler's defaults)."""
    for it in tl.range(it0, it1, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL, warp_specialize=WS):
        start, cols, ok = _key_tile(lut_row, it, Lk, topk, offs_n, BLOCK_N, BS, KPI, SPARSE)
        k = _load_tile(k_desc, K_base, row0, start, col0, cols, ok, s_kl, offs_d, USE_TMA, MASK)
        if F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k))
        if MASK:
            s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(v_desc, V_base, row0, start, col0, cols, ok, s_vl, offs_d, USE_TMA, MASK)
        pv = p.to(V_base.dtype.element_ty)
        if F32:
            v = v.to(tl.float32)
            pv = pv.to(tl.float32)
        acc = tl.dot(pv, v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_loop_pairs(acc, l_i, m_i, q, K_base, V_base, k_desc, v_desc, lut_row, it0, n_pairs, row0, col0,
                    s_kl, s_vl, qk_scale, offs_n, offs_d,
                    BS: tl.constexpr, USE_TMA: tl.constexpr, F32: tl.constexpr,
                    LOOP_STAGES: tl.constexpr, UNROLL: tl.constexpr, WS: tl.constexpr):
    """Sparse, unmasked: LUT slots it0, it0+1, ... two selected key blocks per online-softmax step (one running-max
    update, one rescale of the accumulator for both; the two QK^T and PV products are independent)."""
    for j in tl.range(0, n_pairs, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL, warp_specialize=WS):
        it = it0 + 2 * j
        start0 = tl.load(lut_row + it) * BS
        start1 = tl.load(lut_row + it + 1) * BS
        cols0 = start0 + offs_n
        cols1 = start1 + offs_n
        k0 = _load_tile(k_desc, K_base, row0, start0, col0, cols0, cols0 >= 0, s_kl, offs_d, USE_TMA, False)
        k1 = _load_tile(k_desc, K_base, row0, start1, col0, cols1, cols1 >= 0, s_kl, offs_d, USE_TMA, False)
        if F32:
            k0 = k0.to(tl.float32)
            k1 = k1.to(tl.float32)
        s0 = tl.dot(q, tl.trans(k0))
        s1 = tl.dot(q, tl.trans(k1))
        m_new = tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)) * qk_scale)
        p0 = tl.math.exp2(s0 * qk_scale - m_new[:, None])
        p1 = tl.math.exp2(s1 * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + (tl.sum(p0, 1) + tl.sum(p1, 1))
        acc = acc * alpha[:, None]
        v0 = _load_tile(v_desc, V_base, row0, start0, col0, cols0, cols0 >= 0, s_vl, offs_d, USE_TMA, False)
        v1 = _load_tile(v_desc, V_base, row0, start1, col0, cols1, cols1 >= 0, s_vl, offs_d, USE_TMA, False)
        pv0 = p0.to(V_base.dtype.element_ty)
        pv1 = p1.to(V_base.dtype.element_ty)
        if F32:
            v0 = v0.to(tl.float32)
            v1 = v1.to(tl.float32)
            pv0 = pv0.to(tl.float32)
            pv1 = pv1.to(tl.float32)
        acc = tl.dot(pv0, v0, acc)
        acc = tl.dot(pv1, v1, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _memory_den(QR, KMS, b, h, bh, offs_m, m_ok, s_qrb, s_qrl, s_qrh, eps, D: tl.constexpr, MEM_KC: tl.constexpr,
                DEN_GIVEN: tl.constexpr):
    """Denominator of the linear-memory read-out, `relu(q_raw) · kmean + eps`, one value per query row; q_raw read
    in column chunks of MEM_KC (fewer live registers when MEM_KC < D). DEN_GIVEN: QR holds the denominators
    themselves, `(B, Lq, H)` float32 (the RoPE step computes them while it holds q_raw)."""
    if DEN_GIVEN:
        return tl.load(QR + b * s_qrb + h * s_qrh + offs_m * s_qrl, mask=m_ok, other=1.0)
    offs_c = tl.arange(0, MEM_KC)
    for c0 in tl.static_range(0, D, MEM_KC):
        km = tl.load(KMS + bh * D + c0 + offs_c)
        qr = tl.load(QR + b * s_qrb + h * s_qrh + offs_m[:, None] * s_qrl + c0 + offs_c[None, :], mask=m_ok[:, None],
                     other=0.0).to(tl.float32)
        part = tl.sum(tl.maximum(qr, 0.0) * km[None, :], axis=1)
        if c0 == 0:
            den = part + eps
        else:
            den += part
    return den


@triton.jit
def _memory_product(q, KVH, KVL, kv_offs, num, FIRST: tl.constexpr, HAS_LO: tl.constexpr, F32: tl.constexpr):
    """`num (+)= q · KV'[rows of kv_offs]`, fp32: the state either 16-bit (the `hi` part, plus optionally the 16-bit
    residual `lo` in KVL: hi + lo is about fp32 accurate), or fp32, split here into hi (+ lo when HAS_LO); fp32
    products in the interpreter."""
    kv = tl.load(KVH + kv_offs)
    if F32:
        if FIRST:
            num = tl.dot(q.to(tl.float32), kv.to(tl.float32), input_precision="ieee")
        else:
            num = tl.dot(q.to(tl.float32), kv.to(tl.float32), num, input_precision="ieee")
    elif KVH.dtype.element_ty == tl.float32:
        kv_hi = kv.to(q.dtype)
        if FIRST:
            num = tl.dot(q, kv_hi)
        else:
            num = tl.dot(q, kv_hi, num)
        if HAS_LO:
            num = tl.dot(q, (kv - kv_hi.to(tl.float32)).to(q.dtype), num)
    else:
        if FIRST:
            num = tl.dot(q, kv)
        else:
            num = tl.dot(q, kv, num)
        if HAS_LO:
            num = tl.dot(q, tl.load(KVL + kv_offs), num)
    return num


@triton.jit
def _memory_num(q, Q_base, s_ql, offs_m, m_ok, KVH, KVL, BIAS, bh, den, D: tl.constexpr, HAS_LO: tl.constexpr,
                HAS_BIAS: tl.constexpr, F32: tl.constexpr, MEM_KC: tl.constexpr, init=None):
    """`(init + q · KV') / den (+ bias)`, fp32 (`init`: an optional (BLOCK_M, D) fp32 tile the product accumulates
    into). KV' is the state (possibly times the output projection). MEM_KC == D: one product with the whole (D, D)
    state and the query tile `q` in registers; MEM_KC < D: the contraction in chunks of MEM_KC state rows, the
    matching query columns re-read from `Q_base` (L2-resident): a smaller state operand at a time (shared memory /
    registers of the epilogue)."""
    offs_d = tl.arange(0, D)
    if MEM_KC == D:
        kv_offs = bh * D * D + offs_d[:, None] * D + offs_d[None, :]
        if init is None:
            num = _memory_product(q, KVH, KVL, kv_offs, q, True, HAS_LO, F32)
        else:
            num = _memory_product(q, KVH, KVL, kv_offs, init, False, HAS_LO, F32)
    else:
        offs_c = tl.arange(0, MEM_KC)
        num = init
        for c0 in tl.static_range(0, D, MEM_KC):
            qc = tl.load(Q_base + offs_m[:, None] * s_ql + c0 + offs_c[None, :], mask=m_ok[:, None], other=0.0)
            kv_offs = bh * D * D + (c0 + offs_c)[:, None] * D + offs_d[None, :]
            if c0 == 0 and init is None:
                num = _memory_product(qc, KVH, KVL, kv_offs, qc, True, HAS_LO, F32)
            else:
                num = _memory_product(qc, KVH, KVL, kv_offs, num, False, HAS_LO, F32)
    mem = num / den[:, None]
    if HAS_BIAS:
        mem += tl.load(BIAS + offs_d)[None, :]
    return mem


@triton.jit
def _memory_term(q, Q_base, s_ql, QR, KVH, KVL, KMS, BIAS, b, h, bh, offs_m, m_ok, s_qrb, s_qrl, s_qrh, eps,
                 D: tl.constexpr, HAS_LO: tl.constexpr, HAS_BIAS: tl.constexpr, F32: tl.constexpr,
                 MEM_KC: tl.constexpr, DEN_GIVEN: tl.constexpr):
    """Linear-memory read-out of one query tile, `(q · KV') / (relu(q_raw) · kmean + eps) (+ bias)`, fp32. `q` is
    the RoPE'd query the attention uses (also at `Q_base`, rows `offs_m` with stride `s_ql`)."""
    den = _memory_den(QR, KMS, b, h, bh, offs_m, m_ok, s_qrb, s_qrl, s_qrh, eps, D, MEM_KC, DEN_GIVEN)
    return _memory_num(q, Q_base, s_ql, offs_m, m_ok, KVH, KVL, BIAS, bh, den, D, HAS_LO, HAS_BIAS, F32, MEM_KC)


@triton.jit
def _normalise(acc, l_i, mem, den, q, Q_base, s_ql, QR, KVH, KVL, KMS, BIAS, b, h, bh, offs_m, m_ok, s_qrb, s_qrl,
               s_qrh, eps, park_ptrs, D: tl.constexpr, MEM: tl.constexpr, HAS_LO: tl.constexpr,
               HAS_BIAS: tl.constexpr, F32: tl.constexpr, MEM_KC: tl.constexpr, MEM_MODE: tl.constexpr):
    """The output tile of a whole work item: `acc / l_i`, plus (MEM) its linear-memory read-out. MEM_MODE 5: the
    read-out's product accumulates into the attention accumulator itself, `(acc · den / l_i + q · KV') / den`, so
    the epilogue holds one (BLOCK_M, D) fp32 tile, not two (the others: `_add_memory`)."""
    if MEM and MEM_MODE == 5:
        den = _memory_den(QR, KMS, b, h, bh, offs_m, m_ok, s_qrb, s_qrl, s_qrh, eps, D, MEM_KC, MEM == 2)
        return _memory_num(q, Q_base, s_ql, offs_m, m_ok, KVH, KVL, BIAS, bh, den, D, HAS_LO, HAS_BIAS, F32, MEM_KC,
                           acc * (den / l_i)[:, None])
    out = acc / l_i[:, None]
    if MEM:
        out = _add_memory(out, mem, den, q, Q_base, s_ql, QR, KVH, KVL, KMS, BIAS, b, h, bh, offs_m, m_ok, s_qrb,
                          s_qrl, s_qrh, eps, park_ptrs, D, HAS_LO, HAS_BIAS, F32, MEM_KC, MEM_MODE, MEM == 2)
    return out


@triton.jit
def _add_memory(out, mem, den, q, Q_base, s_ql, QR, KVH, KVL, KMS, BIAS, b, h, bh, offs_m, m_ok, s_qrb, s_qrl, s_qrh,
                eps, park_ptrs, D: tl.constexpr, HAS_LO: tl.constexpr, HAS_BIAS: tl.constexpr, F32: tl.constexpr,
                MEM_KC: tl.constexpr, MEM_MODE: tl.constexpr, DEN_GIVEN: tl.constexpr):
    """The attention output tile plus its linear-memory read-out, by where the read-out ran (`MEM_MODE`): 3 / 4: it
    was parked at `park_ptrs`; 2: `mem` was computed before the main loop; 1: the denominator `den` was; 0: all of
    it here."""
    if MEM_MODE >= 3:
        tl.debug_barrier()  # the parked tile was stored by other threads of this program (another layout)
        return out + tl.load(park_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
    elif MEM_MODE == 2:
        return out + mem
    elif MEM_MODE == 1:
        return out + _memory_num(q, Q_base, s_ql, offs_m, m_ok, KVH, KVL, BIAS, bh, den, D, HAS_LO, HAS_BIAS, F32,
                                 MEM_KC)
    else:
        return out + _memory_term(q, Q_base, s_ql, QR, KVH, KVL, KMS, BIAS, b, h, bh, offs_m, m_ok, s_qrb, s_qrl,
                                  s_qrh, eps, D, HAS_LO, HAS_BIAS, F32, MEM_KC, DEN_GIVEN)


@triton.jit
def _merge_parts(PACC, PML, r, n_parts, BLOCK_M: tl.constexpr, D: tl.constexpr, CG: tl.constexpr):
    """Merges the `n_parts` partial softmax states of split item `r`: (unnormalised acc, max, sum)."""
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_all = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for p in range(0, n_parts):
        if CG:
            m_p = tl.load(PML + (r * n_parts + p) * 2 * BLOCK_M + rows, cache_modifier=".cg")
        else:
            m_p = tl.load(PML + (r * n_parts + p) * 2 * BLOCK_M + rows)
        m_all = tl.maximum(m_all, m_p)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    l_all = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p in range(0, n_parts):
        slot = r * n_parts + p
        if CG:
            m_p = tl.load(PML + slot * 2 * BLOCK_M + rows, cache_modifier=".cg")
            l_p = tl.load(PML + slot * 2 * BLOCK_M + BLOCK_M + rows, cache_modifier=".cg")
            a_p = tl.load(PACC + (slot * BLOCK_M + rows[:, None]) * D + offs_d[None, :], cache_modifier=".cg")
        else:
            m_p = tl.load(PML + slot * 2 * BLOCK_M + rows)
            l_p = tl.load(PML + slot * 2 * BLOCK_M + BLOCK_M + rows)
            a_p = tl.load(PACC + (slot * BLOCK_M + rows[:, None]) * D + offs_d[None, :])
        wgt = tl.math.exp2(m_p - m_all)
        l_all += l_p * wgt
        acc += a_p * wgt[:, None]
    return acc, l_all, m_all


@triton.jit
def _fwd_unit(u, Q, K, V, O, LSE, LUT, q_desc, k_desc, v_desc, PACC, PML, SEM, QR, KVH, KVL, KMS, BIAS, PARK,
              PQ, PK, PKP, BMAP, NK, NP,
              Lq, Lk, H, M, topk, n_full, n_parts,
              s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh, s_qrb, s_qrl, s_qrh,
              qk_scale, mem_eps,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
              KPI: tl.constexpr, SPARSE: tl.constexpr, USE_TMA: tl.constexpr, F32: tl.constexpr,
              MEM: tl.constexpr, HAS_LO: tl.constexpr, HAS_BIAS: tl.constexpr,
              GROUP: tl.constexpr, SINGLE_LOOP: tl.constexpr, LOOP_STAGES: tl.constexpr, UNROLL: tl.constexpr,
              WS: tl.constexpr, MEM_MODE: tl.constexpr, FUSED_COMBINE: tl.constexpr, MEM_KC: tl.constexpr,
              SELECT: tl.constexpr, K_PAD: tl.constexpr, SEL_DC: tl.constexpr, WRITE_MAP: tl.constexpr,
              HAS_PRE: tl.constexpr, SEARCH: tl.constexpr, FIELD: tl.constexpr, K_TOP: tl.constexpr):
    """Work unit `u`: units `< n_full` are whole items (query block `w % M` of batch-head `w // M`); the others are
    the `n_parts` key-range parts of the remaining items, which write unnormalised partials (PACC, PML) merged by
    `_attn_fwd_combine_kernel` or, with FUSED_COMBINE, by the last part to finish (an arrival counter per item)."""
    # (branch-free: automatic warp specialisation does not take data-dependent branches around the main loop)
    whole_item = u < n_full
    rel = tl.maximum(u - n_full, 0)
    w = tl.where(whole_item, u, n_full + rel // n_parts)
    part = tl.where(whole_item, 0, rel % n_parts)
    parts = tl.where(whole_item, 1, n_parts)
    pid_m = w % M
    bh = w // M
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < Lq
    Q_base = Q + b * s_qb + h * s_qh
    if USE_TMA:
        q = q_desc.load([b * Lq + pid_m * BLOCK_M, h * D])
    else:
        q = tl.load(Q_base + offs_m[:, None] * s_ql + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    if F32:
        q = q.to(tl.float32)
    K_base = K + b * s_kb + h * s_kh
    V_base = V + b * s_vb + h * s_vh
    o_offs = b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :]
    o_ptrs = O + o_offs
    # Linear-memory read-out (MEM), MEM_MODE 0: all of it in the epilogue; 1: the denominator (q_raw load) before
    # the main loop; 2: the whole read-out before the main loop, its result held in registers meanwhile; 3 / 4: the
    # whole read-out before the main loop, parked in the output tile (3, rounded to its dtype) or in the float32
    # PARK buffer of the output's layout (4) for whole items (split items add it when they merge), read back by the
    # epilogue: no registers held across the loop, so the no-memory configuration fits; 5: all of it in the epilogue,
    # accumulated into the attention accumulator (`_normalise`). MEM 2: QR holds the denominators (`_memory_den`).
    park_ptrs = (PARK if MEM_MODE == 4 else O) + o_offs
    den = 0.0  # placeholders for the modes that compute these in the epilogue (`_add_memory`)
    mem = 0.0
    if MEM and MEM_MODE >= 1 and MEM_MODE <= 2:
        den = _memory_den(QR, KMS, b, h, bh, offs_m, m_ok, s_qrb, s_qrl, s_qrh, mem_eps, D, MEM_KC, MEM == 2)
        if MEM_MODE == 2:
            mem = _memory_num(q, Q_base, s_ql, offs_m, m_ok, KVH, KVL, BIAS, bh, den, D, HAS_LO, HAS_BIAS, F32,
                              MEM_KC)
    if MEM and MEM_MODE >= 3 and MEM_MODE <= 4:
        parked = _memory_term(q, Q_base, s_ql, QR, KVH, KVL, KMS, BIAS, b, h, bh, offs_m, m_ok, s_qrb, s_qrl, s_qrh,
                              mem_eps, D, HAS_LO, HAS_BIAS, F32, MEM_KC, MEM == 2)
        rows_parked = tl.where(parts == 1, Lq, 0)  # predicate as a bound: every row of a whole item or none
        tl.store(park_ptrs, parked.to(park_ptrs.dtype.element_ty), mask=(offs_m < rows_parked)[:, None])
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    if SPARSE:
        lut_row = LUT + (bh * M + pid_m) * topk
        n_iter = tl.cdiv(topk, KPI)
        if SELECT:  # this query block's selection first (its row of the LUT), from the pooled blocks
            _select_one_row(PQ, PK, PKP, LUT, BMAP, bh * M + pid_m, bh, NK, NP, topk, K_PAD, D, SEL_DC, WRITE_MAP,
                            HAS_PRE, SEARCH, FIELD, K_TOP)
            tl.debug_barrier()  # the row was stored by other threads of this program than those reading it
    else:
        lut_row = LUT
        n_iter = tl.cdiv(Lk, BLOCK_N)
    chunk = tl.cdiv(n_iter, parts)
    it_lo = part * chunk
    it_hi = tl.minimum(n_iter, it_lo + chunk)
    row0 = b * Lk
    col0 = h * D
    if SINGLE_LOOP:  # one loop, every iteration masked (a simple loop for warp specialisation)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, V_base, k_desc, v_desc, lut_row, it_lo, it_hi, row0,
                                  col0, Lk, topk, s_kl, s_vl, qk_scale, offs_n, offs_d, BLOCK_N, BS, KPI, SPARSE,
                                  USE_TMA, True, F32, LOOP_STAGES, UNROLL, WS)
    else:
        # Only the last iteration can hold invalid keys (the partial last block comes last: the LUT is ascending).
        # (The bounds are written as below on purpose: sharing one precomputed bound between the two loops makes
        # ptxas serialise the wgmma instructions, measured on the sm_90a code of Triton 3.6.)
        if GROUP == 2:
            it_mid = tl.maximum(it_lo, tl.minimum(it_hi, n_iter - 1))
            n_pairs = (it_mid - it_lo) // 2
            acc, l_i, m_i = _fwd_loop_pairs(acc, l_i, m_i, q, K_base, V_base, k_desc, v_desc, lut_row, it_lo,
                                            n_pairs, row0, col0, s_kl, s_vl, qk_scale, offs_n, offs_d, BS, USE_TMA,
                                            F32, LOOP_STAGES, UNROLL, WS)
            acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, V_base, k_desc, v_desc, lut_row,
                                      it_lo + 2 * n_pairs, tl.minimum(it_hi, n_iter - 1), row0, col0, Lk, topk, s_kl,
                                      s_vl, qk_scale, offs_n, offs_d, BLOCK_N, BS, KPI, SPARSE, USE_TMA, False, F32,
                                      None, None, False)
        else:
            acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, V_base, k_desc, v_desc, lut_row, it_lo,
                                      tl.minimum(it_hi, n_iter - 1), row0, col0, Lk, topk, s_kl, s_vl, qk_scale, offs_n,
                                      offs_d, BLOCK_N, BS, KPI, SPARSE, USE_TMA, False, F32, LOOP_STAGES, UNROLL, WS)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, V_base, k_desc, v_desc, lut_row,
                                  tl.maximum(it_lo, n_iter - 1), it_hi, row0, col0, Lk, topk, s_kl, s_vl, qk_scale,
                                  offs_n, offs_d, BLOCK_N, BS, KPI, SPARSE, USE_TMA, True, F32, None, None, False)
    if WS and not FUSED_COMBINE:
        # Branch-free epilogue (automatic warp specialisation does not take a data-dependent branch after the
        # loop): whole items store the output, split parts their partial state, through predicated stores.
        out = _normalise(acc, l_i, mem, den, q, Q_base, s_ql, QR, KVH, KVL, KMS, BIAS, b, h, bh, offs_m, m_ok, s_qrb,
                         s_qrl, s_qrh, mem_eps, park_ptrs, D, MEM, HAS_LO, HAS_BIAS, F32, MEM_KC, MEM_MODE)
        rows_out = tl.where(parts == 1, Lq, 0)  # predicate as a bound: every row valid or none
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < rows_out)[:, None])
        tl.store(LSE + bh * Lq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < rows_out)
        slot = tl.maximum(u - n_full, 0)
        rows = tl.arange(0, BLOCK_M)
        rows_part = tl.where(parts > 1, BLOCK_M, 0)
        tl.store(PACC + (slot * BLOCK_M + rows[:, None]) * D + offs_d[None, :], acc, mask=(rows < rows_part)[:, None])
        tl.store(PML + (slot * 2 * BLOCK_M) + rows, m_i, mask=rows < rows_part)
        tl.store(PML + (slot * 2 * BLOCK_M) + BLOCK_M + rows, l_i, mask=rows < rows_part)
    elif parts == 1:
        # with MEM, the fused linear-memory read-out (inference): Q is read and O written once
        out = _normalise(acc, l_i, mem, den, q, Q_base, s_ql, QR, KVH, KVL, KMS, BIAS, b, h, bh, offs_m, m_ok, s_qrb,
                         s_qrl, s_qrh, mem_eps, park_ptrs, D, MEM, HAS_LO, HAS_BIAS, F32, MEM_KC, MEM_MODE)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None])
        tl.store(LSE + bh * Lq + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)
    else:
        slot = u - n_full
        rows = tl.arange(0, BLOCK_M)
        tl.store(PACC + (slot * BLOCK_M + rows[:, None]) * D + offs_d[None, :], acc)
        tl.store(PML + (slot * 2 * BLOCK_M) + rows, m_i)
        tl.store(PML + (slot * 2 * BLOCK_M) + BLOCK_M + rows, l_i)
        if FUSED_COMBINE:
            r = w - n_full
            tl.debug_barrier()  # every thread's partial stores precede the release below
            arrived = tl.atomic_add(SEM + r, 1, sem="acq_rel", scope="gpu")
            if arrived == parts - 1:  # the last part of this item merges all of them (fixed order: deterministic)
                acc, l_all, m_all = _merge_parts(PACC, PML, r, parts, BLOCK_M, D, True)
                out = acc / l_all[:, None]
                if MEM:
                    out += _memory_term(q, Q_base, s_ql, QR, KVH, KVL, KMS, BIAS, b, h, bh, offs_m, m_ok, s_qrb,
                                        s_qrl, s_qrh, mem_eps, D, HAS_LO, HAS_BIAS, F32, MEM_KC, MEM == 2)
                tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None])
                tl.store(LSE + bh * Lq + offs_m, m_all + tl.math.log2(l_all), mask=m_ok)
                tl.atomic_xchg(SEM + r, 0, sem="relaxed", scope="gpu")  # ready for the next launch / graph replay


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, LUT, q_desc, k_desc, v_desc, PACC, PML, SEM, QR, KVH, KVL, KMS, BIAS, PARK,
                     PQ, PK, PKP, BMAP, NK, NP, Lq, Lk, H, M, topk, n_full, n_parts, n_units, rows_q, rows_k,
                     s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh, s_qrb, s_qrl, s_qrh,
                     qk_scale, mem_eps,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
                     KPI: tl.constexpr, SPARSE: tl.constexpr, USE_TMA: tl.constexpr, DEVICE_DESC: tl.constexpr,
                     F32: tl.constexpr, MEM: tl.constexpr, HAS_LO: tl.constexpr, HAS_BIAS: tl.constexpr,
                     GROUP: tl.constexpr, SINGLE_LOOP: tl.constexpr, LOOP_STAGES: tl.constexpr,
                     UNROLL: tl.constexpr, WS: tl.constexpr, MEM_MODE: tl.constexpr, FUSED_COMBINE: tl.constexpr,
                     PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, WS_OUTER: tl.constexpr,
                     MEM_KC: tl.constexpr, PDL: tl.constexpr, SELECT: tl.constexpr, K_PAD: tl.constexpr,
                     SEL_DC: tl.constexpr, WRITE_MAP: tl.constexpr, HAS_PRE: tl.constexpr, SEARCH: tl.constexpr,
                     FIELD: tl.constexpr, K_TOP: tl.constexpr):
    """1-D grid over work units (see `_fwd_unit`): one unit per program, or (PERSISTENT) a grid of resident programs
    striding over the units. DEVICE_DESC: the bulk-tensor descriptors are built in the kernel (Q, K, V viewed as
    (rows, H*D) matrices) instead of on the host."""
    _pdl_entry(PDL)
    if DEVICE_DESC:
        q_desc = tl.make_tensor_descriptor(Q, shape=[rows_q, H * D], strides=[s_ql, 1], block_shape=[BLOCK_M, D])
        k_desc = tl.make_tensor_descriptor(K, shape=[rows_k, H * D], strides=[s_kl, 1], block_shape=[BLOCK_N, D])
        v_desc = tl.make_tensor_descriptor(V, shape=[rows_k, H * D], strides=[s_vl, 1], block_shape=[BLOCK_N, D])
    if PERSISTENT:
        for u in tl.range(tl.program_id(0), n_units, tl.num_programs(0), flatten=FLATTEN, warp_specialize=WS_OUTER):
            _fwd_unit(u, Q, K, V, O, LSE, LUT, q_desc, k_desc, v_desc, PACC, PML, SEM, QR, KVH, KVL, KMS, BIAS, PARK,
                      PQ, PK, PKP, BMAP, NK, NP, Lq, Lk, H, M, topk, n_full, n_parts,
                      s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh, s_qrb, s_qrl, s_qrh,
                      qk_scale, mem_eps, D, BLOCK_M, BLOCK_N, BS, KPI, SPARSE, USE_TMA, F32, MEM, HAS_LO, HAS_BIAS,
                      GROUP, SINGLE_LOOP, LOOP_STAGES, UNROLL, WS, MEM_MODE, FUSED_COMBINE, MEM_KC, SELECT, K_PAD,
                      SEL_DC, WRITE_MAP, HAS_PRE, SEARCH, FIELD, K_TOP)
    else:
        _fwd_unit(tl.program_id(0), Q, K, V, O, LSE, LUT, q_desc, k_desc, v_desc, PACC, PML, SEM, QR, KVH, KVL, KMS,
                  BIAS, PARK, PQ, PK, PKP, BMAP, NK, NP, Lq, Lk, H, M, topk, n_full, n_parts,
                  s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh, s_qrb, s_qrl, s_qrh,
                  qk_scale, mem_eps, D, BLOCK_M, BLOCK_N, BS, KPI, SPARSE, USE_TMA, F32, MEM, HAS_LO, HAS_BIAS,
                  GROUP, SINGLE_LOOP, LOOP_STAGES, UNROLL, WS, MEM_MODE, FUSED_COMBINE, MEM_KC, SELECT, K_PAD,
                  SEL_DC, WRITE_MAP, HAS_PRE, SEARCH, FIELD, K_TOP)
    _pdl_exit(PDL)


@triton.jit
def _attn_fwd_combine_kernel(O, LSE, PACC, PML, Q, QR, KVH, KVL, KMS, BIAS, Lq, H, M, n_full, n_parts,
                             s_ob, s_ol, s_oh, s_qb, s_ql, s_qh, s_qrb, s_qrl, s_qrh, mem_eps,
                             D: tl.constexpr, BLOCK_M: tl.constexpr, MEM: tl.constexpr, HAS_LO: tl.constexpr,
                             HAS_BIAS: tl.constexpr, F32: tl.constexpr, MEM_KC: tl.constexpr, PDL: tl.constexpr):
    """Grid (number of split items,): merges the partial softmax states of one split work item."""
    _pdl_entry(PDL)
    r = tl.program_id(0)
    w = n_full + r
    pid_m = w % M
    bh = w // M
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_m = pid_m * BLOCK_M + rows
    acc, l_all, m_all = _merge_parts(PACC, PML, r, n_parts, BLOCK_M, D, False)
    m_ok = offs_m < Lq
    out = acc / l_all[:, None]
    if MEM:
        Q_base = Q + b * s_qb + h * s_qh
        q = tl.load(Q_base + offs_m[:, None] * s_ql + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        out += _memory_term(q, Q_base, s_ql, QR, KVH, KVL, KMS, BIAS, b, h, bh, offs_m, m_ok, s_qrb, s_qrl, s_qrh,
                            mem_eps, D, HAS_LO, HAS_BIAS, F32, MEM_KC, MEM == 2)
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(LSE + bh * Lq + offs_m, m_all + tl.math.log2(l_all), mask=m_ok)
    _pdl_exit(PDL)


# ----------------------------------------------------------------------------------------------------------------
# Attention backward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _dq_loop(dq, q, do, lse, delta, K_base, V_base, lut_row, it0, it1, Lk, topk, s_kl, s_vl, qk_scale,
             offs_n, offs_d,
             BLOCK_N: tl.constexpr, BS: tl.constexpr, KPI: tl.constexpr, SPARSE: tl.constexpr, MASK: tl.constexpr,
             F32: tl.constexpr):
    for it in range(it0, it1):
        start, cols, ok = _key_tile(lut_row, it, Lk, topk, offs_n, BLOCK_N, BS, KPI, SPARSE)
        if MASK:
            k = tl.load(K_base + cols[:, None] * s_kl + offs_d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(V_base + cols[:, None] * s_vl + offs_d[None, :], mask=ok[:, None], other=0.0)
        else:
            k = tl.load(K_base + cols[:, None] * s_kl + offs_d[None, :])
            v = tl.load(V_base + cols[:, None] * s_vl + offs_d[None, :])
        if F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:
            p = tl.where(ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dsk = ds.to(K_base.dtype.element_ty)
        if F32:
            dsk = dsk.to(tl.float32)
        dq = tl.dot(dsk, k, dq)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, LUT,
                        Lq, Lk, H, M, topk,
                        s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh,
                        s_dob, s_dol, s_doh, s_dqb, s_dql, s_dqh,
                        qk_scale, sm_scale,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
                        KPI: tl.constexpr, SPARSE: tl.constexpr, F32: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < Lq
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dol + offs_d[None, :], mask=m_ok[:, None],
                 other=0.0)
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=m_ok)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=m_ok, other=0.0)
    if F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    K_base = K + b * s_kb + h * s_kh
    V_base = V + b * s_vb + h * s_vh
    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    if SPARSE:
        lut_row = LUT + (bh * M + pid_m) * topk
        n_iter = tl.cdiv(topk, KPI)
    else:
        lut_row = LUT
        n_iter = tl.cdiv(Lk, BLOCK_N)
    dq = _dq_loop(dq, q, do, lse, delta, K_base, V_base, lut_row, 0, n_iter - 1, Lk, topk, s_kl, s_vl, qk_scale,
                  offs_n, offs_d, BLOCK_N, BS, KPI, SPARSE, False, F32)
    dq = _dq_loop(dq, q, do, lse, delta, K_base, V_base, lut_row, n_iter - 1, n_iter, Lk, topk, s_kl, s_vl,
                  qk_scale, offs_n, offs_d, BLOCK_N, BS, KPI, SPARSE, True, F32)
    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dql + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit
def _reverse_lut_kernel(BMAP, RLUT, RCNT, M, NK,
                        M_PAD: tl.constexpr, NC: tl.constexpr):
    """Grid (cdiv(NK, NC), B*H): for every key block, the query blocks that selected it (ascending) and their
    count. BMAP (B*H, M, NK) int8 -> RLUT (B*H, NK, M) int32, RCNT (B*H, NK) int32."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid * NC + tl.arange(0, NC)
    ok = (offs_m < M)[:, None] & (offs_n < NK)[None, :]
    flags = tl.load(BMAP + bh * M * NK + offs_m[:, None] * NK + offs_n[None, :], mask=ok, other=0).to(tl.int32)
    pos = tl.cumsum(flags, axis=0) - 1
    mm = tl.zeros((M_PAD, NC), dtype=tl.int32) + offs_m[:, None]
    tl.store(RLUT + (bh * NK + offs_n[None, :]) * M + pos, mm, mask=ok & (flags > 0))
    tl.store(RCNT + bh * NK + offs_n, tl.sum(flags, axis=0), mask=offs_n < NK)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, RLUT, RCNT,
                          Lq, Lk, H, NK,
                          s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh,
                          s_dob, s_dol, s_doh, s_dkb, s_dkl, s_dkh, s_dvb, s_dvl, s_dvh,
                          qk_scale, sm_scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr,
                          F32: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    n_ok = offs_n < Lk
    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    if F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    Q_base = Q + b * s_qb + h * s_qh
    DO_base = DO + b * s_dob + h * s_doh
    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    if SPARSE:
        rl_row = RLUT + (bh * NK + pid_n) * tl.cdiv(Lq, BLOCK_M)
        n_iter = tl.load(RCNT + bh * NK + pid_n)
    else:
        rl_row = RLUT
        n_iter = tl.cdiv(Lq, BLOCK_M)
    for it in range(0, n_iter):
        if SPARSE:
            qb = tl.load(rl_row + it)
        else:
            qb = it
        offs_m = qb * BLOCK_M + offs_m0
        m_ok = offs_m < Lq
        q = tl.load(Q_base + offs_m[:, None] * s_ql + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        do = tl.load(DO_base + offs_m[:, None] * s_dol + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * Lq + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh * Lq + offs_m, mask=m_ok, other=0.0)
        if F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # Query rows past Lq were loaded as zeros (q, dO, lse, delta): their p_t is 1 and every product with them
        # vanishes, so no mask is needed.
        s_t = tl.dot(k, tl.trans(q))
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        pt = p_t.to(DO.dtype.element_ty)
        if F32:
            pt = pt.to(tl.float32)
        dv = tl.dot(pt, do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dst = ds_t.to(Q.dtype.element_ty)
        if F32:
            dst = dst.to(tl.float32)
        dk = tl.dot(dst, q, dk)
    dk = dk * sm_scale
    tl.store(DK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkl + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None])
    tl.store(DV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvl + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Launchers (plain Python; the custom ops below call them)
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected (B, L, H, D) query and key/value of equal shape, got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"query {tuple(q.shape)} and key {tuple(k.shape)} differ in batch, heads or head_dim")
    check_key_length(k)
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be 16, 32, 64, 128 or 256 for the Triton kernel, got {d}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for the Triton kernel, got {block_size}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"the Triton kernel takes bf16 or fp16 query/key/value of one dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")


def _f32_dot(x: torch.Tensor) -> bool:
    return _interpret() and x.dtype == torch.bfloat16


def _direct_call(*tensors) -> bool:
    """True when the custom op's dispatcher can be skipped: eager mode (not tracing/compiling) and no gradient
    needed. The op is still registered and used everywhere else (autograd, torch.compile, fake tensors)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _check_centering(key_centering: str) -> None:
    if key_centering not in ("heads", "none"):
        raise ValueError(f"`key_centering` must be 'heads' or 'none', got {key_centering!r}.")


def _prefix_arg(pooled_key_prefix: torch.Tensor | None, key: torch.Tensor, block_size: int):
    """Validated, contiguous fp32 pooled prefix (or None)."""
    if pooled_key_prefix is None:
        return None
    check_pooled_key_prefix(pooled_key_prefix, key, block_size)
    return pooled_key_prefix.detach().float().contiguous()


def _pooled_args(pooled_blocks, query: torch.Tensor, key: torch.Tensor, block_size: int, prefix):
    """Validated, contiguous fp32 `(pooled_query, pooled_key)` (or `(None, None)`)."""
    if pooled_blocks is None:
        return None, None
    num_prefix = 0 if prefix is None else prefix.shape[2]
    return tuple(t.detach().float().contiguous()
                 for t in check_pooled_blocks(pooled_blocks, query, key, block_size, num_prefix))


def select_key_blocks_triton(query: torch.Tensor, key: torch.Tensor, topk_ratio: float = 0.2,
                             block_size: int = 64, key_centering: str = "heads", write_map: bool = False,
                             pooled_key_prefix: torch.Tensor | None = None):
    """Triton block selection. Returns the `(B, H, M, topk)` int32 LUT (ascending) and, when `write_map`, the
    `(B, H, M, K)` int8 block map (else `None`). `pooled_key_prefix` (`(B, H, P, D)`, optional): the pooled key blocks
    of the first `P * block_size` keys ([`pool_key_blocks_triton`]); only the other key blocks are pooled."""
    _check_centering(key_centering)
    query, key = last_contiguous(query), last_contiguous(key)
    topk = num_selected_blocks(-(-key.shape[1] // block_size), topk_ratio)
    return _select(query, key, topk, block_size, key_centering == "heads", write_map,
                   _prefix_arg(pooled_key_prefix, key, block_size))


def pool_key_blocks_triton(key: torch.Tensor, block_size: int = 64, key_centering: str = "heads",
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `pool_key_blocks_naive`: `(B, H, ceil(L / block_size), D)` fp32 pooled (centred) key blocks;
    written into `out` (contiguous, that shape) when given (e.g. a cache's preallocated buffer)."""
    _check_centering(key_centering)
    key = last_contiguous(key)
    batch, length, heads, dim = key.shape
    shape = (batch, heads, triton.cdiv(length, block_size), dim)
    if out is not None:
        check_pool_out(out, key, block_size)
    if length == 0:
        return out if out is not None else key.new_empty(shape, dtype=torch.float32)
    _, pooled = _pool(key[:, :0], key, block_size, key_centering == "heads", out_k=out)
    return pooled


def _pool(query, key, block_size: int, center: bool, first_key_block: int = 0, out_k=None):
    """Mean-pooled query blocks and (centred) key blocks `first_key_block..`, (B, H, M, D) and (B, H, K - first, D)
    fp32, one launch."""
    batch, len_q, heads, dim = query.shape
    len_k = key.shape[1]
    num_q_blocks = triton.cdiv(len_q, block_size)
    num_k_blocks = triton.cdiv(len_k, block_size) - first_key_block
    dev = query.device
    pooled_q = new_empty((batch, heads, num_q_blocks, dim), device=dev, dtype=torch.float32)
    pooled_k = out_k if out_k is not None else new_empty((batch, heads, num_k_blocks, dim), device=dev,
                                                         dtype=torch.float32)
    if num_q_blocks + num_k_blocks == 0:
        return pooled_q, pooled_k
    h_pad = triton.next_power_of_2(heads)
    grid = (num_q_blocks + num_k_blocks, batch)
    strides = (query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2))
    if SELECT_CONFIG.get("pool", "heads") == "heads":
        _pool_heads_kernel[grid](
            query, key, pooled_q, pooled_k, len_q, len_k, num_q_blocks, num_k_blocks, first_key_block, *strides,
            H=heads, H_PAD=h_pad, D=dim, BLOCK=block_size, CENTER=center, **_pdl_launch(query),
            num_warps=SELECT_CONFIG.get("pool_warps", 4), num_stages=SELECT_CONFIG.get("pool_stages", 1),
        )
        return pooled_q, pooled_k
    tok = max(1, min(block_size, SELECT_CONFIG.get("pool_elems", 4096) // (h_pad * dim)))
    _pool_kernel[grid](
        query, key, pooled_q, pooled_k, len_q, len_k, num_q_blocks, num_k_blocks, first_key_block, *strides,
        H=heads, H_PAD=h_pad, D=dim, BLOCK=block_size, TOK=tok, CENTER=center,
        num_warps=SELECT_CONFIG.get("pool_warps", 4),
        num_stages=3 if not _interpret() else 1,
    )
    return pooled_q, pooled_k


def _pool_for_selection(query, key, topk: int, block_size: int, center: bool, write_map: bool, pooled_prefix=None,
                        pooled=None):
    """The pooling launch of a selection (none when `pooled = (pooled_q, pooled_k)` comes precomputed, e.g. from the
    RoPE step) and the buffers the top-k fills: `(lut, bmap or None, selection)` with `selection = (pooled_q,
    pooled_k, pooled_prefix, bmap, num_k_blocks, num_prefix)` (also the `selection` argument of
    `attention_forward`, which then selects in the attention kernel's prologue)."""
    batch, len_q, heads, _ = query.shape
    num_q_blocks = triton.cdiv(len_q, block_size)
    num_k_blocks = triton.cdiv(key.shape[1], block_size)
    num_prefix = 0 if pooled_prefix is None else pooled_prefix.shape[2]
    if pooled is not None:
        pooled_q, pooled_k = pooled
    else:
        pooled_q, pooled_k = _pool(query, key, block_size, center, first_key_block=num_prefix)
    lut = new_empty((batch, heads, num_q_blocks, topk), device=query.device, dtype=torch.int32)
    bmap = (new_empty((batch, heads, num_q_blocks, num_k_blocks), device=query.device, dtype=torch.int8)
            if write_map else None)
    return lut, bmap, (pooled_q, pooled_k, pooled_prefix, bmap, num_k_blocks, num_prefix)


def _select(query, key, topk: int, block_size: int, center: bool, write_map: bool, pooled_prefix=None, pooled=None):
    batch, _, heads, dim = query.shape
    num_q_blocks = triton.cdiv(query.shape[1], block_size)
    lut, bmap, (pooled_q, pooled_k, _, _, num_k_blocks, num_prefix) = _pool_for_selection(
        query, key, topk, block_size, center, write_map, pooled_prefix, pooled)
    if bmap is None:
        bmap = lut  # an unused pointer argument
    impl = SELECT_CONFIG.get("impl", "row")
    prefix = dict(HAS_PRE=num_prefix > 0)
    k_pad, threshold = _threshold_args(num_k_blocks, topk)
    select_stages = 1 if _interpret() else SELECT_CONFIG.get("select_stages", 1)
    pkp = pooled_prefix if num_prefix else pooled_k
    if impl == "row":
        dc = SELECT_CONFIG.get("dc") or min(dim, max(8, 4096 // k_pad))
        _select_row_kernel[(num_q_blocks, batch * heads)](
            pooled_q, pooled_k, pkp, lut, bmap, num_q_blocks, num_k_blocks, num_prefix, topk,
            K_PAD=k_pad, D=dim, DC=dc, WRITE_MAP=write_map, **prefix, num_warps=SELECT_CONFIG.get("num_warps", 4),
            num_stages=1,
        )
    elif impl == "rows":
        group = SELECT_CONFIG.get("G", 4)
        dc = SELECT_CONFIG.get("dc") or min(dim, max(1, 8192 // (k_pad * group)))
        _select_rows_kernel[(triton.cdiv(num_q_blocks, group), batch * heads)](
            pooled_q, pooled_k, pkp, lut, bmap, num_q_blocks, num_k_blocks, num_prefix, topk,
            G=group, K_PAD=k_pad, D=dim, DC=dc, WRITE_MAP=write_map, **prefix, **threshold,
            num_warps=SELECT_CONFIG.get("num_warps", 4), num_stages=select_stages,
        )
    elif impl == "group":
        group = SELECT_CONFIG.get("G", 16)
        dc = SELECT_CONFIG.get("dc") or min(dim, max(8, 8192 // k_pad))
        _select_kernel[(triton.cdiv(num_q_blocks, group), batch * heads)](
            pooled_q, pooled_k, pkp, lut, bmap, num_q_blocks, num_k_blocks, num_prefix, topk,
            G=group, K_PAD=k_pad, D=dim, DC=dc, WRITE_MAP=write_map, **prefix, **threshold, **_pdl_launch(query),
            num_warps=SELECT_CONFIG.get("num_warps", 8 if k_pad >= 256 else 4), num_stages=select_stages,
        )
    else:  # "torch": scores by a float32 matmul, torch.topk (for comparison)
        if num_prefix:
            pooled_k = torch.cat([pooled_prefix, pooled_k], dim=2)
        scores = pooled_q @ pooled_k.transpose(-1, -2)
        lut.copy_(scores.topk(topk, dim=-1).indices.sort(dim=-1).values)
        if write_map:
            bmap.zero_().scatter_(-1, lut.long(), 1)
    return lut, (bmap if write_map else None)


def _descriptor(x: torch.Tensor, rows: int, block_rows: int, dim: int):
    """2-D (B*L, H*D) bulk-copy descriptor over a (B, L, H, D) tensor, or None when its strides do not allow it."""
    b, length, h, d = x.shape
    if TensorDescriptor is None or not _descriptor_ok(x):
        return None
    return TensorDescriptor(x, [b * length, h * d], [x.stride(1), 1], [block_rows, dim])


def _descriptor_ok(x: torch.Tensor) -> bool:
    """A (B, L, H, D) tensor can be viewed as a (B*L, H*D) matrix with 16-byte aligned rows (bulk-tensor copies)."""
    b, length, h, d = x.shape
    if x.stride(2) != d or (b > 1 and x.stride(0) != length * x.stride(1)):
        return False
    return (x.stride(1) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0


def _ensure_allocator() -> None:
    """Kernels that build bulk-copy descriptors on the device need a global scratch allocator; install a torch
    one unless the application set its own."""
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")

        triton.set_allocator(alloc)


def _on_device(x: torch.Tensor) -> bool:
    """GPU-only launch features (bulk copies, resident-program counts) apply: a CUDA tensor, or the interpreter."""
    return x.is_cuda or _interpret()


def _split_plan(work: int, n_iter: int, cfg: dict, device) -> tuple[int, int]:
    """(programs doing whole items, parts per remaining item). `slots` = programs resident at once (multiprocessors
    x programs per multiprocessor); the items of the last, partial wave are split so that it is not mostly idle."""
    slots = cfg.get("slots")
    if slots is None:
        if _interpret() or not torch.cuda.is_available():
            return work, 1
        slots = _num_sms(device) * cfg.get("ctas_per_sm", 1)
    if slots <= 0 or work % slots == 0:
        return work, 1
    rest = work % slots
    parts = min(slots // rest, cfg.get("max_parts", 4), max(1, n_iter // 2))
    if parts < 2:
        return work, 1
    return work - rest, parts


_SM_COUNT: dict = {}


def _num_sms(device) -> int:
    device = torch.device(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


_SEMAPHORES: dict = {}
_RETIRED_SEMAPHORES: list = []


def _semaphores(n: int, device) -> torch.Tensor:
    """Arrival counters of the fused split-item merge: zero-initialised once per device and kept (every launch
    leaves them at zero again, so CUDA-graph replays reuse them). Grows when more are needed; a replaced buffer is
    kept alive, since a captured graph may still point to it. One stream at a time: two launches running
    concurrently on different streams would share the counters."""
    key = str(torch.device(device))
    buf = _SEMAPHORES.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED_SEMAPHORES.append(buf)
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _SEMAPHORES[key] = buf
    return buf


# Forward launch-configuration keys (`_config("fwd_sparse" | "fwd_dense")`, overridable via CONFIG_OVERRIDES):
#   KPI / BLOCK_M, BLOCK_N: tiles; num_warps, num_stages (kernel-level software pipelining), maxnreg;
#   tma: False | True ("host": descriptors built on the host) | "device" (built in the kernel);
#   ctas_per_sm, slots, max_parts: the split of the last wave;
#   group (sparse): 1, or 2 selected key blocks per online-softmax step;
#   single_loop: one main loop with every iteration masked (instead of peeling the masked last iteration);
#   loop_stages, unroll, ws: `tl.range(num_stages=, loop_unroll_factor=, warp_specialize=)` of the main loop;
#   fused_combine: split items merged by their last part (no second launch);
#   persistent (+ flatten, ws_outer): resident programs striding over the work units;
#   mem_mode: where the fused linear-memory read-out runs (0 epilogue, 1 denominator first, 2 all of it first and
#   held in registers, 3 / 4 all of it first and parked until the epilogue in the output tile / a float32 buffer,
#   5 epilogue, accumulated into the attention accumulator: one fp32 tile live instead of two);
#   memory_lo: the memory state as 16-bit hi + lo halves (about fp32 accuracy) instead of hi only;
#   mem_state: "bf16" (a float32 state is cast on the host, one more launch) or "f32" (read as float32 and split
#   in the kernel); a state passed already in the queries' 16-bit dtype is read as is (hi only, no cast);
#   mem_kc: the read-out's contraction in chunks of mem_kc state rows (query columns re-read from L2) instead of
#   one product with the whole (D, D) state (None / D).
FWD_KEYS = ("KPI", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg", "tma", "ctas_per_sm", "slots",
            "max_parts", "group", "single_loop", "loop_stages", "unroll", "ws", "fused_combine", "persistent",
            "flatten", "ws_outer", "mem_mode", "memory_lo", "mem_state", "mem_kc")


def _threshold_args(num_k_blocks: int, topk: int) -> tuple[int, dict]:
    """(K_PAD, the `_topk_rows` constexprs) of SELECT_CONFIG["search"]."""
    k_pad = max(16, triton.next_power_of_2(num_k_blocks))
    search = SELECT_CONFIG.get("search", "binary")
    if search not in SEARCH_STEPS:
        raise ValueError(f"SELECT_CONFIG['search'] must be one of {sorted(SEARCH_STEPS)}, got {search!r}")
    # radix4 packs three counts (each <= k_pad) into one reduction: fields of k_pad.bit_length() bits.
    # sort: tl.topk keeps a power-of-two number of keys, at least topk
    return k_pad, dict(SEARCH=search, FIELD=k_pad.bit_length(), K_TOP=min(k_pad, triton.next_power_of_2(topk)))


def attention_forward(q, k, v, lut, topk: int, block_size: int, scale: float, dense: bool, cfg: dict | None = None,
                      memory: tuple | None = None, selection: tuple | None = None):
    """Launches the forward kernel. Returns `(out, lse)` (lse base 2, (B, H, Lq) fp32). `memory`: optional
    `(query_raw, kv (B, H, D, D) fp32, kmean (B, H, D) fp32, bias (D,) fp32 or None, eps)` read-out added to the
    output; in place of `query_raw` the read-out's denominators `relu(q_raw) · kmean + eps` `(B, Lq, H)` float32
    (kmean and eps are then unused). `selection` (`_pool_for_selection`): the kernel selects each query block's key blocks itself and writes
    them to `lut` (and the block map) before attending. `cfg`: launch configuration (see FWD_KEYS), the measured
    default when None."""
    batch, len_q, heads, dim = q.shape
    len_k = k.shape[1]
    kind = "fwd_dense" if dense else ("fwd_sparse_memory" if memory is not None else "fwd_sparse")
    cfg = dict(cfg or _config(kind, dim, block_size))
    unknown = set(cfg) - set(FWD_KEYS)
    if unknown:
        raise ValueError(f"unknown forward launch option(s) {sorted(unknown)}")
    out = new_empty_like(q)
    lse = new_empty((batch, heads, len_q), device=q.device, dtype=torch.float32)
    if dense:
        block_m, block_n, kpi = cfg["BLOCK_M"], cfg["BLOCK_N"], 1
        n_iter = triton.cdiv(len_k, block_n)
    else:
        kpi = cfg.get("KPI", 1)
        block_m, block_n = block_size, block_size * kpi
        n_iter = triton.cdiv(topk, kpi)
    group = cfg.get("group", 1) if not dense and kpi == 1 else 1
    if group not in (1, 2):
        raise ValueError(f"`group` must be 1 or 2, got {group}")
    num_q_blocks = triton.cdiv(len_q, block_m)
    tma = cfg.get("tma", False)
    use_tma = bool(tma) and kpi == 1 and _on_device(q)
    device_desc = use_tma and tma == "device"
    q_desc = k_desc = v_desc = None
    if use_tma:
        if not all(_descriptor_ok(t) for t in (q, k, v)):
            use_tma = device_desc = False
        elif device_desc:
            _ensure_allocator()
        else:
            q_desc = _descriptor(q, batch * len_q, block_m, dim)
            k_desc = _descriptor(k, batch * len_k, block_n, dim)
            v_desc = _descriptor(v, batch * len_k, block_n, dim)
            use_tma = None not in (q_desc, k_desc, v_desc)
            if not use_tma:
                q_desc = k_desc = v_desc = None
    work = num_q_blocks * batch * heads
    n_full, n_parts = _split_plan(work, n_iter, cfg, q.device)
    n_split = (work - n_full) * n_parts
    n_units = n_full + n_split
    fused_combine = bool(cfg.get("fused_combine", False)) and n_split > 0
    if n_split:
        pacc = new_empty((n_split, block_m, dim), device=q.device, dtype=torch.float32)
        pml = new_empty((n_split, 2, block_m), device=q.device, dtype=torch.float32)
    else:
        pacc = pml = lse
    sem = _semaphores(work - n_full, q.device) if fused_combine else lse
    has_lo = False
    if memory is not None:
        q_raw, kvp, kms, bias, mem_eps = memory
        den_given = q_raw.dim() == 3  # the denominators, float32 (B, Lq, H): checked by the caller
        if den_given:
            kms = lse
        else:
            q_raw = last_contiguous(q_raw)
            kms = kms.float().contiguous()
        lo = bool(cfg.get("memory_lo", False))
        if _f32_dot(q):  # interpreter, bf16: fp32 state, fp32 dot
            kv_hi, kv_lo = kvp.float().contiguous(), None
        elif kvp.dtype == torch.float32 and cfg.get("mem_state", "bf16") == "f32":
            kv_hi, kv_lo, has_lo = kvp.contiguous(), None, lo  # split into 16-bit halves in the kernel
        elif kvp.dtype == q.dtype:
            kv_hi, kv_lo = kvp.contiguous(), None
        else:
            kvp = kvp.float()
            kv_hi = kvp.to(q.dtype).contiguous()
            kv_lo = (kvp - kv_hi.float()).to(q.dtype).contiguous() if lo else None
        has_lo = has_lo or kv_lo is not None
        bias = None if bias is None else bias.float().contiguous()
        qr_strides = (q_raw.stride(0), q_raw.stride(1), q_raw.stride(2))
    else:
        q_raw = kv_hi = kv_lo = kms = bias = None
        mem_eps, qr_strides = 0.0, (0, 0, 0)
    mem_args = tuple(t if t is not None else d for t, d in ((q_raw, q), (kv_hi, lse), (kv_lo, lse), (kms, lse),
                                                            (bias, lse)))
    mem_kc = int(cfg.get("mem_kc") or dim)
    if memory is not None and (mem_kc < 16 or mem_kc > dim or dim % mem_kc):
        raise ValueError(f"`mem_kc` must divide head_dim {dim} and be >= 16, got {mem_kc}")
    mem_mode = int(cfg.get("mem_mode", 0))
    if mem_mode not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"`mem_mode` must be 0, 1, 2, 3, 4 or 5, got {mem_mode}")
    park = out
    if memory is not None and mem_mode == 4:
        park = torch.empty_like(out, dtype=torch.float32)  # same layout as `out`: the kernel uses out's strides
        assert park.stride() == out.stride()
    mem_flags = dict(MEM=0 if memory is None else (2 if den_given else 1), HAS_LO=has_lo, HAS_BIAS=bias is not None,
                     MEM_KC=mem_kc)
    if selection is not None and not dense:
        pooled_q, pooled_k, pooled_prefix, bmap, num_k_blocks, num_prefix = selection
        k_pad, threshold = _threshold_args(num_k_blocks, topk)
        sel_dc = SELECT_CONFIG.get("fused_dc") or min(dim, max(8, 4096 // k_pad))
        sel_args = (pooled_q, pooled_k, pooled_prefix if num_prefix else pooled_k, bmap if bmap is not None else lut,
                    num_k_blocks, num_prefix)
        sel_flags = dict(SELECT=True, K_PAD=k_pad, SEL_DC=sel_dc, WRITE_MAP=bmap is not None, HAS_PRE=num_prefix > 0,
                         **threshold)
    else:
        sel_args = (lse, lse, lse, lse, 0, 0)
        sel_flags = dict(SELECT=False, K_PAD=16, SEL_DC=16, WRITE_MAP=False, HAS_PRE=False, SEARCH="binary", FIELD=5,
                         K_TOP=16)
    persistent = bool(cfg.get("persistent", False))
    grid = (n_units,)
    if persistent:
        slots = cfg.get("slots") or (_num_sms(q.device) * cfg.get("ctas_per_sm", 1) if q.is_cuda else n_units)
        grid = (max(1, min(n_units, slots)),)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        launch["maxnreg"] = cfg["maxnreg"]
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, lut if lut is not None else lse,
        q_desc if q_desc is not None else q, k_desc if k_desc is not None else k, v_desc if v_desc is not None else v,
        pacc, pml, sem, *mem_args, park, *sel_args,
        len_q, len_k, heads, num_q_blocks, topk, n_full, n_parts, n_units, batch * len_q, batch * len_k,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), *qr_strides,
        scale * LOG2E, mem_eps,
        D=dim, BLOCK_M=block_m, BLOCK_N=block_n, BS=block_size, KPI=kpi, SPARSE=not dense, USE_TMA=use_tma,
        DEVICE_DESC=device_desc, F32=_f32_dot(q), **mem_flags,
        GROUP=group, SINGLE_LOOP=bool(cfg.get("single_loop", False)), LOOP_STAGES=cfg.get("loop_stages"),
        UNROLL=cfg.get("unroll"), WS=bool(cfg.get("ws", False)), MEM_MODE=mem_mode,
        FUSED_COMBINE=fused_combine, PERSISTENT=persistent, FLATTEN=bool(cfg.get("flatten", False)),
        WS_OUTER=bool(cfg.get("ws_outer", False)), **sel_flags, **_pdl_launch(q), **launch,
    )
    if n_split and not fused_combine:
        _attn_fwd_combine_kernel[(work - n_full,)](
            out, lse, pacc, pml, q, *mem_args, len_q, heads, num_q_blocks, n_full, n_parts,
            out.stride(0), out.stride(1), out.stride(2), q.stride(0), q.stride(1), q.stride(2), *qr_strides, mem_eps,
            D=dim, BLOCK_M=block_m, **mem_flags, F32=_f32_dot(q), **_pdl_launch(q), num_warps=4,
        )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, lut, bmap, block_size: int, scale: float, dense: bool,
                       cfg: dict | None = None):
    """Launches the backward kernels. Returns `(dq, dk, dv)`."""
    batch, len_q, heads, dim = q.shape
    len_k = k.shape[1]
    cfg = dict(cfg or _config("bwd_dense" if dense else "bwd_sparse", dim, block_size))
    dout = last_contiguous(dout)
    dq, dk, dv = new_empty_like(q), new_empty_like(k), new_empty_like(v)
    delta = new_empty_like(lse)
    if dense:
        block_m, block_n, kpi = cfg["BLOCK_M"], cfg["BLOCK_N"], 1
        topk, num_q_blocks, num_k_blocks = 0, triton.cdiv(len_q, block_m), triton.cdiv(len_k, block_n)
        lut = rlut = rcnt = lse
    else:
        kpi = cfg.get("KPI", 1)
        block_m = block_n = block_size
        topk = lut.shape[-1]
        num_q_blocks, num_k_blocks = triton.cdiv(len_q, block_size), triton.cdiv(len_k, block_size)
    common = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _attn_bwd_dq_kernel[(num_q_blocks, batch * heads)](
        q, k, v, out, dout, dq, lse, delta, lut,
        len_q, len_k, heads, num_q_blocks, topk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        scale * LOG2E, scale,
        D=dim, BLOCK_M=block_m, BLOCK_N=block_n * kpi if not dense else block_n, BS=block_size, KPI=kpi,
        SPARSE=not dense, F32=_f32_dot(q), **common,
    )
    if not dense:
        rlut = new_empty((batch * heads, num_k_blocks, num_q_blocks), device=q.device, dtype=torch.int32)
        rcnt = new_empty((batch * heads, num_k_blocks), device=q.device, dtype=torch.int32)
        m_pad = max(16, triton.next_power_of_2(num_q_blocks))
        nc = max(1, min(64, 8192 // m_pad))
        _reverse_lut_kernel[(triton.cdiv(num_k_blocks, nc), batch * heads)](
            bmap, rlut, rcnt, num_q_blocks, num_k_blocks, M_PAD=m_pad, NC=nc, num_warps=4,
        )
    if dense:
        block_m, block_n = cfg.get("DKV_BLOCK_M", block_m), cfg.get("DKV_BLOCK_N", block_n)
        num_k_blocks = triton.cdiv(len_k, block_n)
    common = dict(num_warps=cfg.get("dkv_num_warps", cfg["num_warps"]),
                  num_stages=cfg.get("dkv_num_stages", cfg["num_stages"]))
    _attn_bwd_dkdv_kernel[(num_k_blocks, batch * heads)](
        q, k, v, dout, dk, dv, lse, delta, rlut, rcnt,
        len_q, len_k, heads, num_k_blocks,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        scale * LOG2E, scale,
        D=dim, BLOCK_M=block_m, BLOCK_N=block_n, SPARSE=not dense, F32=_f32_dot(q), **common,
    )
    return dq, dk, dv


def _block_map_from_lut(lut: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    bmap = torch.zeros((*lut.shape[:-1], num_k_blocks), device=lut.device, dtype=torch.int8)
    return bmap.scatter_(-1, lut.long(), 1)


# ----------------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------------


def _bsa_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: Optional[torch.Tensor], topk: int,
                block_size: int, center: bool, scale: float, dense: bool, pooled_prefix: Optional[torch.Tensor],
                pooled_q: Optional[torch.Tensor] = None, pooled_k: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_k_blocks = triton.cdiv(k.shape[1], block_size)
    pooled = None if pooled_q is None else (pooled_q, pooled_k)
    if dense:
        lut, bmap = q.new_empty((0,), dtype=torch.int32), q.new_empty((0,), dtype=torch.int8)
    elif block_index is None and SELECT_CONFIG.get("fused"):
        lut, bmap, selection = _pool_for_selection(q, k, topk, block_size, center, True, pooled_prefix, pooled)
        out, lse = attention_forward(q, k, v, lut, topk, block_size, scale, dense, selection=selection)
        return out, lse, lut, bmap
    elif block_index is None:
        lut, bmap = _select(q, k, topk, block_size, center, write_map=True, pooled_prefix=pooled_prefix,
                            pooled=pooled)
    else:
        lut = block_index.to(torch.int32).sort(dim=-1).values.contiguous()  # kernels expect ascending
        bmap = _block_map_from_lut(lut, num_k_blocks)
    out, lse = attention_forward(q, k, v, lut if not dense else None, topk, block_size, scale, dense)
    return out, lse, lut, bmap


_bsa_fwd_op = torch.library.custom_op("diffusers_hybrid::block_sparse_attn_fwd", mutates_args=())(_bsa_fwd_impl)


@_bsa_fwd_op.register_fake
def _(q, k, v, block_index, topk, block_size, center, scale, dense, pooled_prefix, pooled_q=None, pooled_k=None):
    batch, len_q, heads, _ = q.shape
    num_q_blocks = -(-len_q // block_size)
    num_k_blocks = -(-k.shape[1] // block_size)
    lse = q.new_empty((batch, heads, len_q), dtype=torch.float32)
    if dense:
        lut, bmap = q.new_empty((0,), dtype=torch.int32), q.new_empty((0,), dtype=torch.int8)
    else:
        lut = q.new_empty((batch, heads, num_q_blocks, topk), dtype=torch.int32)
        bmap = q.new_empty((batch, heads, num_q_blocks, num_k_blocks), dtype=torch.int8)
    return torch.empty_like(q), lse, lut, bmap


@torch.library.custom_op("diffusers_hybrid::block_sparse_attn_bwd", mutates_args=())
def _bsa_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, lut: torch.Tensor, bmap: torch.Tensor, block_size: int, scale: float, dense: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, lut, bmap, block_size, scale, dense)


@_bsa_bwd_op.register_fake
def _(dout, q, k, v, out, lse, lut, bmap, block_size, scale, dense):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _bsa_setup_context(ctx, inputs, output):
    q, k, v, _block_index, _topk, block_size, _center, scale, dense, _pooled_prefix, _pooled_q, _pooled_k = inputs
    out, lse, lut, bmap = output
    ctx.save_for_backward(q, k, v, out, lse, lut, bmap)
    ctx.block_size, ctx.scale, ctx.dense = block_size, scale, dense
    ctx.set_materialize_grads(False)


def _bsa_backward(ctx, dout, _dlse, _dlut, _dbmap):
    q, k, v, out, lse, lut, bmap = ctx.saved_tensors
    if dout is None:
        return (None,) * 12
    dq, dk, dv = _bsa_bwd_op(dout, q, k, v, out, lse, lut, bmap, ctx.block_size, ctx.scale, ctx.dense)
    return (dq, dk, dv) + (None,) * 9


_bsa_fwd_op.register_autograd(_bsa_backward, setup_context=_bsa_setup_context)


def _bsa_memory_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_raw: torch.Tensor,
                       kv_proj: torch.Tensor, kmean: torch.Tensor, bias: Optional[torch.Tensor], topk: int,
                       block_size: int, center: bool, scale: float, dense: bool, eps: float,
                       pooled_prefix: Optional[torch.Tensor], pooled_q: Optional[torch.Tensor] = None,
                       pooled_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    memory = (query_raw, kv_proj, kmean, bias, eps)
    pooled = None if pooled_q is None else (pooled_q, pooled_k)
    if not dense and SELECT_CONFIG.get("fused"):
        lut, _, selection = _pool_for_selection(q, k, topk, block_size, center, False, pooled_prefix, pooled)
        return attention_forward(q, k, v, lut, topk, block_size, scale, dense, memory=memory, selection=selection)[0]
    lut = None if dense else _select(q, k, topk, block_size, center, write_map=False, pooled_prefix=pooled_prefix,
                                     pooled=pooled)[0]
    out, _ = attention_forward(q, k, v, lut, topk, block_size, scale, dense, memory=memory)
    return out


_bsa_memory_fwd_op = torch.library.custom_op("diffusers_hybrid::block_sparse_attn_memory_fwd",
                                             mutates_args=())(_bsa_memory_fwd_impl)


@_bsa_memory_fwd_op.register_fake
def _(q, k, v, query_raw, kv_proj, kmean, bias, topk, block_size, center, scale, dense, eps, pooled_prefix,
      pooled_q=None, pooled_k=None):
    return torch.empty_like(q)


def project_memory_state(kv_state: torch.Tensor, proj_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The linear memory's state with the output projection folded in, `KV' = KV @ W.T` per head (float32, `(B, H,
    D, D)`): `linear_proj(q · KV / den) = (q · KV') / den + bias`. A caller that keeps the state between passes can
    project it once and pass it with `state_is_projected=True`."""
    kv = kv_state.detach().float()
    if proj_weight is not None:
        kv = torch.matmul(kv, proj_weight.detach().float().t())
    return kv.contiguous()


def block_sparse_attention_with_memory_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_raw: torch.Tensor,
    kv_state: torch.Tensor,
    kmean_state: torch.Tensor,
    *,
    eps: float = 1e-6,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    topk_ratio: float = 1.0,
    block_size: int = 64,
    key_centering: str = "heads",
    scale: float | None = None,
    dense: bool = False,
    pooled_key_prefix: torch.Tensor | None = None,
    state_is_projected: bool = False,
    pooled_blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
    memory_denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    `block_sparse_attention(query, key, value) + linear_proj(linear_memory_read(query, query_raw, kv, kmean))` with
    the read-out fused into the attention kernel (inference: `query` is the RoPE'd query, used as the read-out's
    numerator query, spec 1.3). `linear_proj` (`x @ proj_weight.T + proj_bias`, shared by the heads) is folded into
    the state: `KV' = KV @ W.T` per head ([`project_memory_state`]). Under autograd it falls back to the unfused,
    differentiable ops.

    Args:
        query_raw (`(B, Lq, H, D)`): the un-RoPE'd query (denominator). kv_state (`(B, H, D, D)`), kmean_state
            (`(B, H, D)`): float32 memory state. proj_weight (`(D, D)`), proj_bias (`(D,)`): optional projection.
        pooled_key_prefix (`(B, H, P, D)`, *optional*): pooled key blocks of the first `P * block_size` keys (see
            [`select_key_blocks_triton`]).
        state_is_projected (`bool`): `kv_state` is already `KV'` (`proj_weight` then only checked to be None).
        pooled_blocks (`tuple`, *optional*): precomputed `(pooled_query, pooled_key)` (see
            [`block_sparse_attention_triton`]).
        memory_denominator (`(B, Lq, H)` float32, *optional*): the read-out's denominators `relu(query_raw) ·
            kmean_state + eps`, precomputed (e.g. by the RoPE step); then pass `query_raw=None` and `kmean_state=None`.
            Inference only (no gradient flows through them).

    Returns:
        `(B, Lq, H, D)` in the dtype of `query`.

    Raises:
        `ValueError`: for a `kv_state` / `kmean_state` that requires grad (with grad enabled): neither branch passes
            a gradient to the memory state (the callers absorb detached keys and values).
    """
    check_memory_query(query, query_raw, kmean_state, memory_denominator)
    check_memory_state(query, query_raw, kv_state, kmean_state)
    check_state_without_grad(kv_state, kmean_state)
    if state_is_projected and proj_weight is not None:
        raise ValueError("`state_is_projected=True` takes the projection folded into `kv_state`; pass no "
                         "`proj_weight`.")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            query, key, value, query_raw, proj_weight, proj_bias)):
        if memory_denominator is not None:
            raise ValueError("`memory_denominator` is for inference: its gradient w.r.t. the raw query is not kept; "
                             "pass `query_raw` and `kmean_state` under autograd")
        from ..linear_memory.triton_kernel import linear_memory_read_triton

        out = block_sparse_attention_triton(query, key, value, topk_ratio=topk_ratio, block_size=block_size,
                                            key_centering=key_centering, scale=scale, dense=dense,
                                            pooled_key_prefix=pooled_key_prefix, pooled_blocks=pooled_blocks)
        memory = linear_memory_read_triton(query, query_raw, kv_state.float(), kmean_state, eps=eps)
        if proj_weight is not None:
            memory = torch.nn.functional.linear(memory.to(proj_weight.dtype), proj_weight, proj_bias)
        elif proj_bias is not None:
            memory = memory + proj_bias.float()
        return out + memory.to(out.dtype)
    _check_centering(key_centering)
    _check_inputs(query, key, value, block_size)
    query, key, value = (last_contiguous(t) for t in (query, key, value))
    if memory_denominator is None:
        query_raw, kmean_state = last_contiguous(query_raw), kmean_state.detach().float().contiguous()
    else:  # the kernel reads the denominators where it would read q_raw; the op's kmean argument is then unused
        query_raw = kmean_state = memory_denominator.detach().float()
    num_k_blocks = -(-key.shape[1] // block_size)
    topk = num_selected_blocks(num_k_blocks, topk_ratio)
    dense = dense or topk == num_k_blocks
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    kv = kv_state.detach() if state_is_projected else project_memory_state(kv_state, proj_weight)
    bias = None if proj_bias is None else proj_bias.detach().float()
    prefix = None if dense else _prefix_arg(pooled_key_prefix, key, block_size)
    pooled_q, pooled_k = (None, None) if dense else _pooled_args(pooled_blocks, query, key, block_size, prefix)
    op = _bsa_memory_fwd_impl if _direct_call() else _bsa_memory_fwd_op
    return op(query, key, value, query_raw, kv.contiguous(), kmean_state, bias, topk,
              block_size, key_centering == "heads", float(scale), bool(dense), float(eps), prefix, pooled_q, pooled_k)


def block_sparse_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    topk_ratio: float = 1.0,
    block_size: int = 64,
    key_centering: str = "heads",
    scale: float | None = None,
    dense: bool = False,
    block_index: torch.Tensor | None = None,
    pooled_key_prefix: torch.Tensor | None = None,
    pooled_blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """
    Block-sparse softmax attention (selection included) through the Triton kernels; same contract as
    `block_sparse_attention_naive` with `select_key_blocks_naive`.

    Args:
        query (`(B, Lq, H, D)`), key / value (`(B, Lk, H, D)`): bf16 or fp16, last dimension contiguous.
        topk_ratio (`float`): fraction of key blocks kept per query block (`max(1, floor(ratio * K))`).
        block_size (`int`): selection block, a power of two >= 16 (64 in the model).
        key_centering (`str`): `"heads"` (official) or `"none"`.
        scale (`float`, *optional*): softmax scale, `1/sqrt(D)` by default.
        dense (`bool`): attend to every key (no selection): the dispatch sets it when the ratio keeps every block.
        block_index (`(B, H, ceil(Lq/bs), topk)` integer tensor, *optional*): precomputed selection (skips ours):
            exactly that shape (a batch-1 index is not broadcast), every index in `[0, K)` and unique within its row
            (any order); checked at a device sync (benchmarks and tests pass it, the model never does).
        pooled_key_prefix (`(B, H, P, D)` float32, *optional*): the pooled (centred) key blocks of the first
            `P * block_size` keys ([`pool_key_blocks_triton`]); the selection pools only the remaining keys.
        pooled_blocks (`tuple`, *optional*): `(pooled_query, pooled_key)`, float32: the mean-pooled query blocks
            `(B, H, M, D)` and the pooled key blocks after the prefix, `(B, H, K - P, D)`, computed elsewhere (the
            RoPE step, `rope_chunk_into_window_triton`): the selection then pools nothing.

    Returns:
        `(B, Lq, H, D)` tensor in the dtype of `query`; differentiable w.r.t. query, key and value.
    """
    _check_centering(key_centering)
    _check_inputs(query, key, value, block_size)
    query, key, value = (last_contiguous(t) for t in (query, key, value))
    num_k_blocks = -(-key.shape[1] // block_size)
    if block_index is not None:
        check_block_index(block_index, query, key, block_size)
        topk = block_index.shape[-1]
        dense = False
    else:
        topk = num_selected_blocks(num_k_blocks, topk_ratio)
        dense = dense or topk == num_k_blocks
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    selects = not dense and block_index is None
    prefix = _prefix_arg(pooled_key_prefix, key, block_size) if selects else None
    pooled_q, pooled_k = _pooled_args(pooled_blocks, query, key, block_size, prefix) if selects else (None, None)
    # Eager inference skips the dispatcher (its overhead is not negligible next to the kernels).
    op = _bsa_fwd_impl if _direct_call(query, key, value) else _bsa_fwd_op
    out, _lse, _lut, _bmap = op(query, key, value, block_index, topk, block_size, key_centering == "heads",
                                float(scale), bool(dense), prefix, pooled_q, pooled_k)
    return out


__all__ = [
    "CONFIG_OVERRIDES",
    "FWD_KEYS",
    "SELECT_CONFIG",
    "attention_backward",
    "attention_forward",
    "block_sparse_attention_triton",
    "block_sparse_attention_with_memory_triton",
    "pool_key_blocks_triton",
    "project_memory_state",
    "select_key_blocks_triton",
]
