# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Plain-PyTorch reference for block selection and block-sparse softmax attention (the kernels' ground truth).

Layout everywhere: `(batch, seq_len, heads, head_dim)`. Queries and keys are cut into contiguous blocks of
`block_size` tokens (the last block of each may be partial). Every query block attends to the `topk` key blocks
whose mean-pooled key has the largest dot product with the mean-pooled query block.
"""

import math

import torch
import torch.nn.functional as F


def num_selected_blocks(num_key_blocks: int, topk_ratio: float) -> int:
    """`max(1, floor(ratio * K))`, capped at `K`: never zero (the official `floor` alone gives 0 blocks, i.e. NaN,
    when `K < 5`)."""
    if not 0.0 < topk_ratio <= 1.0:
        raise ValueError(f"`topk_ratio` must be in (0, 1], got {topk_ratio}.")
    # The epsilon keeps exact products such as 0.2 * 220 = 44 from flooring to 43 through float error.
    return max(1, min(num_key_blocks, int(math.floor(topk_ratio * num_key_blocks + 1e-6))))


def mean_pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over each block of `block_size` tokens (partial last block: mean over its valid rows), in float32.

    Args:
        x (`torch.Tensor` of shape `(B, L, H, D)`).
    Returns:
        `torch.Tensor` of shape `(B, H, ceil(L / block_size), D)`, float32.
    """
    batch, length, heads, dim = x.shape
    num_blocks = -(-length // block_size)
    if num_blocks == 0:
        return x.new_zeros((batch, heads, 0, dim), dtype=torch.float32)
    padded = F.pad(x.float(), (0, 0, 0, 0, 0, num_blocks * block_size - length))
    sums = padded.view(batch, num_blocks, block_size, heads, dim).sum(dim=2)
    # rows per block, built on the device (no host-to-device copy: CUDA-graph capturable)
    counts = (length - block_size * torch.arange(num_blocks, device=x.device)).clamp(max=block_size).float()
    return (sums / counts.view(1, -1, 1, 1)).permute(0, 2, 1, 3)


def pool_key_blocks_naive(key: torch.Tensor, block_size: int = 64, key_centering: str = "heads") -> torch.Tensor:
    """
    The pooled key blocks the selection ranks against: `key_centering` applied per token, then the mean of every
    `block_size`-token block (see [`select_key_blocks_naive`]).

    Args:
        key (`torch.Tensor` of shape `(B, L, H, D)`).
    Returns:
        `torch.Tensor` of shape `(B, H, ceil(L / block_size), D)`, float32.
    """
    if key_centering == "heads":
        key = key.float() - key.float().mean(dim=2, keepdim=True)
    elif key_centering != "none":
        raise ValueError(f"`key_centering` must be 'heads' or 'none', got {key_centering!r}.")
    return mean_pool_blocks(key, block_size)


def check_pooled_key_prefix(pooled_key_prefix: torch.Tensor, key: torch.Tensor, block_size: int) -> int:
    """Validates precomputed pooled key blocks for a prefix of `key`; returns the number of prefix blocks `P` (the
    prefix covers keys `[0, min(P * block_size, L))`: whole blocks, or every block with the partial last one)."""
    batch, length, heads, dim = key.shape
    if pooled_key_prefix.dim() != 4 or pooled_key_prefix.shape[0] != batch or pooled_key_prefix.shape[1] != heads \
            or pooled_key_prefix.shape[3] != dim:
        raise ValueError(f"`pooled_key_prefix` must have shape (B, H, P, D) = ({batch}, {heads}, P, {dim}), got "
                         f"{tuple(pooled_key_prefix.shape)}")
    num_prefix = pooled_key_prefix.shape[2]
    if num_prefix > -(-length // block_size):
        raise ValueError(f"`pooled_key_prefix` holds {num_prefix} blocks of {block_size} tokens, more than the "
                         f"{length} keys make")
    return num_prefix


def check_pooled_blocks(pooled_blocks, query: torch.Tensor, key: torch.Tensor, block_size: int, num_prefix: int):
    """Validates precomputed `(pooled_query, pooled_key)` (see [`select_key_blocks_naive`]); returns them."""
    if not (isinstance(pooled_blocks, (tuple, list)) and len(pooled_blocks) == 2):
        raise ValueError("`pooled_blocks` must be a pair (pooled_query, pooled_key)")
    pooled_query, pooled_key = pooled_blocks
    batch, len_q, heads, dim = query.shape
    expected_q = (batch, heads, -(-len_q // block_size), dim)
    expected_k = (batch, heads, -(-key.shape[1] // block_size) - num_prefix, dim)
    if tuple(pooled_query.shape) != expected_q or tuple(pooled_key.shape) != expected_k:
        raise ValueError(f"`pooled_blocks` must have shapes {expected_q} and {expected_k} (the key blocks after the "
                         f"{num_prefix} of `pooled_key_prefix`), got {tuple(pooled_query.shape)} and "
                         f"{tuple(pooled_key.shape)}")
    return pooled_query, pooled_key


def select_key_blocks_naive(
    query: torch.Tensor,
    key: torch.Tensor,
    topk_ratio: float,
    block_size: int = 64,
    key_centering: str = "heads",
    pooled_key_prefix: torch.Tensor | None = None,
    pooled_blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """
    Chooses, per (batch, head, query block), the key blocks to attend to.

    Args:
        query (`torch.Tensor` of shape `(B, Lq, H, D)`), key (`torch.Tensor` of shape `(B, Lk, H, D)`).
        topk_ratio (`float`): fraction of key blocks kept (see [`num_selected_blocks`]).
        block_size (`int`): tokens per block.
        key_centering (`str`): `"heads"` subtracts the mean over the *head* axis from every key before pooling (what
            the official code does, a bug that changes the ranking; kept to reproduce released checkpoints);
            `"none"` skips it (centring over tokens would not change the ranking).
        pooled_key_prefix (`torch.Tensor` of shape `(B, H, P, D)`, *optional*): the pooled key blocks of the first
            `P * block_size` keys, as [`pool_key_blocks_naive`] computes them (e.g. kept by the cache for the part of
            the window that does not change between passes); only the remaining keys are pooled.
        pooled_blocks (`tuple`, *optional*): `(pooled_query, pooled_key)` computed elsewhere (e.g. by the RoPE step,
            `rope_chunk_into_window`): the mean-pooled query blocks `(B, H, M, D)` and the pooled key blocks after
            the prefix's `P`, `(B, H, K - P, D)`, float32; nothing is pooled here then.

    Returns:
        `torch.LongTensor` of shape `(B, H, ceil(Lq / block_size), topk)`: selected key-block indices, sorted
        ascending.
    """
    num_prefix = 0 if pooled_key_prefix is None else check_pooled_key_prefix(pooled_key_prefix, key, block_size)
    if pooled_blocks is not None:
        pooled_q, pooled_rest = (t.float() for t in check_pooled_blocks(pooled_blocks, query, key, block_size,
                                                                         num_prefix))
    else:
        pooled_q = mean_pool_blocks(query, block_size)
        pooled_rest = pool_key_blocks_naive(key[:, num_prefix * block_size :], block_size, key_centering)
    parts = [pooled_key_prefix.float()] if num_prefix else []
    pooled_k = torch.cat(parts + [pooled_rest], dim=2) if parts else pooled_rest
    scores = pooled_q @ pooled_k.transpose(-1, -2)  # (B, H, M, K)
    topk = num_selected_blocks(pooled_k.shape[2], topk_ratio)
    return scores.topk(topk, dim=-1).indices.sort(dim=-1).values


def check_key_length(key: torch.Tensor) -> None:
    """Attention needs at least one key: an empty key sequence is refused (the selection would pick a block that
    does not exist)."""
    if key.dim() == 4 and key.shape[1] == 0:
        raise ValueError(f"key must hold at least one token, got shape {tuple(key.shape)}")


def check_pool_out(out: torch.Tensor, key: torch.Tensor, block_size: int) -> None:
    """Validates the `out` buffer of [`pool_key_blocks_naive`] / `pool_key_blocks_triton` (shared by both kernels):
    a contiguous float32 `(B, H, ceil(L / block_size), D)` tensor on the key's device."""
    batch, length, heads, dim = key.shape
    shape = (batch, heads, -(-length // block_size), dim)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous() or out.device != key.device:
        layout = "" if out.is_contiguous() else " (not contiguous)"
        raise ValueError(f"`out` must be a contiguous float32 tensor of shape {shape} on {key.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}{layout}")


def check_block_index(block_index: torch.Tensor, query: torch.Tensor, key: torch.Tensor, block_size: int,
                      check_values: bool = True) -> None:
    """Validates a precomputed selection (shared by the reference and the kernel): an integer tensor of shape exactly
    `(B, H, ceil(Lq / block_size), topk)` (no batch broadcast), `1 <= topk <= K`, and with `check_values` every index
    in `[0, K)` and none repeated within a row (the kernel attends to each listed block, a repeat would count a block
    twice)."""
    batch, len_q, heads, _ = query.shape
    num_q_blocks, num_k_blocks = -(-len_q // block_size), -(-key.shape[1] // block_size)
    if block_index.dim() != 4 or tuple(block_index.shape[:3]) != (batch, heads, num_q_blocks):
        raise ValueError(f"block_index must have shape (B, H, M, topk) = ({batch}, {heads}, {num_q_blocks}, topk), "
                         f"got {tuple(block_index.shape)}")
    if not 1 <= block_index.shape[-1] <= num_k_blocks:
        raise ValueError(f"block_index must select 1 to {num_k_blocks} key blocks per row, got "
                         f"{block_index.shape[-1]}")
    if block_index.dtype.is_floating_point or block_index.dtype.is_complex or block_index.dtype == torch.bool:
        raise ValueError(f"block_index must be an integer tensor, got {block_index.dtype}")
    if not check_values or block_index.numel() == 0 or torch.compiler.is_compiling():
        return
    # The range and repeats need the values: one device sync. A given `block_index` comes from benchmarks and tests
    # only (the ops build their own selection and skip this), so the sync is acceptable here.
    ordered = block_index.long().sort(dim=-1).values
    repeats = ordered[..., 1:] == ordered[..., :-1]
    low, high, repeated = torch.stack([ordered[..., 0].min(), ordered[..., -1].max(), repeats.any().long()]).tolist()
    if low < 0 or high >= num_k_blocks:
        raise ValueError(f"block_index must hold key blocks in [0, {num_k_blocks}), got {low if low < 0 else high}")
    if repeated:
        value = int(ordered[..., 1:][repeats][0])
        raise ValueError(f"block_index selects key block {value} twice in one row (indices must be unique per row)")


def block_mask_from_indices(block_index: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """`(B, H, M, topk)` indices -> boolean `(B, H, M, K)` block map."""
    mask = torch.zeros(*block_index.shape[:-1], num_key_blocks, dtype=torch.bool, device=block_index.device)
    return mask.scatter_(-1, block_index, True)


def block_sparse_attention_naive(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_index: torch.Tensor | None,
    block_size: int = 64,
    scale: float | None = None,
    *,
    check_index_values: bool = True,
) -> torch.Tensor:
    """
    Softmax attention restricted to the selected key blocks, computed densely with a mask in float32.

    Args:
        query (`(B, Lq, H, D)`), key (`(B, Lk, H, D)`), value (`(B, Lk, H, D)`).
        block_index (`(B, H, ceil(Lq/bs), topk)` integer tensor or `None`): selected key blocks, unique per row and
            in `[0, K)` (checked as the Triton kernel checks them, see [`check_block_index`]); `None` means all keys
            (dense).
        scale (`float`, *optional*): defaults to `1/sqrt(D)`.
        check_index_values (`bool`): check the range and uniqueness of `block_index` (a device sync); the dispatch
            skips it for the selection it computed itself.

    Returns:
        `torch.Tensor` of shape `(B, Lq, H, D)` in the dtype of `query`.
    """
    len_q, len_k = query.shape[1], key.shape[1]
    q, k, v = (t.float().transpose(1, 2) for t in (query, key, value))
    mask = None
    if block_index is not None:
        check_block_index(block_index, query, key, block_size, check_index_values)
        num_key_blocks = -(-len_k // block_size)
        block_map = block_mask_from_indices(block_index, num_key_blocks)
        mask = block_map.repeat_interleave(block_size, dim=2)[:, :, :len_q]
        mask = mask.repeat_interleave(block_size, dim=3)[..., :len_k]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).to(query.dtype)
