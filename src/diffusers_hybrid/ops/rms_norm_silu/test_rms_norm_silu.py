# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The Wan VAE's normalisation + SiLU with the causal cache in front: Triton kernel against its reference.

On CPU the kernel runs through Triton's interpreter at small awkward shapes (channel counts that are not powers of
two, several frames, batch 2, channels-first and channels-last), fresh random inputs per run, the output poisoned
before the launch. The interpreter rounds float32 to bfloat16 by truncation, so bf16 results are compared within
one bf16 step. With CUDA the same cases run on the GPU.
"""

import pytest
import torch

from diffusers_hybrid.ops import rms_norm_silu_with_cache, triton_available
from diffusers_hybrid.ops.rms_norm_silu.naive import rms_norm_silu_with_cache_naive
from diffusers_hybrid.ops.utils import poisoned_outputs

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without CUDA


def _case(batch, channels, frames, height, width, cache_frames, dtype, memory_format, device=DEVICE):
    x = (torch.randn(batch, channels, frames, height, width, device=device) * 3 + 0.5).to(dtype)
    cache = torch.randn(batch, channels, cache_frames, height, width, device=device).to(dtype)
    weight = 1 + 0.5 * torch.randn(channels, device=device)
    return x.contiguous(memory_format=memory_format), weight, cache.contiguous(memory_format=memory_format)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("shape", [(2, 24, 3, 5, 7, 2), (1, 70, 1, 3, 9, 2), (2, 5, 4, 2, 3, 1)])
def test_rms_norm_silu_with_cache_matches_reference(dtype, memory_format, shape, with_bias):
    x, weight, cache = _case(*shape, dtype, memory_format)
    bias = torch.randn(shape[1], device=x.device).to(dtype) if with_bias else None
    want = rms_norm_silu_with_cache_naive(x, weight, cache, bias)
    with poisoned_outputs():
        got = rms_norm_silu_with_cache(x, weight, cache, bias=bias, kernel="triton")
    assert got.shape == want.shape and got.dtype == dtype and got.isfinite().all()
    assert got.is_contiguous(memory_format=memory_format)
    step = {torch.bfloat16: 2.0**-7, torch.float32: 1e-6}[dtype]
    assert (got.float() - want.float()).abs().max() <= step * want.float().abs().max() + 1e-6
    assert torch.equal(got[:, :, : shape[-1]], cache)  # the cache frames are copied unchanged


def test_rms_norm_silu_with_cache_reference_and_errors():
    x, weight, cache = _case(2, 6, 3, 2, 2, 2, torch.float32, torch.contiguous_format)
    got = rms_norm_silu_with_cache(x, weight, cache, kernel="reference")
    norm = x / x.pow(2).sum(1, keepdim=True).sqrt()
    y = norm * weight.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(got[:, :, 2:], y * torch.sigmoid(y))
    bias = torch.randn(6, device=x.device)
    got = rms_norm_silu_with_cache(x, weight, cache, bias=bias, kernel="reference")
    shifted = x + bias.view(1, -1, 1, 1, 1)
    y = shifted / shifted.pow(2).sum(1, keepdim=True).sqrt() * weight.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(got[:, :, 2:], y * torch.sigmoid(y))
    with pytest.raises(ValueError, match="bias"):
        rms_norm_silu_with_cache(x, weight, cache, bias=bias[:4])
    with pytest.raises(ValueError, match="weight"):
        rms_norm_silu_with_cache(x, weight[:5], cache)
    with pytest.raises(ValueError, match="cache"):
        rms_norm_silu_with_cache(x, weight, cache[:, :3])
    with pytest.raises(ValueError, match="kernel"):
        rms_norm_silu_with_cache(x, weight, cache, kernel="cuda")


class _NoLaunch:
    """Stands for a Triton kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_poisoned_outputs_reach_this_module(monkeypatch):
    """Inside `poisoned_outputs()` the output is poisoned before the launch: with the kernel launch stubbed out,
    nothing is written after the cache frames, so they are NaN. The module must read the live flag
    (`utils.POISON_OUTPUTS`), not a copy bound at import (which stayed False and made the poisoning a no-op)."""
    from diffusers_hybrid.ops.rms_norm_silu import triton_kernel as tk

    assert not hasattr(tk, "POISON_OUTPUTS")
    monkeypatch.setattr(tk, "_rms_norm_silu_kernel", _NoLaunch())
    x, weight, cache = _case(1, 6, 2, 3, 4, 1, torch.float32, torch.contiguous_format)
    with poisoned_outputs():
        out = tk.rms_norm_silu_with_cache_triton(x, weight, cache)
    assert torch.equal(out[:, :, :1], cache) and out[:, :, 1:].isnan().all()
