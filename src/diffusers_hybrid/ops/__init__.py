# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Ops of Hybrid Forcing: the attention ops, and the streaming VAE decode's normalisation. No diffusers imports here.

Each op has a plain-PyTorch reference (`<op>/naive.py`, the ground truth, runs anywhere) and a Triton kernel
(`<op>/triton_kernel.py`, CUDA, or CPU through `TRITON_INTERPRET=1`). Models call only the public functions below and
choose the implementation with `kernel="reference" | "triton"`.
"""

import warnings

import torch

from .block_sparse_attention.naive import (
    block_sparse_attention_naive,
    check_key_length,
    check_pool_out,
    check_pooled_key_prefix,
    num_selected_blocks,
    pool_key_blocks_naive,
    select_key_blocks_naive,
)
from .linear_memory.naive import (
    check_absorb_out,
    check_memory_query,
    check_memory_state,
    linear_memory_absorb_naive,
    linear_memory_read_naive,
)
from .rms_norm_silu.naive import rms_norm_silu_with_cache_naive
from .rotary import apply_rope_naive, apply_rotary_emb, rope_chunk_into_window_naive

KERNELS = ("reference", "triton")


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}.")


def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA device, or the interpreter via `TRITON_INTERPRET=1`)."""
    import os

    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_HEAD_DIMS = {
    "attention": (16, 32, 64, 128, 256), "memory": (16, 32, 64, 128), "rope": (16, 32, 64, 128, 256),
}
_warned: set[str] = set()


