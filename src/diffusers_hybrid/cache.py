# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Streaming state of the hybrid transformer: what each query sees, and the preallocated per-layer caches.

Frames are *latent* frames. A chunk is `num_frame_per_block` frames. For a chunk whose first frame is `f0`:

- softmax keys: the sink frames `0 .. sink_frames-1`, plus the most recent `local_attn_frames` frames ending with
  the chunk itself (frames `max(sink, f0 + chunk - local) .. f0 + chunk - 1`), in temporal order;
- linear memory (hybrid mode): every frame that has left that window (`< f0 + chunk - local`), optionally including
  the sink frames (the official code absorbs them too);
- RoPE ("relative" mode): the chunk's queries sit at `f - shift` with `shift = max(0, f0 + chunk - max_rope_frames)`,
  window keys use the same shift, sink keys stay at their own index, and a frame absorbed into the memory is RoPE'd
  with the shift of the chunk that first reads it. So no temporal index ever reaches `max_rope_frames` and the stream
  is unbounded. "absolute" mode uses `f` everywhere (bounded by the RoPE table).

[`AttentionLayout`] is the single place that decides this; the attention processor, the cache and the
`cache_mode="none"` path all ask it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ops import apply_rope, linear_memory_absorb, pool_key_blocks
from .ops.linear_memory.naive import project_state

ATTENTION_MODES = ("dense", "window", "hybrid")


def _normalize_device(device) -> torch.device:
    """`cpu`, `cpu:0`, `cuda` and `cuda:N` compare equal to where tensors actually live."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return torch.device("cpu")
    return device


def _version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; `None` where there is none to read: inference-mode tensors, and code
    that `torch.compile` traces (it cannot guard on the counter)."""
    if torch.compiler.is_compiling() or tensor.is_inference():
        return None
    return tensor._version


ROPE_MODES = ("relative", "absolute")


@dataclass(frozen=True)
class AttentionLayout:
    """
    Which frames a chunk's queries see, and at which RoPE positions.

    Args:
        chunk_frames (`int`): frames per chunk (`num_frame_per_block`).
        sink_frames (`int`): leading frames that stay visible forever (0 in dense mode).
        window_frames (`int`): most recent non-sink frames visible, the current chunk included.
        use_memory (`bool`): frames leaving the window are absorbed into the linear memory (hybrid mode).
        absorb_sink (`bool`): the sink frames are absorbed into the memory too when they leave the window.
        rope_mode (`str`): `"relative"` (clamped, unbounded) or `"absolute"`.
        max_rope_frames (`int`): temporal RoPE positions stay below this in relative mode.
        rope_table_frames (`int`): size of the RoPE table (bounds absolute mode).
    """

    chunk_frames: int
    sink_frames: int
    window_frames: int
    use_memory: bool
    absorb_sink: bool
    rope_mode: str
    max_rope_frames: int
    rope_table_frames: int

    @classmethod
    def from_config(cls, config) -> "AttentionLayout":
        mode = config.attention_mode
        if mode == "dense":
            sink, window, memory = 0, config.dense_max_frames, False
        else:
            sink, window, memory = config.sink_frames, config.local_attn_frames, mode == "hybrid"
        return cls(
            chunk_frames=config.num_frame_per_block,
            sink_frames=sink,
            window_frames=window,
            use_memory=memory,
            absorb_sink=config.absorb_sink_frames,
            rope_mode=config.rope_mode,
            max_rope_frames=config.max_rope_frames,
            rope_table_frames=config.rope_max_seq_len,
        )

    @property
    def history_frames(self) -> int:
        """Non-sink frames kept from earlier chunks."""
        return self.window_frames - self.chunk_frames

    @property
    def cache_frames(self) -> int:
        """Frames of K/V a layer cache holds: sink, history, and a scratch slot for the current chunk."""
        return self.sink_frames + self.window_frames

    def rope_shift(self, chunk_start: int) -> int:
        if self.rope_mode == "absolute":
            return 0
        return max(0, chunk_start + self.chunk_frames - self.max_rope_frames)

    def query_positions(self, chunk_start: int) -> list[int]:
        shift = self.rope_shift(chunk_start)
        positions = [f - shift for f in range(chunk_start, chunk_start + self.chunk_frames)]
        if positions[-1] >= self.rope_table_frames:
            raise ValueError(
                f"Frame {positions[-1]} is past the RoPE table ({self.rope_table_frames} frames) in "
                f"rope_mode={self.rope_mode!r}; use rope_mode='relative' for unbounded streaming."
            )
        return positions

    def visible_frames(self, chunk_start: int) -> tuple[list[int], list[int]]:
        """`(frames, positions)` of the softmax keys of the chunk starting at `chunk_start`, in key order."""
        end = chunk_start + self.chunk_frames
        shift = self.rope_shift(chunk_start)
        sink = list(range(0, min(self.sink_frames, end)))
        window = list(range(max(self.sink_frames, end - self.window_frames), end))
        return sink + window, sink + [f - shift for f in window]

    def memory_end(self, chunk_start: int) -> int:
        """Frames `< memory_end` have left the window of this chunk."""
        if not self.use_memory or chunk_start < 0:
            return 0
        return max(0, chunk_start + self.chunk_frames - self.window_frames)

    def frames_absorbed_for(self, chunk_start: int) -> tuple[list[int], list[int]]:
        """`(frames, positions)` that enter the memory right before the chunk at `chunk_start` reads it."""
        first = 0 if self.absorb_sink else self.sink_frames
        start = max(first, self.memory_end(chunk_start - self.chunk_frames))
        frames = list(range(start, self.memory_end(chunk_start)))
        shift = self.rope_shift(chunk_start)
        return frames, [f - shift for f in frames]


