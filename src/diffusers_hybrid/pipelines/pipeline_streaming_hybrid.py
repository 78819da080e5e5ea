# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""`StreamingHybridPipeline`: few-step, chunk-by-chunk text-to-video with a [`HybridForcingTransformer3DModel`].

One code path: [`StreamingHybridSession`] produces one chunk per `next()` (prompt switch, denoising passes, the clean
cache-write pass, streaming VAE decode); `StreamingHybridPipeline.__call__` opens a bounded session and concatenates its
chunks, so `__call__` and `stream` give the same frames for the same seed by construction.

Per chunk of `num_frame_per_block` latent frames (official inference schedule, `reference/official-spec.md` §5):

```
x = noise                                            # (B, 16, 3, h, w)
for i, t in enumerate(timesteps):                    # [1000, 937.5, 833.3, 625] by default
    v = transformer(x, t, cache_mode="read")
    x0 = x - sigma_i * v
    x = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * fresh_noise   if i is not the last step
transformer(x0, t=context_noise (0), cache_mode="write")  # commits the chunk to the cache
frames = vae_stream.decode(x0)                       # 9 frames for the first chunk, 12 after
```
"""

from __future__ import annotations

import contextlib
import html
import operator
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.models import AutoencoderKLWan
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler, SchedulerMixin
from diffusers.utils import BaseOutput, is_ftfy_available, logging, replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from diffusers.video_processor import VideoProcessor
from huggingface_hub import ModelCard

try:
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel
except ImportError:  # without transformers the pipeline still runs from precomputed `prompt_embeds`
    PreTrainedTokenizerBase = UMT5EncoderModel = None

from ..models.transformer_hybrid_forcing import HybridForcingTransformer3DModel
from ..utils import hub_utils
from ..video.streaming_vae import StreamingWanDecoder

if is_ftfy_available():
    import ftfy

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

# `model_index.json` of the shim layout names the transformer's library by its shim's stem; diffusers type-checks a
# transformer passed to `from_pretrained` against that name in `sys.modules`, also in `DiffusionPipeline.from_pretrained`
# (which imports this module through the pipeline shim before it checks any component): see `hub_utils`.
hub_utils.register_shim_module_aliases([HybridForcingTransformer3DModel])

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
NUM_TRAIN_TIMESTEPS = 1000

EXAMPLE_DOC_STRING = """
    Examples:
        ```python
        >>> import torch
        >>> from diffusers.utils import export_to_video
        >>> from diffusers_hybrid import HybridForcingTransformer3DModel, StreamingHybridPipeline

        >>> # a saved Hybrid Forcing pipeline (see `save_pretrained`), or a stock Wan repo plus a converted transformer:
        >>> # transformer = HybridForcingTransformer3DModel.from_pretrained("path/to/converted", torch_dtype=torch.bfloat16)
        >>> # pipe = StreamingHybridPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", transformer=transformer)
        >>> pipe = StreamingHybridPipeline.from_pretrained("path/to/hybrid-forcing", dtype=torch.bfloat16)
        >>> pipe.to("cuda")

        >>> prompt = "A cat and a dog baking a cake together in a sunny kitchen"
        >>> video = pipe(prompt, height=480, width=832, num_frames=81).frames[0]
        >>> export_to_video(video, "output.mp4", fps=16)

        >>> # unbounded streaming with a prompt switch
        >>> with pipe.stream(prompt, num_frames=None) as session:
        ...     for chunk in session:
        ...         print(chunk.index, chunk.frames.shape, chunk.timings["total"])
        ...         if chunk.index == 5:
        ...             session.set_prompt("The cat and the dog eat the cake")
        ...         if chunk.index == 20:
        ...             break
        ```
"""


def _basic_clean(text: str) -> str:
    if is_ftfy_available():
        text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def prompt_clean(text: str) -> str:
    """The text normalisation Wan's pipelines apply before tokenizing (html unescape, ftfy if installed, whitespace)."""
    return re.sub(r"\s+", " ", _basic_clean(text)).strip()


