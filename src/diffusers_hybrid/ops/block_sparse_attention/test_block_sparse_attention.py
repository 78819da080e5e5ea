# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Triton block selection + block-sparse attention against the plain-PyTorch references.

On CPU the kernels run through Triton's interpreter (`conftest.py` sets `TRITON_INTERPRET=1`) at small awkward
shapes: lengths that are not multiples of the block, several heads, batch 2. Inputs are fresh random tensors every
run; every buffer the launchers allocate is poisoned (NaN / out-of-range ints) so unwritten elements fail the test.
GPU tests (`@pytest.mark.gpu`) run the real Wan2.1 shapes against a float32 reference.
"""

import math

import pytest
import torch

from diffusers_hybrid.ops import block_sparse_attention, triton_available
from diffusers_hybrid.ops.block_sparse_attention.naive import (
    block_sparse_attention_naive,
    mean_pool_blocks,
    num_selected_blocks,
)
from diffusers_hybrid.ops.utils import poisoned_outputs

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton cannot run here")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _kernels():
    from diffusers_hybrid.ops.block_sparse_attention import triton_kernel

    return triton_kernel


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _pooled_scores(query, key, block_size, key_centering):
    """float64 selection scores from the reference pooling (B, H, M, K)."""
    if key_centering == "heads":
        key = key.double() - key.double().mean(dim=2, keepdim=True)
    pooled_q = mean_pool_blocks(query.double(), block_size).double()
    pooled_k = mean_pool_blocks(key.double(), block_size).double()
    return pooled_q @ pooled_k.transpose(-1, -2)


def assert_valid_selection(lut, query, key, topk_ratio, block_size, key_centering):
    """LUT entries: right count, in range, strictly ascending, and a top-k set of the float64 scores up to float32
    rounding (every selected score >= every unselected score - tol)."""
    scores = _pooled_scores(query, key, block_size, key_centering)
    batch, heads, num_q_blocks, num_k_blocks = scores.shape
    topk = num_selected_blocks(num_k_blocks, topk_ratio)
    assert lut.shape == (batch, heads, num_q_blocks, topk)
    lut = lut.long().cpu()
    assert (lut >= 0).all() and (lut < num_k_blocks).all()
    if topk > 1:
        assert (lut[..., 1:] > lut[..., :-1]).all(), "indices must be unique and ascending"
    scores = scores.cpu()
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, lut, True)
    tol = 1e-5 * scores.abs().amax(dim=-1, keepdim=True) + 1e-7
    min_sel = torch.where(selected, scores, torch.inf).amin(-1)
    max_rest = torch.where(selected, -torch.inf, scores).amax(-1)
    assert (min_sel >= max_rest - tol.squeeze(-1)).all(), "selection is not a top-k set"


def _inputs(batch, len_q, len_k, heads, dim, dtype, device="cpu", grad=False):
    q = torch.randn(batch, len_q, heads, dim, dtype=dtype, device=device)
    k = torch.randn(batch, len_k, heads, dim, dtype=dtype, device=device)
    v = torch.randn(batch, len_k, heads, dim, dtype=dtype, device=device)
    # A per-head key offset makes the "heads" centring matter for the ranking.
    k = k + 0.5 * torch.randn(1, 1, heads, dim, dtype=dtype, device=device)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _reference(q, k, v, lut, block_size, scale=None):
    """float32 reference forward and (q, k, v) gradients for a given selection."""
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    out = block_sparse_attention_naive(qf, kf, vf, None if lut is None else lut.long(), block_size, scale)
    return out, (qf, kf, vf)


# ------------------------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: small awkward shapes
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_centering, topk_ratio, select_cfg", [
    ("heads", 0.1, {}),
    ("none", 0.3, {"impl": "rows", "G": 4}),
    ("heads", 0.3, {"impl": "group", "pool": "tok"}),
    ("heads", 0.3, {"impl": "group", "G": 8, "search": "radix4", "pool_stages": 2, "select_stages": 2}),
    ("none", 0.1, {"impl": "rows", "G": 2, "search": "radix4"}),
    ("heads", 0.2, {"impl": "group", "G": 8, "search": "sort"}),
    ("none", 0.3, {"impl": "rows", "G": 2, "search": "sort"}),
])
def test_selection_is_topk(key_centering, topk_ratio, select_cfg, monkeypatch):
    tk = _kernels()
    monkeypatch.setattr(tk, "SELECT_CONFIG", {**tk.SELECT_CONFIG, **select_cfg})
    q, k, _ = _inputs(2, 50, 230, 3, 32, torch.bfloat16)
    with poisoned_outputs():
        lut, bmap = tk.select_key_blocks_triton(q, k, topk_ratio, 16, key_centering, write_map=True)
    assert_valid_selection(lut, q, k, topk_ratio, 16, key_centering)
    expected_map = torch.zeros(bmap.shape, dtype=torch.int8).scatter_(-1, lut.long(), 1)
    assert torch.equal(bmap, expected_map)


@pytest.mark.parametrize(
    "dtype, dim, block_size, topk_ratio, len_q, len_k",
    [
        (torch.bfloat16, 32, 32, 0.3, 70, 230),  # partial last query and key blocks
        (torch.float16, 64, 32, 0.5, 45, 150),
        (torch.bfloat16, 16, 16, 0.01, 33, 100),  # ratio below 1/K: at least one block
    ],
)
def test_sparse_forward_backward(dtype, dim, block_size, topk_ratio, len_q, len_k):
    tk = _kernels()
    q, k, v = _inputs(2, len_q, len_k, 2, dim, dtype, grad=True)
    with poisoned_outputs():
        lut, _ = tk.select_key_blocks_triton(q.detach(), k.detach(), topk_ratio, block_size, "heads")
        out = tk.block_sparse_attention_triton(q, k, v, topk_ratio=topk_ratio, block_size=block_size)
        grad_out = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    assert_valid_selection(lut, q.detach(), k.detach(), topk_ratio, block_size, "heads")
    ref, leaves = _reference(q, k, v, lut, block_size)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.float())
    assert out.dtype == dtype and not out.isnan().any()
    assert _rel_err(out, ref) < 1e-2
    for got, want in zip((dq, dk, dv), ref_grads):
        assert not got.isnan().any()
        assert _rel_err(got, want) < 2e-2


def test_dense_forward_backward_and_dispatch():
    """ratio 1.0: the dispatch passes `dense=True` (no selection); compare with dense softmax attention."""
    q, k, v = _inputs(2, 50, 110, 2, 32, torch.bfloat16, grad=True)
    with poisoned_outputs():
        out = block_sparse_attention(q, k, v, topk_ratio=1.0, block_size=16, kernel="triton")
        grad_out = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    ref, leaves = _reference(q, k, v, None, 16)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.float())
    assert _rel_err(out, ref) < 1e-2
    for got, want in zip((dq, dk, dv), ref_grads):
        assert _rel_err(got, want) < 2e-2


def test_given_block_index_and_custom_scale():
    """A precomputed (int64, reference) selection and a non-default scale; non-contiguous (B, L, H, D) views."""
    tk = _kernels()
    from diffusers_hybrid.ops.block_sparse_attention.naive import select_key_blocks_naive

    qkv = torch.randn(2, 40, 3, 2, 32, dtype=torch.float16)  # fused projection layout: views with strided rows
    q = qkv[:, :, 0]
    k = torch.randn(2, 90, 2, 32, dtype=torch.float16)
    v = torch.randn(2, 90, 2, 32, dtype=torch.float16)
    lut = select_key_blocks_naive(q, k, 0.4, 16, "none")
    with poisoned_outputs():
        out = tk.block_sparse_attention_triton(q, k, v, block_size=16, scale=0.3, block_index=lut)
    ref, _ = _reference(q, k, v, lut, 16, scale=0.3)
    assert _rel_err(out, ref) < 1e-2


def test_custom_op_registration():
    """Fake implementation, schema and autograd registration of the custom ops (what torch.compile relies on)."""
    tk = _kernels()
    q, k, v = _inputs(1, 20, 40, 2, 16, torch.float16, grad=True)
    args = (q, k, v, None, 1, 16, True, 0.25, False, None)
    torch.library.opcheck(tk._bsa_fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                            "test_autograd_registration"))


def test_compiles_through_custom_op():
    tk = _kernels()
    q, k, v = _inputs(1, 20, 40, 2, 16, torch.float16, grad=True)

    def fn(q, k, v):
        return tk.block_sparse_attention_triton(q, k, v, topk_ratio=0.5, block_size=16).float().square().sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = fn(q, k, v)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    assert torch.allclose(loss, loss_eager)
    for a, b in zip(grads, grads_eager):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------------
# GPU: the real shapes
# ------------------------------------------------------------------------------------------------------------------

# Wan2.1-1.3B at 832x480: 3-frame chunk (4,680 queries) against sink + window (14,040 keys), 12 heads of 128.
REAL_SHAPES = [
    dict(len_q=4680, len_k=14040, heads=12, dim=128),
    dict(len_q=4680, len_k=9360, heads=12, dim=64),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: f"{s['len_q']}x{s['len_k']}h{s['heads']}d{s['dim']}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("topk_ratio", [0.2, 1.0])
def test_gpu_real_shapes(shape, dtype, topk_ratio):
    tk = _kernels()
    q, k, v = _inputs(1, shape["len_q"], shape["len_k"], shape["heads"], shape["dim"], dtype, "cuda", grad=True)
    dense = topk_ratio == 1.0
    with poisoned_outputs():
        lut = None
        if not dense:
            lut, _ = tk.select_key_blocks_triton(q.detach(), k.detach(), topk_ratio, 64, "heads")
        out = block_sparse_attention(q, k, v, topk_ratio=topk_ratio, block_size=64, kernel="triton")
        grad_out = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    if lut is not None:
        assert_valid_selection(lut, q.detach(), k.detach(), topk_ratio, 64, "heads")
    ref, leaves = _reference(q, k, v, lut, 64)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.float())
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert _rel_err(out, ref) < tol
    for got, want in zip((dq, dk, dv), ref_grads):
        assert _rel_err(got, want) < 2 * tol


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("search", ["binary", "sort"])
def test_gpu_selection_fused_into_attention(search, monkeypatch):
    """Real shape, the selection in the attention kernel's prologue: a valid top-k LUT, the output and gradients of
    attention over exactly those blocks, and a CUDA-graph replay on new inputs equal to an eager call."""
    tk = _kernels()
    monkeypatch.setattr(tk, "SELECT_CONFIG", {**tk.SELECT_CONFIG, "fused": True, "search": search})
    q, k, v = _inputs(1, 4680, 14040, 12, 128, torch.bfloat16, "cuda", grad=True)
    topk = num_selected_blocks(-(-14040 // 64), 0.2)
    with poisoned_outputs():
        out, _, lut, _ = tk._bsa_fwd_impl(q.detach(), k.detach(), v.detach(), None, topk, 64, True, 128 ** -0.5,
                                          False, None)
        got = block_sparse_attention(q, k, v, topk_ratio=0.2, block_size=64, kernel="triton")
        grad_out = torch.randn_like(got)
        grads = torch.autograd.grad(got, (q, k, v), grad_out)
    assert_valid_selection(lut, q.detach(), k.detach(), 0.2, 64, "heads")
    assert torch.equal(got.detach(), out)
    ref, leaves = _reference(q, k, v, lut, 64)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.float())
    assert _rel_err(got, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert _rel_err(g, r) < 2e-2
    q, k, v = (t.detach() for t in (q, k, v))
    fn = lambda: tk.block_sparse_attention_triton(q, k, v, topk_ratio=0.2)  # noqa: E731
    replayed = _replay_on_new_inputs(fn, (q, k, v))
    assert torch.equal(replayed, fn())


def _replay_on_new_inputs(fn, inputs):
    """Captures `fn()` in a CUDA graph (after two warm-up calls on a side stream), refills `inputs` with new random
    values and replays; returns the graph's output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for t in inputs:
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    return out


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph():
    """The whole op (selection + attention) captured in a CUDA graph and replayed on new inputs."""
    tk = _kernels()
    q, k, v = _inputs(1, 1000, 3000, 4, 128, torch.bfloat16, "cuda")
    fn = lambda: tk.block_sparse_attention_triton(q, k, v, topk_ratio=0.2)  # noqa: E731
    out = _replay_on_new_inputs(fn, (q, k, v))
    assert torch.equal(out, fn())


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs Hopper or later")
@pytest.mark.parametrize("mode", ["entry", "late"])
def test_gpu_pdl_chain_equals_plain_launches(mode, monkeypatch):
    """With programmatic dependent launch (USE_PDL) the forward chain (pool, select, attention, combine) gives the
    same bits as plain launches, eagerly and replayed from a CUDA graph on new inputs."""
    tk = _kernels()
    q, k, v = _inputs(1, 4680, 14040, 12, 128, torch.bfloat16, "cuda")
    fn = lambda: tk.block_sparse_attention_triton(q, k, v, topk_ratio=0.2)  # noqa: E731
    want = fn()
    monkeypatch.setattr(tk, "USE_PDL", mode)
    assert tk._pdl_launch(q)["PDL"] == tk.PDL_MODES[mode]
    with poisoned_outputs():
        assert torch.equal(fn(), want)
    out = _replay_on_new_inputs(fn, (q, k, v))
    monkeypatch.setattr(tk, "USE_PDL", None)
    assert torch.equal(out, fn())


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("placement, given_den", [
    (None, False), (dict(mem_mode=3, mem_kc=128, num_stages=1, ctas_per_sm=4), False),
    (dict(mem_mode=4, mem_kc=128, num_stages=1, ctas_per_sm=4), False),
    (dict(mem_mode=0, mem_kc=128, num_stages=2, ctas_per_sm=2), False),
    (dict(mem_mode=5, mem_kc=128, num_stages=1, ctas_per_sm=4), True), (None, True)],
    ids=["default", "parked_in_output", "parked_float32", "epilogue_2x2", "accumulated_whole_1x4_given_den",
         "default_given_den"])