def _use_triton(op: str, tensor: torch.Tensor, block_size: int | None = None) -> bool:
    """Whether the Triton kernel takes these inputs; otherwise the op falls back to the reference (one warning)."""
    reasons = []
    if tensor.shape[-1] not in _TRITON_HEAD_DIMS[op]:
        reasons.append(f"head_dim {tensor.shape[-1]} not in {_TRITON_HEAD_DIMS[op]}")
    if op == "attention" and tensor.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"dtype {tensor.dtype} (bf16/fp16 only)")
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        reasons.append(f"block_size {block_size} (a power of two >= 16)")
    if not reasons:
        return True
    message = f"Triton {op} kernel does not take {', '.join(reasons)}; using the reference implementation."
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
    return False


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    topk_ratio: float = 1.0,
    block_size: int = 64,
    key_centering: str = "heads",
    scale: float | None = None,
    pooled_key_prefix: torch.Tensor | None = None,
    pooled_blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
    kernel: str = "reference",
) -> torch.Tensor:
    """
    Block-sparse softmax attention of `query` over `key`/`value`, block selection included.

    Args:
        query (`torch.Tensor` of shape `(B, Lq, H, D)`), key / value (`torch.Tensor` of shape `(B, Lk, H, D)`).
        topk_ratio (`float`): fraction of `block_size`-token key blocks each query block attends to; when it keeps
            every block the attention is dense and no selection runs.
        key_centering (`str`): `"heads"` (official) or `"none"`; see `select_key_blocks_naive`.
        pooled_key_prefix (`torch.Tensor` of shape `(B, H, P, D)`, *optional*): the selection's pooled key blocks
            for the first `P * block_size` keys, as [`pool_key_blocks`] computes them (a cache keeps them for the
            part of the window that is the same in every pass of a chunk); only the other keys are pooled.
        pooled_blocks (`tuple`, *optional*): `(pooled_query, pooled_key)`, the selection's mean-pooled query blocks
            `(B, H, ceil(Lq / block_size), D)` and pooled key blocks after the prefix, `(B, H, K - P, D)`, as
            [`rope_chunk_into_window`] returns them; the selection then pools nothing.
        kernel (`str`): `"reference"` or `"triton"`.

    Returns:
        `torch.Tensor` of shape `(B, Lq, H, D)`, dtype of `query`.
    """
    _check_kernel(kernel)
    check_key_length(key)
    num_key_blocks = -(-key.shape[1] // block_size)
    dense = num_selected_blocks(num_key_blocks, topk_ratio) == num_key_blocks
    if kernel == "triton" and _use_triton("attention", query, block_size):
        from .block_sparse_attention.triton_kernel import block_sparse_attention_triton

        return block_sparse_attention_triton(
            query, key, value, topk_ratio=topk_ratio, block_size=block_size, key_centering=key_centering,
            scale=scale, dense=dense, pooled_key_prefix=pooled_key_prefix, pooled_blocks=pooled_blocks,
        )
    block_index = None
    if not dense:
        block_index = select_key_blocks_naive(query, key, topk_ratio, block_size, key_centering, pooled_key_prefix,
                                              pooled_blocks)
    # the selection's own indices: no range / uniqueness check (a device sync)
    return block_sparse_attention_naive(query, key, value, block_index, block_size, scale, check_index_values=False)


def pool_key_blocks(
    key: torch.Tensor,
    block_size: int = 64,
    key_centering: str = "heads",
    *,
    out: torch.Tensor | None = None,
    kernel: str = "reference",
) -> torch.Tensor:
    """
    The block selection's pooled key blocks: `key_centering` per token, then the mean of every `block_size`-token
    block; `(B, H, ceil(L / block_size), D)` float32, written into `out` when given (a contiguous float32 tensor of
    that shape on the key's device, checked alike by both kernels). Pass the result for a prefix of the keys as
    `pooled_key_prefix` to [`block_sparse_attention`].
    """
    _check_kernel(kernel)
    if kernel == "triton" and _use_triton("attention", key, block_size):
        from .block_sparse_attention.triton_kernel import pool_key_blocks_triton

        return pool_key_blocks_triton(key, block_size, key_centering, out=out)
    if out is not None:
        check_pool_out(out, key, block_size)
    pooled = pool_key_blocks_naive(key, block_size, key_centering)
    return pooled if out is None else out.copy_(pooled)


def block_sparse_attention_with_memory(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_raw: torch.Tensor | None,
    kv_state: torch.Tensor,
    kmean_state: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    state_is_projected: bool = False,
    topk_ratio: float = 1.0,
    block_size: int = 64,
    key_centering: str = "heads",
    scale: float | None = None,
    pooled_key_prefix: torch.Tensor | None = None,
    pooled_blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
    memory_denominator: torch.Tensor | None = None,
    kernel: str = "reference",
) -> torch.Tensor:
    """
    Hybrid attention of one chunk at inference: block-sparse softmax attention plus the linear memory read with the
    RoPE'd `query` as numerator query (spec 1.3, inference form), through the output projection `linear_proj`
    (`proj_weight`, `proj_bias`, shared by the heads):

        block_sparse_attention(query, key, value) + F.linear(linear_memory_read(query, query_raw, kv, kmean), W, b)

    The reference computes exactly that (the projection in the output dtype); the Triton kernel fuses the read-out
    into the attention kernel with the projection folded into the state (`KV' = KV @ W.T`, float32), so its result
    differs from the reference by rounding only. Differentiable w.r.t. the queries, keys and values (Triton: through
    the unfused kernels). `state_is_projected=True`: `kv_state` already is `KV @ W.T` (float32, e.g. the layer
    cache's `projected_kv_state`), so no projection runs per call; pass no `proj_weight` then (`proj_bias` still).
    `memory_denominator` (`(B, Lq, H)` float32, no gradient): the read-out's denominators `relu(query_raw) ·
    kmean_state + eps`, precomputed (the RoPE step [`rope_chunk_into_window`] returns them); pass `query_raw=None`
    and `kmean_state=None` then.

    `query_raw` must have the shape of `query`, `kv_state` be `(B, H, D, D)` and `kmean_state` `(B, H, D)` exactly
    (a batch-1 state is not broadcast; both kernels refuse it alike). Gradients: the reference differentiates
    through everything, the memory state included; the Triton kernel passes no gradient to `kv_state` /
    `kmean_state` (the callers absorb detached keys and values) and raises a `ValueError` for a state that requires
    grad while grad is enabled, rather than leaving its `.grad` silently `None`.
    """
    _check_kernel(kernel)
    check_key_length(key)
    if (kernel == "triton" and _use_triton("attention", query, block_size) and _use_triton("memory", query)
            and kv_state is not None):
        # the fused op validates the memory arguments itself: checked once per call
        from .block_sparse_attention.triton_kernel import block_sparse_attention_with_memory_triton

        num_key_blocks = -(-key.shape[1] // block_size)
        return block_sparse_attention_with_memory_triton(
            query, key, value, query_raw, kv_state, kmean_state, eps=eps, proj_weight=proj_weight,
            proj_bias=proj_bias, topk_ratio=topk_ratio, block_size=block_size, key_centering=key_centering,
            scale=scale, dense=num_selected_blocks(num_key_blocks, topk_ratio) == num_key_blocks,
            pooled_key_prefix=pooled_key_prefix, state_is_projected=state_is_projected, pooled_blocks=pooled_blocks,
            memory_denominator=memory_denominator,
        )
    check_memory_query(query, query_raw, kmean_state, memory_denominator)
    check_memory_state(query, query_raw, kv_state, kmean_state)
    if state_is_projected and proj_weight is not None:
        raise ValueError("`state_is_projected=True` takes `kv_state` with the projection folded in; pass no `proj_weight`.")
    out = block_sparse_attention(query, key, value, topk_ratio=topk_ratio, block_size=block_size,
                                 key_centering=key_centering, scale=scale, pooled_key_prefix=pooled_key_prefix,
                                 pooled_blocks=pooled_blocks, kernel=kernel)
    if memory_denominator is not None:
        memory = linear_memory_read_naive(query, None, kv_state, None, eps, denominator=memory_denominator)
    else:
        memory = linear_memory_read(query, query_raw, kv_state, kmean_state, eps=eps, kernel=kernel)
    memory = memory.to(out.dtype)
    if proj_weight is not None:
        memory = torch.nn.functional.linear(memory, proj_weight, proj_bias)
    elif proj_bias is not None:
        memory = memory + proj_bias
    return out + memory


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    kernel: str = "reference",
) -> torch.Tensor:
    """
    RoPE of `x` `(B, L, H, D)` with Wan's tables `cos` / `sin` (broadcastable to `(1, L, 1, D)`), as
    [`apply_rotary_emb`] computes it (float32 math, rounded to `x`'s dtype), without gradient; written into `out` when
    given (`x` itself, or a view such as a slice of a cache buffer). The Triton kernel reads `x` and writes `out` once
    (the reference goes through float32 copies).
    """
    _check_kernel(kernel)
    if kernel == "triton" and _use_triton("rope", x):
        from .rotary.triton_kernel import apply_rope_triton

        return apply_rope_triton(x, cos, sin, out)
    return apply_rope_naive(x, cos, sin, out)


def rope_chunk_into_window(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    window_key: torch.Tensor,
    window_value: torch.Tensor,
    *,
    pool_block_size: int | None = None,
    key_centering: str = "heads",
    first_pooled_key_block: int = 0,
    memory_kmean: torch.Tensor | None = None,
    memory_eps: float = 1e-6,
    kernel: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """
    The RoPE step of a cached chunk (no gradient): returns the RoPE'd `query`, writes the RoPE'd `key` and `value`
    into the last rows of `window_key` / `window_value` (the cache's scratch slot after the cached context) and, with
    `pool_block_size`, returns the block selection's pooled blocks as `pooled_blocks` of [`block_sparse_attention`]
    takes them (key blocks of the window from `first_pooled_key_block` on); with `memory_kmean`, the linear memory
    read-out's denominators as [`block_sparse_attention_with_memory`] takes them (`memory_denominator`). The Triton
    kernel does it all in one launch. See `rotary/naive.py` for shapes.

    Returns:
        `(query_roped, pooled_query, pooled_key, memory_denominator)`; the pools `None` without `pool_block_size`,
        the denominators `None` without `memory_kmean`.
    """
    _check_kernel(kernel)
    args = (query, key, value, cos, sin, window_key, window_value, pool_block_size, key_centering,
            first_pooled_key_block, memory_kmean, memory_eps)
    if kernel == "triton" and _use_triton("rope", query, pool_block_size):
        from .rotary.triton_kernel import rope_chunk_into_window_triton

        return rope_chunk_into_window_triton(*args)
    return rope_chunk_into_window_naive(*args)


def linear_memory_absorb(
    kv_state: torch.Tensor,
    kmean_state: torch.Tensor,
    count: int,
    key_raw: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    key_roped: torch.Tensor | None = None,
    projection: torch.Tensor | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
    kernel: str = "reference",
) -> tuple[torch.Tensor, ...]:
    """
    Folds `s` new tokens into the linear memory's running means (spec 1.3): `kv` gets `R(key_raw) ⊗ value`, the keys
    RoPE'd by the op with `cos`/`sin` (rounded to the key dtype, as [`apply_rotary_emb`] does), and `kmean` gets
    `relu(key_raw)`. The Triton kernel passes no gradient (the callers absorb detached keys and values).

    Args:
        kv_state (`(B, H, D, D)` float32), kmean_state (`(B, H, D)` float32): the state before absorption.
        count (`int`): tokens absorbed so far.
        key_raw, value (`torch.Tensor` of shape `(B, s, H, D)`, one dtype, `D` even): the un-RoPE'd keys and the
            values; strided views (e.g. consecutive frames of a cache buffer) are read in place by the Triton kernel.
        cos, sin (`torch.Tensor` broadcastable to `(1, s, 1, D)`): RoPE tables of the keys' absorption positions
            (Wan's `repeat_interleave`d form, see [`apply_rotary_emb`]). With `key_roped`: one rotation for every
            token, broadcastable to `(1, 1, 1, D)`.
        key_roped (`(B, s, H, D)`, *optional*): the same keys already RoPE'd, at positions that all differ from the
            absorption positions by the one rotation `cos`/`sin` (the temporal shift by which relative RoPE moves a
            cache's window). The state then sums `key_roped ⊗ value` and rotates the sum once: the same state up to
            the rounding of `key_roped`, and the Triton kernel multiplies loaded tiles instead of rotating each key.
        projection (`(D, D)`, *optional*): a weight `W` (`linear_proj.weight`); also returns `kv @ W.T` (float32
            math, `W`'s dtype), the state the fused read-out takes.
        out (`tuple` of tensors, *optional*, eager only): contiguous buffers to write the results into, in the order
            returned; they may be `kv_state` / `kmean_state` themselves (an in-place update).
        kernel (`str`): `"reference"` or `"triton"`.

    Returns:
        `(kv_state, kmean_state)`, float32 (new tensors unless `out`), plus the projected state with `projection`. See
        `linear_memory/naive.py` for the math.
    """
    _check_kernel(kernel)
    if kernel == "triton" and _use_triton("memory", key_raw):
        from .linear_memory.triton_kernel import linear_memory_absorb_triton

        return linear_memory_absorb_triton(kv_state, kmean_state, count, key_raw, value, cos, sin, key_roped,
                                           projection, out)
    if out is not None:
        check_absorb_out(out, kv_state, kmean_state, projection)
    result = linear_memory_absorb_naive(kv_state, kmean_state, count, key_raw, value, cos, sin, key_roped, projection)
    if out is None:
        return result
    for buffer, value_ in zip(out, result):
        buffer.copy_(value_)
    return tuple(out)


def linear_memory_read(
    query_numerator: torch.Tensor,
    query_raw: torch.Tensor,
    kv_state: torch.Tensor,
    kmean_state: torch.Tensor,
    *,
    eps: float = 1e-6,
    kernel: str = "reference",
) -> torch.Tensor:
    """Reads the linear memory for every query token: `(q_num · kv) / (relu(q_raw) · kmean + eps)`, float32,
    `(B, S, H, D)`. See `linear_memory/naive.py`.

    `query_raw` must have the shape of `query_numerator`, `kv_state` be `(B, H, D, D)` and `kmean_state` `(B, H, D)`
    exactly (a batch-1 state is not broadcast; both kernels refuse it alike). Gradients: the reference
    differentiates w.r.t. both queries and the state; the Triton kernel w.r.t. both queries only. It passes no
    gradient to `kv_state` / `kmean_state` (the callers absorb detached keys and values) and raises a `ValueError` for
    a state that requires grad while grad is enabled, rather than leaving its `.grad` silently `None`."""
    _check_kernel(kernel)
    check_memory_state(query_numerator, query_raw, kv_state, kmean_state, "query_numerator")
    if kernel == "triton" and _use_triton("memory", query_raw):
        from .linear_memory.triton_kernel import linear_memory_read_triton

        return linear_memory_read_triton(query_numerator, query_raw, kv_state, kmean_state, eps=eps)
    return linear_memory_read_naive(query_numerator, query_raw, kv_state, kmean_state, eps)


def rms_norm_silu_with_cache(
    x: torch.Tensor,
    weight: torch.Tensor,
    cache: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    kernel: str = "reference",
) -> torch.Tensor:
    """`cat([cache, silu(rms_norm(x + bias) * weight)], dim=2)` over channels of `(B, C, T, H, W)` tensors: the Wan
    VAE's normalisation + activation in front of a causal convolution (`bias`: the previous convolution's). See
    `rms_norm_silu/naive.py`. The Triton kernel keeps `x`'s memory format (channels-first or channels-last 3D)."""
    _check_kernel(kernel)
    if kernel == "triton":
        from .rms_norm_silu.triton_kernel import rms_norm_silu_with_cache_triton

        return rms_norm_silu_with_cache_triton(x, weight, cache, bias)
    return rms_norm_silu_with_cache_naive(x, weight, cache, bias)


__all__ = [
    "KERNELS",
    "apply_rope",
    "apply_rotary_emb",
    "block_sparse_attention",
    "block_sparse_attention_with_memory",
    "check_pooled_key_prefix",
    "linear_memory_absorb",
    "linear_memory_read",
    "num_selected_blocks",
    "pool_key_blocks",
    "rms_norm_silu_with_cache",
    "rope_chunk_into_window",
    "select_key_blocks_naive",
    "triton_available",
]
