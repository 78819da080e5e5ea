# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Triton kernels for the linear-attention memory (absorption and read-out); see `naive.py` for the math.

- Absorption: per (batch, head, column block of D, token split) a program loads each tile of raw keys once (as its
  even and odd channels), RoPEs it in registers (fp32, rounded to the key dtype as `apply_rotary_emb` does) and
  accumulates `R(k)ᵀ v` (tensor cores, fp32 accumulators) and `Σ relu(k_raw)` over its tokens: it reads the raw keys,
  the values and the small RoPE tables, no RoPE'd copy of the keys. With one split it writes the new running means
  directly, otherwise a second small launch sums the splits in a fixed order (deterministic, no atomics) and folds in
  the old state.
- Absorption of keys given RoPE'd (`key_roped`, e.g. a cache's history one temporal shift away from its absorption
  positions): the RoPE'd tiles go into the product as loaded, and the split sum rotates the sums' key rows once. The
  split sum can write into the old state's own buffers and also write the state times a projection weight.
- Read-out: per (batch, head, run of token blocks) `(q_num · kv) / (relu(q_raw) · kmean + eps)`, the D×D state loaded
  once per program; backward gives the gradients w.r.t. `query_numerator` and `query_raw` (the state is detached).

Both are `torch.library.custom_op`s with fake implementations (torch.compile / CUDA graphs); the read-out has a
registered autograd formula.
"""

import os

import torch

if not torch.cuda.is_available():  # CPU only: run the kernels through Triton's interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ..utils import last_contiguous, new_empty, new_empty_like  # noqa: E402
from .naive import (  # noqa: E402
    check_absorb_args,
    check_absorb_out,
    check_memory_state,
    check_state_without_grad,
    project_state,
)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_mode(x: torch.Tensor) -> tuple[bool, str]:
    """(upcast operands to fp32, input precision). The interpreter mis-multiplies bf16, so it upcasts; fp32 operands
    on the GPU use 3xTF32 (about fp32 accuracy, still on tensor cores)."""
    if _interpret():
        return True, "ieee"
    return x.dtype == torch.float32, "tf32x3"


def _split_state(x: torch.Tensor) -> bool:
    """Read-out: split the fp32 state into 16-bit hi + lo halves (GPU, 16-bit queries)."""
    return not _interpret() and x.dtype in (torch.bfloat16, torch.float16)


# Launch parameters (benchmarks override); defaults measured on an H100. Keys: absorb_tokens (min tokens per program),
# absorb_progs_per_sm, absorb_be (state columns per program), absorb_warps, absorb_stages, absorb_finish_rows (state
# rows per program of the split sum); read_bm, read_warps,
# read_progs_per_sm, read_stages, read_bwd_warps.
# Absorption (session 8, fused RoPE on pair words; benchmarks/RESULTS.md round 9): no software pipelining (55 us vs
# 66 us with 3 stages: its operands are computed in registers, so the loads cannot be prefetched into shared memory
# anyway), 8 state rows per program of the split sum, key sums on the tensor cores (41.5 us vs 49.2 us).
# Keys given RoPE'd (`_absorb_roped_kernel`): loaded tiles, so the loads are software-pipelined
# (absorb_roped_stages).
LM_CONFIG: dict = {"absorb_tokens": 128, "absorb_stages": 1, "absorb_finish_rows": 8, "absorb_ksum": "dot",
                   "absorb_roped_stages": 3, "read_bm": 128, "read_warps": 8, "read_progs_per_sm": 8}
# absorb_ksum: "reduce" (a cross-thread sum of relu(k_raw) per token tile) | "dot" (tensor cores: ones @ relu(k_raw)).
# Rows of the ones matrix of the "dot" sums: the smallest M of a tensor-core product.
KSUM_ROWS = tl.constexpr(16)


@triton.jit
def _pair_halves(words, HALF_DTYPE: tl.constexpr):
    """The two values packed in each integer word (two 16-bit floats in an int32, two float32 in an int64; the lower
    address, i.e. the even channel, in the low half), as HALF_DTYPE."""
    if HALF_DTYPE.primitive_bitwidth == 16:
        w = words.to(tl.uint32, bitcast=True)
        low = (w & 0xFFFF).to(tl.uint16).to(HALF_DTYPE, bitcast=True)
        high = (w >> 16).to(tl.uint16).to(HALF_DTYPE, bitcast=True)
    else:
        w = words.to(tl.uint64, bitcast=True)
        low = (w & 0xFFFFFFFF).to(tl.uint32).to(HALF_DTYPE, bitcast=True)
        high = (w >> 32).to(tl.uint32).to(HALF_DTYPE, bitcast=True)
    return low, high


@triton.jit
def _absorb_kernel(KRAW, V, COS, SIN, KV_OLD, KM_OLD, KV_OUT, KM_OUT, PART_KV, PART_KM,
                   S, H, tokens_per_split, w_old, w_new,
                   s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_cl, s_cd, s_sl, s_sd,
                   D: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr, DIRECT: tl.constexpr,
                   F32: tl.constexpr, PREC: tl.constexpr, KSUM_DOT: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                   KEY_DTYPE: tl.constexpr):
    """Grid (B*H, D // BE, splits). KRAW holds the raw keys (of KEY_DTYPE) viewed as one integer word per channel pair
    and COS / SIN the float32 tables likewise (`_pair_halves`): the even and odd channels come as two (BT, D/2) tiles,
    the rotation of each pair is element-wise between the two (no register shuffles), and the state's even and odd
    rows are two products, `R(k)_evenᵀ v` and `R(k)_oddᵀ v`, stored interleaved. The same raw tiles give
    `Σ relu(k_raw)`. KSUM_DOT: those sums on the tensor cores (a (KSUM_ROWS, BT) matrix of ones times relu(k_raw),
    exact: 16-bit inputs, fp32 accumulation) instead of a cross-thread reduction per tile. BF16_BY_HAND (interpreter,
    bf16 keys): its fp32 -> bf16 cast truncates, so the RoPE'd keys are rounded to the nearest bf16 by hand (kept in
    fp32: the interpreter multiplies in fp32 anyway)."""
    bh = tl.program_id(0)
    pe = tl.program_id(1)
    sp = tl.program_id(2)
    n_split = tl.num_programs(2)
    b = (bh // H).to(tl.int64)  # a batch offset of a large cache buffer can pass 2**31 elements
    h = bh % H
    HALF: tl.constexpr = D // 2
    offs_p = tl.arange(0, HALF)
    offs_e = pe * BE + tl.arange(0, BE)
    offs_t = tl.arange(0, BT)
    acc_even = tl.zeros((HALF, BE), dtype=tl.float32)
    acc_odd = tl.zeros((HALF, BE), dtype=tl.float32)
    ksum_even = tl.zeros((HALF,), dtype=tl.float32)
    ksum_odd = tl.zeros((HALF,), dtype=tl.float32)
    if KSUM_DOT:
        ones = tl.full((KSUM_ROWS, BT), 1.0, dtype=KEY_DTYPE)
        ksum_rows_even = tl.zeros((KSUM_ROWS, HALF), dtype=tl.float32)
        ksum_rows_odd = tl.zeros((KSUM_ROWS, HALF), dtype=tl.float32)
    t0 = sp * tokens_per_split
    t1 = tl.minimum(S, t0 + tokens_per_split)
    for t in range(t0, t1, BT):
        rows = t + offs_t
        ok = rows < t1
        # one word per channel pair: contiguous, vectorised loads (two strided loads of the halves cost 4x more)
        pairs = tl.load(KRAW + b * s_kb + h * s_kh + rows[:, None] * s_kl + offs_p[None, :], mask=ok[:, None],
                        other=0)
        k_even, k_odd = _pair_halves(pairs, KEY_DTYPE)
        v = tl.load(V + b * s_vb + h * s_vh + rows[:, None] * s_vl + offs_e[None, :], mask=ok[:, None], other=0.0)
        # Wan's tables repeat each angle for both channels of a pair: the low half of a float32 pair is the angle's
        c = _pair_halves(tl.load(COS + rows[:, None] * s_cl + offs_p[None, :] * s_cd, mask=ok[:, None], other=0),
                         tl.float32)[0]
        s = _pair_halves(tl.load(SIN + rows[:, None] * s_sl + offs_p[None, :] * s_sd, mask=ok[:, None], other=0),
                         tl.float32)[0]
        ke, ko = k_even.to(tl.float32), k_odd.to(tl.float32)
        r_even = ke * c - ko * s
        r_odd = ke * s + ko * c
        # rounded to the key dtype like `apply_rotary_emb`: the products then run on 16-bit tensor cores with the
        # reference's numerics
        if BF16_BY_HAND:
            bits = r_even.to(tl.uint32, bitcast=True)
            r_even = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
            bits = r_odd.to(tl.uint32, bitcast=True)
            r_odd = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        else:
            r_even = r_even.to(KEY_DTYPE)
            r_odd = r_odd.to(KEY_DTYPE)
        if F32:
            acc_even = tl.dot(tl.trans(r_even.to(tl.float32)), v.to(tl.float32), acc_even, input_precision=PREC)
            acc_odd = tl.dot(tl.trans(r_odd.to(tl.float32)), v.to(tl.float32), acc_odd, input_precision=PREC)
        else:
            acc_even = tl.dot(tl.trans(r_even), v, acc_even)
            acc_odd = tl.dot(tl.trans(r_odd), v, acc_odd)
        # Σ relu(k_raw) from the same raw tiles; every column block computes it (small next to the products), the
        # first one stores it
        if KSUM_DOT:
            if F32:
                ksum_rows_even = tl.dot(ones.to(tl.float32), tl.maximum(ke, 0.0), ksum_rows_even,
                                        input_precision="ieee")
                ksum_rows_odd = tl.dot(ones.to(tl.float32), tl.maximum(ko, 0.0), ksum_rows_odd,
                                       input_precision="ieee")
            else:
                ksum_rows_even = tl.dot(ones, tl.maximum(k_even, 0.0).to(KEY_DTYPE), ksum_rows_even)
                ksum_rows_odd = tl.dot(ones, tl.maximum(k_odd, 0.0).to(KEY_DTYPE), ksum_rows_odd)
        else:
            ksum_even += tl.sum(tl.maximum(ke, 0.0), axis=0)
            ksum_odd += tl.sum(tl.maximum(ko, 0.0), axis=0)
    if KSUM_DOT:  # every row holds the same sums
        ksum_even = tl.max(ksum_rows_even, axis=0)
        ksum_odd = tl.max(ksum_rows_odd, axis=0)
    # state rows 2p (even channels) and 2p + 1 (odd channels)
    rows_even = (2 * offs_p)[:, None] * D + offs_e[None, :]
    if DIRECT:
        base = bh * D * D
        old_even = tl.load(KV_OLD + base + rows_even)
        old_odd = tl.load(KV_OLD + base + rows_even + D)
        tl.store(KV_OUT + base + rows_even, acc_even * w_new + old_even * w_old)
        tl.store(KV_OUT + base + rows_even + D, acc_odd * w_new + old_odd * w_old)
        if pe == 0:
            km_even = tl.load(KM_OLD + bh * D + 2 * offs_p)
            km_odd = tl.load(KM_OLD + bh * D + 2 * offs_p + 1)
            tl.store(KM_OUT + bh * D + 2 * offs_p, ksum_even * w_new + km_even * w_old)
            tl.store(KM_OUT + bh * D + 2 * offs_p + 1, ksum_odd * w_new + km_odd * w_old)
    else:
        part = (bh * n_split + sp) * D * D
        tl.store(PART_KV + part + rows_even, acc_even)
        tl.store(PART_KV + part + rows_even + D, acc_odd)
        if pe == 0:
            tl.store(PART_KM + (bh * n_split + sp) * D + 2 * offs_p, ksum_even)
            tl.store(PART_KM + (bh * n_split + sp) * D + 2 * offs_p + 1, ksum_odd)


@triton.jit
def _absorb_roped_kernel(KROPED, KRAW, V, PART_KV, PART_KM, S, H, tokens_per_split,
                         s_rb, s_rl, s_rh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh,
                         D: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr, F32: tl.constexpr,
                         PREC: tl.constexpr):
    """Grid (B*H, D // BE, splits), keys given RoPE'd: per split, `Σ key_roped ⊗ v` with both tiles loaded straight
    into the tensor-core product (software-pipelined: no operand is computed in registers), and `Σ relu(k_raw)`
    accumulated element-wise in a (BT, D) tile, reduced once at the end. Always partial sums: the finish kernel
    rotates them (one rotation for every token commutes with the sum) and folds in the old state."""
    bh = tl.program_id(0)
    pe = tl.program_id(1)
    sp = tl.program_id(2)
    n_split = tl.num_programs(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, D)
    offs_e = pe * BE + tl.arange(0, BE)
    offs_t = tl.arange(0, BT)
    acc = tl.zeros((D, BE), dtype=tl.float32)
    ksum_rows = tl.zeros((BT, D), dtype=tl.float32)
    t0 = sp * tokens_per_split
    t1 = tl.minimum(S, t0 + tokens_per_split)
    for t in range(t0, t1, BT):
        rows = t + offs_t
        ok = rows < t1
        kr = tl.load(KROPED + b * s_rb + h * s_rh + rows[:, None] * s_rl + offs_d[None, :], mask=ok[:, None],
                     other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + rows[:, None] * s_vl + offs_e[None, :], mask=ok[:, None], other=0.0)
        if F32:
            acc = tl.dot(tl.trans(kr.to(tl.float32)), v.to(tl.float32), acc, input_precision=PREC)
        else:
            acc = tl.dot(tl.trans(kr), v, acc)
        kw = tl.load(KRAW + b * s_kb + h * s_kh + rows[:, None] * s_kl + offs_d[None, :], mask=ok[:, None],
                     other=0.0)
        ksum_rows += tl.maximum(kw.to(tl.float32), 0.0)
    part = (bh * n_split + sp) * D * D
    tl.store(PART_KV + part + offs_d[:, None] * D + offs_e[None, :], acc)
    if pe == 0:
        tl.store(PART_KM + (bh * n_split + sp) * D + offs_d, tl.sum(ksum_rows, axis=0))


@triton.jit
def _absorb_finish_kernel(KV_OLD, KM_OLD, KV_OUT, KM_OUT, PART_KV, PART_KM, COS, SIN, W, PROJ, n_split, w_old,
                          w_new, D: tl.constexpr, BR: tl.constexpr, ROTATE: tl.constexpr, PROJECT: tl.constexpr,
                          PREC: tl.constexpr):
    """Grid (B*H, D // BR): sums the splits in order; ROTATE: rotates the key rows in pairs by the one rotation
    COS / SIN ((D,) float32, Wan's form); folds in the old state; PROJECT: also writes the rows times `W.T` (W
    (D, D), row-major) in PROJ's dtype. Each program reads its old rows before writing them, so the outputs may be
    the old state itself (an in-place update)."""
    bh = tl.program_id(0)
    pr = tl.program_id(1)
    offs_r = pr * BR + tl.arange(0, BR)
    offs_d = tl.arange(0, D)
    tile = offs_r[:, None] * D + offs_d[None, :]
    acc = tl.zeros((BR, D), dtype=tl.float32)
    for sp in range(0, n_split):
        acc += tl.load(PART_KV + (bh * n_split + sp) * D * D + tile)
    if ROTATE:  # rows 2p and 2p + 1 are a key channel pair
        even, odd = tl.split(tl.permute(tl.reshape(acc, (BR // 2, 2, D)), (0, 2, 1)))
        offs_p = pr * BR + 2 * tl.arange(0, BR // 2)
        c = tl.load(COS + offs_p)[:, None]
        s = tl.load(SIN + offs_p + 1)[:, None]
        acc = tl.reshape(tl.permute(tl.join(even * c - odd * s, even * s + odd * c), (0, 2, 1)), (BR, D))
    new = acc * w_new + tl.load(KV_OLD + bh * D * D + tile) * w_old
    tl.store(KV_OUT + bh * D * D + tile, new)
    if PROJECT:
        w_t = tl.load(W + offs_d[None, :] * D + offs_d[:, None]).to(tl.float32)  # W.T
        tl.store(PROJ + bh * D * D + tile, tl.dot(new, w_t, input_precision=PREC).to(PROJ.dtype.element_ty))
    if pr == 0:
        ks = tl.zeros((D,), dtype=tl.float32)
        for sp in range(0, n_split):
            ks += tl.load(PART_KM + (bh * n_split + sp) * D + offs_d)
        km_old = tl.load(KM_OLD + bh * D + offs_d)
        tl.store(KM_OUT + bh * D + offs_d, ks * w_new + km_old * w_old)


@triton.jit
def _read_kernel(QN, QR, KV, KM, OUT, S, H, eps, blocks_per_prog,
                 s_qnb, s_qnl, s_qnh, s_qrb, s_qrl, s_qrh, s_ob, s_ol, s_oh,
                 D: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """Grid (cdiv(cdiv(S, BM), blocks_per_prog), B*H). SPLIT: the fp32 state is split into two 16-bit halves
    (hi + lo) in the queries' dtype so that both products run on tensor cores at about fp32 accuracy (the 16-bit
    queries are exact); otherwise an fp32 dot at precision PREC."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    kv = tl.load(KV + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
    if SPLIT:
        kv_hi = kv.to(QN.dtype.element_ty)
        kv_lo = (kv - kv_hi.to(tl.float32)).to(QN.dtype.element_ty)
    km = tl.load(KM + bh * D + offs_d)
    for i in range(0, blocks_per_prog):
        offs_m = (pid * blocks_per_prog + i) * BM + tl.arange(0, BM)
        ok = offs_m < S
        qn = tl.load(QN + b * s_qnb + h * s_qnh + offs_m[:, None] * s_qnl + offs_d[None, :], mask=ok[:, None],
                     other=0.0)
        qr = tl.load(QR + b * s_qrb + h * s_qrh + offs_m[:, None] * s_qrl + offs_d[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
        if SPLIT:
            num = tl.dot(qn, kv_hi)
            num = tl.dot(qn, kv_lo, num)
        else:
            num = tl.dot(qn.to(tl.float32), kv, input_precision=PREC)
        den = tl.sum(tl.maximum(qr, 0.0) * km[None, :], axis=1) + eps
        tl.store(OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :], num / den[:, None],
                 mask=ok[:, None])


@triton.jit
def _read_bwd_kernel(QN, QR, KV, KM, DOUT, DQN, DQR, S, H, eps, blocks_per_prog,
                     s_qnb, s_qnl, s_qnh, s_qrb, s_qrl, s_qrh, s_gb, s_gl, s_gh,
                     s_dnb, s_dnl, s_dnh, s_drb, s_drl, s_drh,
                     D: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    kv = tl.load(KV + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
    kv_t = tl.load(KV + bh * D * D + offs_d[None, :] * D + offs_d[:, None])  # transposed, straight from memory
    if SPLIT:
        kv_hi = kv.to(QN.dtype.element_ty)
        kv_lo = (kv - kv_hi.to(tl.float32)).to(QN.dtype.element_ty)
        kvt_hi = kv_t.to(QN.dtype.element_ty)
        kvt_lo = (kv_t - kvt_hi.to(tl.float32)).to(QN.dtype.element_ty)
    km = tl.load(KM + bh * D + offs_d)
    for i in range(0, blocks_per_prog):
        offs_m = (pid * blocks_per_prog + i) * BM + tl.arange(0, BM)
        ok = offs_m < S
        qn = tl.load(QN + b * s_qnb + h * s_qnh + offs_m[:, None] * s_qnl + offs_d[None, :], mask=ok[:, None],
                     other=0.0)
        qr = tl.load(QR + b * s_qrb + h * s_qrh + offs_m[:, None] * s_qrl + offs_d[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
        g = tl.load(DOUT + b * s_gb + h * s_gh + offs_m[:, None] * s_gl + offs_d[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float32)
        den = tl.sum(tl.maximum(qr, 0.0) * km[None, :], axis=1) + eps
        inv = 1.0 / den
        gs = g * inv[:, None]
        if SPLIT:
            num = tl.dot(qn, kv_hi)
            num = tl.dot(qn, kv_lo, num)
            gs16 = gs.to(QN.dtype.element_ty)
            dqn = tl.dot(gs16, kvt_hi)
            dqn = tl.dot(gs16, kvt_lo, dqn)
        else:
            num = tl.dot(qn.to(tl.float32), kv, input_precision=PREC)
            dqn = tl.dot(gs, kv_t, input_precision=PREC)
        dden = -tl.sum(gs * num, axis=1) * inv
        dqr = tl.where(qr > 0, dden[:, None] * km[None, :], 0.0)
        tl.store(DQN + b * s_dnb + h * s_dnh + offs_m[:, None] * s_dnl + offs_d[None, :],
                 dqn.to(DQN.dtype.element_ty), mask=ok[:, None])
        tl.store(DQR + b * s_drb + h * s_drh + offs_m[:, None] * s_drl + offs_d[None, :],
                 dqr.to(DQR.dtype.element_ty), mask=ok[:, None])


def _check_head_dim(dim: int) -> None:
    if dim not in (16, 32, 64, 128):
        raise ValueError(f"head_dim must be 16, 32, 64 or 128 for the Triton kernel, got {dim}")


def _check_state(kv_state: torch.Tensor, kmean_state: torch.Tensor, ref: torch.Tensor):
    batch, _, heads, dim = ref.shape
    if kv_state.shape != (batch, heads, dim, dim) or kmean_state.shape != (batch, heads, dim):
        raise ValueError(f"state shapes {tuple(kv_state.shape)}, {tuple(kmean_state.shape)} do not match tokens "
                         f"{tuple(ref.shape)}")
    _check_head_dim(dim)


_PAIR_WORD = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}
_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _absorb_outputs(kv_state, kmean_state, projection, out):
    """The buffers the absorption writes: `out` (checked: may be the state itself) or new ones."""
    if out is not None:
        check_absorb_out(out, kv_state, kmean_state, projection)
        return list(out)
    outputs = [new_empty_like(kv_state), new_empty_like(kmean_state)]
    if projection is not None:
        outputs.append(new_empty(kv_state.shape, dtype=projection.dtype, device=kv_state.device))
    return outputs


def _absorb_launch(kv_state, kmean_state, count: int, key_raw, value, cos, sin, num_splits: int | None = None,
                   key_roped=None, projection=None, out=None):
    key_raw, value = last_contiguous(key_raw), last_contiguous(value)  # slice views of a cache buffer: no copy
    kv_state = kv_state.float().contiguous()
    kmean_state = kmean_state.float().contiguous()
    batch, num_new, heads, dim = key_raw.shape
    outputs = _absorb_outputs(kv_state, kmean_state, projection, out)
    kv_out, km_out = outputs[:2]
    total = count + num_new
    if num_new == 0:
        if kv_out.data_ptr() != kv_state.data_ptr():
            kv_out.copy_(kv_state)
        if km_out.data_ptr() != kmean_state.data_ptr():
            km_out.copy_(kmean_state)
        if projection is not None:
            outputs[2].copy_(project_state(kv_state, projection))
        return tuple(outputs)
    w_old, w_new = count / total, 1.0 / total
    f32, prec = _dot_mode(key_raw)
    be = min(dim, LM_CONFIG.get("absorb_be", 128))
    bt = 32 if _interpret() else LM_CONFIG.get("absorb_roped_bt" if key_roped is not None else "absorb_bt", 64)
    if num_splits is None:
        if _interpret():
            num_splits = 1
        else:  # at least `absorb_tokens` tokens per program, at most `absorb_progs_per_sm` programs per multiprocessor
            sms = torch.cuda.get_device_properties(key_raw.device).multi_processor_count
            slots = sms * LM_CONFIG.get("absorb_progs_per_sm", 1)
            num_splits = max(1, min(triton.cdiv(num_new, LM_CONFIG.get("absorb_tokens", 512)),
                                    slots // (batch * heads * (dim // be))))
    tokens_per_split = triton.cdiv(triton.cdiv(num_new, num_splits), bt) * bt
    num_splits = triton.cdiv(num_new, tokens_per_split)
    # the main kernel writes the new state itself only for one split, keys RoPE'd by it, and no projection
    direct = num_splits == 1 and key_roped is None and projection is None
    if direct:
        part_kv = part_km = kv_out
    else:
        part_kv = new_empty((batch * heads, num_splits, dim, dim), device=kv_state.device, dtype=torch.float32)
        part_km = new_empty((batch * heads, num_splits, dim), device=kv_state.device, dtype=torch.float32)
    grid = (batch * heads, dim // be, num_splits)
    warps = LM_CONFIG.get("absorb_warps", 8)
    if key_roped is not None:
        key_roped = last_contiguous(key_roped)
        _absorb_roped_kernel[grid](
            key_roped, key_raw, value, part_kv, part_km, num_new, heads, tokens_per_split,
            *key_roped.stride()[:3], *key_raw.stride()[:3], *value.stride()[:3],
            D=dim, BE=be, BT=bt, F32=f32, PREC=prec, num_warps=warps,
            num_stages=1 if _interpret() else LM_CONFIG.get("absorb_roped_stages", 3),
        )
    else:
        # tables as (s, D) views with their strides (a broadcast dimension has stride 0)
        cos_t, sin_t = (t.expand(1, num_new, 1, dim)[0, :, 0] for t in (cos, sin))
        # one integer word per channel pair (`_pair_halves`): views, no copies (the last dimension is contiguous)
        key_pairs = key_raw.view(_PAIR_WORD[key_raw.dtype])
        cos_pairs, sin_pairs = (last_contiguous(t.float()).view(torch.int64) for t in (cos_t, sin_t))
        _absorb_kernel[grid](
            key_pairs, value, cos_pairs, sin_pairs, kv_state, kmean_state, kv_out, km_out, part_kv, part_km,
            num_new, heads, tokens_per_split, w_old, w_new,
            *key_pairs.stride()[:3], *value.stride()[:3], *cos_pairs.stride(), *sin_pairs.stride(),
            D=dim, BE=be, BT=bt, DIRECT=direct, F32=f32, PREC=prec, KSUM_DOT=LM_CONFIG.get("absorb_ksum") == "dot",
            BF16_BY_HAND=_interpret() and key_raw.dtype == torch.bfloat16, KEY_DTYPE=_TL_DTYPE[key_raw.dtype],
            num_warps=warps, num_stages=1 if _interpret() else LM_CONFIG.get("absorb_stages", 3),
        )
    if not direct:
        rotate = key_roped is not None
        rotation = [t.reshape(-1).expand(dim).float().contiguous() for t in (cos, sin)] if rotate else [kv_out, kv_out]
        br = min(dim, LM_CONFIG.get("absorb_finish_rows", 32))
        if projection is not None:  # the projection is a tensor-core product: at least 16 rows
            br = min(dim, max(br, 16))
        weight = projection.detach().contiguous() if projection is not None else kv_out
        proj_out = outputs[2] if projection is not None else kv_out
        _absorb_finish_kernel[(batch * heads, dim // br)](
            kv_state, kmean_state, kv_out, km_out, part_kv, part_km, *rotation, weight, proj_out, num_splits, w_old,
            w_new, D=dim, BR=br, ROTATE=rotate, PROJECT=projection is not None, PREC="ieee" if _interpret() else
            "tf32x3", num_warps=LM_CONFIG.get("absorb_finish_warps", 4),
        )
    return tuple(outputs)


def _read_grid(seq: int, bm: int, batch_heads: int, device) -> tuple[int, int]:
    num_blocks = triton.cdiv(seq, bm)
    if _interpret():
        return num_blocks, 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per = max(1, (num_blocks * batch_heads) // (LM_CONFIG.get("read_progs_per_sm", 4) * sms))  # state loaded once
    return triton.cdiv(num_blocks, per), per


def _read_launch(query_numerator, query_raw, kv_state, kmean_state, eps: float):
    qn, qr = last_contiguous(query_numerator), last_contiguous(query_raw)
    kv_state = kv_state.float().contiguous()
    kmean_state = kmean_state.float().contiguous()
    batch, seq, heads, dim = qn.shape
    out = new_empty((batch, seq, heads, dim), device=qn.device, dtype=torch.float32)
    if seq == 0:
        return out
    bm = 32 if _interpret() else LM_CONFIG.get("read_bm", 64)
    _, prec = _dot_mode(qn)
    progs, per = _read_grid(seq, bm, batch * heads, qn.device)
    _read_kernel[(progs, batch * heads)](
        qn, qr, kv_state, kmean_state, out, seq, heads, eps, per,
        qn.stride(0), qn.stride(1), qn.stride(2), qr.stride(0), qr.stride(1), qr.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        D=dim, BM=bm, SPLIT=_split_state(qn), PREC=prec, num_warps=LM_CONFIG.get("read_warps", 4),
        num_stages=1 if _interpret() else LM_CONFIG.get("read_stages", 2),
    )
    return out


def _read_bwd_launch(dout, query_numerator, query_raw, kv_state, kmean_state, eps: float):
    qn, qr, dout = last_contiguous(query_numerator), last_contiguous(query_raw), last_contiguous(dout)
    kv_state = kv_state.float().contiguous()
    kmean_state = kmean_state.float().contiguous()
    batch, seq, heads, dim = qn.shape
    dqn = new_empty_like(qn)
    dqr = new_empty_like(qr)
    if seq == 0:
        return dqn, dqr
    bm = 32 if _interpret() else 64
    _, prec = _dot_mode(qn)
    progs, per = _read_grid(seq, bm, batch * heads, qn.device)
    _read_bwd_kernel[(progs, batch * heads)](
        qn, qr, kv_state, kmean_state, dout, dqn, dqr, seq, heads, eps, per,
        qn.stride(0), qn.stride(1), qn.stride(2), qr.stride(0), qr.stride(1), qr.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), dqn.stride(0), dqn.stride(1), dqn.stride(2),
        dqr.stride(0), dqr.stride(1), dqr.stride(2),
        D=dim, BM=bm, SPLIT=_split_state(qn), PREC=prec, num_warps=LM_CONFIG.get("read_bwd_warps", 8),
        num_stages=1,
    )
    return dqn, dqr


# ----------------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------------


def _absorb_impl(kv_state: torch.Tensor, kmean_state: torch.Tensor, count: int, key_raw: torch.Tensor,
                 value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_roped: torch.Tensor | None,
                 projection: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Always three outputs (an op's outputs are fixed): the projected state is empty without `projection`."""
    out = _absorb_launch(kv_state, kmean_state, count, key_raw, value, cos, sin, key_roped=key_roped,
                         projection=projection)
    return out if projection is not None else (*out, kv_state.new_empty(0))


_absorb_op = torch.library.custom_op("diffusers_hybrid::linear_memory_absorb", mutates_args=())(_absorb_impl)


@_absorb_op.register_fake
def _(kv_state, kmean_state, count, key_raw, value, cos, sin, key_roped, projection):
    projected = kv_state.new_empty(0) if projection is None else kv_state.new_empty(kv_state.shape,
                                                                                   dtype=projection.dtype)
    return (kv_state.new_empty(kv_state.shape, dtype=torch.float32),
            kmean_state.new_empty(kmean_state.shape, dtype=torch.float32), projected)


def _read_impl(query_numerator: torch.Tensor, query_raw: torch.Tensor, kv_state: torch.Tensor,
               kmean_state: torch.Tensor, eps: float) -> torch.Tensor:
    return _read_launch(query_numerator, query_raw, kv_state, kmean_state, eps)


_read_op = torch.library.custom_op("diffusers_hybrid::linear_memory_read", mutates_args=())(_read_impl)


@_read_op.register_fake
def _(query_numerator, query_raw, kv_state, kmean_state, eps):
    return query_numerator.new_empty(query_numerator.shape, dtype=torch.float32)


@torch.library.custom_op("diffusers_hybrid::linear_memory_read_bwd", mutates_args=())
def _read_bwd_op(dout: torch.Tensor, query_numerator: torch.Tensor, query_raw: torch.Tensor,
                 kv_state: torch.Tensor, kmean_state: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return _read_bwd_launch(dout, query_numerator, query_raw, kv_state, kmean_state, eps)


@_read_bwd_op.register_fake
def _(dout, query_numerator, query_raw, kv_state, kmean_state, eps):
    # the real op's layout: `empty_like` of the queries after `last_contiguous` (a query whose last dimension is not
    # unit-stride is copied, so its gradient comes out contiguous)
    return torch.empty_like(last_contiguous(query_numerator)), torch.empty_like(last_contiguous(query_raw))


def _read_setup_context(ctx, inputs, output):
    query_numerator, query_raw, kv_state, kmean_state, eps = inputs
    ctx.save_for_backward(query_numerator, query_raw, kv_state, kmean_state)
    ctx.eps = eps


def _read_backward(ctx, dout):
    query_numerator, query_raw, kv_state, kmean_state = ctx.saved_tensors
    dqn, dqr = _read_bwd_op(dout, query_numerator, query_raw, kv_state, kmean_state, ctx.eps)
    return dqn, dqr, None, None, None


_read_op.register_autograd(_read_backward, setup_context=_read_setup_context)


def linear_memory_absorb_triton(
    kv_state: torch.Tensor,
    kmean_state: torch.Tensor,
    count: int,
    key_raw: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_roped: torch.Tensor | None = None,
    projection: torch.Tensor | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Triton version of `linear_memory_absorb_naive` (same arguments and results, up to the summation order; no
    gradient), one launch plus the split sum. `key_raw` / `key_roped` / `value` may be strided views (e.g.
    consecutive frames of a cache buffer); only their last dimension needs to be contiguous, else they are copied.
    `out` (eager only): contiguous float32 `(kv, kmean)` buffers (plus the projected state's, in the projection's
    dtype) to write into; they may be `kv_state` / `kmean_state` themselves (updated in place)."""
    count = check_absorb_args(kv_state, kmean_state, count, key_raw, value, cos, sin, key_roped, projection)
    _check_state(kv_state, kmean_state, key_raw)
    detached = [None if t is None else t.detach() for t in (key_roped, projection)]
    args = (kv_state.detach(), kmean_state.detach(), count, key_raw.detach(), value.detach(), cos.detach(),
            sin.detach())
    if out is not None:
        if torch.compiler.is_compiling():
            raise RuntimeError("linear_memory_absorb(out=...) runs eagerly only (it writes into its arguments)")
        return _absorb_launch(*args, key_roped=detached[0], projection=detached[1], out=out)
    op = _absorb_op if torch.compiler.is_compiling() else _absorb_impl  # eager: skip the dispatcher
    result = op(*args, *detached)
    return result if projection is not None else result[:2]


def linear_memory_read_triton(
    query_numerator: torch.Tensor,
    query_raw: torch.Tensor,
    kv_state: torch.Tensor,
    kmean_state: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Triton version of `linear_memory_read_naive`: float32 `(B, S, H, D)`; differentiable w.r.t. both queries. The
    state is a constant: no gradient reaches `kv_state` / `kmean_state`, so a state that requires grad (with grad
    enabled) is refused with a ValueError rather than left without its gradient."""
    check_memory_state(query_numerator, query_raw, kv_state, kmean_state, "query_numerator")
    _check_head_dim(query_numerator.shape[-1])
    check_state_without_grad(kv_state, kmean_state)
    direct = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (query_numerator.requires_grad or query_raw.requires_grad))
    op = _read_impl if direct else _read_op  # eager inference: skip the dispatcher
    return op(query_numerator, query_raw, kv_state.detach(), kmean_state.detach(), float(eps))


__all__ = ["linear_memory_absorb_triton", "linear_memory_read_triton"]