def test_gpu_fused_memory_epilogue(placement, given_den, monkeypatch):
    """Real shape: attention + memory read-out + linear_proj fused vs the separate ops (float32 reference), with the
    read-out where the default configuration runs it (accumulated into the attention accumulator, 32 state rows at a
    time), parked before the main loop, in the epilogue of the 2 x 2 configuration, or accumulated in one product;
    the denominators computed in the kernel or given."""
    tk = _kernels()
    from diffusers_hybrid.ops.linear_memory.naive import linear_memory_denominator_naive, linear_memory_read_naive

    if placement is not None:
        monkeypatch.setitem(tk.CONFIG_OVERRIDES, "fwd_sparse_memory", placement)

    q, k, v = _inputs(1, 4680, 14040, 12, 128, torch.bfloat16, "cuda")
    q_raw = torch.randn_like(q)
    kv = torch.randn(1, 12, 128, 128, device="cuda") / 128
    kmean = torch.rand(1, 12, 128, device="cuda")
    weight = torch.randn(128, 128, device="cuda") / 12
    bias = torch.randn(128, device="cuda")
    den = linear_memory_denominator_naive(q_raw, kmean) if given_den else None
    with poisoned_outputs(), torch.no_grad():
        got = tk.block_sparse_attention_with_memory_triton(
            q, k, v, None if given_den else q_raw, kv, None if given_den else kmean, proj_weight=weight,
            proj_bias=bias, topk_ratio=0.2, memory_denominator=den)
        lut, _ = tk.select_key_blocks_triton(q, k, 0.2, 64, "heads")
        ref, _ = _reference(q, k, v, lut, 64)
        memory = torch.nn.functional.linear(linear_memory_read_naive(q, q_raw, kv, kmean), weight, bias)
    assert _rel_err(got, ref.detach() + memory) < 1e-2


