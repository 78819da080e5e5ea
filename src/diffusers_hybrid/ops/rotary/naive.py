# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Plain-PyTorch reference of the rotary ops (the kernels' ground truth): Wan's interleaved-pair RoPE, and the
cached-inference step that RoPEs a chunk, writes its keys and values into the window and pools the selection's
blocks."""

import torch

from ..block_sparse_attention.naive import mean_pool_blocks, pool_key_blocks_naive


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """
    Rotates consecutive channel pairs `(x[2i], x[2i+1])` of `x` by the angles encoded in `cos`/`sin`.

    Args:
        x (`torch.Tensor` of shape `(batch, seq_len, heads, head_dim)`): queries or keys.
        cos, sin (`torch.Tensor` broadcastable to `(1, seq_len, 1, head_dim)`): Wan's `repeat_interleave`d tables,
            i.e. `cos[..., 2i] == cos[..., 2i+1]`.

    Returns:
        `torch.Tensor`: the rotated tensor, same shape and dtype as `x` (computed in float32).
    """
    x_f = x.float()
    x1, x2 = x_f.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2].float()
    s = sin[..., 1::2].float()
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def check_rope_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None) -> None:
    """Validates the arguments of [`apply_rope`] (shared by the reference and the kernel)."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be (B, L, H, D) with D even, got shape {tuple(x.shape)}")
    table_shape = (1, x.shape[1], 1, x.shape[3])
    for name, table in (("cos", cos), ("sin", sin)):
        try:
            ok = table.dim() <= 4 and torch.broadcast_shapes(table.shape, table_shape) == table_shape
        except RuntimeError:
            ok = False
        if not ok or not table.is_floating_point():
            raise ValueError(f"{name} must be floating and broadcast to (1, L, 1, D) = {table_shape}, got "
                             f"{tuple(table.shape)} {table.dtype}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must have the shape, dtype and device of x {tuple(x.shape)} {x.dtype} {x.device}, "
                         f"got {tuple(out.shape)} {out.dtype} {out.device}")


@torch.no_grad()
def apply_rope_naive(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """[`apply_rotary_emb`] (no gradient), written into `out` when given (which may be `x` itself)."""
    check_rope_args(x, cos, sin, out)
    rotated = apply_rotary_emb(x, cos, sin)
    return rotated if out is None else out.copy_(rotated)


def check_window_args(query, key, value, window_key, window_value, pool_block_size, key_centering,
                      first_pooled_key_block, memory_kmean=None) -> int:
    """Validates the arguments of the chunk-into-window op; returns the chunk's first row in the window."""
    if query.shape != key.shape or key.shape != value.shape:
        raise ValueError(f"query, key and value must have one shape, got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    if window_key.shape != window_value.shape or window_key.shape[0] != key.shape[0] or \
            window_key.shape[2:] != key.shape[2:]:
        raise ValueError(f"window_key / window_value must be (B, W, H, D) with B, H, D of the key "
                         f"{tuple(key.shape)}, got {tuple(window_key.shape)} and {tuple(window_value.shape)}")
    if key_centering not in ("heads", "none"):
        raise ValueError(f"`key_centering` must be 'heads' or 'none', got {key_centering!r}.")
    if memory_kmean is not None and memory_kmean.shape != (key.shape[0], key.shape[2], key.shape[3]):
        raise ValueError(f"`memory_kmean` must have shape (B, H, D) = {(key.shape[0], key.shape[2], key.shape[3])}, "
                         f"got {tuple(memory_kmean.shape)}")
    start = window_key.shape[1] - key.shape[1]
    if start < 0:
        raise ValueError(f"the window ({window_key.shape[1]} rows) is shorter than the chunk ({key.shape[1]})")
    if pool_block_size is not None:
        if pool_block_size < 1:
            raise ValueError(f"`pool_block_size` must be positive, got {pool_block_size}")
        if not 0 <= first_pooled_key_block * pool_block_size <= start:
            raise ValueError(f"`first_pooled_key_block` {first_pooled_key_block} must start at or before the "
                             f"chunk's first window row {start} (blocks of {pool_block_size})")
    return start


@torch.no_grad()
def rope_chunk_into_window_naive(
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
    """
    One chunk's RoPE at cached inference: returns the RoPE'd `query`, writes the RoPE'd `key` and `value` into the
    last `L` rows of `window_key` / `window_value` (the cache's scratch slot; the rows before hold the cached
    context), and optionally pools the block selection's blocks and computes the linear memory read-out's
    denominators (both need the rows this step holds: the RoPE'd blocks, the raw query).

    Args:
        query, key, value (`torch.Tensor` of shape `(B, L, H, D)`): the chunk's un-RoPE'd queries and keys, values.
        cos, sin (`torch.Tensor` of shape `(1, L, 1, D)`): the chunk's RoPE tables (see [`apply_rotary_emb`]).
        window_key, window_value (`torch.Tensor` of shape `(B, W, H, D)`, `W >= L`): written in rows `W - L ..`.
        pool_block_size (`int`, *optional*): also return the mean-pooled query blocks and the pooled key blocks
            ([`pool_key_blocks_naive`] with `key_centering`) of `window_key` from block `first_pooled_key_block` on
            (which must start at or before the chunk; the blocks before come from elsewhere, e.g. the cache).
        memory_kmean (`torch.Tensor` of shape `(B, H, D)`, *optional*): the linear memory's key mean; also return
            the read-out's denominators `relu(query) · memory_kmean + memory_eps` (spec 1.3: un-RoPE'd query).

    Returns:
        `(query_roped, pooled_query, pooled_key, memory_denominator)`: `(B, L, H, D)` in the dtype of `query`;
        `(B, H, ceil(L / bs), D)` and `(B, H, ceil(W / bs) - first_pooled_key_block, D)` float32, or `None` without
        `pool_block_size`; `(B, L, H)` float32, or `None` without `memory_kmean`.
    """
    start = check_window_args(query, key, value, window_key, window_value, pool_block_size, key_centering,
                              first_pooled_key_block, memory_kmean)
    denominator = None
    if memory_kmean is not None:
        from ..linear_memory.naive import linear_memory_denominator_naive  # (that module imports this one)

        denominator = linear_memory_denominator_naive(query, memory_kmean, memory_eps)
    query_roped = apply_rotary_emb(query, cos, sin)
    window_key[:, start:] = apply_rotary_emb(key, cos, sin)
    window_value[:, start:] = value
    if pool_block_size is None:
        return query_roped, None, None, denominator
    pooled_query = mean_pool_blocks(query_roped, pool_block_size)
    pooled_key = pool_key_blocks_naive(window_key[:, first_pooled_key_block * pool_block_size :], pool_block_size,
                                       key_centering)
    return query_roped, pooled_query, pooled_key, denominator
