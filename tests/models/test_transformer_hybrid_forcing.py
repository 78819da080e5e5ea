# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""HybridForcingTransformer3DModel: Wan equivalence, streaming == full sequence, memory, loading, training hooks."""

import copy
import os

import pytest
import torch
from diffusers import WanTransformer3DModel

from diffusers_hybrid import HybridForcingTransformer3DModel

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
)
TINY_HYBRID = dict(
    num_frame_per_block=3, sink_frames=3, local_attn_frames=6, dense_max_frames=9, max_rope_frames=12,
    sparse_block_size=8, sparse_topk_ratio=0.5,
)
LATENT_H, LATENT_W = 6, 10  # 3x5 = 15 tokens per frame: not a multiple of the sparse block
MODES = ["dense", "window", "hybrid"]


def _inputs(batch=2, frames=3, seed=None, text_len=7):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    x = torch.randn(batch, 4, frames, LATENT_H, LATENT_W, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    text = torch.randn(batch, text_len, 16, generator=g)
    return x, t, text


def _wan(seed=0, **overrides):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_WAN, **overrides}).eval()


def _hybrid(mode="hybrid", seed=0, memory_on=True, **overrides):
    wan_overrides = {k: overrides.pop(k) for k in list(overrides) if k in TINY_WAN}
    model = HybridForcingTransformer3DModel.from_wan(
        _wan(seed, **wan_overrides), **{**TINY_HYBRID, "attention_mode": mode, **overrides}
    )
    if memory_on:  # linear_proj starts at zero; give it weight so the memory branch matters
        with torch.no_grad():
            for block in model.blocks:
                block.attn1.linear_proj.weight.normal_(std=0.5)
                block.attn1.linear_proj.bias.normal_(std=0.1)
    return model.eval()


def _stream(model, x, t, text, passes_per_chunk=2):
    """Runs `x` chunk by chunk: `passes_per_chunk - 1` read passes then one write pass; returns the write outputs."""
    chunk = model.config.num_frame_per_block
    cache = model.init_cache(x.shape[0], LATENT_H, LATENT_W)
    outputs = []
    for start in range(0, x.shape[2], chunk):
        xc, tc = x[:, :, start : start + chunk], t[:, start : start + chunk]
        for _ in range(passes_per_chunk - 1):
            read = model(xc, tc, text, cache=cache, frame_offset=start, cache_mode="read").sample
        out = model(xc, tc, text, cache=cache, frame_offset=start, cache_mode="write").sample
        if passes_per_chunk > 1:
            torch.testing.assert_close(read, out, atol=1e-5, rtol=1e-5)
        outputs.append(out)
    return torch.cat(outputs, dim=2), cache


# ------------------------------------------------------------------------------------------------------------------
# equivalences
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_from_wan_first_chunk_equals_wan(mode):
    wan = _wan()
    model = HybridForcingTransformer3DModel.from_wan(wan, **{**TINY_HYBRID, "attention_mode": mode}).eval()
    # a first chunk has no history; at ratio 1 the hybrid window is dense and linear_proj is zero
    model.register_to_config(sparse_topk_ratio=1.0)
    x, _, text = _inputs()
    t = torch.tensor([999.0, 321.0])
    with torch.no_grad():
        expected = wan(x, t, text).sample
        actual = model(x, t, text).sample
        cache = model.init_cache(2, LATENT_H, LATENT_W)
        streamed = model(x, t, text, cache=cache, cache_mode="write").sample
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if "linear_proj" in n)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rope_mode", ["relative", "absolute"])
def test_streaming_equals_full_sequence(mode, rope_mode):
    model = _hybrid(mode, rope_mode=rope_mode)
    x, t, text = _inputs(frames=18)  # 6 chunks: past the RoPE clamp (12) and well past the window
    with torch.no_grad():
        full = model(x, t, text).sample
        streamed, cache = _stream(model, x, t, text)
    assert full.abs().mean() > 0.1
    torch.testing.assert_close(streamed, full, atol=2e-5, rtol=1e-4)
    assert cache.frames_written == 18
    if mode == "hybrid":
        # after the last write the memory is ready for the next chunk (18): every frame before its window
        # (18 + 3 - 6 = 15 frames), the sink included
        assert cache.memory_tokens == 15 * 15
    else:
        assert cache.memory_tokens == 0


@pytest.mark.parametrize("config, frames, absorbed_frames", [
    # sink not aligned with chunks, window not a multiple of the chunk, memory without the sink; ready for the next
    # chunk (14, 15): frames 1 .. 10 left its window (14 + 2 - 5 = 11), frame 0 is a sink
    (dict(sink_frames=1, local_attn_frames=5, max_rope_frames=9, absorb_sink_frames=False,
          sparse_key_centering="none", linear_attn_query="roped_relu"), 14, 10),
    # a window shorter than two chunks: the frames absorbed at a commit straddle the cache's history and the current
    # chunk, so the commit gathers them from two buffers; ready for the next chunk (10, 11): frames 0 .. 8 left its
    # window (10 + 2 - 3 = 9), the sink included
    (dict(sink_frames=1, local_attn_frames=3, max_rope_frames=7, absorb_sink_frames=True), 10, 9),
], ids=["odd_layout", "absorbing_across_buffers"])
def test_streaming_equals_full_sequence_other_layouts(config, frames, absorbed_frames):
    model = _hybrid("hybrid", num_frame_per_block=2, **config)
    x, t, text = _inputs(frames=frames)
    with torch.no_grad():
        full = model(x, t, text).sample
        streamed, cache = _stream(model, x, t, text)
    torch.testing.assert_close(streamed, full, atol=2e-5, rtol=1e-4)
    assert cache.memory_tokens == absorbed_frames * 15


