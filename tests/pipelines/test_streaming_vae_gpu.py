# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The fused streaming VAE decode on a GPU (Triton or compiled normalisation, both memory formats), replayed from a CUDA
graph, against diffusers' path (needs CUDA)."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from diffusers_hybrid import StreamingWanDecoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def no_tf32():
    """Both paths in true float32: TF32 convolutions would differ by the algorithms cuDNN picks for each."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("norm_kernel", ["triton", "compiled"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
@torch.no_grad()
def test_fused_graphed_decode_matches_diffusers_path(memory_format, norm_kernel, no_tf32):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2).cuda().eval()
    for name, param in vae.named_parameters():
        if name.endswith("gamma"):
            param.copy_(1 + 0.5 * torch.randn_like(param))
        elif name.endswith("bias"):
            param.copy_(0.1 * torch.randn_like(param))
    latents = torch.randn(1, 16, 18, 10, 14, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    reference = StreamingWanDecoder(vae, frames_per_call=None)
    fused = StreamingWanDecoder(vae, frames_per_call=None, fused=True, norm_kernel=norm_kernel,
                                memory_format=memory_format)
    fused.enable_cuda_graph()
    for index in range(6):  # chunk 0: diffusers path; 1: eager fused; 2: capture + replay; 3-5: replays
        chunk = latents[:, :, 3 * index : 3 * index + 3]
        want, got = reference.decode(chunk), fused.decode(chunk)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert fused.graph_replays == 4
