# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Reference of the Wan VAE's normalisation + activation in front of a causal convolution (plain PyTorch)."""

import torch
import torch.nn.functional as F


def check_rms_norm_silu_args(
    x: torch.Tensor, weight: torch.Tensor, cache: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    if x.ndim != 5:
        raise ValueError(f"`x` must be (batch, channels, frames, height, width), got shape {tuple(x.shape)}.")
    batch, channels, _, height, width = x.shape
    if weight.numel() != channels:
        raise ValueError(f"`weight` must hold one value per channel ({channels}), got shape {tuple(weight.shape)}.")
    if cache.ndim != 5 or (cache.shape[0], cache.shape[1], cache.shape[3], cache.shape[4]) != (
        batch, channels, height, width
    ):
        raise ValueError(
            f"`cache` must be (batch, channels, cache_frames, height, width) = ({batch}, {channels}, *, {height}, "
            f"{width}), got shape {tuple(cache.shape)}."
        )
    if bias is not None and bias.numel() != channels:
        raise ValueError(f"`bias` must hold one value per channel ({channels}), got shape {tuple(bias.shape)}.")
    if cache.dtype != x.dtype:
        raise ValueError(f"`cache` must have the dtype of `x` ({x.dtype}), got {cache.dtype}.")


def rms_norm_silu_with_cache_naive(
    x: torch.Tensor, weight: torch.Tensor, cache: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """
    `cat([cache, silu(x' / max(||x'||, 1e-12) * weight)], dim=2)` with `x' = x + bias`: the RMS normalisation over
    channels of diffusers' `WanRMS_norm` (its `gamma * sqrt(channels)` folded into `weight`) and SiLU in float32,
    rounded once to `x`'s dtype, with the causal cache frames in front, as the next causal convolution reads its input.
    `bias` is the previous convolution's, added here instead of in a pass of its own.

    Args:
        x (`torch.Tensor` of shape `(batch, channels, frames, height, width)`).
        weight (`torch.Tensor` of `channels` elements): float32 scale per channel.
        cache (`torch.Tensor` of shape `(batch, channels, cache_frames, height, width)`): `x`'s dtype.
        bias (`torch.Tensor` of `channels` elements, *optional*): added to `x` (in float32) before the normalisation.

    Returns:
        `torch.Tensor` of shape `(batch, channels, cache_frames + frames, height, width)` in `x`'s dtype.
    """
    check_rms_norm_silu_args(x, weight, cache, bias)
    x32 = x.float() if bias is None else x.float() + bias.float().view(1, -1, 1, 1, 1)
    y = F.silu(F.normalize(x32, dim=1) * weight.float().view(1, -1, 1, 1, 1))
    return torch.cat([cache, y.to(x.dtype)], dim=2)