def test_read_pass_leaves_cache_unchanged():
    model = _hybrid("hybrid")
    x, t, text = _inputs(frames=12)
    with torch.no_grad():
        _, cache = _stream(model, x[:, :, :9], t[:, :9], text)
        before = [tensor.clone() for layer in cache.layers for tensor in layer.tensors()]
        visible = [layer.context(model._chunk_plan(cache, False, (3, 5)))[0].clone() for layer in cache.layers]
        model(x[:, :, 9:], t[:, 9:], text, cache=cache, frame_offset=9, cache_mode="read")
        after = [tensor for layer in cache.layers for tensor in layer.tensors()]
    assert cache.frames_written == 9
    current = slice((3 + 3) * 15, None)  # the scratch slot of the current chunk may change; nothing else
    for b, a in zip(before, after):
        if b.ndim == 4 and b.shape[1] == 9 * 15:
            torch.testing.assert_close(a[:, :current.start], b[:, :current.start], atol=0, rtol=0)
        else:
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    for layer, v in zip(cache.layers, visible):
        torch.testing.assert_close(layer.context(model._chunk_plan(cache, False, (3, 5)))[0], v, atol=0, rtol=0)


def _chunk_output_after_perturbing(model, perturbed_chunk, target_chunk):
    x, t, text = _inputs(frames=3 * (target_chunk + 1), seed=3)
    with torch.no_grad():
        base = model(x, t, text).sample
        x2 = x.clone()
        x2[:, :, 3 * perturbed_chunk : 3 * perturbed_chunk + 3] += torch.randn_like(x2[:, :, :3])
        changed = model(x2, t, text).sample
    target = slice(3 * target_chunk, 3 * target_chunk + 3)
    return (changed[:, :, target] - base[:, :, target]).abs().max().item()


def test_evicted_frame_reaches_later_chunks_only_through_memory():
    # one layer: deeper layers would carry the frame forward through the window's hidden states
    hybrid = _hybrid("hybrid", num_layers=1)
    window = _hybrid("window", num_layers=1)
    # chunk 1 (frames 3-5) has left the window of chunk 3 (frames 6-11 visible) and sits in the memory
    assert _chunk_output_after_perturbing(hybrid, 1, 3) > 1e-3
    assert _chunk_output_after_perturbing(window, 1, 3) == 0.0
    # while still in the window, both see it
    assert _chunk_output_after_perturbing(window, 1, 2) > 1e-3


def test_from_wan_kwargs_rejects_unknown_and_zeroes_new_parameters():
    with pytest.raises(ValueError, match="not_a_field"):
        HybridForcingTransformer3DModel.from_wan(_wan(), not_a_field=1)
    model = HybridForcingTransformer3DModel.from_wan(_wan())
    new = {n: p for n, p in model.named_parameters() if "linear_proj" in n}
    assert len(new) == 2 * TINY_WAN["num_layers"] and all(float(p.detach().abs().sum()) == 0 for p in new.values())
    assert set(model.state_dict()) - set(_wan().state_dict()) == set(new)


# ------------------------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_cache_bytes_constant_over_100_chunks(mode):
    model = _hybrid(mode, num_layers=1)
    x, t, text = _inputs(batch=1, frames=3)
    cache = model.init_cache(1, LATENT_H, LATENT_W)
    sizes, pointers = [], None
    with torch.no_grad():
        for chunk in range(100):
            offset = cache.frames_written
            model(x, t[:, :1].expand(1, 3), text, cache=cache, frame_offset=offset, cache_mode="read")
            model(x, torch.zeros(1), text, cache=cache, frame_offset=offset, cache_mode="write")
            sizes.append(cache.nbytes())
            ptrs = [tensor.data_ptr() for layer in cache.layers for tensor in layer.tensors()]
            pointers = pointers or ptrs
            assert ptrs == pointers  # no reallocation
    assert cache.frames_written == 300
    assert len(set(sizes[1:])) == 1 and sizes[0] == sizes[-1]
    if mode == "hybrid":
        assert all(torch.isfinite(layer.kv_state).all() for layer in cache.layers)
        assert cache.layers[0].kv_state.dtype == torch.float32


def test_cache_reset_and_to():
    model = _hybrid("hybrid")
    x, t, text = _inputs(frames=9)
    with torch.no_grad():
        first, cache = _stream(model, x, t, text)
        cache.reset()
        assert cache.frames_written == 0 and cache.memory_tokens == 0
        out = []
        for start in range(0, 9, 3):
            out.append(model(x[:, :, start:start + 3], t[:, start:start + 3], text, cache=cache,
                             frame_offset=start, cache_mode="write").sample)
    torch.testing.assert_close(torch.cat(out, 2), first, atol=1e-6, rtol=1e-6)
    cache.to(dtype=torch.bfloat16)
    assert cache.layers[0].key.dtype == torch.bfloat16 and cache.layers[0].kv_state.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        model(x[:, :, :3], t[:, :3], text, cache=cache, frame_offset=9, cache_mode="read")


def test_text_cache_reused_and_refreshed():
    model = _hybrid("hybrid")
    x, t, text = _inputs(frames=6)
    other_text = torch.randn_like(text)
    with torch.no_grad():
        cache = model.init_cache(2, LATENT_H, LATENT_W)
        model(x[:, :, :3], t[:, :3], text, cache=cache, cache_mode="write")
        assert cache.text_is_cached(text)
        # same tensor object: K/V reused, so the embedder is not even called
        calls = []
        hook = model.condition_embedder.text_embedder.register_forward_hook(lambda *a: calls.append(1))
        cached = model(x[:, :, 3:], t[:, 3:], text, cache=cache, frame_offset=3, cache_mode="read").sample
        assert calls == []
        # a new prompt tensor is re-encoded
        switched = model(x[:, :, 3:], t[:, 3:], other_text, cache=cache, frame_offset=3, cache_mode="read").sample
        assert calls == [1] and cache.text_is_cached(other_text)
        hook.remove()
    full = model(x, t, text).sample.detach()
    torch.testing.assert_close(cached, full[:, :, 3:], atol=2e-5, rtol=1e-4)
    assert (switched - cached).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# absorption schedule (spec §2.4) and the memory math