def test_selection_ties_go_to_lower_block():
    """Exactly equal pooled scores (duplicated key blocks): a deterministic, valid top-k (lower index first)."""
    tk = _kernels()
    q, k, _ = _inputs(1, 32, 128, 2, 16, torch.float16)
    k[:, 64:128] = k[:, 0:64]  # blocks 4..7 repeat blocks 0..3
    lut, _ = tk.select_key_blocks_triton(q, k, 0.125, 16, "none")  # 1 of 8: the best block ties its copy
    assert_valid_selection(lut, q, k, 0.125, 16, "none")
    assert (lut < 4).all()


def test_num_selected_blocks_matches_spec():
    # 832x480 steady state: 220 key blocks at 20% -> 44 (spec §10); never zero.
    assert num_selected_blocks(220, 0.2) == 44
    assert num_selected_blocks(4, 0.2) == 1
    assert math.isclose(44 / 220, 0.2)


@pytest.mark.parametrize("dense, slots", [(False, 5), (True, 6)])
def test_split_last_wave(dense, slots):
    """The last, partial wave of work items is split over key ranges and recombined: same result as unsplit."""
    tk = _kernels()
    q, k, v = _inputs(2, 60, 200, 2, 32, torch.float16)
    lut, _ = tk.select_key_blocks_triton(q, k, 0.5, 16, "heads")
    topk = lut.shape[-1]
    base = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1) if dense else dict(KPI=1, num_warps=4,
                                                                                         num_stages=1)
    args = (q, k, v, None if dense else lut, topk, 16, 0.2, dense)
    work = (-(-60 // (32 if dense else 16))) * 4
    n_iter = -(-200 // 32) if dense else topk
    assert tk._split_plan(work, n_iter, dict(slots=slots), "cpu")[1] > 1  # the remainder really is split
    with poisoned_outputs():
        ref, ref_lse = tk.attention_forward(*args, cfg=dict(base, slots=0))
        got, got_lse = tk.attention_forward(*args, cfg=dict(base, slots=slots))
        # the fused memory epilogue on split items runs in the combine kernel
        memory = (torch.randn_like(q), torch.randn(2, 2, 32, 32) / 32, torch.rand(2, 2, 32), torch.randn(32), 1e-6)
        ref_mem, _ = tk.attention_forward(*args, cfg=dict(base, slots=0), memory=memory)
        got_mem, _ = tk.attention_forward(*args, cfg=dict(base, slots=slots), memory=memory)
    assert _rel_err(got, ref) < 2e-3
    assert _rel_err(got_lse, ref_lse) < 1e-5
    assert _rel_err(got_mem, ref_mem) < 2e-3 and _rel_err(got_mem, ref) > 1e-2


@pytest.mark.parametrize("with_proj, dense", [(True, False), (False, True)])
def test_fused_memory_epilogue(with_proj, dense):
    """Attention + linear-memory read-out (+ linear_proj) fused in the epilogue == the separate reference ops."""
    tk = _kernels()
    from diffusers_hybrid.ops.linear_memory.naive import linear_memory_read_naive

    q, k, v = _inputs(2, 40, 100, 2, 32, torch.bfloat16)
    q_raw = torch.randn_like(q)
    kv = torch.randn(2, 2, 32, 32) / 32
    kmean = torch.rand(2, 2, 32)
    weight = torch.randn(32, 32) / 6 if with_proj else None
    bias = torch.randn(32) if with_proj else None
    ratio = 1.0 if dense else 0.4
    with poisoned_outputs(), torch.no_grad():
        got = tk.block_sparse_attention_with_memory_triton(
            q, k, v, q_raw, kv, kmean, eps=1e-6, proj_weight=weight, proj_bias=bias, topk_ratio=ratio,
            block_size=16)
    lut = None if dense else tk.select_key_blocks_triton(q, k, ratio, 16, "heads")[0]
    ref, _ = _reference(q, k, v, lut, 16)
    memory = linear_memory_read_naive(q.float(), q_raw.float(), kv, kmean)
    if with_proj:
        memory = torch.nn.functional.linear(memory, weight, bias)
    assert _rel_err(got, ref.detach() + memory) < 1e-2


# ------------------------------------------------------------------------------------------------------------------
# Forward launch-configuration variants (round 2): each one against the float32 reference, forward and backward (the
# backward kernels use the variant's log-sum-exp). `slots` forces the last-wave split on CPU.
# ------------------------------------------------------------------------------------------------------------------

FWD_VARIANTS = {
    "group2": dict(group=2),
    "single_loop": dict(single_loop=True),
    "loop_attributes": dict(loop_stages=2, unroll=2),
    "warp_specialize": dict(ws=True, single_loop=True),
    "tma_device": dict(tma="device"),
    "tma_host": dict(tma=True),
    "persistent": dict(persistent=True, slots=3),
    "fused_combine": dict(fused_combine=True, slots=5),
    "persistent_fused_flatten": dict(persistent=True, fused_combine=True, flatten=True, slots=5),
    "warp_specialize_split": dict(ws=True, single_loop=True, slots=5, group=2),
    "group2_split": dict(group=2, slots=5),
}


@pytest.fixture
def allocator():
    """Descriptors built in the kernel need a scratch allocator (the launcher installs one when none is set)."""
    import triton
    from triton.runtime import _allocation

    previous = _allocation._allocator.get()
    yield
    triton.set_allocator(previous)


@pytest.mark.parametrize("name", list(FWD_VARIANTS))
def test_forward_variants_forward_backward(name, monkeypatch, allocator):
    tk = _kernels()
    monkeypatch.setitem(tk.CONFIG_OVERRIDES, "fwd_sparse", FWD_VARIANTS[name])
    # K = 15 key blocks, 5 selected (odd: a pair loop leaves one unmasked block); 3 query blocks x 2 x 2 = 12 items
    q, k, v = _inputs(2, 40, 230, 2, 32, torch.bfloat16, grad=True)
    with poisoned_outputs():
        lut, _ = tk.select_key_blocks_triton(q.detach(), k.detach(), 0.35, 16, "heads")
        out = tk.block_sparse_attention_triton(q, k, v, topk_ratio=0.35, block_size=16)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert lut.shape[-1] == 5
    ref, leaves = _reference(q, k, v, lut, 16)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.float())
    assert not out.isnan().any() and _rel_err(out, ref) < 1e-2
    for got, want in zip(grads, ref_grads):
        assert not got.isnan().any() and _rel_err(got, want) < 2e-2


def test_memory_placement_is_validated(monkeypatch):
    tk = _kernels()
    monkeypatch.setitem(tk.CONFIG_OVERRIDES, "fwd_sparse_memory", dict(mem_mode=6))
    q, k, v = _inputs(1, 20, 40, 1, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="mem_mode"):
        tk.block_sparse_attention_with_memory_triton(q, k, v, torch.randn_like(q), torch.randn(1, 1, 16, 16),
                                                     torch.rand(1, 1, 16), topk_ratio=0.5, block_size=16)


def test_split_plan_is_exercised_by_the_variants():
    tk = _kernels()
    n_full, parts = tk._split_plan(12, 5, dict(slots=5), "cpu")
    assert (n_full, parts) == (10, 2)


MEMORY_VARIANTS = {
    "epilogue": dict(mem_mode=0),
    "denominator_first": dict(mem_mode=1),
    "all_first": dict(mem_mode=2),
    "all_first_split_fused": dict(mem_mode=2, slots=5, fused_combine=True),
    "denominator_first_ws_split": dict(mem_mode=1, ws=True, single_loop=True, slots=5),
    "epilogue_persistent_split": dict(mem_mode=0, persistent=True, slots=5, memory_lo=True, mem_state="f32"),
    # round 3: the read-out's contraction in chunks of state rows (query columns re-read)
    "epilogue_kc16": dict(mem_mode=0, mem_kc=16),
    "denominator_first_kc16_f32_lo": dict(mem_mode=1, mem_kc=16, mem_state="f32", memory_lo=True),
    "all_first_kc16_split": dict(mem_mode=2, mem_kc=16, slots=5),
    "epilogue_kc16_split_fused": dict(mem_mode=0, mem_kc=16, slots=5, fused_combine=True),
    # session 6: the whole read-out before the main loop, parked in the output tile until the epilogue
    "parked": dict(mem_mode=3),
    "parked_split": dict(mem_mode=3, slots=5),
    "parked_split_fused": dict(mem_mode=3, slots=5, fused_combine=True),
    "parked_persistent_split_kc16": dict(mem_mode=3, persistent=True, slots=5, mem_kc=16),
    "parked_f32_state_lo": dict(mem_mode=3, mem_state="f32", memory_lo=True),
    "parked_float32": dict(mem_mode=4),
    "parked_float32_split_fused": dict(mem_mode=4, slots=5, fused_combine=True),
    "parked_float32_persistent_split": dict(mem_mode=4, persistent=True, slots=5),
    # session 8: the read-out's product accumulated into the attention accumulator (one fp32 tile in the epilogue)
    "accumulated": dict(mem_mode=5, mem_kc=32),
    "accumulated_kc16_f32_lo": dict(mem_mode=5, mem_kc=16, mem_state="f32", memory_lo=True),
    "accumulated_ws_split": dict(mem_mode=5, ws=True, single_loop=True, slots=5),
    "accumulated_split_fused": dict(mem_mode=5, slots=5, fused_combine=True),
}


@pytest.mark.parametrize("name", list(MEMORY_VARIANTS))
def test_fused_memory_variants(name, monkeypatch):
    """Attention + linear-memory read-out (+ linear_proj folded into the state) in each placement == the separate
    reference ops."""
    tk = _kernels()
    from diffusers_hybrid.ops.linear_memory.naive import linear_memory_read_naive

    monkeypatch.setitem(tk.CONFIG_OVERRIDES, "fwd_sparse_memory", MEMORY_VARIANTS[name])
    # the fused op launches with the "fwd_sparse_memory" configuration: the variant must be what it runs
    assert MEMORY_VARIANTS[name].items() <= tk._config("fwd_sparse_memory", 32, 16).items()
    q, k, v = _inputs(2, 40, 230, 2, 32, torch.bfloat16)
    q_raw = torch.randn_like(q)
    kv = torch.randn(2, 2, 32, 32) / 32
    kmean = torch.rand(2, 2, 32)
    weight = torch.randn(32, 32) / 6
    bias = torch.randn(32)
    with poisoned_outputs(), torch.no_grad():
        got = tk.block_sparse_attention_with_memory_triton(
            q, k, v, q_raw, kv, kmean, eps=1e-6, proj_weight=weight, proj_bias=bias, topk_ratio=0.35, block_size=16)
        lut = tk.select_key_blocks_triton(q, k, 0.35, 16, "heads")[0]
    ref, _ = _reference(q, k, v, lut, 16)
    memory = torch.nn.functional.linear(linear_memory_read_naive(q.float(), q_raw.float(), kv, kmean), weight, bias)
    assert _rel_err(got, ref.detach() + memory) < 1e-2


@pytest.mark.parametrize("placement", [dict(mem_mode=1, slots=5, fused_combine=True), dict(mem_mode=5, slots=5)],
                         ids=["den_first_split_fused", "accumulated_split"])
def test_fused_memory_with_given_denominators(placement, monkeypatch):
    """The read-out's denominators given (as the RoPE step computes them) instead of the raw query: the same result
    as the kernel computing them, and as the reference; whole and split items (the merge paths read them too)."""
    tk = _kernels()
    from diffusers_hybrid.ops.linear_memory.naive import linear_memory_denominator_naive, linear_memory_read_naive

    monkeypatch.setitem(tk.CONFIG_OVERRIDES, "fwd_sparse_memory", placement)
    q, k, v = _inputs(2, 40, 230, 3, 32, torch.bfloat16)
    q_raw = torch.randn_like(q)
    kv, kmean = torch.randn(2, 3, 32, 32) / 32, torch.rand(2, 3, 32)
    weight, bias = torch.randn(32, 32) / 6, torch.randn(32)
    den = linear_memory_denominator_naive(q_raw, kmean, 1e-3)
    common = dict(proj_weight=weight, proj_bias=bias, topk_ratio=0.35, block_size=16, eps=1e-3)
    with poisoned_outputs(), torch.no_grad():
        got = tk.block_sparse_attention_with_memory_triton(q, k, v, None, kv, None, memory_denominator=den, **common)
        from_raw = tk.block_sparse_attention_with_memory_triton(q, k, v, q_raw, kv, kmean, **common)
        lut = tk.select_key_blocks_triton(q, k, 0.35, 16, "heads")[0]
    torch.testing.assert_close(got, from_raw, rtol=1e-2, atol=1e-2)
    ref, _ = _reference(q, k, v, lut, 16)
    memory = torch.nn.functional.linear(linear_memory_read_naive(q.float(), None, kv, None, denominator=den), weight,
                                        bias)
    assert _rel_err(got, ref.detach() + memory) < 1e-2 and _rel_err(got, ref) > 5e-2
    with pytest.raises(ValueError, match="memory_denominator"):
        tk.block_sparse_attention_with_memory_triton(q, k, v, q_raw, kv, None, memory_denominator=den, **common)
    with pytest.raises(ValueError, match="memory_denominator"):
        tk.block_sparse_attention_with_memory_triton(q, k, v, None, kv, None, memory_denominator=den[:, :5], **common)


def test_fused_memory_with_projected_state_and_prefix():
    """`state_is_projected` (the caller keeps KV' = KV W^T) and a pooled key prefix give the same result."""
    tk = _kernels()
    q, k, v = _inputs(1, 40, 100, 2, 32, torch.float16)
    q_raw = torch.randn_like(q)
    kv, kmean = torch.randn(1, 2, 32, 32) / 32, torch.rand(1, 2, 32)
    weight, bias = torch.randn(32, 32) / 6, torch.randn(32)
    prefix = tk.pool_key_blocks_triton(k[:, :48], 16, "heads")
    with torch.no_grad():
        a = tk.block_sparse_attention_with_memory_triton(q, k, v, q_raw, kv, kmean, proj_weight=weight,
                                                         proj_bias=bias, topk_ratio=0.3, block_size=16)
        b = tk.block_sparse_attention_with_memory_triton(q, k, v, q_raw, tk.project_memory_state(kv, weight), kmean,
                                                         proj_bias=bias, topk_ratio=0.3, block_size=16,
                                                         state_is_projected=True, pooled_key_prefix=prefix)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="state_is_projected"):
        tk.block_sparse_attention_with_memory_triton(q, k, v, q_raw, kv, kmean, proj_weight=weight,
                                                     state_is_projected=True)


def test_fused_memory_with_16bit_projected_state():
    """A projected state kept in the queries' 16-bit dtype (no per-call cast or fold) stays within 16-bit tolerance
    of the float32 reference."""
    tk = _kernels()
    from diffusers_hybrid.ops.linear_memory.naive import linear_memory_read_naive

    q, k, v = _inputs(2, 40, 230, 3, 32, torch.bfloat16)
    q_raw = torch.randn_like(q)
    kv, kmean = torch.randn(2, 3, 32, 32) / 32, torch.rand(2, 3, 32)
    weight, bias = torch.randn(32, 32) / 6, torch.randn(32)
    state = tk.project_memory_state(kv, weight).to(torch.bfloat16)
    with poisoned_outputs(), torch.no_grad():
        got = tk.block_sparse_attention_with_memory_triton(q, k, v, q_raw, state, kmean, proj_bias=bias,
                                                           topk_ratio=0.35, block_size=16, state_is_projected=True)
        lut = tk.select_key_blocks_triton(q, k, 0.35, 16, "heads")[0]
    ref, _ = _reference(q, k, v, lut, 16)
    memory = torch.nn.functional.linear(linear_memory_read_naive(q.float(), q_raw.float(), kv, kmean), weight, bias)
    assert not got.isnan().any() and _rel_err(got, ref.detach() + memory) < 1e-2
    with pytest.raises(ValueError, match="mem_kc"):
        tk.attention_forward(q, k, v, lut, lut.shape[-1], 16, 0.2, False, dict(KPI=1, num_warps=4, num_stages=1,
                                                                               mem_kc=24),
                             memory=(q_raw, state, kmean, bias, 1e-6))


@pytest.mark.parametrize("impl, num_keys, num_prefix", [("group", 230, 0), ("rows", 230, 9), ("group", 600 * 16, 0)])
def test_radix4_and_sort_searches_equal_binary_search(impl, num_keys, num_prefix, monkeypatch):
    """The 16-step radix-4 threshold search and the sort-based one select exactly what the 32-step binary search
    selects (ties included: duplicated key blocks), with and without a pooled prefix; 600 key blocks pad to 1024
    columns, whose packed counts need 64-bit fields (the 1024-wide sort network takes minutes in the interpreter:
    compiled only)."""
    tk = _kernels()
    from diffusers_hybrid.ops.block_sparse_attention.naive import select_key_blocks_naive

    dim = 16 if num_keys > 1000 else 32
    # the 600-block case at one batch entry and two heads: the interpreter's time grows with both (CI budget)
    q, k, _ = _inputs(*((2, 50) if num_keys < 1000 else (1, 20)), num_keys, 3 if num_keys < 1000 else 2, dim,
                      torch.bfloat16)
    k[:, 64:128] = k[:, 0:64]  # exact ties between key blocks 4..7 and 0..3
    prefix = tk.pool_key_blocks_triton(k[:, : num_prefix * 16], 16, "heads") if num_prefix else None
    luts = {}
    searches = ("binary", "radix4") + (("sort",) if num_keys < 1000 or not tk._interpret() else ())
    for search in searches:
        monkeypatch.setattr(tk, "SELECT_CONFIG", {**tk.SELECT_CONFIG, "impl": impl, "G": 4, "search": search})
        with poisoned_outputs():
            luts[search], _ = tk.select_key_blocks_triton(q, k, 0.3, 16, "heads", pooled_key_prefix=prefix)
    assert torch.equal(luts["radix4"], luts["binary"])
    if "sort" in luts:
        assert torch.equal(luts["sort"], luts["binary"])
    assert_valid_selection(luts["radix4"], q, k, 0.3, 16, "heads")
    # torch.topk orders exact ties arbitrarily: compare with the reference on the rows without a tie at the cut
    want = select_key_blocks_naive(q, k, 0.3, 16, "heads")
    scores = _pooled_scores(q, k, 16, "heads")
    top = scores.topk(want.shape[-1] + 1, dim=-1).values
    untied = (top[..., -2] - top[..., -1]) > 1e-5 * scores.abs().amax(-1)  # clear of float32 rounding at the cut
    assert untied.any() and (luts["radix4"].long() == want).all(-1)[untied].all()


def test_pdl_mode_is_checked_and_off_in_the_interpreter(monkeypatch):
    tk = _kernels()
    x = torch.zeros(1)
    monkeypatch.setattr(tk, "USE_PDL", "sometimes")
    with pytest.raises(ValueError, match="USE_PDL"):
        tk._pdl_launch(x)
    monkeypatch.setattr(tk, "USE_PDL", "late")
    assert tk._pdl_launch(x) == {"PDL": 0}  # a CPU tensor (interpreter): plain launches


def test_unknown_search_is_rejected(monkeypatch):
    tk = _kernels()
    monkeypatch.setattr(tk, "SELECT_CONFIG", {**tk.SELECT_CONFIG, "impl": "group", "search": "bogus"})
    q, k, _ = _inputs(1, 20, 40, 2, 16, torch.float16)
    with pytest.raises(ValueError, match="search"):
        tk.select_key_blocks_triton(q, k, 0.5, 16, "heads")


def test_unknown_forward_option_is_rejected():
    tk = _kernels()
    q, k, v = _inputs(1, 20, 40, 2, 16, torch.float16)
    with pytest.raises(ValueError, match="unknown forward launch option"):
        tk.attention_forward(q, k, v, None, 0, 16, 0.25, True, dict(BLOCK_M=16, BLOCK_N=16, num_warps=4,
                                                                    num_stages=1, bogus=1))


# ------------------------------------------------------------------------------------------------------------------
# Pooled key prefix: the selection takes precomputed pooled key blocks for a prefix of the keys
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["reference", "triton"])
@pytest.mark.parametrize("key_centering, num_prefix", [("heads", 9), ("none", 14), ("heads", 0), ("heads", 15)])
def test_pooled_key_prefix_equals_pooling_everything(kernel, key_centering, num_prefix):
    """Selection (and attention) with the pooled blocks of the first `P` key blocks given == pooling all keys; the
    prefix may be empty or cover every block, the last block partial (230 = 14 * 16 + 6)."""
    from diffusers_hybrid.ops import pool_key_blocks
    from diffusers_hybrid.ops.block_sparse_attention.naive import select_key_blocks_naive

    q, k, v = _inputs(2, 40, 230, 2, 32, torch.bfloat16)
    prefix = pool_key_blocks(k[:, : num_prefix * 16], 16, key_centering, kernel=kernel)
    assert prefix.shape == (2, 2, num_prefix, 32) and prefix.dtype == torch.float32
    with poisoned_outputs():
        plain = block_sparse_attention(q, k, v, topk_ratio=0.3, block_size=16, key_centering=key_centering,
                                       kernel=kernel)
        cached = block_sparse_attention(q, k, v, topk_ratio=0.3, block_size=16, key_centering=key_centering,
                                        pooled_key_prefix=prefix, kernel=kernel)
    torch.testing.assert_close(cached, plain, atol=0, rtol=0)
    want = select_key_blocks_naive(q, k, 0.3, 16, key_centering)
    if kernel == "reference":
        got = select_key_blocks_naive(q, k, 0.3, 16, key_centering, pooled_key_prefix=prefix)
        assert torch.equal(got, want)
    else:
        tk = _kernels()
        with poisoned_outputs():
            got, bmap = tk.select_key_blocks_triton(q, k, 0.3, 16, key_centering, write_map=True,
                                                    pooled_key_prefix=prefix)
            base, _ = tk.select_key_blocks_triton(q, k, 0.3, 16, key_centering)
        assert torch.equal(got, base)
        assert_valid_selection(got, q, k, 0.3, 16, key_centering)
        assert torch.equal(bmap, torch.zeros(bmap.shape, dtype=torch.int8).scatter_(-1, got.long(), 1))


