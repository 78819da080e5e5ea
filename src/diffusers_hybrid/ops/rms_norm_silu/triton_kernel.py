# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Triton kernel of the Wan VAE's normalisation + SiLU with the causal cache in front
(`rms_norm_silu_with_cache_naive` is its reference).

Each program normalises `BLOCK_ROWS` positions (batch, frame, pixel) over all channels at once and writes them after
the cache frames of the output, which the launcher copies in; inputs and outputs may be channels-first or
channels-last (strides are passed), so a VAE in either memory format reads and writes each element once.
"""

import os

import torch

if not torch.cuda.is_available():  # CPU only: run the kernels through Triton's interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .. import utils  # noqa: E402  (the live `utils.POISON_OUTPUTS`, which `poisoned_outputs()` switches)
from .naive import check_rms_norm_silu_args  # noqa: E402

NORM_EPS = 1e-12  # F.normalize's
ELEMENTS_PER_PROGRAM = 8192


@triton.jit
def _rms_norm_silu_kernel(X, W, B, OUT, rows, channels, positions_per_batch, out_row_shift,
                          s_xb, s_xr, s_xc, s_ob, s_or, s_oc, eps,
                          BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows_here = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    chans = tl.arange(0, BLOCK_C)
    row_ok = rows_here < rows
    chan_ok = chans < channels
    mask = row_ok[:, None] & chan_ok[None, :]
    batch = rows_here // positions_per_batch
    rest = rows_here - batch * positions_per_batch  # (frame, pixel) position within the batch element
    x = tl.load(X + (batch * s_xb + rest * s_xr)[:, None] + chans[None, :] * s_xc, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:  # the previous convolution's bias (masked channels stay 0 and do not enter the norm)
        x = x + tl.where(mask, tl.load(B + chans, mask=chan_ok, other=0.0)[None, :], 0.0)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
    w = tl.load(W + chans, mask=chan_ok, other=0.0)
    y = x * inv_norm[:, None] * w[None, :]
    y = y * tl.sigmoid(y)
    out_offsets = (batch * s_ob + (rest + out_row_shift) * s_or)[:, None] + chans[None, :] * s_oc
    tl.store(OUT + out_offsets, y.to(OUT.dtype.element_ty), mask=mask)


def _row_stride(t: torch.Tensor) -> int:
    """The stride between consecutive (frame, pixel) positions: frames, rows and pixels must form one flat axis (true
    of channels-first and channels-last contiguous tensors)."""
    _, _, frames, height, width = t.shape
    s_t, s_h, s_w = t.stride(2), t.stride(3), t.stride(4)
    if not ((s_h == s_w * width or height == 1) and (s_t == s_h * height or frames == 1)):
        raise ValueError(f"frames, rows and pixels of a tensor with strides {t.stride()} are not one flat axis")
    return s_w


def rms_norm_silu_with_cache_triton(
    x: torch.Tensor, weight: torch.Tensor, cache: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Same contract as `rms_norm_silu_with_cache_naive`; the output has `x`'s memory format (channels-first or
    channels-last 3D)."""
    check_rms_norm_silu_args(x, weight, cache, bias)
    batch, channels, frames, height, width = x.shape
    cache_frames = cache.shape[2]
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    if not (x.is_contiguous() or channels_last):
        x = x.contiguous()
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    out = torch.empty((batch, channels, cache_frames + frames, height, width), dtype=x.dtype, device=x.device,
                      memory_format=memory_format)
    if utils.POISON_OUTPUTS:
        utils._poison(out)
    out[:, :, :cache_frames].copy_(cache)
    weight = weight.reshape(-1).float().contiguous()
    bias_f32 = bias.reshape(-1).float().contiguous() if bias is not None else weight  # unread without a bias
    positions = frames * height * width
    rows = batch * positions
    block_c = triton.next_power_of_2(channels)
    block_rows = max(1, min(triton.next_power_of_2(rows), ELEMENTS_PER_PROGRAM // block_c))
    grid = (triton.cdiv(rows, block_rows),)
    _rms_norm_silu_kernel[grid](
        x, weight, bias_f32, out, rows, channels, positions, cache_frames * height * width,
        x.stride(0), _row_stride(x), x.stride(1), out.stride(0), _row_stride(out), out.stride(1), NORM_EPS,
        BLOCK_ROWS=block_rows, BLOCK_C=block_c, HAS_BIAS=bias is not None, num_warps=4 if block_rows * block_c <= 4096 else 8,
    )
    return out