# ------------------------------------------------------------------------------------------------------------------
def test_absorption_schedule_matches_official_layout():
    model = HybridForcingTransformer3DModel(**{**TINY_WAN, "attention_mode": "hybrid"})  # official 3/6/21 defaults
    layout = model.attention_layout
    table = {n: layout.frames_absorbed_for(3 * n) for n in range(40)}
    assert table[0] == ([], []) and table[1] == ([], [])
    assert table[2] == ([0, 1, 2], [0, 1, 2])  # the sink chunk, at its own positions
    assert table[3] == ([3, 4, 5], [3, 4, 5])
    assert table[6] == ([12, 13, 14], [12, 13, 14])
    assert table[7] == ([15, 16, 17], [12, 13, 14])
    for n in range(7, 40):
        assert table[n] == ([3 * n - 6, 3 * n - 5, 3 * n - 4], [12, 13, 14])
    absorbed = [f for frames, _ in table.values() for f in frames]
    assert absorbed == list(range(len(absorbed)))  # every frame exactly once, no gap
    # queries and window keys (spec §2.5)
    assert layout.query_positions(18) == [18, 19, 20] and layout.query_positions(300) == [18, 19, 20]
    assert layout.visible_frames(21) == ([0, 1, 2, 18, 19, 20, 21, 22, 23], [0, 1, 2, 15, 16, 17, 18, 19, 20])
    assert layout.visible_frames(3) == ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])
    assert layout.visible_frames(0) == ([0, 1, 2], [0, 1, 2])


def test_linear_memory_against_hand_written_loops():
    from diffusers_hybrid.ops import linear_memory_absorb, linear_memory_read

    torch.manual_seed(0)
    batch, heads, dim = 2, 3, 6
    kv = torch.zeros(batch, heads, dim, dim)
    kmean = torch.zeros(batch, heads, dim)
    all_keys, all_angles, all_values = [], [], []
    count = 0
    for tokens in (7, 4, 9):
        k_raw, v = torch.randn(batch, tokens, heads, dim), torch.randn(batch, tokens, heads, dim)
        angles = torch.rand(tokens, dim // 2) * 6.3  # one angle per channel pair and token
        cos, sin = (t.repeat_interleave(2, -1).view(1, tokens, 1, dim) for t in (angles.cos(), angles.sin()))
        kv, kmean = linear_memory_absorb(kv, kmean, count, k_raw, v, cos, sin)
        count += tokens
        all_keys.append(k_raw), all_angles.append(angles), all_values.append(v)
    keys, angles, values = (torch.cat(x, i) for x, i in ((all_keys, 1), (all_angles, 0), (all_values, 1)))
    # RoPE by hand: channel pairs as complex numbers, rotated by e^{i·angle}
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None]
    roped = torch.view_as_real(torch.view_as_complex(keys.unflatten(-1, (-1, 2)).contiguous()) * rotation).flatten(-2)
    q_num, q_raw = torch.randn(batch, 6, heads, dim), torch.randn(batch, 6, heads, dim)
    out = linear_memory_read(q_num, q_raw, kv, kmean, eps=1e-6)
    for b in range(batch):
        for h in range(heads):
            kv_ref = sum(torch.outer(roped[b, i, h], values[b, i, h]) for i in range(count)) / count
            kmean_ref = sum(torch.relu(keys[b, i, h]) for i in range(count)) / count
            torch.testing.assert_close(kv[b, h], kv_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kmean[b, h], kmean_ref, atol=1e-5, rtol=1e-5)
            for s in range(6):
                expected = (q_num[b, s, h] @ kv_ref) / (torch.relu(q_raw[b, s, h]) @ kmean_ref + 1e-6)
                torch.testing.assert_close(out[b, s, h], expected, atol=1e-4, rtol=1e-4)


def test_block_selection_never_empty_never_nan():
    from diffusers_hybrid.ops import block_sparse_attention, num_selected_blocks, select_key_blocks_naive

    assert num_selected_blocks(4, 0.2) == 1 and num_selected_blocks(220, 0.2) == 44 and num_selected_blocks(5, 1.0) == 5
    with pytest.raises(ValueError, match="topk_ratio"):
        num_selected_blocks(10, 0.0)
    q, k, v = torch.randn(2, 37, 3, 8), torch.randn(2, 29, 3, 8), torch.randn(2, 29, 3, 8)
    index = select_key_blocks_naive(q, k, 0.1, block_size=8)
    assert index.shape == (2, 3, 5, 1)
    out = block_sparse_attention(q, k, v, topk_ratio=0.1, block_size=8)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------------------
# loading and conversion
# ------------------------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    model = _hybrid("hybrid", local_attn_frames=9, rope_mode="absolute", max_rope_frames=12)
    model.save_pretrained(tmp_path)
    loaded = HybridForcingTransformer3DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.local_attn_frames == 9 and loaded.config.rope_mode == "absolute"
    x, t, text = _inputs(frames=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, text).sample, model(x, t, text).sample, atol=0, rtol=0)