def few_step_schedule(
    denoising_step_list: list[float], timestep_shift: float = 5.0, warp_denoising_step: bool = True
) -> tuple[list[float], list[float]]:
    """
    The few-step schedule of Self-Forcing / Hybrid Forcing: `(timesteps, sigmas)`.

    With `warp_denoising_step`, each step `t` of `denoising_step_list` is mapped to `timesteps[1000 - t]` of the
    1000-step flow-matching grid shifted by `timestep_shift`, i.e. `sigma = shift·s / (1 + (shift - 1)·s)` with
    `s = t / 1000` (the same values as `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(sigmas=s)`).
    Without it, `sigma = t / 1000`. The timesteps passed to the transformer are `1000·sigma`.
    """
    steps = [float(t) for t in denoising_step_list]
    if not steps:
        raise ValueError("`denoising_step_list` must not be empty.")
    if any(not (0 < t <= NUM_TRAIN_TIMESTEPS) for t in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(
            f"`denoising_step_list` must be strictly decreasing values in (0, {NUM_TRAIN_TIMESTEPS}], got {steps}."
        )
    if timestep_shift <= 0:
        raise ValueError(f"`timestep_shift` must be > 0, got {timestep_shift}.")
    sigmas = []
    for t in steps:
        s = t / NUM_TRAIN_TIMESTEPS
        sigmas.append(timestep_shift * s / (1 + (timestep_shift - 1) * s) if warp_denoising_step else s)
    return [s * NUM_TRAIN_TIMESTEPS for s in sigmas], sigmas


def _as_int(name: str, value) -> int:
    """`value` as a Python `int`: anything `operator.index` accepts (`int`, NumPy and torch integers) or an integral
    `float` (`9.0`); anything else (`9.5`, `"9"`, `True`) raises a `ValueError` naming the argument, its type and
    value."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            if isinstance(value, (float, np.floating)) and float(value).is_integer():
                return int(value)
    raise ValueError(f"`{name}` must be an integer, got {type(value).__name__} {value!r}.")


def valid_num_frames(num_frames: int, chunk_frames: int, temporal_scale: int = 4) -> list[int]:
    """The valid video lengths nearest to `num_frames`: `1 + temporal_scale·(F - 1)` with `F` a multiple of
    `chunk_frames` latent frames."""
    step = temporal_scale * chunk_frames
    first = temporal_scale * (chunk_frames - 1) + 1
    below = first + max(0, (num_frames - first) // step) * step
    candidates = {below, below + step} if below <= num_frames else {first}
    return sorted(c for c in candidates if c >= first)


@dataclass
class StreamingHybridPipelineOutput(BaseOutput):
    r"""
    Output class of [`StreamingHybridPipeline`].

    Args:
        frames (`torch.Tensor`, `np.ndarray`, or `list[list[PIL.Image.Image]]`):
            The videos: a list of `batch_size` lists of PIL images, or an array / tensor of shape
            `(batch_size, num_frames, height, width, channels)` (`np`) or `(batch_size, num_frames, channels, height,
            width)` (`pt`), values in [0, 1]; with `output_type="latent"` the normalised latents
            `(batch_size, 16, num_latent_frames, height // 8, width // 8)`.
    """

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]


@dataclass
class StreamingHybridChunk:
    r"""
    One generated chunk of a [`StreamingHybridSession`].

    Args:
        index (`int`): chunk index in the stream (0, 1, ...).
        frames: the chunk's decoded frames in the session's `output_type` (same layout as
            [`StreamingHybridPipelineOutput`]; 9 frames for chunk 0, 12 after; latents for `"latent"`).
        frame_start (`int`): index of the chunk's first video frame in the stream.
        latent_start (`int`): index of the chunk's first latent frame in the stream.
        prompt (`str` or `list[str]` or `None`): the prompt the chunk was generated with (`None` for embeddings).
        timings (`dict[str, float]`): seconds spent on this chunk: `total` (wall time of `next()`), `text_encode`
            (0 unless the prompt changed), `recache`, and, when the session was opened with `profile=True`,
            `denoise` (all denoising passes), `cache_write` (the clean pass) and `decode` (VAE + post-processing).
            `since_start` is the wall time from the session's first chunk request to this chunk's end.
        num_frames (`int`): video frames of the chunk (9 for chunk 0, 12 after, for chunks of 3 latent frames).
        latents (`torch.Tensor`): the chunk's clean latents `(batch_size, 16, num_frame_per_block, h, w)`, float32.
    """

    index: int
    frames: Any
    frame_start: int
    latent_start: int
    num_frames: int
    prompt: str | list[str] | None
    timings: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None


class _Timer:
    """Per-component timing. On CUDA with `profile=True` the components are separated by synchronisations."""

    def __init__(self, device: torch.device, profile: bool):
        self.cuda = device.type == "cuda"
        self.profile = profile
        self.times: dict[str, float] = {}

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def section(self, name: str):
        if self.profile:
            self.sync()
        start = time.perf_counter()
        yield
        if self.profile:
            self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


class _RecacheState:
    """
    What the session keeps to re-encode the cached window under a new prompt exactly (LongLive-style recache): the
    inputs of the recent cache-write passes (a constant number of latent frames) and the cache's undo records of the
    last `history_frames / chunk` commits.
    """

    def __init__(self, chunk: int, sink: int, history: int):
        self.chunk, self.sink, self.history = chunk, sink, history
        self.num_commits = history // chunk
        # write-pass inputs by chunk start: the chunks holding sink frames and the last `num_commits` chunks
        self.latents: dict[int, torch.Tensor] = {}
        self.records: list = []  # HybridCache.record_commit() of the last `num_commits` commits, oldest first

    def remember(self, start: int, context_latents: torch.Tensor) -> None:
        self.latents[start] = context_latents
        oldest_recent = start + self.chunk - self.num_commits * self.chunk
        for s in list(self.latents):
            if s >= self.sink and s < oldest_recent:
                del self.latents[s]

    def clear(self) -> None:
        self.latents, self.records = {}, []

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.latents.values())
        return total + sum(record.nbytes() for record in self.records)


class StreamingHybridSession:
    r"""
    A streaming generation opened by [`StreamingHybridPipeline.stream`]. Iterating it yields a
    [`StreamingHybridChunk`] per chunk, computed when requested; with `num_frames=None` it never ends and memory stays
    constant. Use it as a context manager, or call [`close`] to free its cache.

    The session owns a [`~diffusers_hybrid.HybridCache`] and a [`~diffusers_hybrid.StreamingWanDecoder`]; only one
    session of a pipeline should run at a time (they share the pipeline's models).
    """

    def __init__(self, pipe: "StreamingHybridPipeline", *, prompts, prompt_embeds, num_videos_per_prompt, batch_size,
                 height, width, num_chunks, generator, latents, output_type, timesteps, sigmas, context_noise,
                 attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length,
                 recache_on_switch, vae_frames_per_call, profile, device):
        self.pipe = pipe
        transformer = pipe.transformer
        config = transformer.config
        self.chunk_frames = config.num_frame_per_block
        self.batch_size = batch_size
        self.height, self.width = height, width
        self.latent_height = height // pipe.vae_scale_factor_spatial
        self.latent_width = width // pipe.vae_scale_factor_spatial
        self.num_chunks = num_chunks
        self.output_type = output_type
        self.generator = generator
        self._latents = latents
        self.timesteps, self.sigmas = list(timesteps), list(sigmas)
        self.context_noise = float(context_noise)
        self.attention_kwargs = attention_kwargs
        self.callback_on_step_end = callback_on_step_end
        self.callback_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        self.max_sequence_length = max_sequence_length
        self.num_videos_per_prompt = num_videos_per_prompt
        self.recache_on_switch = recache_on_switch
        self.profile = profile
        self.device = device
        self.transformer_dtype = transformer.dtype

        self.prompt = prompts
        self.num_prompts = len(prompts) if prompts is not None else batch_size // num_videos_per_prompt
        self.prompt_embeds = prompt_embeds
        self._pending: tuple | None = None

        self.cache = transformer.init_cache(
            batch_size, self.latent_height, self.latent_width, device=device, dtype=self.transformer_dtype
        )
        self.decoder = None
        if output_type != "latent":
            fused = getattr(pipe, "_fused_vae_decode", None)
            self.decoder = StreamingWanDecoder(pipe.vae, frames_per_call=vae_frames_per_call, fused=fused is not None,
                                               norm_kernel=fused["norm_kernel"] if fused else None)
            if fused is not None and getattr(pipe, "_use_cuda_graphs", False):
                self.decoder.enable_cuda_graph()
        self._recache = None
        self._graphs = {}  # cache mode -> CUDAGraphPass
        if getattr(pipe, "_use_cuda_graphs", False) and self.cache.device.type == "cuda":
            from ..utils.cuda_graphs import CUDAGraphPass

            self._graphs = {mode: CUDAGraphPass(transformer, self.cache, mode) for mode in ("read", "write")}
        if recache_on_switch:
            self.cache.check_rewindable()
            layout = self.cache.layout
            self._recache = _RecacheState(self.chunk_frames, layout.sink_frames, layout.history_frames)
        self.index = 0
        self.frames_emitted = 0
        self._closed = False
        self._stopped = False
        self._start_time: float | None = None

    # ------------------------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def latent_frames_written(self) -> int:
        return self.index * self.chunk_frames

    def nbytes(self) -> dict[str, int]:
        """Bytes held by the session's state: `cache` (transformer K/V, linear memory, text K/V), `vae` (the
        decoder's causal cache) and `recache` (what `recache_on_switch` keeps)."""
        if self._closed:
            return {"cache": 0, "vae": 0, "recache": 0}
        return {
            "cache": self.cache.nbytes(),
            "vae": self.decoder.nbytes() if self.decoder is not None else 0,
            "recache": self._recache.nbytes() if self._recache is not None else 0,
        }

    def set_prompt(self, prompt: str | list[str] | None = None, *, prompt_embeds: torch.Tensor | None = None,
                   recache: bool | None = None) -> None:
        """
        Switches the prompt from the next chunk on: the text is re-encoded and the cross-attention K/V cache is
        refreshed when that chunk starts.

        Args:
            prompt (`str` or `list[str]`): one prompt for every video of the batch, or one per prompt of the session.
            prompt_embeds (`torch.Tensor`, *optional*): precomputed embeddings `(batch_size, seq, text_dim)` instead.
            recache (`bool`, *optional*): also re-encode cached frames with the new prompt (LongLive's recache), so
                the next chunk sees context consistent with it. Early in the stream, while every frame written so far
                is still cached (in `window`/`hybrid` mode, up to `sink_frames + local_attn_frames -
                num_frame_per_block` latent frames), all of them are re-encoded: the sink frames too, and the linear
                memory is rebuilt from them. Later, only the window's recent (non-sink) frames are re-encoded; the sink
                frames' K/V and the linear memory keep the prompt they were encoded with. Defaults to the session's
                `recache_on_switch`; needs a session opened with `recache_on_switch=True`.
        """
        if self._closed:
            raise ValueError("`set_prompt` was called on a closed StreamingHybridSession; open a new one with `stream`.")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds` to `set_prompt`.")
        recache = self.recache_on_switch if recache is None else recache
        if recache and self._recache is None:
            raise ValueError("`recache=True` needs a session opened with `stream(..., recache_on_switch=True)`.")
        if prompt is not None:
            prompts = self.pipe._normalize_prompts(prompt, self.num_prompts)
            self._pending = (prompts, None, recache)
        else:
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != self.batch_size:
                raise ValueError(
                    f"`prompt_embeds` must be (batch_size={self.batch_size}, seq, text_dim), got "
                    f"{tuple(prompt_embeds.shape)}."
                )
            self.pipe._check_text_dim(prompt_embeds)
            self._pending = (None, prompt_embeds, recache)

    def close(self) -> None:
        """Frees the cache and the decoder state; the session yields nothing more."""
        if self._closed:
            return
        self._closed = True
        self._graphs = {}
        self.cache = None
        self.decoder = None
        self._recache = None
        self._latents = None
        self.prompt_embeds = None
        self.pipe.maybe_free_model_hooks()

    def __iter__(self):
        return self

    def __next__(self) -> StreamingHybridChunk:
        if self._closed or self._stopped:
            raise StopIteration
        if self.pipe.interrupt:  # set between two chunks (e.g. from another thread): start no new chunk
            self._stopped = True
            raise StopIteration
        if self.num_chunks is not None and self.index >= self.num_chunks:
            self._stopped = True
            raise StopIteration
        return self._next_chunk()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------------------------------------------------------
    # one chunk
    # ------------------------------------------------------------------------------------------------------------
    def _noise(self, shape) -> torch.Tensor:
        return randn_tensor(shape, generator=self.generator, device=self.device, dtype=torch.float32)

    def _transformer(self, latents, timestep: float, cache_mode: str) -> torch.Tensor:
        t = torch.full((self.batch_size,), timestep, device=self.device, dtype=torch.float32)
        graph = self._graphs.get(cache_mode)
        if graph is not None:
            return graph(latents.to(self.transformer_dtype), t, self.prompt_embeds, self.attention_kwargs)
        return self.pipe.transformer(
            hidden_states=latents.to(self.transformer_dtype),
            timestep=t,
            encoder_hidden_states=self.prompt_embeds,
            cache=self.cache,
            frame_offset=self.cache.frames_written,
            cache_mode=cache_mode,
            attention_kwargs=self.attention_kwargs,
            return_dict=False,
        )[0]

    def _write(self, context_latents: torch.Tensor) -> None:
        """The clean cache-write pass (and what a later recache needs)."""
        state = self._recache
        start = self.cache.frames_written
        if state is not None:
            self._backup_before_commit()
        self._transformer(context_latents, self.context_noise, "write")
        if state is not None:
            state.remember(start, context_latents)

    @torch.no_grad()
    def _next_chunk(self) -> StreamingHybridChunk:
        pipe = self.pipe
        if self._start_time is None:
            self._start_time = time.perf_counter()
        timer = _Timer(self.device, self.profile)
        start = time.perf_counter()
        pipe._num_timesteps = len(self.timesteps)  # this session's schedule (sessions may interleave)
        timings = {"text_encode": 0.0, "recache": 0.0}
        if self._pending is not None:
            self._apply_prompt_switch(timings)

        chunk, f0 = self.chunk_frames, self.cache.frames_written
        shape = (self.batch_size, pipe.transformer.config.in_channels, chunk, self.latent_height, self.latent_width)
        num_steps = len(self.timesteps)

        # 1. Denoising passes (read the cache, leave it unchanged)
        with timer.section("denoise"):
            if self._latents is not None:
                latents = self._latents[:, :, f0 : f0 + chunk].to(device=self.device, dtype=torch.float32)
            else:
                latents = self._noise(shape)
            # `pipe.interrupt` is not checked here: a chunk that has started is always completed (all its steps,
            # its cache write and its decode) and emitted; the session stops after it (end of this method)
            for i, (t, sigma) in enumerate(zip(self.timesteps, self.sigmas)):
                pipe._current_timestep = t
                flow = self._transformer(latents, t, "read")
                x0 = latents - sigma * flow.float()
                if i + 1 < num_steps:
                    sigma_next = self.sigmas[i + 1]
                    latents = (1.0 - sigma_next) * x0 + sigma_next * self._noise(shape)
                else:
                    latents = x0
                if self.callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in self.callback_tensor_inputs:
                        callback_kwargs[name] = latents if name == "latents" else self.prompt_embeds
                    outputs = self.callback_on_step_end(pipe, self.index * num_steps + i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                    new_embeds = outputs.pop("prompt_embeds", None)
                    if new_embeds is not None and new_embeds is not self.prompt_embeds:
                        self.prompt_embeds = new_embeds.to(device=self.device, dtype=self.transformer_dtype)
                        self.cache.reset_text()
            pipe._current_timestep = None
            clean = latents

        # 2. The clean cache-write pass at t = context_noise
        with timer.section("cache_write"):
            context = clean
            if self.context_noise > 0:
                sigma_c = self.context_noise / NUM_TRAIN_TIMESTEPS
                context = (1.0 - sigma_c) * clean + sigma_c * self._noise(shape)
            self._write(context)

        # 3. Streaming decode
        with timer.section("decode"):
            if self.output_type == "latent":
                frames = clean
            else:
                vae = pipe.vae
                video = self.decoder.decode(self.decoder.denormalize(clean.to(vae.dtype)))
                frames = pipe.video_processor.postprocess_video(video, output_type=self.output_type)
        timer.sync()
        end = time.perf_counter()

        timings["total"] = end - start
        timings["since_start"] = end - self._start_time
        if self.profile:
            timings.update(timer.times)
        scale = pipe.vae_scale_factor_temporal
        result = StreamingHybridChunk(
            index=self.index,
            frames=frames,
            frame_start=self.frames_emitted,
            latent_start=f0,
            num_frames=chunk * scale - (scale - 1 if f0 == 0 else 0),
            prompt=None if self.prompt is None else (self.prompt[0] if len(self.prompt) == 1 else list(self.prompt)),
            timings=timings,
            latents=clean,
        )
        self.index += 1
        self.frames_emitted += result.num_frames
        if pipe.interrupt:
            self._stopped = True
        return result

    # ------------------------------------------------------------------------------------------------------------
    # prompt switch and recache
    # ------------------------------------------------------------------------------------------------------------
    def _apply_prompt_switch(self, timings: dict) -> None:
        prompts, embeds, recache = self._pending
        self._pending = None
        start = time.perf_counter()
        if embeds is None:
            embeds = self.pipe.encode_prompt(
                prompts, num_videos_per_prompt=self.num_videos_per_prompt,
                max_sequence_length=self.max_sequence_length, device=self.device,
            )
        self.prompt = prompts
        self.prompt_embeds = embeds.to(device=self.device, dtype=self.transformer_dtype)
        self.cache.reset_text()
        timings["text_encode"] = time.perf_counter() - start
        if recache and self.cache.frames_written > 0:
            start = time.perf_counter()
            self._recache_window()
            timings["recache"] = time.perf_counter() - start

    def _backup_before_commit(self) -> None:
        """Before a cache-write pass: keep the cache's undo record of it."""
        state = self._recache
        if state.num_commits == 0:
            return
        state.records = (state.records + [self.cache.record_commit()])[-state.num_commits:]

    @torch.no_grad()
    def _recache_window(self) -> None:
        """
        Re-runs cache-write passes under the new prompt. What is re-encoded depends on how far the stream is:

        - early, while every frame written so far is still in the window (`frames_written <= sink + history`): the
          cache is reset and every chunk written so far is replayed, so the sink frames and the recent frames are
          re-encoded and the linear memory is rebuilt from them;
        - later: the cache is rewound to its exact state before the last `history` frames (their commits undone:
          history K/V and linear memory restored) and only those chunks are replayed. The sink frames' K/V and the
          linear memory keep what they were encoded with: the frames the memory absorbed are no longer kept.

        Either way, with the same prompt this reproduces the cache bit for bit.
        """
        state, cache, pipe = self._recache, self.cache, self.pipe
        frames_written, chunk, history = cache.frames_written, self.chunk_frames, state.history
        if history == 0:
            return
        if frames_written <= state.sink + history:
            # early in the stream every written frame is in the window: replay from an empty cache
            replay = [state.latents[s] for s in range(0, frames_written, chunk)]
            cache.reset()
            state.clear()
        else:
            start = frames_written - history
            pipe.transformer.rewind_cache(cache, state.records)
            replay = [state.latents[s] for s in range(start, frames_written, chunk)]
            state.records = []
        cache.reset_text()
        for context in replay:
            self._write(context)


class StreamingHybridPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    r"""
    Streaming text-to-video with Hybrid Forcing: a causal Wan2.1 transformer generates the video chunk by chunk of
    `num_frame_per_block` latent frames in a few denoising steps, attending to a constant-size cache (sink + window,
    and a linear memory of older frames), and the Wan VAE decodes each chunk as soon as it exists.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    The components come in WanPipeline's order, `(tokenizer, text_encoder, vae, scheduler, transformer)`. The attribute
    `base_model` (a Hub repo id or `None`) is the base the model card of [`save_pretrained`] names.

    Args:
        tokenizer ([`T5TokenizerFast`]): tokenizer of [google/umt5-xxl](https://huggingface.co/google/umt5-xxl).
        text_encoder ([`UMT5EncoderModel`]): the UMT5 encoder of Wan2.1.
        vae ([`AutoencoderKLWan`]): the Wan2.1 VAE.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): kept for compatibility with diffusers tooling; the few-step
            schedule is this pipeline's own configuration (below), so a stock Wan scheduler may be passed too.
        transformer ([`HybridForcingTransformer3DModel`]): the causal streaming transformer.
        denoising_step_list (`list[float]`, defaults to `[1000, 750, 500, 250]`): denoising steps per chunk.
        timestep_shift (`float`, defaults to `5.0`): shift of the flow-matching grid the steps are warped onto.
        warp_denoising_step (`bool`, defaults to `True`): warp the steps onto the shifted grid (official inference).
        context_noise (`float`, defaults to `0.0`): timestep of the clean cache-write pass (and the noise level added
            to the chunk for it).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    # the Hub repo id the model is built on, for the model card `save_pretrained` writes; `None` when unknown (see
    # `from_pretrained`), set it by hand otherwise
    base_model: str | None = None
    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    _optional_components = ["tokenizer", "text_encoder"]
    _lora_loadable_modules = ["transformer"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        text_encoder: UMT5EncoderModel | None,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: HybridForcingTransformer3DModel,
        denoising_step_list: list[float] = (1000.0, 750.0, 500.0, 250.0),
        timestep_shift: float = 5.0,
        warp_denoising_step: bool = True,
        context_noise: float = 0.0,
    ):
        super().__init__()
        if transformer is not None and not isinstance(transformer, HybridForcingTransformer3DModel):
            if isinstance(transformer, SchedulerMixin) or isinstance(scheduler, HybridForcingTransformer3DModel):
                raise ValueError(
                    f"`transformer` must be a HybridForcingTransformer3DModel, got {type(transformer).__name__} (and "
                    f"`scheduler` is a {type(scheduler).__name__}): the arguments look swapped. The order is "
                    "(tokenizer, text_encoder, vae, scheduler, transformer), like WanPipeline's; pass them by keyword."
                )
            raise ValueError(
                f"`transformer` must be a HybridForcingTransformer3DModel, got {type(transformer).__name__}; convert a "
                "Wan transformer with `HybridForcingTransformer3DModel.from_wan(...)` or load a converted checkpoint."
            )
        few_step_schedule(list(denoising_step_list), timestep_shift, warp_denoising_step)  # validates
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, scheduler=scheduler
        )
        self.register_to_config(
            denoising_step_list=[float(t) for t in denoising_step_list],
            timestep_shift=float(timestep_shift),
            warp_denoising_step=bool(warp_denoising_step),
            context_noise=float(context_noise),
        )
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self._interrupt = False
        self._current_timestep = None
        self._num_timesteps: int | None = None
        self._use_cuda_graphs = False
        self._fused_vae_decode: dict | None = None

    def enable_cuda_graphs(self, enabled: bool = True) -> None:
        """Replays the transformer's denoising passes and its cache-write pass from CUDA graphs once a stream reaches
        its steady state (window full, RoPE positions clamped): same outputs, far fewer kernel launches (the write
        pass's commits run eagerly after each replay). With [`enable_fused_vae_decode`], the VAE decode of
        steady-state chunks is replayed from a graph too. Only used on CUDA devices; each session captures its own
        graphs (and recaptures after a prompt switch)."""
        self._use_cuda_graphs = bool(enabled)

    def enable_fused_vae_decode(self, enabled: bool = True, norm_kernel: str | None = None) -> None:
        """Decodes the stream's chunks, once the VAE's causal cache is full, with [`StreamingWanDecoder`]'s fused
        forward of the Wan2.1 decoder (`fused=True`): the same result up to float rounding, with fewer memory passes
        (each normalisation + activation is one kernel, `norm_kernel` as in [`StreamingWanDecoder`]) and, on CUDA,
        channels-last convolutions. Under [`enable_cuda_graphs`] the fused decode is replayed from a CUDA graph.
        Takes effect for sessions opened afterwards."""
        from ..video.streaming_vae import NORM_KERNELS

        if norm_kernel not in NORM_KERNELS:
            raise ValueError(f"`norm_kernel` must be one of {NORM_KERNELS}, got {norm_kernel!r}.")
        self._fused_vae_decode = {"norm_kernel": norm_kernel} if enabled else None

    # ------------------------------------------------------------------------------------------------------------
    # text
    # ------------------------------------------------------------------------------------------------------------
    def _get_t5_prompt_embeds(self, prompt: list[str], max_sequence_length: int, device, dtype) -> torch.Tensor:
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("This pipeline has no tokenizer/text encoder; pass `prompt_embeds` instead of `prompt`.")
        prompt = [prompt_clean(p) for p in prompt]
        inputs = self.tokenizer(
            prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        for text in prompt:
            ids = self.tokenizer(text, add_special_tokens=True, truncation=False).input_ids
            if len(ids) > max_sequence_length:
                removed = self.tokenizer.decode(ids[max_sequence_length - 1 : -1], skip_special_tokens=True)
                logger.warning(
                    f"The prompt is {len(ids)} tokens long and was truncated to `max_sequence_length`="
                    f"{max_sequence_length}; this part of it was dropped: {removed!r}"
                )
        input_ids, mask = inputs.input_ids, inputs.attention_mask
        encoder_device = get_module_execution_device(self.text_encoder)
        hidden = self.text_encoder(input_ids.to(encoder_device), mask.to(encoder_device)).last_hidden_state
        # padded positions are zero, as Wan was trained with
        hidden = hidden * mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        return hidden.to(device=device, dtype=dtype)

    def encode_prompt(
        self,
        prompt: str | list[str],
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        r"""
        Encodes the prompt into UMT5 hidden states `(batch_size·num_videos_per_prompt, max_sequence_length, 4096)`;
        padded positions are zeros. No negative prompt: the model is distilled and runs without guidance.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); longer than `max_sequence_length` tokens are truncated with a
                warning.
            num_videos_per_prompt (`int`, defaults to 1): copies per prompt.
            prompt_embeds (`torch.Tensor`, *optional*): returned (repeated) instead of encoding `prompt`.
            max_sequence_length (`int`, defaults to 512): padded / truncated token length.
        """
        device = device or self._execution_device
        dtype = dtype or (self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype)
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._get_t5_prompt_embeds(prompts, max_sequence_length, device, dtype)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        return prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)

    # ------------------------------------------------------------------------------------------------------------
    # checks
    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _normalize_prompts(prompt, expected: int | None = None) -> list[str]:
        if isinstance(prompt, str):
            prompts = [prompt] if expected is None else [prompt] * expected
        elif isinstance(prompt, (list, tuple)):
            prompts = list(prompt)
            if not prompts:
                raise ValueError("`prompt` is an empty list; pass at least one non-empty prompt.")
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"`prompt` must be a string or a list of strings, got {prompt!r}.")
            if expected is not None and len(prompts) != expected:
                raise ValueError(
                    f"`prompt` is a list of {len(prompts)} prompts but the batch has {expected} prompt(s): "
                    f"{prompt!r}."
                )
        else:
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}: {prompt!r}.")
        for p in prompts:
            if not p.strip():
                raise ValueError(f"`prompt` must not be empty, got {p!r}.")
        return prompts

    def _check_text_dim(self, prompt_embeds: torch.Tensor) -> None:
        text_dim = self.transformer.config.text_dim
        if prompt_embeds.shape[-1] != text_dim:
            raise ValueError(
                f"`prompt_embeds` have hidden size {prompt_embeds.shape[-1]} (shape {tuple(prompt_embeds.shape)}) but "
                f"the transformer's `text_dim` is {text_dim}: they come from another text encoder than this model's."
            )

    def check_inputs(self, prompt, prompt_embeds, height, width, num_frames, num_videos_per_prompt, generator,
                     latents, output_type, callback_on_step_end_tensor_inputs):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown `output_type`={output_type!r}; use one of {list(OUTPUT_TYPES)}.")
        height, width = _as_int("height", height), _as_int("width", width)
        num_videos_per_prompt = _as_int("num_videos_per_prompt", num_videos_per_prompt)
        if num_frames is not None:
            num_frames = _as_int("num_frames", num_frames)
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(
                f"`height` and `width` must be positive multiples of {multiple}, got height={height}, width={width}."
            )
        if num_videos_per_prompt < 1:
            raise ValueError(f"`num_videos_per_prompt` must be >= 1, got {num_videos_per_prompt}.")
        chunk = self.transformer.config.num_frame_per_block
        if num_frames is not None:
            scale = self.vae_scale_factor_temporal
            ok = num_frames >= 1 and (num_frames - 1) % scale == 0
            ok = ok and ((num_frames - 1) // scale + 1) % chunk == 0
            if not ok:
                nearest = valid_num_frames(num_frames, chunk, scale)
                examples = ", ".join(str(scale * (chunk * m - 1) + 1) for m in (1, 2, 3))
                raise ValueError(
                    f"`num_frames`={num_frames} is not a valid length: it must be 1 + {scale}·k video frames making "
                    f"whole chunks of {chunk} latent frames ({examples}, ...); the nearest valid values are "
                    f"{' and '.join(map(str, nearest))}."
                )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if prompt is not None:
            self._normalize_prompts(prompt)
        if prompt_embeds is not None:
            if prompt_embeds.ndim != 3:
                raise ValueError(f"`prompt_embeds` must be (batch, seq, dim), got shape {tuple(prompt_embeds.shape)}.")
            self._check_text_dim(prompt_embeds)
        if callback_on_step_end_tensor_inputs is not None:
            bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if bad:
                raise ValueError(f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {bad}.")

    # ------------------------------------------------------------------------------------------------------------
    # properties (diffusers conventions)
    # ------------------------------------------------------------------------------------------------------------
    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    @property
    def num_timesteps(self) -> int:
        """Denoising steps per chunk of the running (or last) call or stream, per-call `denoising_step_list` included;
        the configured `denoising_step_list`'s length before any. The `step` that `callback_on_step_end` receives runs
        across chunks (`chunk·num_timesteps + i`)."""
        num = getattr(self, "_num_timesteps", None)
        return len(self.config.denoising_step_list) if num is None else num

    # ------------------------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(
        self,
        prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        denoising_step_list: list[float] | None = None,
        timestep_shift: float | None = None,
        warp_denoising_step: bool | None = None,
        context_noise: float | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        recache_on_switch: bool = False,
        vae_frames_per_call: int | None = 1,
        profile: bool = False,
    ) -> StreamingHybridSession:
        r"""
        Opens a streaming session: iterate it to get each chunk's frames as soon as they are decoded.

        Args:
            prompt, height, width, num_videos_per_prompt, generator, latents, prompt_embeds, output_type,
            attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length:
                as in [`~StreamingHybridPipeline.__call__`].
            num_frames (`int`, *optional*): video length; `None` streams without end at constant memory.
            denoising_step_list, timestep_shift, warp_denoising_step, context_noise: override the pipeline's schedule
                configuration for this session.
            recache_on_switch (`bool`, defaults to `False`): keep what is needed to re-encode the attention window with
                a new prompt on `set_prompt` (LongLive's recache; what is re-encoded: see
                [`StreamingHybridSession.set_prompt`]); costs about one history window of K/V.
            vae_frames_per_call (`int` or `None`, defaults to 1): latent frames per VAE decoder call (`None`: a whole
                chunk per call, faster on GPU, equal to the full decode up to float rounding).
            profile (`bool`, defaults to `False`): time the denoising, cache-write and decode parts of each chunk
                separately (synchronises the device between them).

        Returns:
            [`StreamingHybridSession`]
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, prompt_embeds, height, width, num_frames, num_videos_per_prompt, generator, latents,
                          output_type, callback_on_step_end_tensor_inputs)
        height, width = _as_int("height", height), _as_int("width", width)
        num_videos_per_prompt = _as_int("num_videos_per_prompt", num_videos_per_prompt)
        num_frames = None if num_frames is None else _as_int("num_frames", num_frames)
        config = self.config
        timesteps, sigmas = few_step_schedule(
            denoising_step_list if denoising_step_list is not None else config.denoising_step_list,
            timestep_shift if timestep_shift is not None else config.timestep_shift,
            warp_denoising_step if warp_denoising_step is not None else config.warp_denoising_step,
        )
        context_noise = config.context_noise if context_noise is None else context_noise
        if not 0 <= context_noise < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"`context_noise` must be in [0, {NUM_TRAIN_TIMESTEPS}), got {context_noise}.")

        prompts = self._normalize_prompts(prompt) if prompt is not None else None
        num_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        batch_size = num_prompts * num_videos_per_prompt
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but the batch has {batch_size} videos "
                f"({num_prompts} prompt(s) x {num_videos_per_prompt}); pass one generator per video."
            )
        chunk = self.transformer.config.num_frame_per_block
        num_chunks = None
        if num_frames is not None:
            num_chunks = ((num_frames - 1) // self.vae_scale_factor_temporal + 1) // chunk
        if latents is not None and latents.ndim == 5 and latents.shape[0] != batch_size:
            what = (f"`prompt` is a list of {num_prompts} prompt(s)" if prompts is not None
                    else f"`prompt_embeds` holds {num_prompts} prompt(s)")
            raise ValueError(
                f"{what} (x {num_videos_per_prompt} video(s) each = a batch of {batch_size}) but `latents` has a batch "
                f"of {latents.shape[0]}: {prompt!r}."
            )
        if latents is not None:
            if num_frames is None:
                raise ValueError("`latents` (the noise of the whole video) needs a bounded `num_frames`.")
            expected = (batch_size, self.transformer.config.in_channels, num_chunks * chunk,
                        height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
            if tuple(latents.shape) != expected:
                raise ValueError(
                    f"`latents` must have shape {expected} (batch of {batch_size} videos), got {tuple(latents.shape)}."
                )

        device = torch.device(self._execution_device)
        if device.type == "cpu":
            device = torch.device("cpu")  # CPU tensors report "cpu", never "cpu:0" (model offload's device)
        self._interrupt = False
        self._current_timestep = None
        self._num_timesteps = len(timesteps)
        embeds = self.encode_prompt(
            prompts, num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
            max_sequence_length=max_sequence_length, device=device,
        ).to(self.transformer.dtype)
        if embeds.shape[0] != batch_size:
            raise ValueError(f"`prompt_embeds` give {embeds.shape[0]} videos but the batch has {batch_size}.")
        return StreamingHybridSession(
            self, prompts=prompts, prompt_embeds=embeds, num_videos_per_prompt=num_videos_per_prompt,
            batch_size=batch_size, height=height, width=width, num_chunks=num_chunks, generator=generator,
            latents=latents, output_type=output_type, timesteps=timesteps, sigmas=sigmas, context_noise=context_noise,
            attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, recache_on_switch=recache_on_switch,
            vae_frames_per_call=vae_frames_per_call, profile=profile, device=device,
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        denoising_step_list: list[float] | None = None,
        timestep_shift: float | None = None,
        warp_denoising_step: bool | None = None,
        context_noise: float | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        vae_frames_per_call: int | None = 1,
    ) -> StreamingHybridPipelineOutput | tuple:
        r"""
        Generates a whole video (a bounded [`stream`] whose chunks are concatenated).

        Args:
            prompt (`str` or `list[str]`): the prompt(s). Not empty; longer than `max_sequence_length` tokens is
                truncated with a warning.
            height (`int`, defaults to 480), width (`int`, defaults to 832): multiples of 16.
            num_frames (`int`, defaults to 81): `1 + 4·k` video frames making whole chunks of
                `num_frame_per_block` latent frames (81 = 21 latent frames = 7 chunks of 3).
            num_videos_per_prompt (`int`, defaults to 1): videos per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one, or one per video.
            latents (`torch.Tensor`, *optional*): the initial noise of every chunk, `(batch, 16, latent_frames,
                height // 8, width // 8)`; the re-noising between steps still draws from `generator`.
            prompt_embeds (`torch.Tensor`, *optional*): precomputed UMT5 embeddings instead of `prompt`.
            output_type (`str`, defaults to `"np"`): `"np"`, `"pil"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a [`StreamingHybridPipelineOutput`] or a tuple.
            denoising_step_list, timestep_shift, warp_denoising_step, context_noise: override the pipeline's
                configured schedule (see the class docstring) for this call.
            attention_kwargs (`dict`, *optional*): passed to the transformer (`scale` = LoRA scale).
            callback_on_step_end (`Callable`, *optional*): called after every denoising step of every chunk as
                `callback_on_step_end(pipe, step, timestep, callback_kwargs)`, `step = chunk·num_steps + i`; it may
                return replaced `latents` (the chunk's) or `prompt_embeds`. Setting `pipe._interrupt = True` (here or
                from another thread) stops after the current chunk: the chunk in progress still runs all its denoising
                steps, its cache write and its decode, and is the last one returned; set between two chunks of a
                [`stream`], no further chunk starts. (diffusers' one-shot pipelines skip the remaining steps instead; a
                chunk cut short would be noise.) `pipe.num_timesteps` is the number of steps per chunk of this call.
            callback_on_step_end_tensor_inputs (`list[str]`): tensors passed to the callback (`latents`,
                `prompt_embeds`).
            max_sequence_length (`int`, defaults to 512): text length of the UMT5 encoder.
            vae_frames_per_call (`int` or `None`, defaults to 1): see [`stream`].

        Examples:

        Returns:
            [`StreamingHybridPipelineOutput`] or `tuple`: `frames` as described in [`StreamingHybridPipelineOutput`].
        """
        if num_frames is None:
            raise ValueError("`num_frames`=None would never end; use `stream(...)` for unbounded generation.")
        session = self.stream(
            prompt=prompt, height=height, width=width, num_frames=num_frames,
            num_videos_per_prompt=num_videos_per_prompt, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, output_type=output_type, denoising_step_list=denoising_step_list,
            timestep_shift=timestep_shift, warp_denoising_step=warp_denoising_step, context_noise=context_noise,
            attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, vae_frames_per_call=vae_frames_per_call,
        )
        chunks = []
        with session, self.progress_bar(total=session.num_chunks) as progress_bar:
            for chunk in session:
                chunks.append(chunk.frames)
                progress_bar.update()
        video = concatenate_frames(chunks, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return StreamingHybridPipelineOutput(frames=video)

    # ------------------------------------------------------------------------------------------------------------
    # saving / loading
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        [`~DiffusionPipeline.from_pretrained`]. A local folder written by [`save_pretrained`] (the remote-code shim
        layout) loads without `trust_remote_code`: its only `.py` files are checked to be exactly our one-line
        re-exports of the installed `diffusers_hybrid` classes. Hub repos need `trust_remote_code=True`, and so does
        `DiffusionPipeline.from_pretrained` of any folder in that layout. A stock Wan repo loads too when a converted
        `transformer=` is passed; components passed explicitly replace the saved ones (with
        `DiffusionPipeline.from_pretrained(..., trust_remote_code=True, transformer=...)` too).

        The loaded pipeline's [`base_model`] is set when it is known without network: the `base_model` of a local
        folder's model card, a stock diffusers repo id the pipeline was assembled from, or the `base_model` of a Hub
        repo's card in the local cache (see [`~diffusers_hybrid.utils.hub_utils.known_base_model`]).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if "trust_remote_code" not in kwargs and os.path.isdir(path) and hub_utils.is_known_shim_layout(path):
            kwargs["trust_remote_code"] = True
        cache_dir, revision = kwargs.get("cache_dir"), kwargs.get("revision")
        # A component passed explicitly is type-checked against its `model_index.json` library, looked up in
        # `sys.modules` by name; for our shim entries that name is the shim's stem (aliased when this module loads).
        with hub_utils.shim_module_aliases():
            pipe = super().from_pretrained(path, **kwargs)
        pipe.base_model = hub_utils.known_base_model(path, cache_dir=cache_dir, revision=revision)
        return pipe

    def _card_configs(self) -> tuple[dict, dict]:
        transformer_config = dict(self.transformer.config) if self.transformer is not None else {}
        pipeline_config = {k: self.config[k] for k in
                           ("denoising_step_list", "timestep_shift", "warp_denoising_step", "context_noise")}
        return transformer_config, pipeline_config

    def _write_model_card(self, save_directory: str, repo_id: str, base_model: str | None = None,
                          overwrite: bool = False, hub_repo_id: str | None = None, token: str | None = None) -> None:
        """`README.md` of `save_directory`, the way diffusers' `load_or_create_model_card` treats cards: an existing
        card (the folder's, else, when pushing, the Hub repo's) is kept as written, only `library_name` is filled in
        when missing; otherwise (or with `overwrite`) a card is generated from the configs."""
        path = os.path.join(save_directory, "README.md")
        card = None
        if not overwrite:
            if os.path.isfile(path):
                try:
                    card = ModelCard.load(path)
                except Exception as e:  # noqa: BLE001 - a card we cannot parse is still the author's: keep it
                    logger.warning(f"Kept {path} as it is: it could not be read as a model card ({e}).")
                    return
            elif hub_repo_id is not None:
                card = hub_utils.load_hub_model_card(hub_repo_id, token=token)
        if card is not None:
            if hub_utils.populate_model_card(card) or not os.path.isfile(path):
                card.save(path)
            return
        transformer_config, pipeline_config = self._card_configs()
        base_model = base_model if base_model is not None else self.base_model
        hub_utils.make_model_card(
            repo_id, transformer_config, pipeline_config, base_model=base_model,
            temporal_scale=self.vae_scale_factor_temporal,
        ).save(path)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        remote_code_shims: bool = True,
        model_card: bool = True,
        base_model: str | None = None,
        overwrite_model_card: bool = False,
        **kwargs,
    ):
        r"""
        Saves the pipeline (safetensors only) in the remote-code shim layout, so that the folder loads with
        `StreamingHybridPipeline.from_pretrained(folder)` and with
        `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`, and writes a model card
        (`README.md`) unless there is one.

        Args:
            save_directory (`str` or `os.PathLike`): where to write.
            remote_code_shims (`bool`, defaults to `True`): write the one-line re-export files and point
                `model_index.json` to them (without them only `StreamingHybridPipeline.from_pretrained` of a local
                folder, after `import diffusers_hybrid`, can load it).
            model_card (`bool`, defaults to `True`): make sure the folder has a model card. Like diffusers'
                `load_or_create_model_card`, an existing `README.md` in `save_directory` (or, with `push_to_hub`, in
                the Hub repo) is kept as written (only `library_name` is added to its metadata when missing); a card is
                generated only when there is none.
            base_model (`str`, *optional*): the Hub repo id the model is built on, written as the generated card's
                `base_model`; defaults to [`base_model`] (`None` unless known: then the card names no base model).
            overwrite_model_card (`bool`, defaults to `False`): generate the card even if `README.md` exists.
            push_to_hub (`bool`, defaults to `False`): then upload the folder (`repo_id`, `token`, `private`,
                `commit_message`, `create_pr` in `kwargs`).
        """
        if not safe_serialization:
            raise ValueError("diffusers_hybrid saves safetensors only; `safe_serialization=False` is not supported.")
        save_directory = os.fspath(save_directory)
        repo_id = kwargs.pop("repo_id", None)
        commit_message = kwargs.pop("commit_message", None)
        private = kwargs.pop("private", None)
        create_pr = kwargs.pop("create_pr", False)
        token = kwargs.pop("token", None)
        super().save_pretrained(
            save_directory, safe_serialization=True, variant=variant, max_shard_size=max_shard_size, push_to_hub=False,
            **kwargs,
        )
        if remote_code_shims:
            hub_utils.write_remote_code_shims(save_directory, type(self).__name__)
        card_repo = repo_id or os.path.basename(os.path.normpath(save_directory))
        if model_card:
            self._write_model_card(save_directory, card_repo, base_model=base_model, overwrite=overwrite_model_card,
                                   hub_repo_id=card_repo if push_to_hub else None, token=token)
        if push_to_hub:
            return hub_utils.upload_pipeline_folder(
                save_directory, repo_id or card_repo, token=token, private=private,
                commit_message=commit_message or f"Upload {type(self).__name__}", create_pr=create_pr,
            )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        base_model: str | None = None,
        overwrite_model_card: bool = False,
        **kwargs,
    ):
        r"""Uploads the pipeline to the Hub through [`save_pretrained`] (same folder: shims, safetensors). The repo's
        existing model card is kept, as diffusers' `push_to_hub` does; without one (or with `overwrite_model_card`), a
        card is generated (`base_model` as in [`save_pretrained`])."""
        repo_id = hub_utils.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmpdir:
            self.save_pretrained(tmpdir, safe_serialization=safe_serialization, variant=variant, model_card=False)
            self._write_model_card(tmpdir, repo_id, base_model=base_model, overwrite=overwrite_model_card,
                                   hub_repo_id=repo_id, token=token)
            return hub_utils.upload_pipeline_folder(
                tmpdir, repo_id, token=token, private=private, create_repo_first=False,
                commit_message=commit_message or f"Upload {type(self).__name__}", create_pr=create_pr,
            )


def concatenate_frames(chunks: list, output_type: str):
    """Joins per-chunk outputs along time (the layouts of [`StreamingHybridPipelineOutput`])."""
    if not chunks:
        raise ValueError("No chunk was generated.")
    if output_type == "np":
        return np.concatenate(chunks, axis=1)
    if output_type == "pt":
        return torch.cat(chunks, dim=1)
    if output_type == "latent":
        return torch.cat(chunks, dim=2)
    return [sum((chunk[b] for chunk in chunks), []) for b in range(len(chunks[0]))]


__all__ = [
    "StreamingHybridChunk",
    "StreamingHybridPipeline",
    "StreamingHybridPipelineOutput",
    "StreamingHybridSession",
    "few_step_schedule",
]
