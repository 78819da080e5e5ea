# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Plain-PyTorch reference for the linear-attention memory of evicted tokens (the kernels' ground truth).

The state of one layer is a running *mean* over every absorbed token (spec §1.3):

    kv    = mean_t  R(k_t) ⊗ v_t          (B, H, D, D)   keys RoPE'd at their absorption positions, no feature map
    kmean = mean_t  φ(k_t)                (B, H, D)      φ = ReLU on the raw (un-RoPE'd) key
    count = number of absorbed tokens

and a query reads it as  o = (q_num · kv) / (φ(q) · kmean + eps),  with `q_num` the RoPE'd query (optionally after
φ) and the denominator's query un-RoPE'd. Both are kept in float32.
"""

import torch


def linear_memory_absorb_naive(
    kv_state: torch.Tensor,
    kmean_state: torch.Tensor,
    count: int,
    key_roped: torch.Tensor,
    key_raw: torch.Tensor,
    value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Folds `s` new tokens into the running means.

    Args:
        kv_state (`(B, H, D, D)` float32), kmean_state (`(B, H, D)` float32): the state before absorption.
        count (`int`): tokens absorbed so far (N).
        key_roped (`(B, s, H, D)`): keys RoPE'd at their absorption positions.
        key_raw (`(B, s, H, D)`): the same keys before RoPE.
        value (`(B, s, H, D)`).

    Returns:
        `(kv_state, kmean_state)` after absorption (new tensors; inputs are not modified).
    """
    num_new = key_roped.shape[1]
    kv_sum = torch.einsum("bshd,bshe->bhde", key_roped.float(), value.float())
    k_sum = torch.relu(key_raw.float()).sum(dim=1)
    total = count + num_new
    kv = (kv_sum + count * kv_state) / total
    kmean = (k_sum + count * kmean_state) / total
    return kv, kmean


def linear_memory_read_naive(
    query_numerator: torch.Tensor,
    query_raw: torch.Tensor,
    kv_state: torch.Tensor,
    kmean_state: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """
    Reads the memory for every query token.

    Args:
        query_numerator (`(B, S, H, D)`): the query used in the numerator (RoPE'd; optionally φ before RoPE).
        query_raw (`(B, S, H, D)`): the un-RoPE'd query; the denominator uses φ(query_raw).
        kv_state (`(B, H, D, D)`), kmean_state (`(B, H, D)`): float32 state.
        eps (`float`): added to the denominator.

    Returns:
        `torch.Tensor` of shape `(B, S, H, D)`, float32.
    """
    numerator = torch.einsum("bshd,bhde->bshe", query_numerator.float(), kv_state)
    denominator = torch.einsum("bshd,bhd->bsh", torch.relu(query_raw.float()), kmean_state) + eps
    return numerator / denominator.unsqueeze(-1)