def test_from_pretrained_of_wan_folder_zero_fills_linear_proj(tmp_path):
    wan = _wan()
    wan.save_pretrained(tmp_path)
    model = HybridForcingTransformer3DModel.from_pretrained(tmp_path, attention_mode="hybrid", **TINY_HYBRID).eval()
    for name, param in model.named_parameters():
        assert not param.is_meta, name
        if "linear_proj" in name:
            assert float(param.abs().sum()) == 0
    x, _, text = _inputs()
    t = torch.tensor([500.0, 20.0])
    model.register_to_config(sparse_topk_ratio=1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text).sample, wan(x, t, text).sample, atol=1e-5, rtol=1e-5)


# hand-written inverse of the original -> diffusers key map
_TO_ORIGINAL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
_BLOCK_TO_ORIGINAL = {
    "scale_shift_table": "modulation", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn1.linear_proj": "self_attn.linear_proj", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k", "norm2": "norm3",
}


def _to_original(state_dict):
    out = {}
    for key, value in state_dict.items():
        new = key
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            for diff, orig in _BLOCK_TO_ORIGINAL.items():
                if rest == diff or rest.startswith(diff + "."):
                    rest = orig + rest[len(diff):]
                    break
            new = f"blocks.{index}.{rest}"
        else:
            for diff, orig in _TO_ORIGINAL.items():
                if key == diff or key.startswith(diff + "."):
                    new = orig + key[len(diff):]
                    break
        out[new] = value.clone()
    assert len(out) == len(state_dict)
    return out


@pytest.mark.parametrize("fmt", ["wan_safetensors", "self_forcing_pt", "hybrid_forcing_pt"])
def test_original_checkpoint_conversion(tmp_path, fmt):
    from safetensors.torch import save_file

    source = _hybrid("hybrid")
    x, t, text = _inputs(frames=9)
    original = _to_original(source.state_dict())
    if fmt == "wan_safetensors":
        original = {"model.diffusion_model." + k: v for k, v in original.items() if "linear_proj" not in k}
        path = tmp_path / "wan.safetensors"
        save_file(original, path)
        expected_model = copy.deepcopy(source)
        with torch.no_grad():
            for block in expected_model.blocks:
                block.attn1.linear_proj.weight.zero_(), block.attn1.linear_proj.bias.zero_()
    else:
        if fmt == "self_forcing_pt":
            original = {k: v for k, v in original.items() if "linear_proj" not in k}
        wrapped = {"model." + k: v for k, v in original.items()}
        ema = {k: v + 1.0 for k, v in wrapped.items()}  # the EMA differs: the default must take `generator`
        path = tmp_path / "ckpt.pt"
        torch.save({"generator": wrapped, "generator_ema": ema}, path)
        expected_model = copy.deepcopy(source)
        if fmt == "self_forcing_pt":
            with torch.no_grad():
                for block in expected_model.blocks:
                    block.attn1.linear_proj.weight.zero_(), block.attn1.linear_proj.bias.zero_()
    config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    loaded = HybridForcingTransformer3DModel.from_original_checkpoint(path, config=config).eval()
    inferred = HybridForcingTransformer3DModel.from_original_checkpoint(path, attention_head_dim=12, **TINY_HYBRID)
    assert inferred.config.num_attention_heads == 2
    assert inferred.config.num_layers == 2 and inferred.config.ffn_dim == 32
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, text).sample, expected_model(x, t, text).sample, atol=0, rtol=0)
    if fmt != "wan_safetensors":
        ema_model = HybridForcingTransformer3DModel.from_original_checkpoint(path, config=config, use_ema=True)
        delta = ema_model.proj_out.weight - loaded.proj_out.weight
        torch.testing.assert_close(delta, torch.ones_like(delta))


def test_original_checkpoint_errors_name_keys(tmp_path):
    state = _to_original(_hybrid("hybrid").state_dict())
    config = {k: v for k, v in _hybrid("hybrid").config.items() if not k.startswith("_")}
    state["blocks.0.self_attn.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery"):
        HybridForcingTransformer3DModel.from_original_checkpoint(state, config=config)
    del state["blocks.0.self_attn.mystery.weight"]
    del state["blocks.1.ffn.0.weight"]
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.net\.0\.proj\.weight"):
        HybridForcingTransformer3DModel.from_original_checkpoint(state, config=config)


def test_conversion_script(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import save_file

    source = _hybrid("hybrid")
    path = tmp_path / "hf.safetensors"
    save_file({"model." + k: v for k, v in _to_original(source.state_dict()).items()}, path)
    config = tmp_path / "cfg"
    source.save_config(config)
    out = tmp_path / "converted"
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "convert_hybrid_forcing_to_diffusers.py")
    subprocess.run(
        [sys.executable, script, "--checkpoint_path", str(path), "--config", str(config), "--output_path", str(out)],
        check=True, capture_output=True,
    )
    loaded = HybridForcingTransformer3DModel.from_pretrained(out)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), source.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    # bf16: the modules diffusers keeps in float32 are stored in float32, as `from_pretrained(torch_dtype=...)` has them
    subprocess.run(
        [sys.executable, script, "--checkpoint_path", str(path), "--config", str(config), "--output_path",
         str(tmp_path / "bf16"), "--dtype", "bf16"],
        check=True, capture_output=True,
    )
    from safetensors.torch import load_file

    stored = {k: v.dtype for f in (tmp_path / "bf16").glob("*.safetensors") for k, v in load_file(f).items()}
    assert stored["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert stored["scale_shift_table"] == stored["blocks.0.norm2.weight"] == torch.float32


# ------------------------------------------------------------------------------------------------------------------
# training hooks
# ------------------------------------------------------------------------------------------------------------------
def _grads(model, x, t, text, **kwargs):
    model.zero_grad()
    model(x, t, text, **kwargs).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_gradient_checkpointing_equivalence(mode):
    model = _hybrid(mode).train()
    x, t, text = _inputs(frames=12)
    plain = _grads(model, x, t, text)
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = _grads(model, x, t, text)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)
    if mode == "hybrid":  # 12 frames reach the memory, so its projection learns
        assert plain["blocks.1.attn1.linear_proj.weight"].abs().sum() > 0


