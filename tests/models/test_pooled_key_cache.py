# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The block selection's pooled key blocks kept in the layer cache (sink + history, recomputed in place by each commit)
give exactly what pooling every key in every pass gives; and the fused Triton attention + memory read-out path of the
processor, streamed through Triton's interpreter, matches the reference kernels."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffusers_hybrid.ops.block_sparse_attention.naive import pool_key_blocks_naive

from .test_transformer_hybrid_forcing import LATENT_H, LATENT_W, _hybrid, _inputs


def _set_pooled_key_cache(model, enabled: bool) -> None:
    for block in model.blocks:
        block.attn1.processor.cache_pooled_keys = enabled


def _stream(model, x, t, text, on_read=None):
    chunk = model.config.num_frame_per_block
    cache = model.init_cache(x.shape[0], LATENT_H, LATENT_W)
    outs = []
    for start in range(0, x.shape[2], chunk):
        xc, tc = x[:, :, start : start + chunk], t[:, start : start + chunk]
        read = model(xc, tc, text, cache=cache, frame_offset=start, cache_mode="read").sample
        if on_read is not None:
            on_read(start, cache)
        outs += [read, model(xc, tc, text, cache=cache, frame_offset=start, cache_mode="write").sample]
    return outs, cache


def _assert_pooled_current(cache, block_size, key_centering):
    for layer in cache.layers:
        num = layer.num_pooled_key_blocks(block_size)
        expected = pool_key_blocks_naive(layer.key[:, : num * block_size], block_size, key_centering)
        torch.testing.assert_close(layer.pooled_key, expected, atol=0, rtol=0)


ODD_LAYOUT = dict(sink_frames=1, local_attn_frames=5, num_frame_per_block=2, max_rope_frames=9,
                  absorb_sink_frames=False)


@pytest.mark.parametrize("key_centering, layout", [("heads", {}), ("none", ODD_LAYOUT)], ids=["official", "odd"])
def test_cached_pooled_keys_equal_recomputed(key_centering, layout, monkeypatch):
    model = _hybrid("hybrid", sparse_key_centering=key_centering, **layout)
    block_size = model.config.sparse_block_size
    chunk = model.config.num_frame_per_block
    x, t, text = _inputs(frames=6 * chunk)
    used = []
    from diffusers_hybrid.cache import HybridLayerCache

    original = HybridLayerCache.pooled_key_prefix

    def spy(self, plan, *args):
        prefix = original(self, plan, *args)
        used.append((plan.chunk_start, prefix is not None))
        return prefix

    monkeypatch.setattr(HybridLayerCache, "pooled_key_prefix", spy)
    buffers = {}

    def check(start, cache):
        _assert_pooled_current(cache, block_size, key_centering)
        # one buffer per layer, updated in place (what a CUDA-graph replay of the read passes relies on)
        ptrs = [layer.pooled_key.data_ptr() for layer in cache.layers]
        assert buffers.setdefault("ptrs", ptrs) == ptrs

    with torch.no_grad():
        _set_pooled_key_cache(model, True)
        cached, cache = _stream(model, x, t, text, on_read=lambda s, c: s > 0 and check(s, c))
        _set_pooled_key_cache(model, False)
        plain, _ = _stream(model, x, t, text)
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the prefix is used once sink and history are full (from the third chunk on in both layouts), by both passes
    assert {start for start, hit in used if hit} == {start for start in range(2 * chunk, 6 * chunk, chunk)}
    assert cache.layers[0].pooled_key.shape[2] == cache.layers[0].num_pooled_key_blocks(block_size) > 0


def test_pooled_keys_follow_rewind_reset_and_to():
    model = _hybrid("hybrid")
    block_size, centering = model.config.sparse_block_size, model.config.sparse_key_centering
    x, t, text = _inputs(frames=15)
    cache = model.init_cache(2, LATENT_H, LATENT_W)
    records = []
    with torch.no_grad():
        for start in range(0, 15, 3):
            records = (records + [cache.record_commit()])[-1:]
            model(x[:, :, start : start + 3], t[:, start : start + 3], text, cache=cache, frame_offset=start,
                  cache_mode="write")
        _assert_pooled_current(cache, block_size, centering)
        model.rewind_cache(cache, records)
        _assert_pooled_current(cache, block_size, centering)
        cache.to("cpu")
        _assert_pooled_current(cache, block_size, centering)
        cache.reset()
        _assert_pooled_current(cache, block_size, centering)
        assert all(float(layer.pooled_key.abs().sum()) == 0 for layer in cache.layers)


def _assert_projected_current(cache, weights):
    for layer, weight in zip(cache.layers, weights):
        expected = layer.kv_state @ weight.detach().float().t()
        torch.testing.assert_close(layer.projected_memory_state(weight), expected, atol=1e-5, rtol=1e-5)


