# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The cached-inference RoPE step (RoPE, K/V into the window, the selection's pooled blocks, the memory read-out's
denominators) against its reference.

On CPU the kernel runs through Triton's interpreter at small awkward shapes (chunk and window lengths that are not
multiples of the block, a chunk that starts inside a block, several heads, batch 2), fresh random inputs per run,
outputs poisoned. The interpreter rounds float32 to bfloat16 by truncation (the GPU rounds to nearest), so bf16
results are compared within one bf16 step; float32 runs must match to float32 rounding.
"""

import pytest
import torch

from diffusers_hybrid.ops import apply_rope, block_sparse_attention, rope_chunk_into_window, triton_available
from diffusers_hybrid.ops.block_sparse_attention.naive import mean_pool_blocks, pool_key_blocks_naive
from diffusers_hybrid.ops.linear_memory.naive import linear_memory_denominator_naive
from diffusers_hybrid.ops.rotary.naive import apply_rotary_emb, rope_chunk_into_window_naive
from diffusers_hybrid.ops.utils import poisoned_outputs

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton cannot run here")


def _tables(length, dim, device="cpu"):
    """Wan-style tables: one random angle per channel pair, repeated for both channels."""
    angles = torch.rand(1, length, 1, dim // 2, device=device) * 12.0 - 6.0
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def _case(batch, length, window, heads, dim, dtype, device="cpu"):
    q, k, v = (torch.randn(batch, length, heads, dim, dtype=dtype, device=device) for _ in range(3))
    k = k + 0.5 * torch.randn(1, 1, heads, dim, dtype=dtype, device=device)  # makes the head centring matter
    window_key = torch.randn(batch, window, heads, dim, dtype=dtype, device=device)
    window_value = torch.randn(batch, window, heads, dim, dtype=dtype, device=device)
    return (q, k, v, *_tables(length, dim, device)), window_key, window_value


def _run(kernel, inputs, window_key, window_value, **kwargs):
    window_key, window_value = window_key.clone(), window_value.clone()
    with poisoned_outputs():
        out = rope_chunk_into_window(*inputs, window_key, window_value, kernel=kernel, **kwargs)
    return (*out, window_key, window_value)


def _close(got, want, dtype):
    # one bf16 / fp16 step of the largest magnitude (interpreter truncation), float32 rounding otherwise
    step = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 1e-6}[dtype]
    assert got.shape == want.shape and got.isfinite().all()
    assert (got.float() - want.float()).abs().max() <= step * want.float().abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pool, first_block, centering", [(None, 0, "heads"), (16, 0, "heads"), (16, 1, "none")])
def test_rope_chunk_into_window_matches_reference(dtype, pool, first_block, centering):
    # chunk of 37 rows at window rows 24..60: key block 1 holds 8 cached and 8 chunk rows, the last block 13 rows
    inputs, window_key, window_value = _case(2, 37, 61, 3, 32, dtype)
    kmean = torch.rand(2, 3, 32)  # the memory read-out's denominators from the raw query
    kwargs = dict(pool_block_size=pool, key_centering=centering, first_pooled_key_block=first_block,
                  memory_kmean=kmean, memory_eps=1e-3)
    q_ref, pq_ref, pk_ref, den_ref, wk_ref, wv_ref = _run("reference", inputs, window_key, window_value, **kwargs)
    q_got, pq_got, pk_got, den_got, wk_got, wv_got = _run("triton", inputs, window_key, window_value, **kwargs)
    assert den_got.shape == (2, 37, 3) and den_got.dtype == torch.float32
    torch.testing.assert_close(den_got, linear_memory_denominator_naive(inputs[0], kmean, 1e-3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(den_ref, den_got, rtol=1e-5, atol=1e-6)
    _close(q_got, q_ref, dtype)
    _close(wk_got, wk_ref, dtype)
    assert torch.equal(wk_got[:, :24], window_key[:, :24])  # the cached context is left alone
    assert torch.equal(wv_got, wv_ref)
    if pool is None:
        assert pq_got is None and pk_got is None
        return
    # the pools are of the values the kernel stored (so they match what the selection would pool from the cache)
    torch.testing.assert_close(pq_got, mean_pool_blocks(q_got, pool), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pk_got, pool_key_blocks_naive(wk_got[:, first_block * pool :], pool, centering),
                               rtol=1e-5, atol=1e-6)
    assert pq_got.shape == pq_ref.shape == (2, 3, 3, 32) and pk_got.shape == pk_ref.shape == (2, 3, 4 - first_block, 32)
    _close(pk_got, pk_ref, dtype)


def test_rope_chunk_into_window_reference_is_rope_and_copy():
    inputs, window_key, window_value = _case(1, 20, 50, 2, 16, torch.float32)
    q, k, v, cos, sin = inputs
    query_roped, pooled_query, pooled_key, denominator = rope_chunk_into_window_naive(
        q, k, v, cos, sin, window_key, window_value, pool_block_size=16)
    assert denominator is None  # no memory_kmean
    torch.testing.assert_close(query_roped, apply_rotary_emb(q, cos, sin))
    torch.testing.assert_close(window_key[:, 30:], apply_rotary_emb(k, cos, sin))
    assert torch.equal(window_value[:, 30:], v)
    # RoPE rotates pairs: norms of every pair are kept, so the key norm is too
    torch.testing.assert_close(window_key[:, 30:].norm(dim=-1), k.norm(dim=-1))
    assert pooled_query.shape == (1, 2, 2, 16) and pooled_key.shape == (1, 2, 4, 16)


def test_rope_chunk_into_window_rejects_bad_arguments():
    inputs, window_key, window_value = _case(1, 20, 50, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="first_pooled_key_block"):
        rope_chunk_into_window(*inputs, window_key, window_value, pool_block_size=16, first_pooled_key_block=2)
    for kernel in ("reference", "triton"):
        with pytest.raises(ValueError, match="key_centering"):
            rope_chunk_into_window(*inputs, window_key, window_value, pool_block_size=16, key_centering="tokens",
                                   kernel=kernel)
    with pytest.raises(ValueError, match="shorter than the chunk"):
        rope_chunk_into_window(*inputs, window_key[:, :10], window_value[:, :10])
    with pytest.raises(ValueError, match="memory_kmean"):
        rope_chunk_into_window(*inputs, window_key, window_value, memory_kmean=torch.rand(1, 2, 8), kernel="triton")
    with pytest.raises(ValueError, match="cos / sin"):
        q, k, v, cos, sin = inputs
        rope_chunk_into_window(q, k, v, cos[:, :5], sin[:, :5], window_key, window_value, kernel="triton")


@pytest.mark.parametrize("pool, kmean", [(None, False), (16, True)])
def test_rope_chunk_into_window_custom_op(pool, kmean):
    """The launcher is the opaque custom op `diffusers_hybrid::rope_chunk_into_window` under torch.compile (inductor
    would otherwise recompile the kernel from the traced launch): schema, fake shapes, and a compiled call (window
    views written in place) equal to the eager one."""
    from diffusers_hybrid.ops.rotary import triton_kernel as tk

    inputs, window_key, window_value = _case(2, 37, 61, 3, 32, torch.bfloat16)
    memory_kmean = torch.rand(2, 3, 32) if kmean else None
    args = (*inputs, window_key.clone(), window_value.clone(), pool, "heads", 0, memory_kmean, 1e-3)
    torch.library.opcheck(tk._rope_window_op, args, test_utils=("test_schema", "test_faketensor"))
    # a permuted but dense query ((B, H, L, D) storage seen as (B, L, H, D)): the fake has the real op's strides
    permuted = inputs[0].transpose(1, 2).contiguous().transpose(1, 2)
    args_permuted = (permuted, *inputs[1:], window_key.clone(), window_value.clone(), pool, "heads", 0, memory_kmean,
                     1e-3)
    torch.library.opcheck(tk._rope_window_op, args_permuted, test_utils=("test_schema", "test_faketensor"))

    def step(window_key, window_value):
        # the cache passes views of its buffers: the op writes through them
        out = tk.rope_chunk_into_window_triton(*inputs, window_key[:, 1:], window_value[:, 1:], pool, "heads", 0,
                                               memory_kmean, 1e-3)
        return tuple(t for t in out if t is not None)

    buffers_eager = (torch.cat([window_key[:, :1], window_key], 1), torch.cat([window_value[:, :1], window_value], 1))
    buffers_compiled = tuple(b.clone() for b in buffers_eager)
    eager = step(*buffers_eager)
    with poisoned_outputs():
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*buffers_compiled)
    assert len(compiled) == len(eager) == 1 + 2 * (pool is not None) + kmean
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)
    for got, want in zip(buffers_compiled, buffers_eager):
        assert torch.equal(got, want)
    assert not torch.equal(buffers_eager[0][:, -37:], torch.cat([window_key[:, :1], window_key], 1)[:, -37:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", ["new", "view", "in_place"])
@pytest.mark.parametrize("one_rotation", [False, True])
def test_apply_rope_matches_reference(dtype, target, one_rotation):
    """RoPE into a new tensor, into rows of a larger buffer (the cache's history slice: other rows untouched), and in
    place; per-row tables and one broadcast rotation; 101 rows (one whole block of 64 and a partial one), 3 heads,
    batch 2."""
    x = torch.randn(2, 101, 3, 32, dtype=dtype)
    cos, sin = _tables(1 if one_rotation else 101, 32)
    want = apply_rotary_emb(x, cos, sin)
    buffer = torch.randn(2, 120, 3, 32, dtype=dtype)
    outs = {}
    for kernel in ("reference", "triton"):
        out = {"new": None, "view": buffer.clone()[:, 7:108], "in_place": x.clone()}[target]
        source = out if target == "in_place" else x
        with poisoned_outputs():
            got = apply_rope(source, cos, sin, out=out, kernel=kernel)
        assert got is out or out is None
        if target == "view":
            whole = got._base
            assert torch.equal(whole[:, :7], buffer[:, :7]) and torch.equal(whole[:, 108:], buffer[:, 108:])
        outs[kernel] = got
    _close(outs["triton"], want, dtype)
    assert torch.equal(outs["reference"], want)


def test_apply_rope_rejects_bad_arguments():
    x = torch.randn(1, 10, 2, 16)
    cos, sin = _tables(10, 16)
    for kernel in ("reference", "triton"):
        with pytest.raises(ValueError, match="cos must"):
            apply_rope(x, cos[:, :4], sin, kernel=kernel)
        with pytest.raises(ValueError, match="out must"):
            apply_rope(x, cos, sin, out=torch.empty(1, 10, 2, 16, dtype=torch.bfloat16), kernel=kernel)
    with pytest.raises(ValueError, match="D even"):  # (the Triton kernel would leave an odd head_dim to this one)
        apply_rope(torch.randn(1, 10, 2, 15), cos[..., :15], sin[..., :15])


def test_apply_rope_custom_op():
    """Under torch.compile the launcher is the custom op `diffusers_hybrid::apply_rope` (schema, fake), writing
    through a view as in eager mode."""
    from diffusers_hybrid.ops.rotary import triton_kernel as tk

    x = torch.randn(2, 37, 3, 32, dtype=torch.bfloat16)
    cos, sin = _tables(37, 32)
    torch.library.opcheck(tk._rope_op, (x, cos, sin, torch.empty_like(x)), test_utils=("test_schema",
                                                                                       "test_faketensor"))

    def step(buffer):
        return tk.apply_rope_triton(x, cos, sin, out=buffer[:, 2:39])

    eager, compiled = torch.zeros(2, 40, 3, 32, dtype=x.dtype), torch.zeros(2, 40, 3, 32, dtype=x.dtype)
    step(eager)
    torch.compile(step, backend="aot_eager", fullgraph=True)(compiled)
    assert torch.equal(compiled, eager) and not torch.equal(eager[:, 2:39], torch.zeros_like(x))


def test_selection_from_rope_pools_matches_pooling_in_the_selection():
    """`pooled_blocks` from the RoPE step (with a pooled prefix for the first cached blocks) give the same attention
    as the selection pooling the keys itself, for the Triton and the reference kernels."""
    inputs, window_key, window_value = _case(2, 37, 61, 3, 32, torch.bfloat16)
    prefix_blocks = 1
    outs = {}
    for kernel in ("reference", "triton"):
        query_roped, pooled_query, pooled_key, _, keys, values = _run(
            kernel, inputs, window_key, window_value, pool_block_size=16, first_pooled_key_block=prefix_blocks)
        prefix = pool_key_blocks_naive(keys[:, : prefix_blocks * 16], 16)
        with poisoned_outputs():
            got = block_sparse_attention(query_roped, keys, values, topk_ratio=0.5, block_size=16, kernel=kernel,
                                         pooled_key_prefix=prefix, pooled_blocks=(pooled_query, pooled_key))
            want = block_sparse_attention(query_roped, keys, values, topk_ratio=0.5, block_size=16, kernel=kernel)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        outs[kernel] = got
    assert outs["triton"].isfinite().all()


def test_pooled_blocks_of_a_wrong_shape_are_refused():
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    pooled = (torch.randn(1, 2, 3, 16), torch.randn(1, 2, 2, 16))  # the keys make 3 blocks of 16
    with pytest.raises(ValueError, match="pooled_blocks"):
        block_sparse_attention(q, k, v, topk_ratio=0.5, block_size=16, pooled_blocks=pooled)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
def test_apply_rope_real_shape_gpu():
    """The cache's history re-RoPE at Wan2.1-1.3B 832x480: 6 frames (9,360 keys) x 12 heads x 128, bf16, written into
    rows of the 9-frame key buffer."""
    x = torch.randn(1, 9360, 12, 128, dtype=torch.bfloat16, device="cuda")
    cos, sin = _tables(9360, 128, device="cuda")
    buffer = torch.randn(1, 14040 + 4680, 12, 128, dtype=torch.bfloat16, device="cuda")
    before = buffer.clone()
    with poisoned_outputs():
        apply_rope(x, cos, sin, out=buffer[:, 4680:14040], kernel="triton")
    _close(buffer[:, 4680:14040], apply_rotary_emb(x, cos, sin), torch.bfloat16)
    assert torch.equal(buffer[:, :4680], before[:, :4680]) and torch.equal(buffer[:, 14040:], before[:, 14040:])


@pytest.mark.gpu
@requires_cuda
def test_rope_chunk_into_window_real_shape_gpu():
    """Wan2.1-1.3B at 832x480: a 3-frame chunk (4,680 tokens) at the end of a 9-frame window (14,040 keys), 12 heads
    x 128, bf16; the pooled prefix covers the 146 whole blocks of the 9,360 cached keys."""
    inputs, window_key, window_value = _case(1, 4680, 14040, 12, 128, torch.bfloat16, device="cuda")
    kmean = torch.rand(1, 12, 128, device="cuda")
    kwargs = dict(pool_block_size=64, first_pooled_key_block=146, memory_kmean=kmean)
    q_ref, pq_ref, pk_ref, den_ref, wk_ref, wv_ref = _run("reference", inputs, window_key, window_value, **kwargs)
    q_got, pq_got, pk_got, den_got, wk_got, wv_got = _run("triton", inputs, window_key, window_value, **kwargs)
    torch.testing.assert_close(den_got, den_ref, rtol=1e-5, atol=1e-5)
    _close(q_got, q_ref, torch.bfloat16)
    _close(wk_got, wk_ref, torch.bfloat16)
    assert torch.equal(wv_got, wv_ref) and torch.equal(wk_got[:, :9360], window_key[:, :9360])
    torch.testing.assert_close(pq_got, mean_pool_blocks(q_got, 64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pk_got, pool_key_blocks_naive(wk_got[:, 146 * 64 :], 64), rtol=1e-5, atol=1e-5)


class _NoLaunch:
    """Stands for a Triton kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_poisoned_outputs_reach_this_module(monkeypatch):
    """Inside `poisoned_outputs()` the launchers' buffers are poisoned: with the kernel launch stubbed out, nothing is
    written, so every output is NaN (the module reads the live flag, not a copy bound at import)."""
    from diffusers_hybrid.ops.rotary import triton_kernel as tk

    assert not hasattr(tk, "POISON_OUTPUTS")
    monkeypatch.setattr(tk, "_rope_window_kernel", _NoLaunch())
    inputs, window_key, window_value = _case(1, 20, 40, 2, 16, torch.float32)
    with poisoned_outputs():
        outputs = tk.rope_chunk_into_window_triton(*inputs, window_key, window_value, 16,
                                                   memory_kmean=torch.rand(1, 2, 16))
    assert len(outputs) == 4 and all(t.isnan().all() for t in outputs)