def test_gradients_through_read_pass_with_detached_cache():
    model = _hybrid("hybrid").train()
    model.enable_gradient_checkpointing()
    x, t, text = _inputs(frames=12)
    cache = model.init_cache(2, LATENT_H, LATENT_W)
    with torch.no_grad():
        for start in range(0, 9, 3):
            model(x[:, :, start:start + 3], t[:, start:start + 3], text, cache=cache, frame_offset=start,
                  cache_mode="write")
    out = model(x[:, :, 9:], t[:, 9:], text, cache=cache, frame_offset=9, cache_mode="read").sample
    # a later write must not disturb backward's recomputation
    with torch.no_grad():
        model(x[:, :, 9:], torch.zeros(2), text, cache=cache, frame_offset=9, cache_mode="write")
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["blocks.0.attn1.to_q.weight"].abs().sum() > 0
    assert grads["blocks.0.attn1.linear_proj.weight"].abs().sum() > 0
    assert not any(tensor.requires_grad for layer in cache.layers for tensor in layer.tensors())
    # same gradient as the equivalent uncheckpointed read against an identical cache
    reference = _hybrid("hybrid").train()
    ref_cache = reference.init_cache(2, LATENT_H, LATENT_W)
    with torch.no_grad():
        for start in range(0, 9, 3):
            reference(x[:, :, start:start + 3], t[:, start:start + 3], text, cache=ref_cache, frame_offset=start,
                      cache_mode="write")
    reference(x[:, :, 9:], t[:, 9:], text, cache=ref_cache, frame_offset=9, cache_mode="read").sample.square().mean().backward()
    torch.testing.assert_close(model.blocks[0].attn1.to_q.weight.grad, reference.blocks[0].attn1.to_q.weight.grad,
                               atol=1e-6, rtol=1e-4)


def test_lora_adapters_attach_and_change_output():
    from peft import LoraConfig

    model = _hybrid("hybrid")
    x, t, text = _inputs(frames=6)
    with torch.no_grad():
        before = model(x, t, text).sample
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert any("attn1.to_q" in n for n in lora) and any("ffn.net.2" in n for n in lora)
    with torch.no_grad():
        after = model(x, t, text).sample
        model.disable_adapters()
        disabled = model(x, t, text).sample
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(disabled, before, atol=1e-6, rtol=1e-6)


