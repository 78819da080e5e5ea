# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Triton linear-memory absorption and read-out against the plain-PyTorch references (interpreter on CPU, fresh
random inputs, poisoned output buffers; GPU tests at the real shapes are marked `gpu`)."""

import pytest
import torch

from diffusers_hybrid.ops import apply_rotary_emb, linear_memory_absorb, linear_memory_read, triton_available
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


def _rope_tables(seq, dim, device="cpu"):
    """Random angles, Wan's repeat-interleaved layout: `(1, seq, 1, dim)` float32 cos and sin."""
    angles = torch.rand(seq, dim // 2, device=device) * (2 * torch.pi)
    table = (angles.cos(), angles.sin())
    return tuple(t.repeat_interleave(2, dim=-1).view(1, seq, 1, dim) for t in table)


def _absorb_inputs(batch, seq, heads, dim, dtype, device="cpu"):
    kv, kmean = _state(batch, heads, dim, device)
    key_raw, value = (torch.randn(batch, seq, heads, dim, dtype=dtype, device=device) for _ in range(2))
    return kv, kmean, key_raw, value, *_rope_tables(seq, dim, device)


def _assert_absorbed(got, want, tol=1e-5):
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert _rel_err(g, w) < tol


# s = 75: two full token tiles of the interpreter (32) and a partial one; 3 splits of 32 + 32 + 11 tokens
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_splits, count", [(None, 0), (3, 1234)])
@pytest.mark.parametrize("ksum", ["reduce", "dot"])
def test_absorb(dtype, num_splits, count, ksum, monkeypatch):
    """The kernel RoPEs the raw keys itself; `ksum="dot"`: the sums of relu(k_raw) as a product with ones."""
    tk = _kernels()
    monkeypatch.setattr(tk, "LM_CONFIG", {**tk.LM_CONFIG, "absorb_ksum": ksum})
    kv, kmean, key_raw, value, cos, sin = _absorb_inputs(2, 75, 3, 32, dtype)
    with poisoned_outputs():
        if num_splits is None:
            got = linear_memory_absorb(kv, kmean, count, key_raw, value, cos, sin, kernel="triton")
        else:
            got = tk._absorb_launch(kv, kmean, count, key_raw, value, cos, sin, num_splits=num_splits)
    _assert_absorbed(got, linear_memory_absorb_naive(kv, kmean, count, key_raw, value, cos, sin))


def test_absorb_column_blocks_and_broadcast_tables(monkeypatch):
    """State columns split over programs (`absorb_be` < D: only the first stores the key sums), and tables given
    as `(s, 1, D)` and as one angle per channel for every token (stride 0 along the tokens)."""
    tk = _kernels()
    monkeypatch.setattr(tk, "LM_CONFIG", {**tk.LM_CONFIG, "absorb_be": 16})
    kv, kmean, key_raw, value, cos, sin = _absorb_inputs(2, 40, 2, 32, torch.bfloat16)
    for tables in ((cos[0], sin[0]), (cos[:, :1], sin[:, :1])):
        with poisoned_outputs():
            got = tk._absorb_launch(kv, kmean, 77, key_raw, value, *tables, num_splits=2)
        _assert_absorbed(got, linear_memory_absorb_naive(kv, kmean, 77, key_raw, value, *tables))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_absorb_strided_inputs(dtype):
    """Keys and values as slice views of larger buffers (frames of a cache buffer, a subset of its heads) and tables
    as a slice of a larger table: the result of contiguous copies, bit for bit."""
    batch, seq, heads, dim = 2, 45, 3, 32
    kv, kmean = _state(batch, heads, dim)
    key_buf, value_buf = (torch.randn(batch, seq + 30, heads + 1, dim, dtype=dtype) for _ in range(2))
    cos_buf, sin_buf = _rope_tables(seq + 30, dim)
    rows = slice(20, 20 + seq)
    key_raw, value = key_buf[:, rows, 1:], value_buf[:, rows, :heads]
    cos, sin = cos_buf[:, rows], sin_buf[:, rows]
    assert not key_raw.is_contiguous() and not value.is_contiguous()
    with poisoned_outputs():
        got = linear_memory_absorb(kv, kmean, 90, key_raw, value, cos, sin, kernel="triton")
        dense = linear_memory_absorb(kv, kmean, 90, key_raw.contiguous(), value.contiguous(), cos.contiguous(),
                                     sin.contiguous(), kernel="triton")
    _assert_absorbed(got, linear_memory_absorb_naive(kv, kmean, 90, key_raw, value, cos, sin))
    for g, d in zip(got, dense):
        torch.testing.assert_close(g, d, rtol=0, atol=0)


def _shifted_tables(seq, dim, device="cpu"):
    """Per-token tables of the positions some keys were RoPE'd at, one extra rotation, and the tables of their
    composition (the absorption positions): Wan's layout, `(1, seq, 1, dim)` and `(1, 1, 1, dim)`."""
    key_angles = torch.rand(seq, dim // 2, device=device, dtype=torch.float64) * (2 * torch.pi)
    shift = torch.rand(dim // 2, device=device, dtype=torch.float64) * (2 * torch.pi)

    def tables(angles, shape):
        return tuple(t.repeat_interleave(2, dim=-1).float().view(shape) for t in (angles.cos(), angles.sin()))

    return (tables(key_angles, (1, seq, 1, dim)), tables(shift, (1, 1, 1, dim)),
            tables(key_angles + shift, (1, seq, 1, dim)))


# s = 75 over 1 or 3 splits (see test_absorb), head_dim 32 (rows rotated in pairs by the finish kernel)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_splits, count", [(None, 0), (3, 1234)])
@pytest.mark.parametrize("project", [False, True])
def test_absorb_roped_keys(dtype, num_splits, count, project):
    """Keys given RoPE'd plus one rotation to their absorption positions: the kernel (loaded tiles, the rotation
    applied to the sums) against the reference of that form, which in float32 equals the raw-key form at the
    composed positions; with a projection weight, the projected state too."""
    tk = _kernels()
    batch, seq, heads, dim = 2, 75, 3, 32
    kv, kmean = _state(batch, heads, dim)
    key_raw, value = (torch.randn(batch, seq, heads, dim, dtype=dtype) for _ in range(2))
    key_tables, shift, absorb_tables = _shifted_tables(seq, dim)
    key_roped = apply_rotary_emb(key_raw, *key_tables)
    weight = torch.randn(dim, dim, dtype=dtype) / dim**0.5 if project else None
    want = linear_memory_absorb_naive(kv, kmean, count, key_raw, value, *shift, key_roped, weight)
    with poisoned_outputs():
        got = tk._absorb_launch(kv, kmean, count, key_raw, value, *shift, num_splits=num_splits, key_roped=key_roped,
                                projection=weight)
    _assert_absorbed(got[:2], want[:2])
    if project:  # within one bf16 step of the exact product (the interpreter's cast truncates, the GPU's rounds)
        exact = got[0] @ weight.float().t()
        assert got[2].dtype == dtype
        step = 2**-7 if dtype == torch.bfloat16 else 1e-5
        assert ((got[2].float() - exact).abs() <= exact.abs() * step + 1e-6).all()
    if dtype == torch.float32:  # one rotation of the sum == the composed rotation of every key
        _assert_absorbed(want[:2], linear_memory_absorb_naive(kv, kmean, count, key_raw, value, *absorb_tables))


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_absorb_into_the_state_itself(kernel):
    """`out` = the state's own buffers (the layer cache's in-place commit), raw-key and RoPE'd-key forms, with the
    projection: the results of the out-of-place call."""
    batch, seq, heads, dim = 1, 40, 2, 32
    kv, kmean, key_raw, value, cos, sin = _absorb_inputs(batch, seq, heads, dim, torch.bfloat16)
    key_tables, shift, _ = _shifted_tables(seq, dim)
    weight = torch.randn(dim, dim, dtype=torch.bfloat16)
    for tables, key_roped in (((cos, sin), None), (shift, apply_rotary_emb(key_raw, *key_tables))):
        want = linear_memory_absorb(kv, kmean, 50, key_raw, value, *tables, key_roped=key_roped, projection=weight,
                                    kernel=kernel)
        state = (kv.clone(), kmean.clone(), torch.full((batch, heads, dim, dim), float("nan"), dtype=torch.bfloat16))
        got = linear_memory_absorb(state[0], state[1], 50, key_raw, value, *tables, key_roped=key_roped,
                                   projection=weight, out=state, kernel=kernel)
        assert all(g is t for g, t in zip(got, state))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_absorb_nothing(kernel):
    """No new tokens: the state comes back unchanged (also before anything was absorbed); with a projection weight,
    the unchanged state's projection, also when written in place."""
    kv, kmean, key_raw, value, cos, sin = _absorb_inputs(1, 0, 2, 16, torch.float32)
    for count in (0, 5):
        got = linear_memory_absorb(kv, kmean, count, key_raw, value, cos, sin, kernel=kernel)
        torch.testing.assert_close(got[0], kv, rtol=0, atol=0)
        torch.testing.assert_close(got[1], kmean, rtol=0, atol=0)
    weight = torch.randn(16, 16, dtype=torch.bfloat16)
    state = (kv.clone(), kmean.clone(), torch.full((1, 2, 16, 16), float("nan"), dtype=torch.bfloat16))
    got = linear_memory_absorb(state[0], state[1], 5, key_raw, value, cos, sin, projection=weight, out=state,
                               kernel=kernel)
    torch.testing.assert_close(got[0], kv, rtol=0, atol=0)
    torch.testing.assert_close(got[2], (kv @ weight.float().t()).bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
@pytest.mark.filterwarnings("ignore:Triton memory kernel does not take")  # head_dim 15: the reference raises
def test_absorb_bad_arguments(kernel):
    kv, kmean, key_raw, value, cos, sin = _absorb_inputs(1, 8, 2, 16, torch.float32)

    def absorb(**changes):
        args = dict(kv_state=kv, kmean_state=kmean, count=3, key_raw=key_raw, value=value, cos=cos, sin=sin)
        return linear_memory_absorb(**{**args, **changes}, kernel=kernel)

    cases = [
        (dict(cos=cos[:, :7]), r"cos must broadcast to \(1, s, 1, D\) = \(1, 8, 1, 16\), got shape \(1, 7, 1, 16\)"),
        (dict(sin=sin.expand(2, 8, 1, 16)), r"sin must broadcast .* got shape \(2, 8, 1, 16\)"),
        (dict(cos=cos[0, :, 0]), r"cos must broadcast .* got shape \(8, 16\)"),
        (dict(cos=cos[..., :8]), r"cos must broadcast .* got shape \(1, 8, 1, 8\)"),
        (dict(sin=(sin > 0)), r"sin must be floating point, got torch.bool"),
        (dict(value=value[:, :7]), r"value must have the shape of key_raw \(1, 8, 2, 16\), got \(1, 7, 2, 16\)"),
        (dict(value=value.double()), r"one floating dtype, got torch.float32 and torch.float64"),
        (dict(key_raw=key_raw[0]), r"key_raw must be \(B, s, H, D\), got shape \(8, 2, 16\)"),
        (dict(key_raw=key_raw[..., :15], value=value[..., :15], cos=cos[..., :15], sin=sin[..., :15]),
         r"head_dim must be even .* got 15"),
        (dict(kv_state=kv[:, :1]), r"kv_state / kmean_state must be \(1, 2, 16, 16\) / \(1, 2, 16\)"),
        (dict(kmean_state=kmean[..., :8]), r"got \(1, 2, 16, 16\) / \(1, 2, 8\)"),
        (dict(count=-1), r"count must be >= 0, got -1"),
        (dict(count=2.5), r"count must be a whole number of tokens, got 2.5"),
        (dict(key_roped=key_raw[:, :7]), r"key_roped must have the shape and dtype of key_raw \(1, 8, 2, 16\)"),
        (dict(key_roped=key_raw, cos=cos[:, :1]), r"sin must broadcast to \(1, 1, 1, D\) with key_roped .* got "
                                                  r"shape \(1, 8, 1, 16\)"),
        (dict(projection=kv[0, 0, :8]), r"projection must be a floating \(D, D\) = \(16, 16\) weight, got \(8, 16\)"),
        (dict(out=(kv.clone(),)), r"out must hold 2 tensors \(kv, kmean\), got 1"),
        (dict(out=(kv.clone(), kmean.double())), r"out tensors must be contiguous \(1, 2, 16\) torch.float32"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            absorb(**changes)


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
    key_raw, value = (torch.randn(1, 20, 2, 16) for _ in range(2))
    torch.library.opcheck(tk._absorb_op, (kv, kmean, 7, key_raw, value, *_rope_tables(20, 16), None, None),
                          test_utils=("test_schema", "test_faketensor"))
    _, shift, _ = _shifted_tables(20, 16)  # RoPE'd keys and a projection
    torch.library.opcheck(tk._absorb_op, (kv, kmean, 7, key_raw, value, *shift, key_raw.clone(), torch.randn(16, 16)),
                          test_utils=("test_schema", "test_faketensor"))


def _real_shape_absorb_inputs():
    """One 3-frame chunk of Wan2.1-1.3B at 832x480 (4,680 tokens, 12 heads of 128, bf16) as frames of cache buffers
    (strided views), and a state after 9,360 absorbed tokens: `(kv, kmean, count, key_buf, key_raw, value)`."""
    batch, seq, heads, dim, count = 1, 4680, 12, 128, 9360
    kv, kmean = _state(batch, heads, dim, "cuda")
    key_buf, value_buf = (torch.randn(batch, 3 * seq, heads, dim, dtype=torch.bfloat16, device="cuda")
                          for _ in range(2))
    return kv / dim, kmean, count, key_buf, key_buf[:, seq : 2 * seq], value_buf[:, seq : 2 * seq]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("ksum", ["reduce", "dot"])
def test_gpu_absorb_real_shape(ksum, monkeypatch):
    """One 3-frame chunk of Wan2.1-1.3B at 832x480 absorbed (4,680 tokens, 12 heads of 128, bf16), the keys and values
    frames of a cache buffer (strided views), against the float32 reference. The kernel's fp32 rotation may use
    fused multiply-adds, so a few RoPE'd keys round to the neighbouring bf16 value: 1e-4, not 1e-5, for the state."""
    tk = _kernels()
    monkeypatch.setattr(tk, "LM_CONFIG", {**tk.LM_CONFIG, "absorb_ksum": ksum})
    kv, kmean, count, _, key_raw, value = _real_shape_absorb_inputs()
    cos, sin = _rope_tables(key_raw.shape[1], key_raw.shape[-1], "cuda")
    with poisoned_outputs():
        got = linear_memory_absorb(kv, kmean, count, key_raw, value, cos, sin, kernel="triton")
    want = linear_memory_absorb_naive(kv, kmean, count, key_raw, value, cos, sin)
    assert _rel_err(got[0], want[0]) < 1e-4
    assert _rel_err(got[1], want[1]) < 1e-5  # the key sums use the raw keys: order of summation only


@pytest.mark.gpu
@requires_cuda
def test_gpu_absorb_roped_real_shape():
    """The layer cache's commit at the real shape: 4,680 history tokens given RoPE'd (frames of a cache buffer) with
    one rotation to their absorption positions, written into the state in place, with the projected state (bf16)."""
    kv, kmean, count, key_buf, key_raw, value = _real_shape_absorb_inputs()
    seq, dim = key_raw.shape[1], key_raw.shape[-1]
    key_tables, shift, _ = _shifted_tables(seq, dim, "cuda")
    roped_buf = key_buf.clone()
    roped_buf[:, seq : 2 * seq] = apply_rotary_emb(key_raw, *key_tables)
    key_roped = roped_buf[:, seq : 2 * seq]
    weight = (torch.randn(dim, dim, device="cuda") / dim**0.5).bfloat16()
    want = linear_memory_absorb_naive(kv, kmean, count, key_raw, value, *shift, key_roped, weight)
    state = (kv.clone(), kmean.clone(), torch.full_like(kv, float("nan"), dtype=torch.bfloat16))
    with poisoned_outputs():
        got = linear_memory_absorb(state[0], state[1], count, key_raw, value, *shift, key_roped=key_roped,
                                   projection=weight, out=state, kernel="triton")
    assert _rel_err(got[0], want[0]) < 1e-5
    assert _rel_err(got[1], want[1]) < 1e-5
    exact = got[0] @ weight.float().t()
    assert ((got[2].float() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()  # rounded to the nearest bf16


@pytest.mark.gpu
@requires_cuda
def test_gpu_read_real_shapes():
    """The read-out of one 3-frame chunk of Wan2.1-1.3B at 832x480 (4,680 queries, 12 heads of 128), bf16."""
    batch, seq, heads, dim = 1, 4680, 12, 128
    kv, kmean, key_raw, value, cos, sin = _absorb_inputs(batch, seq, heads, dim, torch.bfloat16, "cuda")
    kv, kmean = linear_memory_absorb(kv / dim, kmean, 9360, key_raw, value, cos, sin, kernel="triton")
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


def test_read_bwd_custom_op_fake_strides():
    """The fake of `diffusers_hybrid::linear_memory_read_bwd` has the real op's strides, also for a query whose last
    dimension is not unit-stride (the launcher copies it, so the gradients come out contiguous) and for a permuted
    but dense one (kept as it is)."""
    tk = _kernels()
    kv, kmean = _state(1, 2, 16)
    grad_out = torch.randn(1, 20, 2, 16)
    for q_num in (torch.randn(1, 20, 16, 2).transpose(-1, -2), torch.randn(1, 2, 20, 16).transpose(1, 2)):
        q_raw = q_num.clone()  # the same layout
        torch.library.opcheck(tk._read_bwd_op, (grad_out, q_num, q_raw, kv, kmean, 1e-6),
                              test_utils=("test_schema", "test_faketensor"))


def test_read_state_shapes_are_validated_by_both_kernels():
    """`linear_memory_read`: a state or raw query that does not match the queries (a batch-1 state included) is
    refused with the same ValueError by both kernels."""
    kv, kmean = _state(2, 2, 16)
    q_num, q_raw = torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    cases = [
        (dict(kv_state=kv[:1]), r"kv_state must have shape \(B, H, D, D\) = \(2, 2, 16, 16\) .* got \(1, 2, 16, 16\)"),
        (dict(kmean_state=kmean[:1]), r"kmean_state must have shape \(B, H, D\) = \(2, 2, 16\) .* got \(1, 2, 16\)"),
        (dict(query_raw=q_raw[:, :5]), r"query_raw must have the shape of query_numerator \(2, 9, 2, 16\), got "
                                       r"\(2, 5, 2, 16\)"),
    ]
    for changes, message in cases:
        args = {**dict(query_numerator=q_num, query_raw=q_raw, kv_state=kv, kmean_state=kmean), **changes}
        for kernel in ("reference", "triton"):
            with pytest.raises(ValueError, match=message):
                linear_memory_read(*args.values(), kernel=kernel)


def test_read_triton_refuses_state_that_requires_grad():
    """The Triton read-out passes no gradient to the state: a state that requires grad (grad enabled) is refused,
    naming it, instead of leaving its `.grad` silently None; the reference differentiates through it, and under
    no_grad the Triton read-out takes it."""
    kv, kmean = _state(2, 2, 16)
    q_num = torch.randn(2, 9, 2, 16, requires_grad=True)
    q_raw = torch.randn(2, 9, 2, 16)
    for name in ("kv_state", "kmean_state"):
        state = dict(kv_state=kv.clone(), kmean_state=kmean.clone())
        state[name].requires_grad_(True)
        for query in (q_num, q_num.detach()):  # with and without a gradient for the queries
            with pytest.raises(ValueError, match=f"`{name}` requires grad"):
                linear_memory_read(query, q_raw, *state.values(), kernel="triton")
        ref = linear_memory_read(q_num, q_raw, *state.values(), kernel="reference")
        assert torch.autograd.grad(ref.sum(), state[name])[0].abs().sum() > 0
        with torch.no_grad():
            got = linear_memory_read(q_num, q_raw, *state.values(), kernel="triton")
        assert _rel_err(got, ref.detach()) < 1e-5


class _NoLaunch:
    """Stands for a Triton kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_poisoned_outputs_reach_this_module(monkeypatch):
    """Inside `poisoned_outputs()` the launchers' buffers are poisoned: with the kernel launch stubbed out, nothing is
    written, so the read-out is NaN (the module reads the live flag, not a copy bound at import)."""
    tk = _kernels()
    assert not hasattr(tk, "POISON_OUTPUTS")
    monkeypatch.setattr(tk, "_read_kernel", _NoLaunch())
    kv, kmean = _state(1, 2, 16)
    with poisoned_outputs():
        out = tk.linear_memory_read_triton(torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16), kv, kmean)
    assert out.isnan().all()
