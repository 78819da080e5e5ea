# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Plain-PyTorch reference for the linear-attention memory of evicted tokens (the kernels' ground truth).

The state of one layer is a running *mean* over every absorbed token (spec §1.3):

    kv    = mean_t  R(k_t) ⊗ v_t          (B, H, D, D)   keys RoPE'd at their absorption positions, no feature map
    kmean = mean_t  φ(k_t)                (B, H, D)      φ = ReLU on the raw (un-RoPE'd) key
    count = number of absorbed tokens

and a query reads it as  o = (q_num · kv) / (φ(q) · kmean + eps),  with `q_num` the RoPE'd query (optionally after
φ) and the denominator's query un-RoPE'd. Both are kept in float32.
"""

import torch

from ..rotary.naive import apply_rotary_emb


def check_absorb_args(kv_state, kmean_state, count, key_raw, value, cos, sin, key_roped=None,
                      projection=None) -> int:
    """Validates the arguments of the absorption (shared by the reference and the kernel); returns `count` as an
    `int`."""
    if key_raw.dim() != 4:
        raise ValueError(f"key_raw must be (B, s, H, D), got shape {tuple(key_raw.shape)}")
    if value.shape != key_raw.shape:
        raise ValueError(f"value must have the shape of key_raw {tuple(key_raw.shape)}, got {tuple(value.shape)}")
    if value.dtype != key_raw.dtype or not key_raw.is_floating_point():
        raise ValueError(f"key_raw and value must have one floating dtype, got {key_raw.dtype} and {value.dtype}")
    batch, num_new, heads, dim = key_raw.shape
    if dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates channel pairs), got {dim}")
    if key_roped is not None and (key_roped.shape != key_raw.shape or key_roped.dtype != key_raw.dtype):
        raise ValueError(f"key_roped must have the shape and dtype of key_raw {tuple(key_raw.shape)} {key_raw.dtype}, "
                         f"got {tuple(key_roped.shape)} {key_roped.dtype}")
    if projection is not None and (tuple(projection.shape) != (dim, dim) or not projection.is_floating_point()):
        raise ValueError(f"projection must be a floating (D, D) = {(dim, dim)} weight, got {tuple(projection.shape)} "
                         f"{projection.dtype}")
    table_shape = (1, 1, 1, dim) if key_roped is not None else (1, num_new, 1, dim)
    if tuple(kv_state.shape) != (batch, heads, dim, dim) or tuple(kmean_state.shape) != (batch, heads, dim):
        raise ValueError(f"kv_state / kmean_state must be {(batch, heads, dim, dim)} / {(batch, heads, dim)} for "
                         f"tokens {tuple(key_raw.shape)}, got {tuple(kv_state.shape)} / {tuple(kmean_state.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        try:
            ok = table.dim() <= 4 and torch.broadcast_shapes(table.shape, table_shape) == table_shape
        except RuntimeError:
            ok = False
        if not ok:
            form = "(1, 1, 1, D) with key_roped (one rotation for every token)" if key_roped is not None else \
                "(1, s, 1, D)"
            raise ValueError(f"{name} must broadcast to {form} = {table_shape}, got shape {tuple(table.shape)}")
        if not table.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {table.dtype}")
    tensors = (kv_state, kmean_state, key_raw, value, cos, sin, key_roped, projection)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if isinstance(count, torch.Tensor) and count.numel() != 1:
        raise ValueError(f"count must be a number, got a tensor of shape {tuple(count.shape)}")
    if isinstance(count, float) and not count.is_integer():
        raise ValueError(f"count must be a whole number of tokens, got {count}")
    count = int(count)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return count


def check_absorb_out(out, kv_state: torch.Tensor, kmean_state: torch.Tensor, projection) -> None:
    """Validates the `out` buffers of an absorption (shared by the reference and the kernel): contiguous float32 kv and
    kmean (plus the projected state in the projection's dtype), on the state's device; they may be the state itself."""
    shapes = [(kv_state.shape, torch.float32), (kmean_state.shape, torch.float32)]
    if projection is not None:
        shapes.append((kv_state.shape, projection.dtype))
    if len(out) != len(shapes):
        names = "kv, kmean" + (", projected" if projection is not None else "")
        raise ValueError(f"out must hold {len(shapes)} tensors ({names}), got {len(out)}")
    for t, (shape, dtype) in zip(out, shapes):
        if t.shape != shape or t.dtype != dtype or not t.is_contiguous() or t.device != kv_state.device:
            raise ValueError(f"out tensors must be contiguous {tuple(shape)} {dtype} on {kv_state.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")


def project_state(kv: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """`kv @ projection.T` in float32, rounded to the weight's dtype (the memory state with `linear_proj` folded)."""
    return torch.matmul(kv.float(), projection.detach().float().t()).to(projection.dtype)


def rotate_state_rows(kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`(B, H, D, D)` state whose key rows (dim -2) are rotated in pairs by one RoPE rotation `cos`/`sin`
    (broadcastable to `(1, 1, 1, D)`, Wan's form): the state of the keys rotated that way (float32, no rounding)."""
    return apply_rotary_emb(kv.float().transpose(-1, -2), cos, sin).transpose(-1, -2)


def linear_memory_absorb_naive(
    kv_state: torch.Tensor,
    kmean_state: torch.Tensor,
    count: int,
    key_raw: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_roped: torch.Tensor | None = None,
    projection: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """
    Folds `s` new tokens into the running means. The keys are RoPE'd here, with [`apply_rotary_emb`]: in float32 and
    rounded back to the dtype of `key_raw` (as the Triton kernel does before its tensor-core product), so the state
    is the one of the RoPE'd keys a cache would hold.

    Args:
        kv_state (`(B, H, D, D)` float32), kmean_state (`(B, H, D)` float32): the state before absorption.
        count (`int`): tokens absorbed so far (N).
        key_raw (`(B, s, H, D)`): the keys before RoPE (`D` even); `value` (`(B, s, H, D)`, same dtype).
        cos, sin (`torch.Tensor` broadcastable to `(1, s, 1, D)`): the RoPE tables of the keys' absorption positions,
            Wan's `repeat_interleave`d form (`cos[..., 2i] == cos[..., 2i+1]`; see [`apply_rotary_emb`]). With
            `key_roped`: one rotation, broadcastable to `(1, 1, 1, D)`.
        key_roped (`(B, s, H, D)`, *optional*): the keys already RoPE'd at positions that all differ from their
            absorption positions by the one rotation `cos`/`sin` (a temporal shift: relative RoPE moves the whole
            window). `kv` then sums `key_roped ⊗ value` and rotates the sum's key rows once (the same state up to
            the rounding of `key_roped`); `kmean` still uses `key_raw`.
        projection (`(D, D)`, *optional*): a weight `W` (e.g. `linear_proj.weight`); also returns `kv @ W.T`, computed
            in float32 and rounded to `W`'s dtype.

    Returns:
        `(kv_state, kmean_state)` after absorption, float32 (new tensors; inputs are not modified), plus the projected
        state when `projection` is given.
    """
    count = check_absorb_args(kv_state, kmean_state, count, key_raw, value, cos, sin, key_roped, projection)
    if key_raw.shape[1] == 0:  # nothing to absorb: the state as it is (no 0/0 before anything was absorbed)
        kv, kmean = kv_state.float().clone(), kmean_state.float().clone()
    else:
        total = count + key_raw.shape[1]
        if key_roped is None:
            kv_sum = torch.einsum("bshd,bshe->bhde", apply_rotary_emb(key_raw, cos, sin).float(), value.float())
        else:
            kv_sum = rotate_state_rows(torch.einsum("bshd,bshe->bhde", key_roped.float(), value.float()), cos, sin)
        k_sum = torch.relu(key_raw.float()).sum(dim=1)
        kv = (kv_sum + count * kv_state) / total
        kmean = (k_sum + count * kmean_state) / total
    if projection is None:
        return kv, kmean
    return kv, kmean, project_state(kv, projection)


def check_memory_query(query: torch.Tensor, query_raw, kmean_state, memory_denominator) -> None:
    """Validates how a read-out gets its denominators: from `query_raw` and `kmean_state`, or precomputed as
    `memory_denominator` `(B, S, H)` (shared by the reference and the fused kernel)."""
    if memory_denominator is None:
        if query_raw is None or kmean_state is None:
            raise ValueError("pass `query_raw` and `kmean_state`, or `memory_denominator` alone")
        return
    if query_raw is not None or kmean_state is not None:
        raise ValueError("`memory_denominator` already holds `query_raw` and `kmean_state`'s contribution; pass them "
                         "as None")
    if memory_denominator.shape != query.shape[:3]:
        raise ValueError(f"`memory_denominator` must have shape {tuple(query.shape[:3])} (B, S, H), got "
                         f"{tuple(memory_denominator.shape)}")


def check_memory_state(query: torch.Tensor, query_raw: torch.Tensor | None, kv_state: torch.Tensor,
                       kmean_state: torch.Tensor | None, query_name: str = "query") -> None:
    """Validates a read-out's raw query and state against its `(B, S, H, D)` numerator query `query` (shared by the
    public ops, both kernels): `query_raw` of the query's shape, `kv_state` `(B, H, D, D)` and `kmean_state`
    `(B, H, D)` exactly; `None` (precomputed denominators) skips a check. A batch-1 state is not broadcast over the
    batch: the kernels index the state per batch element, so every path refuses it alike. Shapes only (no device
    sync)."""
    if query.dim() != 4:
        raise ValueError(f"{query_name} must be (B, S, H, D), got shape {tuple(query.shape)}")
    batch, _, heads, dim = query.shape
    if query_raw is not None and query_raw.shape != query.shape:
        raise ValueError(f"query_raw must have the shape of {query_name} {tuple(query.shape)}, got "
                         f"{tuple(query_raw.shape)}")
    for name, state, want in (("kv_state", kv_state, (batch, heads, dim, dim)),
                              ("kmean_state", kmean_state, (batch, heads, dim))):
        if name == "kmean_state" and state is None:
            continue
        got = None if state is None else tuple(state.shape)
        if got != want:
            form = "(B, H, D, D)" if name == "kv_state" else "(B, H, D)"
            note = " (a batch-1 state is not broadcast)" if got is not None and got[1:] == want[1:] else ""
            raise ValueError(f"{name} must have shape {form} = {want} for {query_name} {tuple(query.shape)}{note}, "
                             f"got {got}")


def check_state_without_grad(kv_state: torch.Tensor, kmean_state: torch.Tensor | None) -> None:
    """The Triton read-outs pass no gradient to the memory state (the callers absorb detached keys and values): a
    state that requires grad, with grad enabled, is refused instead of silently getting no gradient."""
    if not torch.is_grad_enabled():
        return
    for name, state in (("kv_state", kv_state), ("kmean_state", kmean_state)):
        if state is not None and state.requires_grad:
            raise ValueError(f"`{name}` requires grad, but the Triton read-out passes no gradient to the memory "
                             f"state; detach it, or use kernel=\"reference\" to differentiate through the state")


def linear_memory_denominator_naive(query_raw: torch.Tensor, kmean_state: torch.Tensor,
                                    eps: float = 1e-6) -> torch.Tensor:
    """The read-out's denominators `φ(query_raw) · kmean + eps`, `(B, S, H)` float32 (un-RoPE'd query, spec 1.3)."""
    return torch.einsum("bshd,bhd->bsh", torch.relu(query_raw.float()), kmean_state.float()) + eps


def linear_memory_read_naive(
    query_numerator: torch.Tensor,
    query_raw: torch.Tensor | None,
    kv_state: torch.Tensor,
    kmean_state: torch.Tensor | None,
    eps: float = 1e-6,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Reads the memory for every query token.

    Args:
        query_numerator (`(B, S, H, D)`): the query used in the numerator (RoPE'd; optionally φ before RoPE).
        query_raw (`(B, S, H, D)`): the un-RoPE'd query; the denominator uses φ(query_raw).
        kv_state (`(B, H, D, D)`), kmean_state (`(B, H, D)`): float32 state.
        eps (`float`): added to the denominator.
        denominator (`(B, S, H)` float32, *optional*): the denominators already computed
            ([`linear_memory_denominator_naive`]); `query_raw`, `kmean_state` and `eps` are then unused.

    Returns:
        `torch.Tensor` of shape `(B, S, H, D)`, float32.
    """
    numerator = torch.einsum("bshd,bhde->bshe", query_numerator.float(), kv_state.float())
    if denominator is None:
        denominator = linear_memory_denominator_naive(query_raw, kmean_state, eps)
    return numerator / denominator.float().unsqueeze(-1)
