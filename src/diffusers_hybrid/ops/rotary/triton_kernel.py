# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Triton kernels of the cached-inference RoPE step (`rope_chunk_into_window_naive` is its reference) and of plain
RoPE into a given buffer (`apply_rope_naive`: the cache's once-per-chunk re-RoPE of its history).

One launch RoPEs a chunk's queries and keys (Wan's interleaved pairs, float32 math), writes the RoPE'd keys and the
values into the cache's window, and, while the rotated rows are in registers, mean-pools the block selection's
query blocks and (head-centred) key blocks. The block selection then needs no pooling launch of its own: what it
costs is the difference between this kernel with and without pooling.

Grid `(query blocks + key blocks, batch)`, one program per `block_size` rows looping over the heads (the "heads" key
centring needs every head's pooled vector of a block). Query blocks are on the chunk's grid, key blocks on the
window's: the chunk starts `start` rows into the window, so the first key block may hold cached rows (read back from
the window, never written by this launch) before the chunk's.
"""

import os

import torch

if not torch.cuda.is_available():  # CPU only: run the kernels through Triton's interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ..utils import last_contiguous, new_empty, new_empty_like  # noqa: E402
from .naive import check_rope_args, check_window_args  # noqa: E402

# Launch parameters (benchmarks override): warps per program; software-pipelining depth of the loop over heads (the
# next head's rows load while this head's are rotated and pooled).
ROPE_CONFIG: dict = {"num_warps": 4, "num_stages": 1}


@triton.jit
def _rope_tables(COS, SIN, rows, ok, s_cl, s_cd, s_sl, s_sd, HALF: tl.constexpr):
    """cos of the even and sin of the odd channels of `rows`, (BLOCK, HALF) fp32 (Wan's tables repeat each angle
    for both channels of a pair)."""
    offs_p = tl.arange(0, HALF)
    c = tl.load(COS + rows[:, None] * s_cl + (2 * offs_p[None, :]) * s_cd, mask=ok[:, None], other=0.0)
    s = tl.load(SIN + rows[:, None] * s_sl + (2 * offs_p[None, :] + 1) * s_sd, mask=ok[:, None], other=0.0)
    return c.to(tl.float32), s.to(tl.float32)


@triton.jit
def _rope_rows(X, OUT, src_rows, dst_rows, ok, s_xl, s_ol, c, s, BLOCK: tl.constexpr, D: tl.constexpr):
    """Rotates rows `src_rows` of one head of X, stores them as rows `dst_rows` of OUT (OUT's dtype); returns the
    stored values as fp32 (what a later reader of OUT sees) and the rows before rotation (fp32)."""
    offs_d = tl.arange(0, D)
    x = tl.load(X + src_rows[:, None] * s_xl + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK, D // 2, 2)))
    y = tl.reshape(tl.join(x_even * c - x_odd * s, x_even * s + x_odd * c), (BLOCK, D))
    y = y.to(OUT.dtype.element_ty)
    tl.store(OUT + dst_rows[:, None] * s_ol + offs_d[None, :], y, mask=ok[:, None])
    return y.to(tl.float32), x


@triton.jit
def _rope_window_kernel(Q, K, V, COS, SIN, QO, KW, VW, PQ, PK, KMS, DEN,
                        L, start, W, Mq, kb0, NPK, mem_eps,
                        s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh,
                        s_ob, s_ol, s_oh, s_wb, s_wl, s_wh, s_ub, s_ul, s_uh, s_cl, s_cd, s_sl, s_sd,
                        H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                        POOL: tl.constexpr, CENTER: tl.constexpr, STAGES: tl.constexpr, MEM_DEN: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, BLOCK)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D)
    tile = tl.zeros((H_PAD, D), dtype=tl.float32)
    if pid < Mq:  # a query block of the chunk
        rows = pid * BLOCK + offs_t
        ok = rows < L
        c, s = _rope_tables(COS, SIN, rows, ok, s_cl, s_cd, s_sl, s_sd, D // 2)
        dens = tl.zeros((BLOCK, H_PAD), dtype=tl.float32)
        for h in tl.range(0, H, num_stages=STAGES):
            y, x = _rope_rows(Q + b * s_qb + h * s_qh, QO + b * s_ob + h * s_oh, rows, rows, ok, s_ql, s_ol, c, s,
                              BLOCK, D)
            if POOL:
                tile = tl.where(offs_h[:, None] == h, tl.sum(y, axis=0)[None, :], tile)
            if MEM_DEN:  # the memory read-out's denominator uses the un-RoPE'd query (spec 1.3)
                km = tl.load(KMS + (b * H + h) * D + offs_d)
                den = tl.sum(tl.maximum(x, 0.0) * km[None, :], axis=1) + mem_eps
                dens = tl.where(offs_h[None, :] == h, den[:, None], dens)
        if MEM_DEN:  # (B, L, H) contiguous: one row of H values per token
            tl.store(DEN + (b * L + rows[:, None]) * H + offs_h[None, :], dens,
                     mask=ok[:, None] & (offs_h < H)[None, :])
        if POOL:
            tile = tile / tl.minimum(L - pid * BLOCK, BLOCK).to(tl.float32)
            tl.store(PQ + ((b * H + offs_h[:, None]) * Mq + pid) * D + offs_d[None, :], tile,
                     mask=(offs_h < H)[:, None])
    else:  # a key block of the window
        blk = kb0 + pid - Mq
        wrows = blk * BLOCK + offs_t
        crows = wrows - start
        new = (crows >= 0) & (wrows < W)
        cached = wrows < start
        c, s = _rope_tables(COS, SIN, crows, new, s_cl, s_cd, s_sl, s_sd, D // 2)
        for h in tl.range(0, H, num_stages=STAGES):
            window = KW + b * s_wb + h * s_wh
            y, _ = _rope_rows(K + b * s_kb + h * s_kh, window, crows, wrows, new, s_kl, s_wl, c, s, BLOCK, D)
            v = tl.load(V + b * s_vb + h * s_vh + crows[:, None] * s_vl + offs_d[None, :], mask=new[:, None])
            tl.store(VW + b * s_ub + h * s_uh + wrows[:, None] * s_ul + offs_d[None, :], v, mask=new[:, None])
            if POOL:
                old = tl.load(window + wrows[:, None] * s_wl + offs_d[None, :], mask=cached[:, None], other=0.0)
                y = tl.where(new[:, None], y, old.to(tl.float32))
                tile = tl.where(offs_h[:, None] == h, tl.sum(y, axis=0)[None, :], tile)
        if POOL:
            tile = tile / tl.minimum(W - blk * BLOCK, BLOCK).to(tl.float32)
            if CENTER:
                tile = tile - (tl.sum(tile, axis=0) / H)[None, :]
            tl.store(PK + ((b * H + offs_h[:, None]) * NPK + pid - Mq) * D + offs_d[None, :], tile,
                     mask=(offs_h < H)[:, None])


@triton.jit
def _rope_kernel(X, OUT, COS, SIN, L, s_xb, s_xl, s_xh, s_ob, s_ol, s_oh, s_cl, s_cd, s_sl, s_sd,
                 D: tl.constexpr, BLOCK: tl.constexpr):
    """One program per `BLOCK` rows of one head of one batch element."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < L
    c, s = _rope_tables(COS, SIN, rows, ok, s_cl, s_cd, s_sl, s_sd, D // 2)
    _rope_rows(X + b * s_xb + h * s_xh, OUT + b * s_ob + h * s_oh, rows, rows, ok, s_xl, s_ol, c, s, BLOCK, D)


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    batch, length, heads, dim = x.shape
    if out.stride(-1) != 1:
        raise ValueError("`out` needs a contiguous last dimension (written in place)")
    x = last_contiguous(x)
    # broadcast tables keep stride 0 along the rows (one rotation for every token)
    cos, sin = (t.expand(1, length, 1, dim)[0, :, 0] for t in (cos, sin))
    if x.numel() == 0:
        return
    block = 64
    _rope_kernel[(triton.cdiv(length, block), heads, batch)](
        x, out, cos, sin, length, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
        out.stride(2), *cos.stride(), *sin.stride(), D=dim, BLOCK=block, num_warps=4,
    )


# An opaque op under torch.compile, like the RoPE step below.
_rope_op = torch.library.custom_op("diffusers_hybrid::apply_rope", mutates_args=("out",))(_rope_launch)


@_rope_op.register_fake
def _(x, cos, sin, out):
    return None


@torch.no_grad()
def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Triton version of [`apply_rope_naive`] (same arguments and result), one launch: float32 math, one read of `x`
    and one write of `out` (`out` may be `x`, or a view with a contiguous last dimension). Runs as the custom op
    `diffusers_hybrid::apply_rope` under torch.compile."""
    check_rope_args(x, cos, sin, out)
    if out is None:
        out = new_empty_like(x)
    if torch.compiler.is_compiling():
        _rope_op(x, cos, sin, out)
    else:  # eager: skip the dispatcher
        _rope_launch(x, cos, sin, out)
    return out


def _window_result_shapes(query, window_key, pool_block_size, first_pooled_key_block, memory_kmean):
    """Shapes of the launcher's outputs: RoPE'd queries, pooled query and key blocks, denominators (`None` when
    not computed)."""
    batch, length, heads, dim = query.shape
    window = window_key.shape[1]
    pooled_q = pooled_k = denominator = None
    if pool_block_size is not None:
        first = first_pooled_key_block
        pooled_q = (batch, heads, triton.cdiv(length, pool_block_size), dim)
        pooled_k = (batch, heads, triton.cdiv(window, pool_block_size) - first, dim)
    if memory_kmean is not None:
        denominator = (batch, length, heads)
    return tuple(query.shape), pooled_q, pooled_k, denominator


def _rope_window_launch(query, key, value, cos, sin, window_key, window_value, pool_block_size, key_centering,
                        first_pooled_key_block, memory_kmean, memory_eps):
    """Validates, allocates and launches; returns `(query_roped, pooled_q, pooled_k, denominator)` (`None` for what
    was not asked for)."""
    start = check_window_args(query, key, value, window_key, window_value, pool_block_size, key_centering,
                              first_pooled_key_block, memory_kmean)
    if window_key.stride(-1) != 1 or window_value.stride(-1) != 1:
        raise ValueError("`window_key` and `window_value` need a contiguous last dimension (written in place)")
    query, key, value = (last_contiguous(t) for t in (query, key, value))
    batch, length, heads, dim = query.shape
    window = window_key.shape[1]
    pool = pool_block_size is not None
    block = pool_block_size if pool else 64
    cos, sin = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
    if cos.shape != (length, dim) or sin.shape != (length, dim):
        raise ValueError(f"cos / sin must hold ({length}, {dim}) values (shape (1, L, 1, D)), got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    query_roped = new_empty_like(query)
    first = first_pooled_key_block if pool else start // block
    num_q_blocks = triton.cdiv(length, block)
    num_k_blocks = triton.cdiv(window, block) - first
    pooled_q = pooled_k = None
    if pool:
        pooled_q = new_empty((batch, heads, num_q_blocks, dim), device=query.device, dtype=torch.float32)
        pooled_k = new_empty((batch, heads, num_k_blocks, dim), device=query.device, dtype=torch.float32)
    denominator = kmean = None
    if memory_kmean is not None:
        denominator = new_empty((batch, length, heads), device=query.device, dtype=torch.float32)
        kmean = memory_kmean.float().contiguous()
    if length == 0 or batch == 0:
        return query_roped, pooled_q, pooled_k, denominator
    dummy = query_roped  # unused pointer arguments
    _rope_window_kernel[(num_q_blocks + num_k_blocks, batch)](
        query, key, value, cos, sin, query_roped, window_key, window_value,
        pooled_q if pool else dummy, pooled_k if pool else dummy,
        kmean if kmean is not None else dummy, denominator if denominator is not None else dummy,
        length, start, window, num_q_blocks, first, num_k_blocks, float(memory_eps),
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *query_roped.stride()[:3],
        *window_key.stride()[:3], *window_value.stride()[:3], *cos.stride(), *sin.stride(),
        H=heads, H_PAD=triton.next_power_of_2(heads), D=dim, BLOCK=block, POOL=pool,
        CENTER=key_centering == "heads", STAGES=ROPE_CONFIG.get("num_stages", 1), MEM_DEN=kmean is not None,
        num_warps=ROPE_CONFIG.get("num_warps", 4), num_stages=1,
    )
    return query_roped, pooled_q, pooled_k, denominator


def _rope_window_impl(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, window_key: torch.Tensor, window_value: torch.Tensor,
                      pool_block_size: int | None, key_centering: str, first_pooled_key_block: int,
                      memory_kmean: torch.Tensor | None, memory_eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Always four outputs (an op's outputs are fixed): empty float32 tensors stand for what was not asked for."""
    results = _rope_window_launch(query, key, value, cos, sin, window_key, window_value, pool_block_size,
                                  key_centering, first_pooled_key_block, memory_kmean, memory_eps)
    return tuple(query.new_empty(0, dtype=torch.float32) if r is None else r for r in results)


# An opaque op for torch.compile: inductor would otherwise recompile the kernel itself from the traced launch, with
# its own typing of the scalar arguments (it typed `memory_eps` float64, which the kernel's loop does not accept).
_rope_window_op = torch.library.custom_op("diffusers_hybrid::rope_chunk_into_window",
                                          mutates_args=("window_key", "window_value"))(_rope_window_impl)


@_rope_window_op.register_fake
def _(query, key, value, cos, sin, window_key, window_value, pool_block_size, key_centering, first_pooled_key_block,
      memory_kmean, memory_eps):
    shapes = _window_result_shapes(query, window_key, pool_block_size, first_pooled_key_block, memory_kmean)
    dtypes = (query.dtype, torch.float32, torch.float32, torch.float32)
    others = tuple(query.new_empty(0 if shape is None else shape, dtype=dtype)
                   for shape, dtype in zip(shapes[1:], dtypes[1:]))
    # the RoPE'd query has the real launcher's layout: `empty_like` of the query after `last_contiguous` (a permuted
    # but dense query keeps its strides)
    return (torch.empty_like(last_contiguous(query)), *others)


@torch.no_grad()
def rope_chunk_into_window_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    window_key: torch.Tensor,
    window_value: torch.Tensor,
    pool_block_size: int | None = None,
    key_centering: str = "heads",
    first_pooled_key_block: int = 0,
    memory_kmean: torch.Tensor | None = None,
    memory_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Triton version of [`rope_chunk_into_window_naive`] (same arguments and results), one launch. `window_key` /
    `window_value` need a contiguous last dimension (they are written in place); `head_dim` a power of two, and
    `pool_block_size` a power of two >= 16. Under torch.compile it runs as the custom op
    `diffusers_hybrid::rope_chunk_into_window`."""
    args = (query, key, value, cos, sin, window_key, window_value, pool_block_size, key_centering,
            first_pooled_key_block, memory_kmean, float(memory_eps))
    if not torch.compiler.is_compiling():  # eager: skip the dispatcher
        return _rope_window_launch(*args)
    # errors name the bad value at trace time, as in eager mode
    check_window_args(query, key, value, window_key, window_value, pool_block_size, key_centering,
                      first_pooled_key_block, memory_kmean)
    query_roped, pooled_q, pooled_k, denominator = _rope_window_op(*args)
    pool = pool_block_size is not None
    return (query_roped, pooled_q if pool else None, pooled_k if pool else None,
            denominator if memory_kmean is not None else None)


__all__ = ["ROPE_CONFIG", "apply_rope_triton", "rope_chunk_into_window_triton"]