def test_projected_memory_state_is_kept_in_the_weight_dtype():
    """A 16-bit model keeps the projected state in 16 bits (what the fused read-out multiplies in), computed in
    float32 and rounded once; reallocated when the weight's dtype changes."""
    model = _hybrid("hybrid")
    layer = model.init_cache(2, LATENT_H, LATENT_W).layers[0]
    layer.kv_state.normal_()
    weight = torch.randn_like(model.blocks[0].attn1.linear_proj.weight)
    for dtype in (torch.bfloat16, torch.float32):
        w = weight.to(dtype)
        layer.refresh_projected_memory(w)
        got = layer.projected_memory_state(w)
        assert got.dtype == dtype
        assert torch.equal(got, (layer.kv_state @ weight.to(dtype).float().t()).to(dtype))


def test_projected_memory_state_follows_commit_rewind_reset_and_weight_changes():
    """The memory state with `linear_proj` folded in, kept by the layer cache for the fused read-out: current after
    every commit (one buffer, updated in place), rewind, reset and `to`; refused for another or an updated weight."""
    model = _hybrid("hybrid")
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.linear_proj.weight.normal_()
    weights = [block.attn1.linear_proj.weight for block in model.blocks]
    x, t, text = _inputs(frames=18)
    cache = model.init_cache(2, LATENT_H, LATENT_W)
    records, ptrs = [], None
    with torch.no_grad():
        for layer, weight in zip(cache.layers, weights):
            assert layer.projected_memory_state(weight) is None  # nothing kept before the first request
            layer.refresh_projected_memory(weight)
        for start in range(0, 18, 3):
            records = (records + [cache.record_commit()])[-1:]
            model(x[:, :, start : start + 3], t[:, start : start + 3], text, cache=cache, frame_offset=start,
                  cache_mode="write")
            _assert_projected_current(cache, weights)
            now = [layer.projected_kv_state.data_ptr() for layer in cache.layers]
            assert ptrs in (None, now)  # recomputed in place: what a CUDA-graph replay of the read passes needs
            ptrs = now
        assert all(float(layer.kv_state.abs().sum()) > 0 for layer in cache.layers)  # memory was absorbed
        model.rewind_cache(cache, records)
        _assert_projected_current(cache, weights)
        cache.to("cpu")
        _assert_projected_current(cache, weights)
        layer = cache.layers[0]
        assert layer.projected_memory_state(torch.nn.Parameter(weights[0].detach().clone())) is None
        weights[0].add_(1.0)  # an optimizer step: the folded copy is stale until the next commit
        assert layer.projected_memory_state(weights[0]) is None
        layer.refresh_projected_memory(weights[0])
        _assert_projected_current(cache, weights)
        cache.reset()
        assert all(float(layer.projected_kv_state.abs().sum()) == 0 for layer in cache.layers)


def test_projected_memory_state_in_the_reference_op():
    """`state_is_projected=True` with the folded state gives what the per-call projection gives."""
    from diffusers_hybrid.ops import block_sparse_attention_with_memory

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 3, 32, generator=g) for n in (40, 100, 100))
    kv, kmean = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, generator=g) + 0.5
    w, b = torch.randn(32, 32, generator=g), torch.randn(32, generator=g)
    common = dict(topk_ratio=0.5, block_size=16)
    ref = block_sparse_attention_with_memory(q, k, v, q.relu(), kv, kmean, proj_weight=w, proj_bias=b, **common)
    got = block_sparse_attention_with_memory(q, k, v, q.relu(), kv @ w.t(), kmean, proj_bias=b,
                                             state_is_projected=True, **common)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="proj_weight"):
        block_sparse_attention_with_memory(q, k, v, q, kv, kmean, proj_weight=w, state_is_projected=True, **common)


