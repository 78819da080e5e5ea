# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Attention processors of [`HybridForcingTransformer3DModel`].

Self-attention (`attn1`): the chunk's queries attend with (block-sparse) softmax to the frames
[`~diffusers_hybrid.cache.AttentionLayout`] makes visible, and, in hybrid mode, read the linear memory of the frames
that left the window through the layer's zero-initialised `linear_proj`. Cross-attention (`attn2`): Wan's text
attention, with the prompt's K/V kept in the cache across passes and chunks.

The processors are stateless; everything per call arrives in a [`HybridAttentionContext`].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cache import AttentionLayout, ChunkPlan, HybridLayerCache
from ..ops import (
    apply_rotary_emb,
    block_sparse_attention,
    block_sparse_attention_with_memory,
    linear_memory_absorb,
    linear_memory_read,
    rope_chunk_into_window,
)


def _project_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    if getattr(attn, "fused_projections", False):
        if encoder_hidden_states is None:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        query = attn.to_q(hidden_states)
        return (query, *attn.to_kv(encoder_hidden_states).chunk(2, dim=-1))
    source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    return attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)


def _frame_runs(frames: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs `(first, count)` of a sorted frame list."""
    runs: list[tuple[int, int]] = []
    for f in frames:
        if runs and runs[-1][0] + runs[-1][1] == f:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((f, 1))
    return runs


def _gather_frames(x: torch.Tensor, frames: list[int], tokens_per_frame: int) -> torch.Tensor:
    parts = [x[:, first * tokens_per_frame : (first + n) * tokens_per_frame] for first, n in _frame_runs(frames)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass
class FullSequenceChunk:
    """One chunk of a `cache_mode="none"` pass: its queries, visible keys and newly absorbed frames."""

    chunk_start: int
    query_rope: tuple[torch.Tensor, torch.Tensor]
    key_frames: list[int]
    key_rope: tuple[torch.Tensor, torch.Tensor]
    absorb_frames: list[int]
    absorb_rope: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class HybridAttentionContext:
    """
    Per-call inputs of [`HybridForcingAttnProcessor`], built once per forward by the model and shared by all layers
    (except `layer_cache`/`snapshot`, which are per layer).

    Args:
        cache_mode (`str`): `"none"`, `"read"` or `"write"`.
        layout ([`AttentionLayout`]): what a chunk sees.
        tokens_per_frame (`int`).
        topk_ratio (`float`): block-sparse ratio (1.0 = dense softmax).
        plan ([`ChunkPlan`], cached modes): the chunk being computed.
        chunks (`list[FullSequenceChunk]`, `"none"` mode): every chunk of the sequence.
        layer_cache ([`HybridLayerCache`], cached modes).
        snapshot (`tuple`, optional): detached copies of the cached context for passes that need gradients, so that
            gradient-checkpointing recomputation sees the same context even after later chunks were written.
    """

    cache_mode: str
    layout: AttentionLayout
    tokens_per_frame: int
    topk_ratio: float
    block_size: int
    key_centering: str
    linear_query: str
    linear_eps: float
    plan: ChunkPlan | None = None
    chunks: list[FullSequenceChunk] = field(default_factory=list)
    layer_cache: HybridLayerCache | None = None
    snapshot: tuple[torch.Tensor, ...] | None = None

    def for_layer(self, layer_cache: HybridLayerCache | None, snapshot=None) -> "HybridAttentionContext":
        return HybridAttentionContext(**{**self.__dict__, "layer_cache": layer_cache, "snapshot": snapshot})


class HybridForcingAttnProcessor:
    """
    Self-attention of Hybrid Forcing in the three attention modes.

    With a cache, the block selection takes the pooled key blocks of the cached window (sink + history) from the
    layer cache, which recomputes them once per chunk at the commit, and pools only the chunk's own keys. With the
    `"triton"` kernel at inference (no gradient, inference read-out form `linear_attn_query="roped"`, a plain
    `nn.Linear` projection), the linear-memory read-out and `linear_proj` are fused into the attention kernel; with a
    cache, the layer cache keeps the memory state with `linear_proj` folded in (recomputed once per chunk at the
    commit), so the passes of a chunk run no projection matmul.

    Args:
        kernel (`str`, defaults to `"reference"`): `"reference"` (plain PyTorch, runs anywhere) or `"triton"`.
        fuse_memory (`bool`, defaults to `True`): allow the fused read-out (Triton only; results differ from the
            unfused ops by rounding: the projection is folded into the float32 state).
        cache_pooled_keys (`bool`, defaults to `True`): keep the pooled key blocks of the cached window in the cache.
        fuse_rope (`bool`, defaults to `True`): with a cache and no gradient, RoPE the chunk, write its keys and
            values into the cache, pool the block selection's blocks and compute the fused memory read-out's
            denominators in one step (`rope_chunk_into_window`; one launch with `"triton"`); `False` runs the
            plain-PyTorch RoPE and copies and lets the selection pool (for comparisons).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, kernel: str = "reference", fuse_memory: bool = True, cache_pooled_keys: bool = True,
                 fuse_rope: bool = True):
        self.kernel = kernel
        self.fuse_memory = fuse_memory
        self.cache_pooled_keys = cache_pooled_keys
        self.fuse_rope = fuse_rope

    def _fused_memory(self, attn, ctx, tensors) -> bool:
        """The fused attention + memory read-out applies: Triton, inference read-out form, a plain linear projection
        (not wrapped by adapters), no gradient wanted."""
        if not (self.fuse_memory and self.kernel == "triton" and ctx.linear_query == "roped"):
            return False
        if type(attn.linear_proj) is not torch.nn.Linear:
            return False
        params = (attn.linear_proj.weight, attn.linear_proj.bias)
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, *params)))

    def _attend(self, attn, ctx, query_roped, query_raw, query_rope, keys, values, kv_state, kmean_state,
                memory_ready: bool, pooled_key_prefix: torch.Tensor | None = None,
                projected_kv_state: torch.Tensor | None = None, pooled_blocks=None, memory_denominator=None):
        memory = kv_state is not None and memory_ready
        if memory and self._fused_memory(attn, ctx, (query_roped, query_raw, keys, values)):
            # the layer cache keeps the state with `linear_proj` folded in (once per chunk); else fold it here
            projected = projected_kv_state is not None
            given = memory_denominator is not None  # the RoPE step computed the denominators
            return block_sparse_attention_with_memory(
                query_roped, keys, values, None if given else query_raw, projected_kv_state if projected else kv_state,
                None if given else kmean_state, memory_denominator=memory_denominator,
                eps=ctx.linear_eps, proj_weight=None if projected else attn.linear_proj.weight,
                proj_bias=attn.linear_proj.bias, state_is_projected=projected, topk_ratio=ctx.topk_ratio,
                block_size=ctx.block_size, key_centering=ctx.key_centering, pooled_key_prefix=pooled_key_prefix,
                pooled_blocks=pooled_blocks, kernel=self.kernel,
            )
        out = block_sparse_attention(
            query_roped, keys, values, topk_ratio=ctx.topk_ratio, block_size=ctx.block_size,
            key_centering=ctx.key_centering, pooled_key_prefix=pooled_key_prefix, pooled_blocks=pooled_blocks,
            kernel=self.kernel,
        )
        if memory:
            if ctx.linear_query == "roped":
                query_numerator = query_roped
            else:  # "roped_relu": the RoFormer form R(φ(q)) the official training code uses
                query_numerator = apply_rotary_emb(F.relu(query_raw), *query_rope)
            memory = linear_memory_read(
                query_numerator, query_raw, kv_state, kmean_state, eps=ctx.linear_eps, kernel=self.kernel
            )
            out = out + attn.linear_proj(memory.to(out.dtype))
        return out

    def _cached(self, attn, query, key, value, ctx: HybridAttentionContext) -> torch.Tensor:
        plan, layer_cache = ctx.plan, ctx.layer_cache
        kv_state, kmean_state = layer_cache.kv_state, layer_cache.kmean_state
        # the fused read-out applies: the cache keeps the state with `linear_proj` folded in (see the commit below)
        fold = kv_state is not None and self._fused_memory(attn, ctx, (query, key, value))
        projected_kv_state = None
        if fold and ctx.snapshot is None:
            projected_kv_state = layer_cache.projected_memory_state(attn.linear_proj.weight)
        pooled_prefix = pooled_blocks = memory_denominator = None
        select = self.cache_pooled_keys and ctx.topk_ratio < 1.0  # the block selection runs (in a full window)
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        window = None if ctx.snapshot is not None or wants_grad else layer_cache.contiguous_window(plan)
        if window is not None:
            # one step (one launch with Triton): RoPE, the chunk's K/V into the cache's window, the selection's pools
            if select:
                pooled_prefix = layer_cache.pooled_key_prefix(plan, ctx.block_size, ctx.key_centering)
            pool = self.fuse_rope and ctx.topk_ratio < 1.0
            # the fused read-out's denominators need the raw query, which this step holds
            denominators = self.fuse_rope and fold and plan.memory_ready
            query_roped, pooled_query, pooled_key, memory_denominator = rope_chunk_into_window(
                query, key, value, *plan.query_rope, *window, pool_block_size=ctx.block_size if pool else None,
                key_centering=ctx.key_centering, kernel=self.kernel if self.fuse_rope else "reference",
                first_pooled_key_block=0 if pooled_prefix is None else pooled_prefix.shape[2],
                memory_kmean=kmean_state if denominators else None, memory_eps=ctx.linear_eps,
            )
            pooled_blocks = (pooled_query, pooled_key) if pool else None
            keys, values = window
        else:
            query_roped = apply_rotary_emb(query, *plan.query_rope)
            key_roped = apply_rotary_emb(key, *plan.query_rope)
            if ctx.snapshot is not None:
                cached_key, cached_value, kv_state, kmean_state = ctx.snapshot
            else:
                cached_key, cached_value = layer_cache.context(plan)
            keys, values = torch.cat([cached_key, key_roped], 1), torch.cat([cached_value, value], 1)
        out = self._attend(
            attn, ctx, query_roped, query, plan.query_rope, keys, values, kv_state, kmean_state, plan.memory_ready,
            pooled_prefix, projected_kv_state, pooled_blocks, memory_denominator,
        )
        if ctx.cache_mode == "write":
            pooled_keys = (ctx.block_size, ctx.key_centering) if select else None
            layer_cache.commit(plan, key, value, self.kernel, pooled_keys=pooled_keys,
                               memory_projection=attn.linear_proj.weight if fold else None)
        return out

    def _full_sequence(self, attn, query, key, value, ctx: HybridAttentionContext) -> torch.Tensor:
        tpf, layout = ctx.tokens_per_frame, ctx.layout
        batch, _, heads, head_dim = query.shape
        kv_state = kmean_state = None
        if layout.use_memory:
            kv_state = query.new_zeros(batch, heads, head_dim, head_dim, dtype=torch.float32)
            kmean_state = query.new_zeros(batch, heads, head_dim, dtype=torch.float32)
        count = 0
        outputs = []
        for chunk in ctx.chunks:
            if chunk.absorb_frames:
                # the memory is built from detached K/V, as in streaming (absorption happens in the no-grad commit):
                # gradients reach the linear branch through the queries and `linear_proj`
                key_abs = _gather_frames(key, chunk.absorb_frames, tpf).detach()
                value_abs = _gather_frames(value, chunk.absorb_frames, tpf).detach()
                kv_state, kmean_state = linear_memory_absorb(
                    kv_state, kmean_state, count, key_abs, value_abs, *chunk.absorb_rope, kernel=self.kernel,
                )
                count += key_abs.shape[1]
            frames = slice(chunk.chunk_start * tpf, (chunk.chunk_start + layout.chunk_frames) * tpf)
            query_chunk = query[:, frames]
            keys = apply_rotary_emb(_gather_frames(key, chunk.key_frames, tpf), *chunk.key_rope)
            values = _gather_frames(value, chunk.key_frames, tpf)
            outputs.append(
                self._attend(
                    attn, ctx, apply_rotary_emb(query_chunk, *chunk.query_rope), query_chunk, chunk.query_rope,
                    keys, values, kv_state, kmean_state, count > 0,
                )
            )
        return torch.cat(outputs, dim=1)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb=None,
        *,
        context: HybridAttentionContext,
    ) -> torch.Tensor:
        query, key, value = _project_qkv(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if context.cache_mode == "none":
            out = self._full_sequence(attn, query, key, value, context)
        else:
            out = self._cached(attn, query, key, value, context)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class HybridForcingCrossAttnProcessor:
    """
    Wan's text cross-attention; with a cache (and no gradient) the prompt's K/V are computed once and reused by every
    later pass until the prompt changes.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb=None,
        *,
        layer_cache: HybridLayerCache | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            if layer_cache is None or layer_cache.text_key is None:
                raise ValueError("Cross-attention got no text and the cache holds none.")
            query = attn.to_q(hidden_states)
            key, value = layer_cache.text_key, layer_cache.text_value
        else:
            query, key, value = _project_qkv(attn, hidden_states, encoder_hidden_states)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            if layer_cache is not None:
                layer_cache.text_key, layer_cache.text_value = key.detach(), value.detach()
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