def test_text_cache_follows_lora_state_and_in_place_edits():
    from peft import LoraConfig

    model = _hybrid("hybrid")
    # on the text K/V projections only, so that the self-attention cache does not depend on the LoRA state
    targets = ["attn2.to_k", "attn2.to_v"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    x, t, text = _inputs(frames=6)

    def second_chunk(cache, **kwargs):
        return model(x[:, :, 3:], t[:, 3:], text, cache=cache, frame_offset=3, cache_mode="read", **kwargs).sample

    def recomputed(**kwargs):  # the same read pass with the text K/V computed for it
        reference.reset_text()
        return second_chunk(reference, **kwargs)

    with torch.no_grad():
        cache, reference = model.init_cache(2, LATENT_H, LATENT_W), model.init_cache(2, LATENT_H, LATENT_W)
        for c in (cache, reference):  # the first chunk, under the default LoRA state
            model(x[:, :, :3], t[:, :3], text, cache=c, cache_mode="write")
        scaled = second_chunk(cache, attention_kwargs={"scale": 0.0})
        torch.testing.assert_close(scaled, recomputed(attention_kwargs={"scale": 0.0}), atol=0, rtol=0)
        model.disable_adapters()
        disabled = second_chunk(cache)
        torch.testing.assert_close(disabled, recomputed(), atol=0, rtol=0)
        model.enable_adapters()
        enabled = second_chunk(cache)
        torch.testing.assert_close(enabled, recomputed(), atol=0, rtol=0)
        assert (enabled - disabled).abs().max() > 1e-3 and (enabled - scaled).abs().max() > 1e-3
        text.mul_(-1.0)  # edited in place: the same object, other values
        edited = second_chunk(cache)
        torch.testing.assert_close(edited, recomputed(), atol=0, rtol=0)
        assert (edited - enabled).abs().max() > 1e-3


def test_cuda_graph_signature_follows_lora_state_and_scale():
    """A captured graph keeps the LoRA scales of its capture: any change must make the replayer capture again."""
    from peft import LoraConfig

    from diffusers_hybrid.utils.cuda_graphs import CUDAGraphPass

    model = _hybrid("hybrid")
    x, t, text = _inputs(frames=3)
    cache = model.init_cache(2, LATENT_H, LATENT_W)
    cache.device = torch.device("cuda")  # only the replayer's bookkeeping runs here, on CPU
    graphs = CUDAGraphPass(model, cache)
    cache.device = torch.device("cpu")
    plain = graphs._signature(3, text)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    with_lora = graphs._signature(3, text)
    assert with_lora != plain and graphs._signature(3, text, {"scale": 0.5}) != with_lora
    model.disable_adapters()
    assert graphs._signature(3, text) != with_lora
    model.enable_adapters()
    assert graphs._signature(3, text) == with_lora
    with torch.no_grad():
        model(x, t, text, cache=cache, cache_mode="write")
    assert cache.text_is_cached(text, weights_state=None)
    text.add_(1.0)  # an in-place edit: the text K/V are no longer this tensor's, so no replay
    assert not cache.text_is_cached(text, weights_state=None) and not graphs.steady(3, text)


def test_lora_layers_found_again_when_adapters_change():
    """`_lora_state` walks the module tree once per set of adapters; adding, deleting or reloading one under the same
    name must find the layers again (a stale list would keep a CUDA graph of the old adapters)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _hybrid("hybrid")

    def walked(text_only=False):
        modules = model.modules() if not text_only else [
            *model.condition_embedder.text_embedder.modules(),
            *(p for b in model.blocks for p in (b.attn2.to_k, b.attn2.to_v))]
        return [m for m in modules if isinstance(m, BaseTunerLayer)]

    def config(targets):
        return LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)

    model.add_adapter(config(["to_q"]), adapter_name="a")
    first = model._lora_state()
    assert len(first) == len(walked()) > 0 and model._lora_state(text_only=True) == ()
    assert model._lora_layers(False) is model._lora_layers(False)  # cached between passes
    model.add_adapter(config(["attn2.to_k", "ffn.net.2"]), adapter_name="b")
    assert model._lora_layers(False) == walked() and model._lora_layers(True) == walked(True) != []
    assert len(model._lora_state()) > len(first)
    model.delete_adapters("b")
    model.add_adapter(config(["attn2.to_v"]), adapter_name="b")  # same names, other layers
    assert model._lora_layers(False) == walked() and model._lora_layers(True) == walked(True) != []


@pytest.mark.parametrize("mode", MODES)
def test_write_pass_with_gradients_in_every_mode(mode):
    model = _hybrid(mode).train()
    x, t, text = _inputs(frames=15)
    cache = model.init_cache(2, LATENT_H, LATENT_W)
    for start in range(0, 15, 3):  # the hybrid commits from chunk 2 on update the memory the pass read
        model.zero_grad()
        model(x[:, :, start:start + 3], t[:, start:start + 3], text, cache=cache, frame_offset=start,
              cache_mode="write").sample.square().mean().backward()
        assert model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert cache.memory_frames > 0 if mode == "hybrid" else cache.memory_frames == 0


def test_dtype_casts_keep_float32_modules_and_rope_tables(tmp_path):
    wan = _wan()
    wan.save_pretrained(tmp_path)
    wan_bf16 = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    loaded = HybridForcingTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16, **TINY_HYBRID)
    converted = HybridForcingTransformer3DModel.from_wan(wan_bf16, **TINY_HYBRID)  # dtype from the bf16 Wan
    explicit = HybridForcingTransformer3DModel.from_wan(wan, dtype=torch.bfloat16, **TINY_HYBRID)
    old_name = HybridForcingTransformer3DModel.from_wan(wan, torch_dtype=torch.bfloat16, **TINY_HYBRID)
    assert old_name.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="pass only `dtype`"):
        HybridForcingTransformer3DModel.from_wan(wan, dtype=torch.bfloat16, torch_dtype=torch.float16, **TINY_HYBRID)
    original = HybridForcingTransformer3DModel.from_original_checkpoint(
        _to_original(wan.state_dict()), attention_head_dim=12, dtype=torch.bfloat16, **TINY_HYBRID
    )
    expected = {name: p.dtype for name, p in loaded.named_parameters()}
    assert expected["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert expected["scale_shift_table"] == expected["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    for model in (converted, explicit, original):
        assert {name: p.dtype for name, p in model.named_parameters()} == expected
        assert model.rope.freqs_cos.dtype == torch.float32
    x, t, text = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(converted(x.bfloat16(), t, text.bfloat16()).sample,
                                   loaded(x.bfloat16(), t, text.bfloat16()).sample, atol=0, rtol=0)
    # a plain `.to(bf16)` keeps the RoPE tables float32 and exact
    tables = (explicit.rope.freqs_cos.clone(), explicit.rope.freqs_sin.clone())
    model = _hybrid("hybrid").to(torch.bfloat16)
    assert model.rope.freqs_cos.dtype == model.rope.freqs_sin.dtype == torch.float32
    torch.testing.assert_close((model.rope.freqs_cos, model.rope.freqs_sin), tables, atol=0, rtol=0)


def test_from_pretrained_output_loading_info(tmp_path):
    _wan().save_pretrained(tmp_path)
    model, info = HybridForcingTransformer3DModel.from_pretrained(tmp_path, output_loading_info=True, **TINY_HYBRID)
    assert isinstance(model, HybridForcingTransformer3DModel) and not model.blocks[0].attn1.linear_proj.weight.is_meta
    assert any("linear_proj" in key for key in info["missing_keys"])


# ------------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    model = _hybrid("hybrid")
    x, t, text = _inputs(frames=6)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(2, 4, 3, 5, 10), t[:, :3], text)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model.init_cache(1, 6, 9)
    cache = model.init_cache(2, LATENT_H, LATENT_W)
    with pytest.raises(ValueError, match="one chunk of 3"):
        model(x, t, text, cache=cache, cache_mode="read")
    with pytest.raises(ValueError, match="frame_offset"):
        model(x[:, :, :3], t[:, :3], text, cache=cache, frame_offset=3, cache_mode="read")
    with pytest.raises(ValueError, match="Batch size 1"):
        model(x[:1, :, :3], t[:1, :3], text[:1], cache=cache, cache_mode="read")
    with pytest.raises(ValueError, match="cache_mode"):
        model(x[:, :, :3], t[:, :3], text, cache=cache, cache_mode="append")
    with pytest.raises(ValueError, match="needs a `cache`"):
        model(x[:, :, :3], t[:, :3], text, cache_mode="write")
    with pytest.raises(ValueError, match="whole number of chunks"):
        model(x[:, :, :4], t[:, :4], text)
    with pytest.raises(ValueError, match="timestep"):
        model(x, t[:, :2], text)
    with pytest.raises(ValueError, match="Latent size"):
        model(torch.randn(2, 4, 3, 8, 10), t[:, :3], text, cache=cache, cache_mode="read")
    with pytest.raises(ValueError, match="attention_mode"):
        HybridForcingTransformer3DModel(**TINY_WAN, attention_mode="sparse")
    with pytest.raises(ValueError, match="smaller than a chunk"):
        HybridForcingTransformer3DModel(**TINY_WAN, local_attn_frames=2, num_frame_per_block=3)
    with pytest.raises(ValueError, match="max_rope_frames"):
        HybridForcingTransformer3DModel(**TINY_WAN, max_rope_frames=6)
    # clamped window keys would share the sink's temporal positions (sink 4 + window 6 > 9)
    with pytest.raises(ValueError, match="sink \\+ window = 10"):
        HybridForcingTransformer3DModel(**TINY_WAN, sink_frames=4, local_attn_frames=6, max_rope_frames=9)
    with pytest.raises(ValueError, match="sink \\+ window = 9"):
        HybridForcingTransformer3DModel(**TINY_WAN, attention_mode="window", sink_frames=3, local_attn_frames=6,
                                        max_rope_frames=6)
    with pytest.raises(ValueError, match="kernel"):
        model.set_attention_kernel("cuda")
    absolute = _hybrid("window", rope_mode="absolute", rope_max_seq_len=8, max_rope_frames=8, local_attn_frames=3,
                       sink_frames=1)
    with pytest.raises(ValueError, match="RoPE table"):
        absolute(torch.randn(1, 4, 9, LATENT_H, LATENT_W), torch.zeros(1), text[:1])


def test_set_attention_kernel_falls_back_on_cpu(monkeypatch, caplog):
    import diffusers_hybrid.models.transformer_hybrid_forcing as module

    monkeypatch.setattr(module, "triton_available", lambda: False)
    model = _hybrid("hybrid")
    model.set_attention_kernel("triton")
    assert model.attention_kernel == "reference"
    assert all(block.attn1.processor.kernel == "reference" for block in model.blocks)


def test_fused_qkv_projections_give_the_same_output():
    model = _hybrid("hybrid")
    x, t, text = _inputs(frames=6)
    with torch.no_grad():
        before = model(x, t, text).sample
        model.fuse_qkv_projections()
        assert hasattr(model.blocks[0].attn1, "to_qkv") and hasattr(model.blocks[0].attn2, "to_kv")
        cache = model.init_cache(2, LATENT_H, LATENT_W)
        streamed = torch.cat(
            [model(x[:, :, s:s + 3], t[:, s:s + 3], text, cache=cache, frame_offset=s, cache_mode="write").sample
             for s in (0, 3)], dim=2)
        fused = model(x, t, text).sample
    torch.testing.assert_close(fused, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(streamed, before, atol=1e-5, rtol=1e-5)


def test_set_attention_mode_switches_and_validates():
    model = _hybrid("dense")
    x, t, text = _inputs(frames=6)
    model.set_attention_mode("hybrid", sparse_topk_ratio=1.0)
    reference = _hybrid("hybrid", sparse_topk_ratio=1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text).sample, reference(x, t, text).sample, atol=0, rtol=0)
    with pytest.raises(ValueError, match="attention_mode"):
        model.set_attention_mode("sparse")
    assert model.config.attention_mode == "hybrid"  # a rejected switch changes nothing
    with pytest.raises(ValueError, match="cannot change"):
        model.set_attention_mode("window", num_layers=3)


@pytest.mark.parametrize(
    "wan_config",
    [
        dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),  # Wan2.1-T2V-1.3B
        dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),  # Wan2.1-T2V-14B
    ],
    ids=["1.3B", "14B"],
)
def test_real_wan_configs_load_key_for_key(wan_config):
    # built on the meta device: names and shapes only, no memory
    with torch.device("meta"):
        wan = WanTransformer3DModel(**wan_config)
        model = HybridForcingTransformer3DModel(**wan_config)
    wan_shapes = {k: v.shape for k, v in wan.state_dict().items()}
    ours = {k: v.shape for k, v in model.state_dict().items()}
    new = {k for k in ours if "linear_proj" in k}
    assert len(new) == 2 * wan_config["num_layers"]
    assert {k: v for k, v in ours.items() if k not in new} == wan_shapes
    assert all(ours[k] == (128, 128) or ours[k] == (128,) for k in new)


@pytest.mark.parametrize("local_attn_frames", [6, 9])
def test_rewind_restores_the_cache_exactly(local_attn_frames):
    model = _hybrid("hybrid", local_attn_frames=local_attn_frames, max_rope_frames=15)
    x, t, text = _inputs(frames=24)
    chunks = (local_attn_frames - 3) // 3  # commit records that cover the history window
    cache = model.init_cache(2, LATENT_H, LATENT_W)
    records, snapshots = [], {}
    with torch.no_grad():
        for start in range(0, 24, 3):
            snapshots[start] = ([t_.clone() for layer in cache.layers for t_ in layer.tensors()],
                                cache.memory_tokens)
            records = (records + [cache.record_commit()])[-chunks:]
            model(x[:, :, start:start + 3], t[:, start:start + 3], text, cache=cache, frame_offset=start,
                  cache_mode="write")
        after = [t_.clone() for layer in cache.layers for t_ in layer.tensors()]
        model.rewind_cache(cache, records)
        rewound_to = 24 - 3 * chunks
        assert cache.frames_written == rewound_to and cache.memory_tokens == snapshots[rewound_to][1]
        current = slice(LATENT_H // 2 * LATENT_W // 2 * (3 + local_attn_frames - 3), None)
        for restored, expected in zip([t_ for layer in cache.layers for t_ in layer.tensors()],
                                      snapshots[rewound_to][0]):
            if restored.ndim == 4 and restored.shape[1] > current.start:  # the scratch slot is free to differ
                restored, expected = restored[:, :current.start], expected[:, :current.start]
            torch.testing.assert_close(restored, expected, atol=0, rtol=0)
        # replaying the same writes lands exactly where the stream was
        for start in range(rewound_to, 24, 3):
            model(x[:, :, start:start + 3], t[:, start:start + 3], text, cache=cache, frame_offset=start,
                  cache_mode="write")
        replayed = [t_ for layer in cache.layers for t_ in layer.tensors()]
    for a, b in zip(replayed, after):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="commit records"):
        model.rewind_cache(cache, records + records)


def test_torch_compile_full_graph_and_no_recompiles_in_steady_state():
    """Dynamo captures whole passes without graph breaks (no Python-side data-dependent shapes, no host syncs), and
    compiled blocks stop recompiling once a stream is in its steady state (only the commit runs eagerly)."""
    model = _hybrid("hybrid")
    x, t, text = _inputs(frames=24)
    with torch.no_grad():
        # 1. whole passes: full graphs
        full = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(full(x[:, :, :12], t[:, :12], text).sample,
                                   model(x[:, :, :12], t[:, :12], text).sample, atol=0, rtol=0)
        cache = model.init_cache(2, LATENT_H, LATENT_W)
        model(x[:, :, :3], t[:, :3], text, cache=cache, cache_mode="write")
        expected = model(x[:, :, 3:6], t[:, 3:6], text, cache=cache, frame_offset=3, cache_mode="read").sample
        actual = full(x[:, :, 3:6], t[:, 3:6], text, cache=cache, frame_offset=3, cache_mode="read").sample
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)

        # 2. compiled blocks over a stream: compilations stop once positions are clamped and the window is full
        compiles = []

        def counting_backend(graph_module, example_inputs):
            compiles.append(len(graph_module.graph.nodes))
            return graph_module.forward

        eager_model = _hybrid("hybrid")
        model.compile_repeated_blocks(backend=counting_backend, dynamic=False)
        eager_cache, compiled_cache = (m.init_cache(2, LATENT_H, LATENT_W) for m in (eager_model, model))
        counts = []
        for start in range(0, 24, 3):
            args = (x[:, :, start:start + 3], t[:, start:start + 3], text)
            for mode in ("read", "read", "write"):
                expected = eager_model(*args, cache=eager_cache, frame_offset=start, cache_mode=mode).sample
                actual = model(*args, cache=compiled_cache, frame_offset=start, cache_mode=mode).sample
                torch.testing.assert_close(actual, expected, atol=0, rtol=0)
            counts.append(len(compiles))
    assert counts[0] > 0
    # chunk 3 (frames 9-11) is the first with clamped positions (max_rope_frames 12) and a full window
    assert counts[3:] == [counts[3]] * len(counts[3:]), counts
    for a, b in zip(compiled_cache.layers[1].tensors(), eager_cache.layers[1].tensors()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)




@pytest.mark.parametrize("mode", ["window", "hybrid"])
def test_deferred_commits_equal_immediate_commits(mode):
    """A write pass under `cache.defer_commits()` leaves the cache untouched and keeps each layer's K/V; committing
    them afterwards with `model.write_plan(cache)` (what a CUDA-graph-replayed write pass does) gives exactly the
    stream of immediate commits, through absorption, the RoPE clamp and a full window."""
    model = _hybrid(mode)
    x, t, text = _inputs(frames=24)
    immediate, deferred = model.init_cache(2, LATENT_H, LATENT_W), model.init_cache(2, LATENT_H, LATENT_W)
    with torch.no_grad():
        for start in range(0, 24, 3):
            args = (x[:, :, start:start + 3], t[:, start:start + 3], text)
            for cache in (immediate, deferred):
                read = model(*args, cache=cache, frame_offset=start, cache_mode="read").sample
                if cache is immediate:
                    expected = read
                else:
                    torch.testing.assert_close(read, expected, atol=0, rtol=0)
            model(*args, cache=immediate, frame_offset=start, cache_mode="write")
            before = [t.clone() for layer in deferred.layers for t in layer.tensors()]
            deferred.defer_commits(True)
            model(*args, cache=deferred, frame_offset=start, cache_mode="write")
            with pytest.raises(RuntimeError, match="deferred"):
                deferred.commit_pending(model.write_plan(deferred))
            deferred.defer_commits(False)
            assert deferred.frames_written == start
            after = [t for layer in deferred.layers for t in layer.tensors()]
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            deferred.commit_pending(model.write_plan(deferred))
            assert (deferred.frames_written, deferred.memory_tokens) == (immediate.frames_written,
                                                                        immediate.memory_tokens)
            for a, b in zip(deferred.layers, immediate.layers):
                for got, want in zip(a.tensors(), b.tensors()):
                    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert mode == "window" or immediate.memory_tokens > 0
    stale = model.write_plan(deferred)
    deferred.frames_written += 3
    with pytest.raises(ValueError, match="plan starts at frame"):
        deferred.commit_pending(stale)
    fresh = model.init_cache(2, LATENT_H, LATENT_W)
    with pytest.raises(RuntimeError, match="No pending commit"):
        fresh.commit_pending(model.write_plan(fresh))
