# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""CUDA-graph replay of the transformer's cached passes: the denoising ("read") passes and the cache-write pass.

An eager read pass of the 1.3B model is launch-bound (about 300 kernel launches per layer). Once the window is full
and (relative RoPE) the positions are clamped, every read pass of every later chunk runs exactly the same kernels on
the same buffers: the cache is preallocated, the current chunk's K/V go to a fixed scratch slot and the RoPE tables
are fixed. So one captured graph serves all of them; only the latents and the timestep change, and they are copied
into static inputs. Anything that changes the pass (a new prompt's text K/V, a different plan) triggers a recapture;
passes that are not yet in steady state run eagerly.

A write pass is the same pass plus each layer's commit (absorption, history shift, sink and pooled-key updates), whose
slots and counts change from chunk to chunk. So the graph captures the pass with the commits deferred
([`HybridCache.defer_commits`]): each layer keeps its chunk K/V (static graph outputs), and after every replay the
commits run eagerly with the plan of the chunk at hand ([`HybridCache.commit_pending`]).
"""

from __future__ import annotations

import torch


class CUDAGraphPass:
    """
    Replays `transformer(latents, t, text, cache=cache, cache_mode=cache_mode)` from a CUDA graph when possible.

    Args:
        transformer ([`HybridForcingTransformer3DModel`]), cache ([`HybridCache`]): on a CUDA device.
        cache_mode (`str`, defaults to `"read"`): `"read"` (denoising passes) or `"write"` (the cache-write pass: the
            commits run eagerly after each replay).
        warmup (`int`): eager passes on a side stream before capture (kernels compiled / autotuned).
    """

    def __init__(self, transformer, cache, cache_mode: str = "read", warmup: int = 2):
        if cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, got {cache.device}.")
        if cache_mode not in ("read", "write"):
            raise ValueError(f"`cache_mode` must be 'read' or 'write', got {cache_mode!r}.")
        self.transformer = transformer
        self.cache = cache
        self.cache_mode = cache_mode
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature = None
        self.static_latents = self.static_timestep = self.static_output = None
        self.replays = 0
        self.captures = 0

    def _plan_signature(self, frame_offset: int) -> tuple:
        """Which kernels a pass at `frame_offset` runs: its RoPE positions and where its keys come from."""
        frames, positions = self.cache.layout.visible_frames(frame_offset)
        return (
            tuple(self.cache.layout.query_positions(frame_offset)),
            tuple(positions),
            tuple(f >= frame_offset for f in frames),  # which keys come from the scratch slot
        )

    def _signature(self, frame_offset: int, text: torch.Tensor, attention_kwargs=None) -> tuple:
        """What a pass at `frame_offset` depends on besides latents and timestep (the LoRA state and scale included:
        a graph keeps the scales it was captured with)."""
        text_key = self.cache.layers[0].text_key
        return self._plan_signature(frame_offset) + (
            self.cache.memory_tokens > 0,
            id(text),
            text_key.data_ptr() if text_key is not None else None,
            self.transformer._lora_state(),
            (attention_kwargs or {}).get("scale", 1.0),
        )

    def steady(self, frame_offset: int, text: torch.Tensor) -> bool:
        """True when the next chunk's passes will run the same kernels as this one's (same plan up to the commit)."""
        layout = self.cache.layout
        same_plan = self._plan_signature(frame_offset) == self._plan_signature(frame_offset + layout.chunk_frames)
        memory_ready = not layout.use_memory or self.cache.memory_tokens > 0
        return same_plan and memory_ready and self.cache.text_is_cached(text, weights_state=None)

    def _call(self, latents, timestep, text, attention_kwargs):
        return self.transformer(
            latents, timestep, text, cache=self.cache, frame_offset=self.cache.frames_written,
            cache_mode=self.cache_mode, attention_kwargs=attention_kwargs, return_dict=False,
        )[0]

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, attention_kwargs=None):
        frame_offset = self.cache.frames_written
        if not self.steady(frame_offset, text):
            return self._call(latents, timestep, text, attention_kwargs)
        signature = self._signature(frame_offset, text, attention_kwargs)
        if self.graph is None or signature != self.signature or latents.shape != self.static_latents.shape:
            self._capture(latents, timestep, text, attention_kwargs)
            self.signature = signature
        self.static_latents.copy_(latents)
        self.static_timestep.copy_(timestep)
        self.graph.replay()
        self.replays += 1
        if self.cache_mode == "write":  # the layers' K/V are in the graph's static outputs now
            self.cache.commit_pending(self.transformer.write_plan(self.cache))
        return self.static_output.clone()

    def _capture(self, latents, timestep, text, attention_kwargs) -> None:
        self.graph = None
        self.static_latents = latents.clone()
        self.static_timestep = timestep.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        self.cache.defer_commits(self.cache_mode == "write")  # warm-ups and capture leave the cache as it is
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._call(self.static_latents, self.static_timestep, text, attention_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_output = self._call(self.static_latents, self.static_timestep, text, attention_kwargs)
        finally:
            self.cache.defer_commits(False)
        self.graph = graph
        self.captures += 1

    def reset(self) -> None:
        self.graph = None
        self.signature = None
        self.static_latents = self.static_timestep = self.static_output = None
