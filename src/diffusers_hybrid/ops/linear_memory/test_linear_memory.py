# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Triton linear-memory absorption and read-out against the plain-PyTorch references (interpreter on CPU, fresh
random inputs, poisoned output buffers; GPU tests at the real shapes are marked `gpu`)."""

import pytest
import torch

from diffusers_hybrid.ops import linear_memory_absorb, linear_memory_read, triton_available
from diffusers_hybrid.ops.linear_memory.naive import linear_memory_absorb_naive, linear_memory_read_naive
from diffusers_hybrid.ops.utils import poisoned_outputs

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton cannot run here")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _kernels():
    from diffusers_hybrid.ops.linear_memory import triton_kernel

    return triton_kernel


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _state(batch, heads, dim, device="cpu"):
    kv = torch.randn(batch, heads, dim, dim, device=device)
    kmean = torch.rand(batch, heads, dim, device=device)
    return kv, kmean


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_splits, count", [(None, 0), (3, 1234)])
def test_absorb(dtype, num_splits, count):
    tk = _kernels()
    batch, seq, heads, dim = 2, 75, 3, 32
    kv, kmean = _state(batch, heads, dim)
    key_roped, key_raw, value = (torch.randn(batch, seq, heads, dim, dtype=dtype) for _ in range(3))
    with poisoned_outputs():
        if num_splits is None:
            got = linear_memory_absorb(kv, kmean, count, key_roped, key_raw, value, kernel="triton")
        else:
            got = tk._absorb_launch(kv, kmean, count, key_roped, key_raw, value, num_splits=num_splits)
    want = linear_memory_absorb_naive(kv, kmean, count, key_roped, key_raw, value)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert _rel_err(g, w) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_splits, count", [(None, 0), (3, 1234)])
def test_absorb_key_sums_on_tensor_cores(dtype, num_splits, count, monkeypatch):
    """Round 3 variant `absorb_ksum="dot"`: the sums of relu(k_raw) as a product with a ones matrix."""
    tk = _kernels()
    monkeypatch.setattr(tk, "LM_CONFIG", {**tk.LM_CONFIG, "absorb_ksum": "dot"})
    batch, seq, heads, dim = 2, 75, 3, 32
    kv, kmean = _state(batch, heads, dim)
    key_roped, key_raw, value = (torch.randn(batch, seq, heads, dim, dtype=dtype) for _ in range(3))
    with poisoned_outputs():
        got = tk._absorb_launch(kv, kmean, count, key_roped, key_raw, value, num_splits=num_splits)
    want = linear_memory_absorb_naive(kv, kmean, count, key_roped, key_raw, value)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert _rel_err(g, w) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_read_forward_backward(dtype):
    batch, seq, heads, dim = 2, 75, 3, 32
    kv, kmean = _state(batch, heads, dim)
    q_num = torch.randn(batch, seq, heads, dim, dtype=dtype, requires_grad=True)
    q_raw = torch.randn(batch, seq, heads, dim, dtype=dtype, requires_grad=True)
    with poisoned_outputs():
        out = linear_memory_read(q_num, q_raw, kv, kmean, eps=1e-6, kernel="triton")
        grad_out = torch.randn_like(out)
        d_num, d_raw = torch.autograd.grad(out, (q_num, q_raw), grad_out)
    qn, qr = (t.detach().float().requires_grad_(True) for t in (q_num, q_raw))
    ref = linear_memory_read_naive(qn, qr, kv, kmean, 1e-6)
    ref_num, ref_raw = torch.autograd.grad(ref, (qn, qr), grad_out)
    assert out.dtype == torch.float32
    assert _rel_err(out, ref) < 1e-5
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # gradients are returned in the query dtype
    assert _rel_err(d_num, ref_num) < tol
    assert _rel_err(d_raw, ref_raw) < tol


def test_custom_op_registration():
    tk = _kernels()
    kv, kmean = _state(1, 2, 16)
    q_num = torch.randn(1, 20, 2, 16, requires_grad=True)
    q_raw = torch.randn(1, 20, 2, 16, requires_grad=True)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(tk._read_op, (q_num, q_raw, kv, kmean, 1e-6), test_utils=utils)
    keys = [torch.randn(1, 20, 2, 16) for _ in range(3)]
    torch.library.opcheck(tk._absorb_op, (kv, kmean, 7, *keys), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@requires_cuda
def test_gpu_real_shapes():
    """One 3-frame chunk of Wan2.1-1.3B at 832x480 (4,680 tokens, 12 heads of 128), bf16."""
    batch, seq, heads, dim = 1, 4680, 12, 128
    kv, kmean = _state(batch, heads, dim, "cuda")
    kv = kv / dim
    key_roped, key_raw, value = (torch.randn(batch, seq, heads, dim, dtype=torch.bfloat16, device="cuda")
                                 for _ in range(3))
    with poisoned_outputs():
        got = linear_memory_absorb(kv, kmean, 9360, key_roped, key_raw, value, kernel="triton")
    want = linear_memory_absorb_naive(kv, kmean, 9360, key_roped, key_raw, value)
    for g, w in zip(got, want):
        assert _rel_err(g, w) < 1e-5
    kv, kmean = got
    q_num = torch.randn(batch, seq, heads, dim, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    q_raw = torch.randn(batch, seq, heads, dim, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    with poisoned_outputs():
        out = linear_memory_read(q_num, q_raw, kv, kmean, kernel="triton")
        grad_out = torch.randn_like(out)
        d_num, d_raw = torch.autograd.grad(out, (q_num, q_raw), grad_out)
    qn, qr = (t.detach().float().requires_grad_(True) for t in (q_num, q_raw))
    ref = linear_memory_read_naive(qn, qr, kv, kmean)
    ref_num, ref_raw = torch.autograd.grad(ref, (qn, qr), grad_out)
    assert _rel_err(out, ref) < 1e-4
    assert _rel_err(d_num, ref_num) < 1e-2
    assert _rel_err(d_raw, ref_raw) < 1e-2
