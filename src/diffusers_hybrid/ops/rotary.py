# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Rotary position embedding in Wan's interleaved-pair layout (plain PyTorch)."""

import torch


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
