# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""StreamingWanDecoder: chunk-by-chunk decoding equals decoding the whole latent video at once."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from diffusers_hybrid import StreamingWanDecoder

VAE_CONFIGS = {
    "tiny": dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    # Wan2.1's block structure (temporal upsampling in two stages, 2 residual blocks, wider channels)
    "wan21_shape": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=2),
}


def _vae(name):
    torch.manual_seed(0)
    return AutoencoderKLWan(**VAE_CONFIGS[name]).eval()


def _chunks(latents, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(latents[:, :, start : start + size])
        start += size
    return out


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
@torch.no_grad()
def test_streaming_decode_equals_full_decode_exactly(name):
    vae = _vae(name)
    latents = torch.randn(2, 16, 9, 4, 6, generator=torch.Generator().manual_seed(1))
    full = vae.decode(latents).sample
    assert full.shape == (2, 3, 33, 32, 48)
    decoder = StreamingWanDecoder(vae)
    parts = [decoder.decode(chunk) for chunk in _chunks(latents, [3, 3, 3])]
    assert [p.shape[2] for p in parts] == [9, 12, 12]
    assert torch.equal(torch.cat(parts, dim=2), full)  # bit-exact in float32

    # any chunking, and the decoder is reusable after reset()
    decoder.reset()
    parts = [decoder.decode(chunk) for chunk in _chunks(latents, [1, 5, 2, 1])]
    assert [p.shape[2] for p in parts] == [1, 20, 8, 4]
    assert torch.equal(torch.cat(parts, dim=2), full)


@torch.no_grad()
def test_naive_per_chunk_decode_is_wrong():
    """Why the streaming decoder exists: AutoencoderKLWan.decode restarts its causal cache on every call."""
    vae = _vae("tiny")
    latents = torch.randn(1, 16, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    naive = torch.cat([vae.decode(chunk).sample for chunk in _chunks(latents, [3, 3])], dim=2)
    assert naive.shape[2] == 18  # instead of 21
    streamed = torch.cat([StreamingWanDecoder(vae).decode(latents)], dim=2)
    assert streamed.shape[2] == 21


@torch.no_grad()
def test_whole_chunk_calls_match_up_to_rounding():
    vae = _vae("wan21_shape")
    latents = torch.randn(1, 16, 9, 4, 4, generator=torch.Generator().manual_seed(3))
    full = vae.decode(latents).sample
    decoder = StreamingWanDecoder(vae, frames_per_call=None)
    streamed = torch.cat([decoder.decode(chunk) for chunk in _chunks(latents, [3, 3, 3])], dim=2)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_memory_is_constant_and_counts():
    vae = _vae("tiny")
    decoder = StreamingWanDecoder(vae)
    assert decoder.nbytes() == 0 and decoder.num_output_frames(3) == 9
    sizes = []
    for i in range(12):
        decoder.decode(torch.randn(1, 16, 3, 4, 4))
        sizes.append(decoder.nbytes())
    assert decoder.num_output_frames(3) == 12 and decoder.latent_frames_decoded == 36
    assert sizes == [sizes[0]] * 12 and sizes[0] > 0
    decoder.reset()
    assert decoder.nbytes() == 0 and decoder.latent_frames_decoded == 0


def test_denormalize_matches_wan_pipeline():
    vae = _vae("tiny")
    latents = torch.randn(1, 16, 3, 2, 2)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(StreamingWanDecoder(vae).denormalize(latents), latents / std + mean)


@torch.no_grad()
def test_offload_hook_is_triggered_and_bad_input():
    vae = _vae("tiny")
    calls = []

    class Hook:
        def pre_forward(self, module):
            calls.append(module)

    vae._hf_hook = Hook()
    decoder = StreamingWanDecoder(vae)
    decoder.decode(torch.randn(1, 16, 1, 2, 2))
    assert calls == [vae]
    # the fused path does not run under offloading (it would pin re-laid-out weights on the device)
    fused = StreamingWanDecoder(vae, fused=True)
    for _ in range(3):
        fused.decode(torch.randn(1, 16, 3, 2, 2))
    assert fused._steady is None and fused._warned_offload
    with pytest.raises(ValueError, match="latents"):
        decoder.decode(torch.randn(1, 8, 1, 2, 2))
    vae.enable_tiling()
    with pytest.raises(ValueError, match="tiling"):
        StreamingWanDecoder(vae)


def _vae_with_random_norms(name, dtype=torch.float32):
    """A VAE whose RMS-norm gammas and biases are random (at init they are ones and zeros, which would hide a wrong
    scale or a dropped bias)."""
    vae = _vae(name)
    with torch.no_grad():
        for param_name, param in vae.named_parameters():
            if param_name.endswith("gamma"):
                param.copy_(1 + 0.5 * torch.randn_like(param))
            elif param_name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return vae.to(dtype)


@pytest.mark.parametrize(
    "frames_per_call, sizes, norm_kernel, memory_format",
    [
        (None, [3, 3, 3, 3], None, None),
        (1, [1, 5, 2, 1, 3], None, None),
        # (the Triton normalisation is tested against this one in ops/, and inside the decoder on the GPU)
        (None, [3, 3, 3, 3], "reference", torch.channels_last_3d),
    ],
)
@torch.no_grad()
def test_fused_decoder_matches_diffusers_path(frames_per_call, sizes, norm_kernel, memory_format):
    vae = _vae_with_random_norms("wan21_shape")
    latents = torch.randn(1, 16, 12, 4, 6, generator=torch.Generator().manual_seed(4))
    reference = StreamingWanDecoder(vae, frames_per_call=frames_per_call)
    fused = StreamingWanDecoder(vae, frames_per_call=frames_per_call, fused=True, norm_kernel=norm_kernel,
                                memory_format=memory_format)
    chunks = _chunks(latents, sizes)
    expected = [reference.decode(chunk) for chunk in chunks]
    # once the cache is full, diffusers' decoder forward must not run any more
    got = [fused.decode(chunks[0])]
    forward = vae.decoder.forward
    steady_calls = []
    vae.decoder.forward = lambda *a, **k: (steady_calls.append(1), forward(*a, **k))[1]
    for chunk in chunks[1:]:
        got.append(fused.decode(chunk))
    del vae.decoder.forward
    assert fused._steady is not None and len(fused._steady._subpixel) == 3  # the upsamplings in sub-pixel form
    # copies only of the convolutions the steady-state forward runs itself: every 3D one, no 2D one (the attention's
    # 1x1 convolutions run inside diffusers' module, the upsampling ones in sub-pixel form)
    conv3d = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert set(fused._steady._weights) == set(conv3d)
    assert len(steady_calls) <= 1  # at most the call that fills the cache (the second latent frame of the stream)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert fused.nbytes() == reference.nbytes()
    # the cache lives in fixed buffers, updated in place
    pointers = [t.data_ptr() for t in fused._steady.cache]
    fused.decode(torch.randn(1, 16, 3, 4, 6))
    assert [t.data_ptr() for t in fused._steady.cache] == pointers
    fused.reset()
    assert fused._steady is None and fused.nbytes() == 0
    torch.testing.assert_close(fused.decode(chunks[0]), expected[0], atol=0, rtol=0)


@torch.no_grad()
def test_fused_decoder_bf16_is_as_close_to_float32_as_diffusers():
    vae32 = _vae_with_random_norms("wan21_shape")
    vae16 = _vae_with_random_norms("wan21_shape", torch.bfloat16)
    latents = torch.randn(1, 16, 9, 4, 6, generator=torch.Generator().manual_seed(6))
    exact = StreamingWanDecoder(vae32, frames_per_call=None)
    stock = StreamingWanDecoder(vae16, frames_per_call=None)
    fused = StreamingWanDecoder(vae16, frames_per_call=None, fused=True)
    for chunk in _chunks(latents, [3, 3, 3]):
        want = exact.decode(chunk)
        err_stock = (stock.decode(chunk.bfloat16()).float() - want).norm() / want.norm()
        err_fused = (fused.decode(chunk.bfloat16()).float() - want).norm() / want.norm()
        assert err_fused < 1.25 * err_stock + 1e-3 and err_fused < 0.1
    assert fused._steady is not None


def test_fused_decoder_options_and_fallback():
    vae = _vae("tiny")
    with pytest.raises(ValueError, match="norm_kernel"):
        StreamingWanDecoder(vae, fused=True, norm_kernel="cuda")
    with pytest.raises(ValueError, match="memory_format"):
        StreamingWanDecoder(vae, fused=True, memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="fused=True"):
        StreamingWanDecoder(vae).enable_cuda_graph()
    # a decoder with residual up blocks (Wan2.2's layout) keeps the diffusers path
    torch.manual_seed(0)
    residual = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True).eval()
    decoder = StreamingWanDecoder(residual, fused=True)
    with torch.no_grad():
        for _ in range(3):
            decoder.decode(torch.randn(1, 16, 3, 4, 4))
    assert decoder._steady is None


def test_decode_with_grad_truncates_at_each_call():
    """`enable_grad=True` (stream training of a decoder): the output of each call backpropagates into the decoder, the
    cache of earlier calls is detached, and the frames equal the inference path's; the default decodes without a
    graph, also where the caller has grad enabled."""
    vae = _vae(next(iter(VAE_CONFIGS)))
    latents = torch.randn(1, vae.config.z_dim, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    plain = StreamingWanDecoder(vae)
    expected = torch.cat([plain.decode(c) for c in _chunks(latents, [2, 3])], dim=2)
    assert not expected.requires_grad
    trained = StreamingWanDecoder(vae, enable_grad=True)
    first = trained.decode(latents[:, :, :2])
    first.square().mean().backward()
    vae.zero_grad()
    second = trained.decode(latents[:, :, 2:])
    second.square().mean().backward()  # would raise if the cache still held the first call's graph
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.decoder.parameters())
    torch.testing.assert_close(torch.cat([first, second], dim=2).detach(), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fused"):
        StreamingWanDecoder(vae, fused=True, enable_grad=True)