@pytest.mark.parametrize("select_cfg", [{"impl": "group", "G": 4}, {"impl": "rows", "G": 2},
                                        {"impl": "torch"}, {"pool": "tok"}])
def test_pooled_key_prefix_other_selection_kernels(select_cfg, monkeypatch):
    tk = _kernels()
    monkeypatch.setattr(tk, "SELECT_CONFIG", {**tk.SELECT_CONFIG, **select_cfg})
    q, k, _ = _inputs(2, 50, 230, 3, 32, torch.bfloat16)
    prefix = tk.pool_key_blocks_triton(k[:, :96], 16, "heads")
    with poisoned_outputs():
        got, _ = tk.select_key_blocks_triton(q, k, 0.3, 16, "heads", pooled_key_prefix=prefix)
    assert_valid_selection(got, q, k, 0.3, 16, "heads")


def test_pool_key_blocks_triton_matches_reference_and_fills_out():
    tk = _kernels()
    from diffusers_hybrid.ops.block_sparse_attention.naive import pool_key_blocks_naive

    k = _inputs(2, 10, 100, 3, 32, torch.bfloat16)[1]
    out = torch.full((2, 3, 7, 32), float("nan"))
    got = tk.pool_key_blocks_triton(k, 16, "heads", out=out)
    assert got is out
    torch.testing.assert_close(out, pool_key_blocks_naive(k, 16, "heads"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out"):
        tk.pool_key_blocks_triton(k, 16, "heads", out=torch.empty(2, 3, 6, 32))


def test_pooled_key_prefix_is_validated():
    q, k, v = _inputs(1, 20, 40, 2, 16, torch.float16)
    for bad in (torch.zeros(1, 2, 4, 16), torch.zeros(1, 3, 1, 16), torch.zeros(2, 2, 1, 16)):  # 40 keys: 3 blocks
        for kernel in ("reference", "triton"):
            with pytest.raises(ValueError, match="pooled_key_prefix"):
                block_sparse_attention(q, k, v, topk_ratio=0.5, block_size=16, pooled_key_prefix=bad, kernel=kernel)


# Session 6: the top-k selection in the attention kernel's prologue (SELECT_CONFIG["fused"]).
FUSED_SELECTION_CASES = {  # (SELECT_CONFIG, forward launch configuration); "prefix" in the name: cached prefix
    "binary_split": ({}, {"slots": 5}),
    "sort_prefix_narrow_chunks": ({"search": "sort", "fused_dc": 8}, {}),
    "radix4_persistent_split_fused_combine": ({"search": "radix4"}, {"persistent": True, "slots": 5,
                                                                      "fused_combine": True}),
}


@pytest.mark.parametrize("name", list(FUSED_SELECTION_CASES))
def test_selection_fused_into_attention(name, monkeypatch):
    """The attention kernel's own selection (one query block per program): a valid top-k LUT and block map, the
    attention over exactly those blocks forward and backward, and the fused memory op equal to the unfused one."""
    tk = _kernels()
    select_cfg, fwd_cfg = FUSED_SELECTION_CASES[name]
    monkeypatch.setattr(tk, "SELECT_CONFIG", {**tk.SELECT_CONFIG, **select_cfg, "fused": True})
    monkeypatch.setitem(tk.CONFIG_OVERRIDES, "fwd_sparse", fwd_cfg)
    monkeypatch.setitem(tk.CONFIG_OVERRIDES, "fwd_sparse_memory", fwd_cfg)
    q, k, v = _inputs(2, 40, 230, 2, 32, torch.bfloat16, grad=True)  # 3 query blocks x 2 x 2 = 12 work items
    prefix = tk.pool_key_blocks_triton(k.detach()[:, :96], 16, "heads") if "prefix" in name else None
    topk = num_selected_blocks(-(-230 // 16), 0.3)
    with poisoned_outputs():
        out, _, lut, bmap = tk._bsa_fwd_impl(q.detach(), k.detach(), v.detach(), None, topk, 16, True, 32 ** -0.5,
                                             False, prefix)
        got = tk.block_sparse_attention_triton(q, k, v, topk_ratio=0.3, block_size=16, pooled_key_prefix=prefix)
        grad_out = torch.randn_like(got)
        grads = torch.autograd.grad(got, (q, k, v), grad_out)
    assert_valid_selection(lut, q.detach(), k.detach(), 0.3, 16, "heads")
    assert torch.equal(bmap, torch.zeros(bmap.shape, dtype=torch.int8).scatter_(-1, lut.long(), 1))
    assert torch.equal(got.detach(), out)
    ref, leaves = _reference(q, k, v, lut, 16)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.float())
    assert _rel_err(got, ref.detach()) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert _rel_err(g, r) < 2e-2

    q_raw = torch.randn_like(q.detach())
    kv, kmean, weight, bias = torch.randn(2, 2, 32, 32) / 32, torch.rand(2, 2, 32), torch.randn(32, 32) / 6, \
        torch.randn(32)
    args = (q.detach(), k.detach(), v.detach(), q_raw, kv, kmean)
    kwargs = dict(proj_weight=weight, proj_bias=bias, topk_ratio=0.3, block_size=16, pooled_key_prefix=prefix)
    with poisoned_outputs(), torch.no_grad():
        fused = tk.block_sparse_attention_with_memory_triton(*args, **kwargs)
        monkeypatch.setitem(tk.SELECT_CONFIG, "fused", False)
        unfused_lut, _ = tk.select_key_blocks_triton(q.detach(), k.detach(), 0.3, 16, "heads",
                                                     pooled_key_prefix=prefix)
        unfused = tk.block_sparse_attention_with_memory_triton(*args, **kwargs)
    if torch.equal(unfused_lut, lut):  # the same blocks (no near-tie ranked differently): the same kernel arithmetic
        assert torch.equal(fused, unfused)
    else:
        assert _rel_err(fused, unfused) < 2e-2


# ------------------------------------------------------------------------------------------------------------------
# Argument validation: every check raises before any kernel runs (fast on CPU)
# ------------------------------------------------------------------------------------------------------------------


def _memory_case():
    """bf16 (B=2, Lq=20, Lk=40, H=2, D=16) queries, keys, values, raw query, state and projection."""
    q, k, v = _inputs(2, 20, 40, 2, 16, torch.bfloat16)
    q_raw = torch.randn_like(q)
    kv, kmean = torch.randn(2, 2, 16, 16) / 16, torch.rand(2, 2, 16)
    return q, k, v, q_raw, kv, kmean, (torch.randn(16, 16) / 4).bfloat16(), torch.randn(16).bfloat16()


@pytest.mark.parametrize("kernel", ["reference", "triton", "triton_level"])
def test_memory_state_and_raw_query_shapes_are_validated(kernel):
    """A mis-shaped `query_raw`, `kv_state` or `kmean_state` (batch 1 included: no path broadcasts it, the kernel
    indexes the state per batch element) is refused with the same ValueError by both kernels and the Triton-level
    function, with and without gradients (the fused and the unfused Triton branches)."""
    from diffusers_hybrid.ops import block_sparse_attention_with_memory

    tk = _kernels()
    q, k, v, q_raw, kv, kmean, weight, bias = _memory_case()
    if kernel == "triton_level":
        def call(*args, **kwargs):
            return tk.block_sparse_attention_with_memory_triton(*args, **kwargs)
    else:
        def call(*args, **kwargs):
            return block_sparse_attention_with_memory(*args, kernel=kernel, **kwargs)
    cases = [
        (dict(query_raw=torch.randn(2, 20, 3, 16).bfloat16()),
         r"query_raw must have the shape of query \(2, 20, 2, 16\), got \(2, 20, 3, 16\)"),
        (dict(query_raw=torch.randn(2, 21, 2, 16).bfloat16()),
         r"query_raw must have the shape of query \(2, 20, 2, 16\), got \(2, 21, 2, 16\)"),
        (dict(kv_state=kv[:1]), r"kv_state must have shape \(B, H, D, D\) = \(2, 2, 16, 16\) .* got \(1, 2, 16, 16\)"),
        (dict(kmean_state=kmean[:1]), r"kmean_state must have shape \(B, H, D\) = \(2, 2, 16\) .* got \(1, 2, 16\)"),
        (dict(kmean_state=kmean[..., None]), r"kmean_state must have shape .* got \(2, 2, 16, 1\)"),
    ]
    for grad in (False, True):
        for changes, message in cases:
            args = {**dict(query=q.clone().requires_grad_(grad), key=k, value=v, query_raw=q_raw, kv_state=kv,
                           kmean_state=kmean), **changes}
            with pytest.raises(ValueError, match=message):
                call(*args.values(), proj_weight=weight, proj_bias=bias, topk_ratio=0.5, block_size=16)
    # the precomputed denominators: the state is still checked
    den = torch.rand(2, 20, 2) + 1
    with pytest.raises(ValueError, match=r"kv_state must have shape .* got \(1, 2, 16, 16\)"):
        call(q, k, v, None, kv[:1], None, memory_denominator=den, proj_weight=weight, topk_ratio=0.5, block_size=16)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_memory_state_that_requires_grad_is_refused_by_triton(kernel):
    """The Triton read-out passes no gradient to the memory state: a state that requires grad (with grad enabled) is
    refused in both Triton branches (fused: only the state wants a gradient; unfused: the queries do too) instead of
    leaving its `.grad` silently None; the reference differentiates through it; under no_grad it is fine."""
    from diffusers_hybrid.ops import block_sparse_attention_with_memory

    q, k, v, q_raw, kv, kmean, weight, bias = _memory_case()
    common = dict(proj_weight=weight, proj_bias=bias, topk_ratio=1.0, block_size=16, kernel=kernel)
    for query_grad in (False, True):
        for name in ("kv_state", "kmean_state"):
            state = dict(kv_state=kv.clone(), kmean_state=kmean.clone())
            state[name].requires_grad_(True)
            query = q.clone().requires_grad_(query_grad)
            if kernel == "triton":
                with pytest.raises(ValueError, match=f"`{name}` requires grad"):
                    block_sparse_attention_with_memory(query, k, v, q_raw, state["kv_state"], state["kmean_state"],
                                                       **common)
            else:
                out = block_sparse_attention_with_memory(query, k, v, q_raw, state["kv_state"],
                                                         state["kmean_state"], **common)
                (grad,) = torch.autograd.grad(out.float().sum(), state[name])
                assert grad.abs().sum() > 0
    if kernel == "triton":
        with torch.no_grad():
            out = block_sparse_attention_with_memory(q, k, v, q_raw, kv.clone().requires_grad_(True), kmean, **common)
        assert out.shape == q.shape and out.isfinite().all()


def test_given_block_index_is_validated():
    """`block_index` of `block_sparse_attention_triton` (benchmarks, tests): exactly (B, H, M, topk) (a batch-1 index
    is not broadcast), integral, within [0, K) and without repeats in a row; the reference refuses the same indices
    with the same message (it would broadcast a batch-1 index and merge repeats)."""
    tk = _kernels()
    from diffusers_hybrid.ops.block_sparse_attention.naive import select_key_blocks_naive

    q, k, v = _inputs(2, 40, 100, 2, 16, torch.float16)  # M = 3 query blocks, K = 7 key blocks
    lut = select_key_blocks_naive(q, k, 0.4, 16, "none")  # (2, 2, 3, 2)
    repeated = lut.clone()
    repeated[1, 0, 2, 1] = repeated[1, 0, 2, 0]
    cases = [
        (lut[:1], r"block_index must have shape \(B, H, M, topk\) = \(2, 2, 3, topk\), got \(1, 2, 3, 2\)"),
        (lut[0], r"block_index must have shape .* got \(2, 3, 2\)"),
        (lut[..., :0], r"block_index must select 1 to 7 key blocks per row, got 0"),
        (lut.float(), r"block_index must be an integer tensor, got torch.float32"),
        (lut.bool(), r"block_index must be an integer tensor, got torch.bool"),
        (torch.where(lut == lut.max(), 7, lut), r"block_index must hold key blocks in \[0, 7\), got 7"),
        (torch.where(lut == lut.min(), -1, lut), r"block_index must hold key blocks in \[0, 7\), got -1"),
        (repeated, rf"block_index selects key block {int(repeated[1, 0, 2, 0])} twice in one row"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            tk.block_sparse_attention_triton(q, k, v, block_size=16, block_index=bad)
        with pytest.raises(ValueError, match=message):
            block_sparse_attention_naive(q, k, v, bad, 16)
    with poisoned_outputs():  # a valid int32 index in any order is taken as it is
        out = tk.block_sparse_attention_triton(q, k, v, block_size=16, block_index=lut.flip(-1).int())
    assert _rel_err(out, _reference(q, k, v, lut, 16)[0]) < 1e-2


def test_empty_key_sequence_is_refused():
    """No keys (Lk = 0): a ValueError from both kernels (the Triton path crashed the process, the reference failed in
    the selection), with and without the memory read-out."""
    from diffusers_hybrid.ops import block_sparse_attention_with_memory

    q, k, v, q_raw, kv, kmean, weight, bias = _memory_case()
    empty = k[:, :0]
    message = r"key must hold at least one token, got shape \(2, 0, 2, 16\)"
    for kernel in ("reference", "triton"):
        for ratio in (1.0, 0.2):
            with pytest.raises(ValueError, match=message):
                block_sparse_attention(q, empty, empty, topk_ratio=ratio, block_size=16, kernel=kernel)
            with torch.no_grad(), pytest.raises(ValueError, match=message):
                block_sparse_attention_with_memory(q, empty, empty, q_raw, kv, kmean, proj_weight=weight,
                                                   topk_ratio=ratio, block_size=16, kernel=kernel)
    with pytest.raises(ValueError, match=message):
        _kernels().block_sparse_attention_triton(q, empty, empty, block_size=16)


def test_pool_key_blocks_out_is_validated_by_both_kernels():
    """`pool_key_blocks(out=...)`: the reference refuses the buffers the Triton path refuses, with the same message
    (a bf16 buffer would round the cache's pooled keys, a batch-2 one would be broadcast into)."""
    from diffusers_hybrid.ops import pool_key_blocks
    from diffusers_hybrid.ops.block_sparse_attention.naive import pool_key_blocks_naive

    key = torch.randn(1, 40, 2, 16, dtype=torch.bfloat16)  # 3 blocks of 16
    bad_outs = [torch.empty(1, 2, 3, 16, dtype=torch.bfloat16), torch.empty(2, 2, 3, 16), torch.empty(1, 2, 2, 16),
                torch.empty(1, 2, 16, 3).transpose(-1, -2)]
    for out in bad_outs:
        messages = []
        for kernel in ("reference", "triton"):
            with pytest.raises(ValueError, match=r"`out` must be a contiguous float32 tensor of shape \(1, 2, 3, 16\)"
                                                 r" on cpu") as error:
                pool_key_blocks(key, 16, "heads", out=out.clone(), kernel=kernel)
            messages.append(str(error.value))
        assert messages[0] == messages[1]
    for kernel in ("reference", "triton"):
        out = torch.full((1, 2, 3, 16), float("nan"))
        assert pool_key_blocks(key, 16, "heads", out=out, kernel=kernel) is out
        torch.testing.assert_close(out, pool_key_blocks_naive(key, 16, "heads"), atol=1e-5, rtol=1e-5)


class _NoLaunch:
    """Stands for a Triton kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_poisoned_outputs_reach_this_module(monkeypatch):
    """Inside `poisoned_outputs()` the launchers' buffers are poisoned: with the kernel launch stubbed out, nothing is
    written, so the pooled blocks are NaN (the module reads the live flag, not a copy bound at import)."""
    tk = _kernels()
    assert not hasattr(tk, "POISON_OUTPUTS")
    for name in ("_pool_heads_kernel", "_pool_kernel"):
        monkeypatch.setattr(tk, name, _NoLaunch())
    q, k, _ = _inputs(1, 20, 40, 2, 16, torch.bfloat16)
    with poisoned_outputs():
        pooled_q, pooled_k = tk._pool(q, k, 16, True)
    assert pooled_q.isnan().all() and pooled_k.isnan().all()