def test_rope_step_pools_equal_the_selection_pooling():
    """`fuse_rope` (the processor's one-step RoPE + cache write + pooling, default) against the plain-PyTorch RoPE and
    copies with the selection pooling the keys itself: the same streamed outputs, bit for bit, with and without the
    cached pooled prefix."""
    model = _hybrid("hybrid", **ODD_LAYOUT)
    x, t, text = _inputs(frames=6 * model.config.num_frame_per_block)
    outs = {}
    with torch.no_grad():
        for cached in (True, False):
            _set_pooled_key_cache(model, cached)
            for fuse in (True, False):
                for block in model.blocks:
                    block.attn1.processor.fuse_rope = fuse
                outs[cached, fuse] = _stream(model, x, t, text)[0]
    for cached in (True, False):
        for a, b in zip(outs[cached, True], outs[cached, False]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dense_ratio_keeps_no_pooled_keys():
    model = _hybrid("hybrid", sparse_topk_ratio=1.0)
    x, t, text = _inputs(frames=9)
    with torch.no_grad():
        _, cache = _stream(model, x, t, text)
    assert all(layer.pooled_key is None for layer in cache.layers)


_TRITON_STREAM = textwrap.dedent(
    """
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers_hybrid import HybridForcingTransformer3DModel
    from diffusers_hybrid.ops.block_sparse_attention import triton_kernel as tk
    from diffusers_hybrid.ops.linear_memory import triton_kernel as lk
    from diffusers_hybrid.ops.rotary import triton_kernel as rk
    from diffusers_hybrid.ops.utils import poisoned_outputs

    torch.manual_seed(0)
    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2,
                                rope_max_seq_len=64).eval()
    model = HybridForcingTransformer3DModel.from_wan(
        wan, num_frame_per_block=3, sink_frames=3, local_attn_frames=6, max_rope_frames=12, sparse_block_size=16,
        sparse_topk_ratio=0.5, attention_mode="hybrid")
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.linear_proj.weight.normal_(std=0.5)
            block.attn1.linear_proj.bias.normal_(std=0.1)
    model = model.to(torch.bfloat16).eval()
    calls = {"fused": 0, "prefix": 0, "projected": 0, "pooled": 0, "den": 0, "rope": 0, "rope_pooled": 0, "rope_den": 0,
             "absorb": 0, "absorb_roped": 0, "absorb_projecting": 0}
    fused = tk.block_sparse_attention_with_memory_triton
    rope = rk.rope_chunk_into_window_triton
    absorb = lk.linear_memory_absorb_triton

    def spy(*args, **kwargs):
        calls["fused"] += 1
        calls["prefix"] += kwargs.get("pooled_key_prefix") is not None
        calls["pooled"] += kwargs.get("pooled_blocks") is not None
        calls["den"] += kwargs.get("memory_denominator") is not None and args[3] is None
        calls["projected"] += bool(kwargs.get("state_is_projected")) and kwargs.get("proj_weight") is None
        return fused(*args, **kwargs)

    def rope_spy(*args):
        out = rope(*args)
        calls["rope"] += 1
        calls["rope_pooled"] += out[2] is not None
        calls["rope_den"] += out[3] is not None
        return out

    def absorb_spy(*args):
        calls["absorb"] += 1
        calls["absorb_roped"] += args[7] is not None
        calls["absorb_projecting"] += args[8] is not None
        return absorb(*args)

    tk.block_sparse_attention_with_memory_triton = spy
    rk.rope_chunk_into_window_triton = rope_spy
    lk.linear_memory_absorb_triton = absorb_spy
    x = torch.randn(2, 4, 15, 6, 10, dtype=torch.bfloat16)
    t = torch.rand(2, 15) * 1000
    text = torch.randn(2, 7, 16, dtype=torch.bfloat16)

    def stream():
        cache = model.init_cache(2, 6, 10)
        outs = []
        for start in range(0, 15, 3):
            args = (x[:, :, start:start + 3], t[:, start:start + 3], text)
            outs.append(model(*args, cache=cache, frame_offset=start, cache_mode="read").sample)
            outs.append(model(*args, cache=cache, frame_offset=start, cache_mode="write").sample)
        return torch.cat(outs, dim=2).double(), cache

    with torch.no_grad(), poisoned_outputs():
        model.set_attention_kernel("reference")
        ref, _ = stream()
        model.set_attention_kernel("triton")
        got, cache = stream()
    err = ((got - ref).norm() / ref.norm()).item()
    # memory ready from chunk 2 (frames 6-8): 3 chunks x 2 passes x 2 layers fused, all with the cached prefix, the
    # layer cache's projected memory state (kept since the first commit) and the RoPE step's pooled blocks; the RoPE
    # step writes into the window in chunks 0, 2, 3 and 4 (chunk 1 sees a sink and a partial history: not
    # contiguous), with the read-out's denominators once the memory is ready (chunks 2-4), which the fused calls then
    # take. Absorptions (per layer, at the commits of chunks 1-4, each also recomputing the projected state): the
    # sink frames from raw keys, then history frames from their cached RoPE'd keys, shifted by 0 (chunk 2) and by
    # 3 frames (chunks 3 and 4: the RoPE clamp at 12), which chunk 4 reads
    assert calls == {"fused": 12, "prefix": 12, "projected": 12, "pooled": 12, "den": 12, "rope": 16,
                     "rope_pooled": 16, "rope_den": 12, "absorb": 8, "absorb_roped": 6, "absorb_projecting": 8}, calls
    assert got.isfinite().all() and err < 3e-2, err

    # the next chunk's read pass (steady state; its input reused) through the Triton ops traces whole (no graph
    # break) and runs the same kernels
    tk.block_sparse_attention_with_memory_triton, rk.rope_chunk_into_window_triton = fused, rope
    args = (x[:, :, 12:15], t[:, 12:15], text)
    with torch.no_grad():
        eager = model(*args, cache=cache, frame_offset=15, cache_mode="read").sample
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        traced = compiled(*args, cache=cache, frame_offset=15, cache_mode="read").sample
    assert torch.equal(traced, eager)
    print("OK", err)
    """
)


def test_triton_fused_memory_and_pooled_prefix_stream_in_interpreter():
    """The processor's Triton path (fused read-out, pooled key prefix) through Triton's CPU interpreter, in a child
    process so that `TRITON_INTERPRET` does not leak into other tests."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("covered on the GPU by tests/test_model_triton_gpu.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_STREAM], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