@dataclass
class ChunkPlan:
    """Everything one forward pass over a cached chunk needs to know, computed once for all layers."""

    chunk_start: int
    tokens_per_frame: int
    query_rope: tuple[torch.Tensor, torch.Tensor]
    # cached frames visible to this chunk: sink slots [0, sink_valid) and the last `history_valid` history slots
    sink_valid: int
    history_valid: int
    memory_tokens: int
    # the memory is read iff it holds something; a bool (not the count) so compiled passes do not recompile per chunk
    memory_ready: bool = False
    # filled for cache_mode="write" only
    sink_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    absorb_frames: list[int] = field(default_factory=list)
    absorb_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    # the rotation from the positions the history keys are cached RoPE'd at (this chunk's) to their absorption
    # positions: a temporal shift by the change of the RoPE shift between this chunk and the next, `(1, 1, 1, D)`
    absorb_key_shift: tuple[torch.Tensor, torch.Tensor] | None = None
    history_rope: tuple[torch.Tensor, torch.Tensor] | None = None


class HybridLayerCache:
    """
    One transformer layer's streaming state, preallocated once.

    Buffers (`T` = tokens per frame, `S` = sink frames, `W` = window frames, `C` = chunk frames):
        key (`(B, (S+W)·T, H, D)`): RoPE'd keys as the next chunk sees them, laid out `[sink | history | current]`;
            the current-chunk slot is scratch that every pass overwrites.
        key_raw (`(B, (S+W-C)·T, H, D)`): the same sink and history keys before RoPE (for re-RoPE and absorption).
        value (`(B, (S+W)·T, H, D)`).
        kv_state (`(B, H, D, D)`, float32), kmean_state (`(B, H, D)`, float32): the linear memory (hybrid mode).
        text_key / text_value (`(B, text_len, H, D)`): cross-attention K/V of the current prompt.
        pooled_key (`(B, H, P, D)`, float32, block-sparse selection only): the selection's pooled key blocks of the
            first `P = (S + W - C)·T // block_size` whole blocks of `key` (sink + history: the same in every pass of a
            chunk). Allocated by the first commit that asks for it ([`commit`] with `pooled_keys`), then recomputed in
            place by every commit (and by rewind / reset), so passes replayed from a CUDA graph read it current.
        projected_kv_state (`(B, H, D, D)` in `W`'s dtype, fused Triton memory read-out only): `kv_state @ W.T`
            (computed in float32), the memory state with the layer's output projection `linear_proj` (weight `W`)
            folded in, so that the passes of a chunk read it without a projection matmul each; a 16-bit model keeps it
            in 16 bits, the precision the fused read-out multiplies it in (no cast per pass). Kept like `pooled_key`:
            allocated by the first commit that passes `memory_projection`, then recomputed in place by every commit,
            rewind and reset; it is returned only for the same, unchanged weight ([`projected_memory_state`]).
    """

    def __init__(self, layout: AttentionLayout, batch_size, tokens_per_frame, heads, head_dim, device, dtype):
        self.layout = layout
        self.tokens_per_frame = tokens_per_frame
        total = layout.cache_frames * tokens_per_frame
        cached = (layout.sink_frames + layout.history_frames) * tokens_per_frame
        self.key = torch.zeros(batch_size, total, heads, head_dim, device=device, dtype=dtype)
        self.value = torch.zeros_like(self.key)
        self.key_raw = torch.zeros(batch_size, cached, heads, head_dim, device=device, dtype=dtype)
        self.kv_state = self.kmean_state = None
        if layout.use_memory:
            self.kv_state = torch.zeros(batch_size, heads, head_dim, head_dim, device=device, dtype=torch.float32)
            self.kmean_state = torch.zeros(batch_size, heads, head_dim, device=device, dtype=torch.float32)
        self.text_key: torch.Tensor | None = None
        self.text_value: torch.Tensor | None = None
        self.pooled_key: torch.Tensor | None = None
        self._pooled_spec: tuple[int, str, str] | None = None  # (block_size, key_centering, kernel) of pooled_key
        self.projected_kv_state: torch.Tensor | None = None
        self._projection: torch.Tensor | None = None  # the `linear_proj` weight folded into projected_kv_state
        self._projection_key: tuple[int, int] | None = None  # (data_ptr, version) of that weight when folded
        self._defer_commits = False
        self.pending_commit: tuple | None = None  # (key_raw, value, kernel, options) of a deferred commit

    # --- slot arithmetic -------------------------------------------------------------------------------------
    def _frames(self, first_frame: int, num_frames: int) -> slice:
        return slice(first_frame * self.tokens_per_frame, (first_frame + num_frames) * self.tokens_per_frame)

    @property
    def _history_slot(self) -> int:
        return self.layout.sink_frames

    @property
    def _current_slot(self) -> int:
        return self.layout.sink_frames + self.layout.history_frames

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.key, self.value, self.key_raw, self.kv_state, self.kmean_state) if t is not None]

    # --- reads ----------------------------------------------------------------------------------------------
    def _contiguous_start(self, plan: ChunkPlan) -> int | None:
        """First slot of `[cached | current]` when it is one contiguous run of slots, else `None`."""
        if plan.sink_valid == 0:
            return self._current_slot - plan.history_valid
        if plan.sink_valid == self.layout.sink_frames and plan.history_valid == self.layout.history_frames:
            return 0
        return None

    def context(self, plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (sink + history) RoPE'd keys and values visible to the chunk, in key order."""
        sink = self._frames(0, plan.sink_valid)
        hist = self._frames(self._current_slot - plan.history_valid, plan.history_valid)
        start = self._contiguous_start(plan)
        if start is not None:
            region = slice(start * self.tokens_per_frame, hist.stop)
            return self.key[:, region], self.value[:, region]
        return (
            torch.cat([self.key[:, sink], self.key[:, hist]], dim=1),
            torch.cat([self.value[:, sink], self.value[:, hist]], dim=1),
        )

    def contiguous_window(self, plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`[cached | current]` keys and values as views, the current chunk's rows last (the scratch slot, to be
        written by the caller), or `None` when the visible slots are not contiguous (early chunks)."""
        start = self._contiguous_start(plan)
        if start is None:
            return None
        region = slice(start * self.tokens_per_frame, self._frames(self._current_slot, self.layout.chunk_frames).stop)
        return self.key[:, region], self.value[:, region]

    # --- pooled key blocks (block selection) ------------------------------------------------------------------
    def num_pooled_key_blocks(self, block_size: int) -> int:
        """Whole `block_size`-token blocks inside the cached (sink + history) part of `key`."""
        return (self.layout.sink_frames + self.layout.history_frames) * self.tokens_per_frame // block_size

    def pooled_key_prefix(self, plan: ChunkPlan, block_size: int, key_centering: str) -> torch.Tensor | None:
        """The pooled key blocks of the first keys the chunk sees, when they are exactly the cached ones: the
        visible keys are `key[:, :end]` from slot 0 (sink and history full) and `pooled_key` was computed for this
        `block_size` / `key_centering`. Otherwise `None` (the selection pools every key)."""
        if self._pooled_spec is None or self._pooled_spec[:2] != (block_size, key_centering):
            return None
        if self.pooled_key is None or self.pooled_key.shape[2] == 0 or self._contiguous_start(plan) != 0:
            return None
        return self.pooled_key

    @torch.compiler.disable
    @torch.no_grad()
    def refresh_pooled_keys(self, block_size: int, key_centering: str, kernel: str) -> None:
        """(Re)computes `pooled_key` in place from the cached keys (allocating it the first time)."""
        num_blocks = self.num_pooled_key_blocks(block_size)
        batch, _, heads, dim = self.key.shape
        shape = (batch, heads, num_blocks, dim)
        if self.pooled_key is None or tuple(self.pooled_key.shape) != shape or \
                self.pooled_key.device != self.key.device:
            self.pooled_key = torch.zeros(shape, device=self.key.device, dtype=torch.float32)
        if num_blocks:
            pool_key_blocks(self.key[:, : num_blocks * block_size], block_size, key_centering, out=self.pooled_key,
                            kernel=kernel)
        self._pooled_spec = (block_size, key_centering, kernel)

    def _refresh_pooled_keys_if_kept(self) -> None:
        if self._pooled_spec is not None:
            self.refresh_pooled_keys(*self._pooled_spec)

    # --- linear memory with the output projection folded in (fused Triton read-out) -------------------------------
    def projected_memory_state(self, weight: torch.Tensor) -> torch.Tensor | None:
        """`projected_kv_state` when it was folded with this very `weight`, unchanged since (same storage, no in-place
        update: an optimizer step bumps the version), else `None` (the caller folds the projection itself). Under
        torch.compile only the identity is checked (see below)."""
        if self.projected_kv_state is None or self._projection is not weight:
            return None
        # Dynamo cannot trace data-pointer comparisons (a graph break in every pass) and misreads `_version`; a
        # compiled pass trusts the identity check (every commit refolds the projection eagerly, so only an in-place
        # weight update between a commit and the passes of that chunk would go unseen there).
        if not torch.compiler.is_compiling() and self._projection_key != (weight.data_ptr(), weight._version):
            return None
        return self.projected_kv_state

    def _projected_buffer(self, weight: torch.Tensor) -> torch.Tensor:
        """`projected_kv_state`, (re)allocated for `weight`'s dtype and the state's device if needed."""
        kept = self.projected_kv_state
        if kept is None or kept.device != self.kv_state.device or kept.dtype != weight.dtype:
            self.projected_kv_state = torch.empty_like(self.kv_state, dtype=weight.dtype)
        return self.projected_kv_state

    def _folded(self, weight: torch.Tensor) -> None:
        self._projection = weight
        self._projection_key = (weight.data_ptr(), weight._version)

    @torch.compiler.disable
    @torch.no_grad()
    def refresh_projected_memory(self, weight: torch.Tensor | None = None) -> None:
        """(Re)computes `projected_kv_state = kv_state @ weight.T` in place (allocating it the first time); without
        `weight`, with the one kept from before (nothing to do if none was)."""
        weight = self._projection if weight is None else weight
        if weight is None or self.kv_state is None:
            return
        self._projected_buffer(weight).copy_(project_state(self.kv_state, weight))
        self._folded(weight)

    # --- writes ---------------------------------------------------------------------------------------------
    @torch.compiler.disable  # per-chunk bookkeeping: runs eagerly inside compiled passes
    @torch.no_grad()
    def commit(self, plan: ChunkPlan, key_raw: torch.Tensor, value: torch.Tensor, kernel,
               pooled_keys: tuple[int, str] | None = None, memory_projection: torch.Tensor | None = None):
        """
        Commits the current chunk (raw keys `(B, C·T, H, D)` and values): absorbs what leaves the window
        (hybrid), stores sink frames, shifts the history, and re-RoPEs it for the next chunk. Detached: no gradient
        flows into cached context. `pooled_keys` (`(block_size, key_centering)`): also recompute the selection's
        pooled key blocks of the cached keys (see `pooled_key`); `memory_projection` (the `linear_proj` weight): also
        keep the memory state with it folded in (see `projected_kv_state`). Once kept, both are recomputed by every
        commit.
        """
        if self._defer_commits:  # kept for [`HybridCache.commit_pending`] (a CUDA-graph-captured write pass)
            self.pending_commit = (key_raw, value, kernel,
                                   dict(pooled_keys=pooled_keys, memory_projection=memory_projection))
            return
        layout, tpf = self.layout, self.tokens_per_frame
        f0, chunk = plan.chunk_start, layout.chunk_frames
        key_raw, value = key_raw.detach(), value.detach()

        def frame_slot(frame: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
            """The (raw key, value) buffers that hold a frame, and its frame slot there."""
            if frame >= f0:
                return (key_raw, value), frame - f0
            slot = frame if frame < layout.sink_frames else self._current_slot - (f0 - frame)
            return (self.key_raw, self.value), slot

        # 1. linear memory: frames leaving the window before the next chunk, written into the state in place, with
        # the kept projected state (if any) recomputed by the same op
        weight = memory_projection if memory_projection is not None else self._projection
        if plan.absorb_frames:
            runs = []  # [buffers, first slot, frames]: runs of consecutive slots of one buffer
            for frame in plan.absorb_frames:
                buffers, slot = frame_slot(frame)
                if runs and runs[-1][0][0] is buffers[0] and runs[-1][1] + runs[-1][2] == slot:
                    runs[-1][2] += 1
                else:
                    runs.append([buffers, slot, 1])
            keys = [k[:, self._frames(slot, n)] for (k, _), slot, n in runs]
            values = [v[:, self._frames(slot, n)] for (_, v), slot, n in runs]
            # one run (the steady state: consecutive history slots) is passed as views, read in place; frames that
            # straddle buffers are copied together
            k_abs = keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)
            v_abs = values[0] if len(values) == 1 else torch.cat(values, dim=1)
            key_roped, tables = None, plan.absorb_rope  # the op RoPEs the raw keys itself
            (buffers, slot, n), first = runs[0], plan.absorb_frames[0]
            if len(runs) == 1 and buffers[0] is self.key_raw and first >= layout.sink_frames and \
                    plan.absorb_key_shift is not None:
                # history frames: `key` holds them RoPE'd as this chunk saw them, one temporal shift away from
                # their absorption positions
                key_roped, tables = self.key[:, self._frames(slot, n)], plan.absorb_key_shift
            out = (self.kv_state, self.kmean_state)
            if weight is not None:
                out += (self._projected_buffer(weight),)
            linear_memory_absorb(self.kv_state, self.kmean_state, plan.memory_tokens, k_abs, v_abs, *tables,
                                 key_roped=key_roped, projection=weight, out=out, kernel=kernel)
            if weight is not None:
                self._folded(weight)
        else:
            self.refresh_projected_memory(memory_projection)

        # 2. sink frames of this chunk (positions fixed forever)
        num_sink_new = max(0, min(layout.sink_frames, f0 + chunk) - f0)
        if num_sink_new:
            dst = self._frames(f0, num_sink_new)
            src = self._frames(0, num_sink_new)
            self.key_raw[:, dst] = key_raw[:, src]
            apply_rope(key_raw[:, src], *plan.sink_rope, out=self.key[:, dst], kernel=kernel)
            self.value[:, dst] = value[:, src]

        # 3. history = the last `history_frames` frames up to this chunk's end, right-aligned before the scratch slot
        history = layout.history_frames
        if history:
            keep = max(0, history - chunk)  # frames that stay from the old history
            hist = slice(self._history_slot * tpf, self._current_slot * tpf)
            if keep:
                moved = slice(hist.stop - keep * tpf, hist.stop)
                kept = slice(hist.start, hist.start + keep * tpf)
                overlap = kept.stop > moved.start  # a copy of overlapping rows needs a temporary
                for buffer in (self.key_raw, self.value):
                    buffer[:, kept] = buffer[:, moved].clone() if overlap else buffer[:, moved]
            take = history - keep
            self.key_raw[:, hist.stop - take * tpf : hist.stop] = key_raw[:, (chunk - take) * tpf :]
            self.value[:, hist.stop - take * tpf : hist.stop] = value[:, (chunk - take) * tpf :]
            # 4. RoPE the history once per chunk at the positions the next chunk uses
            apply_rope(self.key_raw[:, hist], *plan.history_rope, out=self.key[:, hist], kernel=kernel)

        # 5. the selection's pooled key blocks of the cached keys, for the next chunk's passes
        if pooled_keys is not None:
            self.refresh_pooled_keys(*pooled_keys, kernel)
        else:
            self._refresh_pooled_keys_if_kept()

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()
        if self.pooled_key is not None:
            self.pooled_key.zero_()  # the pooled blocks of all-zero keys: still consistent with `key`
        if self.projected_kv_state is not None:
            self.projected_kv_state.zero_()  # the projection of an all-zero state
        self.text_key = self.text_value = None


@dataclass
class CommitRecord:
    """
    What one commit (`cache_mode="write"`) overwrites, taken just before it: the history frames it evicts (the oldest
    `num_frame_per_block` frames of the history, raw keys and values per layer), the linear memory per layer, and the
    counters. A list of consecutive records lets [`HybridCache.rewind`] restore the cache to before the first one.
    """

    frames_written: int
    memory_tokens: int
    evicted_key_raw: list[torch.Tensor]
    evicted_value: list[torch.Tensor]
    kv_state: list[torch.Tensor | None]
    kmean_state: list[torch.Tensor | None]

    def nbytes(self) -> int:
        tensors = self.evicted_key_raw + self.evicted_value + self.kv_state + self.kmean_state
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class HybridCache:
    """
    Streaming cache of a [`HybridForcingTransformer3DModel`]: a container of [`HybridLayerCache`], one per layer,
    plus the frame and token counters shared by all layers. Create it with `model.init_cache(...)`; memory stays
    constant however many chunks are written.

    Attributes:
        frames_written (`int`): latent frames committed so far (the next chunk starts here).
        memory_tokens (`int`): tokens absorbed into the linear memory so far.
    """

    def __init__(self, layout: AttentionLayout, layers: list[HybridLayerCache], batch_size, latent_height,
                 latent_width, tokens_per_frame, device, dtype):
        self.layout = layout
        self.layers = layers
        self.batch_size = batch_size
        self.latent_height = latent_height
        self.latent_width = latent_width
        self.tokens_per_frame = tokens_per_frame
        self.device = _normalize_device(device)
        self.dtype = dtype
        self.frames_written = 0
        self.memory_tokens = 0
        self._text_source: torch.Tensor | None = None
        self._text_key: tuple | None = None

    def __getitem__(self, index: int) -> HybridLayerCache:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def memory_frames(self) -> int:
        return self.memory_tokens // self.tokens_per_frame

    def nbytes(self) -> int:
        """Bytes held by all preallocated buffers (text K/V included)."""
        total = 0
        for layer in self.layers:
            extra = [t for t in (layer.text_key, layer.text_value) if t is not None]
            total += sum(t.numel() * t.element_size() for t in layer.tensors() + extra)
        return total

    # --- text cross-attention K/V ------------------------------------------------------------------------------
    def text_is_cached(self, encoder_hidden_states: torch.Tensor, weights_state: tuple | None = ()) -> bool:
        """Whether the layers hold the cross-attention K/V of this very tensor, unchanged since (same version
        counter), computed with weights in `weights_state` (the model's LoRA state, see `set_text_source`; `None`
        leaves the weights to the caller)."""
        if self._text_source is not encoder_hidden_states or self.layers[0].text_key is None:
            return False
        version, state = self._text_key
        return version == _version_of(encoder_hidden_states) and (weights_state is None or state == weights_state)

    def set_text_source(self, encoder_hidden_states: torch.Tensor | None, weights_state: tuple = ()) -> None:
        """Records which prompt tensor (and which state of the weights that project it) the text K/V came from;
        `None` forgets them."""
        self._text_source = encoder_hidden_states
        self._text_key = None if encoder_hidden_states is None else (_version_of(encoder_hidden_states), weights_state)
        if encoder_hidden_states is None:
            for layer in self.layers:
                layer.text_key = layer.text_value = None

    def reset_text(self) -> None:
        """Forgets the cached prompt K/V (they are recomputed on the next pass)."""
        self.set_text_source(None)

    def reset(self) -> None:
        """Empties the cache for a new video (buffers are kept)."""
        for layer in self.layers:
            layer.reset()
        self.frames_written = 0
        self.memory_tokens = 0
        self.set_text_source(None)

    def to(self, device=None, dtype=None) -> "HybridCache":
        """Moves the buffers; `dtype` applies to K/V (the linear memory stays float32)."""
        for layer in self.layers:
            for name in ("key", "value", "key_raw", "text_key", "text_value"):
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.to(device=device, dtype=dtype))
            for name in ("kv_state", "kmean_state", "pooled_key", "projected_kv_state"):
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.to(device=device))
        if device is not None:
            self.device = _normalize_device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    # --- undo (exact re-cache under a new prompt) --------------------------------------------------------------
    def check_rewindable(self) -> None:
        """Raises unless commits can be undone exactly (`recache_on_switch`): sink and history in whole chunks."""
        layout = self.layout
        if layout.history_frames % layout.chunk_frames or layout.sink_frames % layout.chunk_frames:
            raise ValueError(
                "Rewinding the cache (`recache_on_switch`) needs the sink and history windows to be whole chunks; got sink "
                f"{layout.sink_frames}, history {layout.history_frames}, chunk {layout.chunk_frames} frames."
            )

    @torch.no_grad()
    def record_commit(self) -> CommitRecord:
        """Copies what the next commit will overwrite (call right before a `cache_mode="write"` pass)."""
        self.check_rewindable()
        tpf, layout = self.tokens_per_frame, self.layout
        evicted = slice(layout.sink_frames * tpf, (layout.sink_frames + layout.chunk_frames) * tpf)

        def clone(t):
            return t.clone() if t is not None else None

        return CommitRecord(
            frames_written=self.frames_written,
            memory_tokens=self.memory_tokens,
            evicted_key_raw=[layer.key_raw[:, evicted].clone() for layer in self.layers],
            evicted_value=[layer.value[:, evicted].clone() for layer in self.layers],
            kv_state=[clone(layer.kv_state) for layer in self.layers],
            kmean_state=[clone(layer.kmean_state) for layer in self.layers],
        )

    @torch.no_grad()
    def rewind(self, records: list[CommitRecord], history_rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        """
        Restores the cache to its state before `records[0]`, given the records of the `history_frames / chunk`
        consecutive commits since (oldest first): their evicted frames are exactly that state's history.

        Args:
            records (`list[CommitRecord]`): from [`record_commit`], oldest first.
            history_rope (`(cos, sin)`): RoPE of the restored history at the positions the chunk at
                `records[0].frames_written` sees (`model._history_rope`).
        """
        self.check_rewindable()
        layout, tpf = self.layout, self.tokens_per_frame
        if len(records) * layout.chunk_frames != layout.history_frames:
            raise ValueError(
                f"Rewinding a history of {layout.history_frames} frames needs "
                f"{layout.history_frames // layout.chunk_frames} commit records, got {len(records)}."
            )
        hist = slice(layout.sink_frames * tpf, (layout.sink_frames + layout.history_frames) * tpf)
        for index, layer in enumerate(self.layers):
            layer.key_raw[:, hist] = torch.cat([r.evicted_key_raw[index] for r in records], dim=1)
            layer.value[:, hist] = torch.cat([r.evicted_value[index] for r in records], dim=1)
            apply_rope(layer.key_raw[:, hist], *history_rope, out=layer.key[:, hist])
            if layer.kv_state is not None:
                layer.kv_state.copy_(records[0].kv_state[index])
                layer.kmean_state.copy_(records[0].kmean_state[index])
            layer._refresh_pooled_keys_if_kept()
            layer.refresh_projected_memory()
        self.memory_tokens = records[0].memory_tokens
        self.frames_written = records[0].frames_written

    # --- bookkeeping ----------------------------------------------------------------------------------------
    def advance(self, plan: ChunkPlan) -> None:
        """Called once after all layers committed a chunk (nothing while commits are deferred: see
        [`commit_pending`])."""
        if self.layers and self.layers[0]._defer_commits:
            return
        self.memory_tokens += len(plan.absorb_frames) * self.tokens_per_frame
        self.frames_written = plan.chunk_start + self.layout.chunk_frames

    def defer_commits(self, enabled: bool = True) -> None:
        """While enabled, a write pass leaves the cache unchanged: each layer keeps its chunk's raw keys and values
        (`pending_commit`) instead of committing them, and the counters stay. [`commit_pending`] then commits. This
        is how a write pass is replayed from a CUDA graph: the graph computes the K/V into static buffers, and the
        commits, whose slots and counts change from chunk to chunk, run eagerly after each replay."""
        for layer in self.layers:
            layer._defer_commits = bool(enabled)

    @torch.no_grad()
    def commit_pending(self, plan: ChunkPlan) -> None:
        """Commits every layer's pending K/V with `plan` (the write plan of the chunk they belong to, e.g.
        `model.write_plan(cache)` before this call), then advances the counters; the pending K/V stay referenced (a
        graph replay refills the same buffers)."""
        if any(layer._defer_commits for layer in self.layers):
            raise RuntimeError("commit_pending() while commits are deferred; call defer_commits(False) first.")
        if any(layer.pending_commit is None for layer in self.layers):
            raise RuntimeError("No pending commit: run a write pass under defer_commits(True) first.")
        if plan.chunk_start != self.frames_written:
            raise ValueError(f"the plan starts at frame {plan.chunk_start}, but the cache holds {self.frames_written}")
        for layer in self.layers:
            key_raw, value, kernel, options = layer.pending_commit
            layer.commit(plan, key_raw, value, kernel, **options)
        self.advance(plan)
