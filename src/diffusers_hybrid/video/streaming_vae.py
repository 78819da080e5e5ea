# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Chunk-by-chunk decoding with the Wan VAE that keeps its causal cache across chunks.

[`~diffusers.AutoencoderKLWan.decode`] clears the decoder's causal-convolution cache before and after every call, so
decoding a video chunk by chunk with it treats each chunk as the start of a new video (wrong frames, and 1 + 4(F-1)
frames per chunk instead of 4F). [`StreamingWanDecoder`] runs the same decoder modules on the same per-frame inputs but
owns the cache and keeps it between calls: decoding latent chunks one after the other gives exactly the frames of
decoding the whole latent video at once (bit for bit with `frames_per_call=1`, the order diffusers uses).

This relies on private parts of diffusers' Wan VAE (`decoder(x, feat_cache=, feat_idx=, first_chunk=)` and the count
of causal convolutions); `diffusers>=0.42.1,<0.44` is pinned for it and `tests/pipelines/test_streaming_vae.py`
checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.utils import logging

from ..ops import rms_norm_silu_with_cache, rms_norm_silu_with_cache_naive, triton_available

__all__ = ["StreamingWanDecoder"]

logger = logging.get_logger(__name__)

CACHE_FRAMES = 2  # a causal 3-tap temporal convolution sees the two frames before its input
NORM_KERNELS = (None, "reference", "triton", "compiled")
SUBPIXEL_UPSAMPLING = True  # the fused path's upsampling in sub-pixel form (benchmarks switch it off to compare)


def _causal_conv_count(decoder: torch.nn.Module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in decoder.modules())


def _is_2x_nearest(upsample) -> bool:
    """A nearest (or nearest-exact) 2x upsampling: output pixel (2i + a, 2j + b) copies input pixel (i, j)."""
    scale = upsample.scale_factor
    scale = tuple(scale) if isinstance(scale, (tuple, list)) else (scale, scale)
    return upsample.mode in ("nearest", "nearest-exact") and tuple(float(v) for v in scale) == (2.0, 2.0)


def _causal_conv(conv, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A `WanCausalConv3d` on an input that already starts with its cache frames (no temporal padding left): the
    spatial zero padding is the convolution's own, not a padded copy."""
    pad_w, _, pad_h = conv._padding[:3]
    return F.conv3d(x, weight, bias, conv.stride, (0, pad_h, pad_w))


# Rows (or columns) of a 3x3 kernel that act on input row i-1, i, i+1 of a 2x nearest-upsampled grid, folded onto the
# two input rows an output row of parity 0 (rows i-1, i) or parity 1 (rows i, i+1) reads.
_SUBPIXEL_FOLD = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def _subpixel_kernels(weight: torch.Tensor) -> list[list[torch.Tensor]]:
    """`conv3x3(nearest_upsample_2x(x))` equals, at output pixel (2i + a, 2j + b), a 2x2 convolution of `x` around
    (i, j): `kernels[a][b]` (out, in, 2, 2), folded in float32 from the 3x3 `weight`."""
    fold = torch.tensor(_SUBPIXEL_FOLD, dtype=torch.float32, device=weight.device)  # (parity, 2, 3)
    w = weight.float()
    return [[torch.einsum("pr,oirs,qs->oipq", fold[a], w, fold[b]).to(weight.dtype) for b in (0, 1)] for a in (0, 1)]


def _upsample_conv_subpixel(frames: torch.Tensor, kernels, bias: torch.Tensor | None, memory_format) -> torch.Tensor:
    """`conv3x3(nearest_upsample_2x(frames), padding=1)` without the upsampled tensor: four 2x2 convolutions on the
    input grid (4/9 of the multiply-adds), interleaved into the output."""
    n, _, h, w = frames.shape
    out = torch.empty((n, kernels[0][0].shape[0], 2 * h, 2 * w), dtype=frames.dtype, device=frames.device,
                      memory_format=memory_format)
    for a in (0, 1):
        for b in (0, 1):
            # padding 1 on a 2x2 kernel: output (h+1, w+1), whose [a:a+h, b:b+w] window reads input rows i-1+a, i+a
            out[:, :, a::2, b::2] = F.conv2d(frames, kernels[a][b], bias, padding=1)[:, :, a : a + h, b : b + w]
    return out


class _SteadyStateDecoder:
    """
    The Wan2.1 decoder's forward for a stream whose causal cache is full (every entry holds the last two time steps of
    its convolution's input): the same modules and weights and the same math as diffusers' `WanDecoder3d` with a
    cache, but written for streaming speed. The cache is updated in place (fixed buffers, so a CUDA graph can replay
    the call), each normalisation + SiLU writes the next convolution's input with the cache frames in front (one
    kernel: `ops.rms_norm_silu_with_cache`), convolutions pad spatially themselves, and each 2x nearest upsampling with
    its 3x3 convolution runs as four 2x2 convolutions on the input grid (sub-pixel form: the same sums without the
    upsampled tensor; other upsamplings run as diffusers does, in the VAE's dtype, which copies values exactly).
    Not bit-exact with diffusers: the normalisation is rounded once instead of three times, the folded kernels once.
    """

    def __init__(self, vae, feat_cache: list, memory_format, norm_silu):
        decoder = vae.decoder
        self.decoder = decoder
        self.memory_format = memory_format
        self.norm_silu = norm_silu  # (x, weight, cache, bias) -> cat([cache, silu(rms_norm(x + bias) * weight)], time)
        frame_format = torch.channels_last if memory_format == torch.channels_last_3d else torch.contiguous_format
        self.frame_format = frame_format  # of the per-frame 2D convolutions of the upsampling
        self._weights = {}
        self._norms = {}
        self._subpixel = {}
        # re-laid-out copies of the convolutions this forward runs itself (not the mid block's attention, which runs
        # as diffusers' module, nor the upsampling convolutions that run in sub-pixel form)
        for module in decoder.modules():
            if isinstance(module, torch.nn.Conv3d):
                self._weights[module] = module.weight.detach().contiguous(memory_format=memory_format)
            elif getattr(module, "mode", None) in ("upsample2d", "upsample3d"):
                upsample, conv = module.resample
                if SUBPIXEL_UPSAMPLING and _is_2x_nearest(upsample) and conv.kernel_size == (3, 3) and \
                        conv.padding == (1, 1):
                    self._subpixel[conv] = [[k.contiguous(memory_format=frame_format) for k in row]
                                            for row in _subpixel_kernels(conv.weight.detach())]
                else:
                    self._weights[conv] = conv.weight.detach().contiguous(memory_format=frame_format)
        # the entries diffusers' forward consumes, in its order: each is the last CACHE_FRAMES time steps of the input
        # of one causal convolution; copied once into fixed buffers that the calls below update in place
        self.cache = [
            t.contiguous(memory_format=memory_format).clone() for t in feat_cache if isinstance(t, torch.Tensor)
        ]
        self._index = 0

    @staticmethod
    def supports(vae, feat_cache: list) -> bool:
        """True for a Wan2.1-layout decoder (no residual up blocks, no patching) whose cache is full."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpBlock

        used = [t for t in feat_cache if t is not None]
        return (
            vae.config.patch_size is None
            and all(isinstance(block, WanUpBlock) for block in vae.decoder.up_blocks)
            and len(used) > 0
            and all(isinstance(t, torch.Tensor) and t.shape[2] == CACHE_FRAMES for t in used)
        )

    def _next_cache(self) -> torch.Tensor:
        cache = self.cache[self._index]
        self._index += 1
        return cache

    def _conv_with_cache(self, conv, x_with_cache: torch.Tensor, cache: torch.Tensor, add_bias: bool = True):
        out = _causal_conv(conv, x_with_cache, self._weights[conv], conv.bias if add_bias else None)
        cache.copy_(x_with_cache[:, :, -CACHE_FRAMES:])  # after the convolution has read the old frames
        return out

    def _input_conv(self, conv, x: torch.Tensor) -> torch.Tensor:
        cache = self._next_cache()
        return self._conv_with_cache(conv, torch.cat([cache, x], dim=2), cache)

    def _norm_conv(self, norm, conv, x: torch.Tensor, x_bias=None, add_bias: bool = True) -> torch.Tensor:
        """`conv(silu(norm(x + x_bias)))` with the cache; `add_bias=False` leaves `conv`'s bias to the caller."""
        cache = self._next_cache()
        weight = self._norms.get(norm)
        if weight is None:
            weight = self._norms[norm] = (norm.gamma.detach().float() * norm.scale).to(x.device)
        return self._conv_with_cache(conv, self.norm_silu(x, weight, cache, x_bias), cache, add_bias)

    def _residual_block(self, block, x: torch.Tensor) -> torch.Tensor:
        if isinstance(block.conv_shortcut, torch.nn.Conv3d):
            shortcut = F.conv3d(x, self._weights[block.conv_shortcut], block.conv_shortcut.bias)
        else:
            shortcut = x
        # conv1's bias goes into the next normalisation kernel instead of a pass of its own
        h = self._norm_conv(block.norm1, block.conv1, x, add_bias=False)
        h = self._norm_conv(block.norm2, block.conv2, h, x_bias=block.conv1.bias)
        return h.add_(shortcut)

    def _upsample(self, resample, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if resample.mode == "upsample3d":
            x = self._input_conv(resample.time_conv, x)  # (b, 2c, t, h, w): two output frames per input frame
            # frame 2t' + k of the output is channels [k*c, (k+1)*c) of input frame t': one copy into the frames
            frames = torch.empty((b * 2 * t, c, h, w), dtype=x.dtype, device=x.device, memory_format=self.frame_format)
            frames.view(b, t, 2, c, h, w).copy_(x.view(b, 2, c, t, h, w).permute(0, 3, 1, 2, 4, 5))
            t = 2 * t
        elif resample.mode == "upsample2d":
            frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # a view for channels-last
        else:
            raise ValueError(f"unexpected resample mode {resample.mode!r} in a Wan decoder")
        upsample, conv = resample.resample
        if conv in self._subpixel:
            frames = _upsample_conv_subpixel(frames, self._subpixel[conv], conv.bias, self.frame_format)
        else:
            frames = F.interpolate(frames, scale_factor=upsample.scale_factor, mode=upsample.mode)
            frames = F.conv2d(frames, self._weights[conv], conv.bias, padding=conv.padding)
        return frames.view(b, t, *frames.shape[1:]).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(b, z_dim, t, h, w) after `post_quant_conv` -> (b, 3, 4t, 8h, 8w), the cache advanced by t frames."""
        cudnn = torch.backends.cudnn
        # cuDNN's heuristics pick slower channels-last 3D kernels than its autotuning does (the first call of a shape
        # autotunes; later calls and graph captures reuse the choice)
        with cudnn.flags(enabled=cudnn.enabled, benchmark=True, benchmark_limit=cudnn.benchmark_limit,
                         deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder
        self._index = 0
        x = x.contiguous(memory_format=self.memory_format)
        x = self._input_conv(decoder.conv_in, x)
        mid = decoder.mid_block
        x = self._residual_block(mid.resnets[0], x)
        for attention, block in zip(mid.attentions, mid.resnets[1:]):
            x = attention(x)
            x = self._residual_block(block, x)
        for up_block in decoder.up_blocks:
            for block in up_block.resnets:
                x = self._residual_block(block, x)
            if up_block.upsamplers is not None:
                x = self._upsample(up_block.upsamplers[0], x)
        x = self._norm_conv(decoder.norm_out, decoder.conv_out, x)
        if self._index != len(self.cache):
            raise RuntimeError(f"the steady-state decoder used {self._index} of {len(self.cache)} cache entries")
        return x


class StreamingWanDecoder:
    """
    Streams latent chunks through an [`~diffusers.AutoencoderKLWan`] decoder, keeping the causal cache between calls.

    The first latent frame of the stream decodes to 1 video frame, every later latent frame to
    `vae.config.scale_factor_temporal` (4) frames: a first chunk of 3 latent frames gives 9 frames, each later one 12.
    Memory is constant: the cache holds the last two time steps of every causal convolution's input.

    Args:
        vae ([`~diffusers.AutoencoderKLWan`]): the VAE (its weights are used, never modified).
        frames_per_call (`int` or `None`, defaults to `1`): latent frames per decoder call. `1` is the order of
            `AutoencoderKLWan.decode` (bit-exact with it); `None` decodes each chunk in one call (the first latent
            frame of the stream alone), which is mathematically the same and faster on GPUs, but not bit-exact
            because convolutions see different batch shapes.
        fused (`bool`, defaults to `False`): once the causal cache is full (from the stream's second decoder call on),
            run the decoder through this module's own forward of the Wan2.1 decoder: the same modules, weights and
            math, with each normalisation + SiLU writing the next convolution's input (cache frames in front) in one
            kernel, no padded copies, and the cache updated in place, so that [`enable_cuda_graph`] can replay it.
            Equal to the diffusers path up to float rounding. Decoders other than Wan2.1's layout keep the diffusers
            path.
        norm_kernel (`str`, *optional*): the fused path's normalisation + SiLU: `"triton"` (one kernel; the default on
            CUDA), `"reference"` (PyTorch ops; the default elsewhere) or `"compiled"` (the reference through
            `torch.compile`).
        memory_format (`torch.memory_format`, *optional*): the fused path's activation and weight layout:
            `torch.channels_last_3d` (the default on CUDA, faster cuDNN convolutions) or `torch.contiguous_format`
            (the default elsewhere).
        enable_grad (`bool`, defaults to `False`): decode in the caller's grad mode instead of under `no_grad`, for
            training a decoder on streams (`training/train_shapes_vae.py --stream_frames`): each call's output
            backpropagates into the decoder, and the cache that earlier calls left is detached (truncated
            backpropagation through time). Not with `fused=True`.

    Example:

    ```py
    >>> decoder = StreamingWanDecoder(vae)
    >>> for latents in latent_chunks:  # de-normalised latents (b, z_dim, f, h, w), see `denormalize`
    ...     video = decoder.decode(latents)  # (b, 3, 9 or 12, H, W) in [-1, 1]
    >>> decoder.reset()  # before another video
    ```
    """

    def __init__(self, vae, frames_per_call: int | None = 1, fused: bool = False, norm_kernel: str | None = None,
                 memory_format: torch.memory_format | None = None, enable_grad: bool = False):
        if frames_per_call is not None and frames_per_call < 1:
            raise ValueError(f"`frames_per_call` must be >= 1 or None, got {frames_per_call}.")
        if getattr(vae, "use_tiling", False):
            raise ValueError("StreamingWanDecoder does not support a VAE with tiling enabled; call `vae.disable_tiling()`.")
        if norm_kernel not in NORM_KERNELS:
            raise ValueError(f"`norm_kernel` must be one of {NORM_KERNELS}, got {norm_kernel!r}.")
        if memory_format not in (None, torch.contiguous_format, torch.channels_last_3d):
            raise ValueError(f"`memory_format` must be None, torch.contiguous_format or torch.channels_last_3d, got "
                             f"{memory_format}.")
        if enable_grad and fused:
            raise ValueError("`enable_grad` trains through diffusers' decoder modules; the fused path is inference only.")
        self.vae = vae
        self.frames_per_call = frames_per_call
        self.enable_grad = bool(enable_grad)
        self.fused = bool(fused)
        self.norm_kernel = norm_kernel
        self.memory_format = memory_format
        self._num_convs = _causal_conv_count(vae.decoder)
        self._use_cuda_graph = False
        self._warned_offload = False
        self.graph_replays = 0
        self.reset()

    def enable_cuda_graph(self, enabled: bool = True) -> None:
        """Replays the fused path's decoder calls from a CUDA graph: the first steady-state call of a shape runs
        eagerly (it autotunes and compiles), the next one captures, and every later call of that shape replays. Only
        used with `fused=True` on CUDA."""
        if enabled and not self.fused:
            raise ValueError("CUDA-graph replay applies to the fused path; create the decoder with `fused=True`.")
        self._use_cuda_graph = bool(enabled)
        self._graph = None

    # ------------------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forgets the causal cache: the next chunk starts a new video."""
        self._feat_cache: list = [None] * self._num_convs
        self._steady: _SteadyStateDecoder | None = None
        self._graph = None
        self._graph_input = self._graph_output = None
        self._graph_warm_shape = None
        self.latent_frames_decoded = 0

    def nbytes(self) -> int:
        """Bytes held by the causal cache (constant after the second latent frame)."""
        return sum(t.numel() * t.element_size() for t in self._feat_cache if isinstance(t, torch.Tensor))

    def num_output_frames(self, latent_frames: int) -> int:
        """Video frames the next `latent_frames` latent frames decode to."""
        scale = self.vae.config.scale_factor_temporal or 4
        first = 1 if self.latent_frames_decoded == 0 else 0
        return latent_frames * scale - first * (scale - 1)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the transformer's normalised space -> the VAE's space (`x * std + mean`, per channel), as
        `WanPipeline` does before decoding."""
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return latents * std + mean

    # ------------------------------------------------------------------------------------------------------------
    def _calls(self, num_frames: int) -> list[tuple[int, int]]:
        """(start, stop) of the decoder calls for the next `num_frames` latent frames."""
        calls, start = [], 0
        if self.latent_frames_decoded == 0 and num_frames:
            calls.append((0, 1))  # the stream's first frame is special (no temporal upsampling)
            start = 1
        step = self.frames_per_call or max(1, num_frames - start)
        for s in range(start, num_frames, step):
            calls.append((s, min(num_frames, s + step)))
        return calls

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """
        Decodes the next latent frames of the stream (under `no_grad` unless the decoder was built with
        `enable_grad=True`).

        Args:
            latents (`torch.Tensor` of shape `(batch_size, z_dim, num_frames, height, width)`): de-normalised latents
                (what `AutoencoderKLWan.decode` takes).

        Returns:
            `torch.Tensor` of shape `(batch_size, 3, num_output_frames, 8·height, 8·width)`, clamped to [-1, 1], in
            the VAE's dtype and device.
        """
        if not self.enable_grad:
            with torch.no_grad():
                return self._decode(latents)
        self._feat_cache = [f.detach() if isinstance(f, torch.Tensor) else f for f in self._feat_cache]
        return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if latents.ndim != 5 or latents.shape[1] != vae.config.z_dim:
            raise ValueError(
                f"`latents` must be (batch, {vae.config.z_dim}, frames, height, width), got {tuple(latents.shape)}."
            )
        # model-offload hook (enable_model_cpu_offload): the decoder submodule is called directly, so trigger the
        # VAE's own hook as `AutoencoderKLWan.decode` does through `apply_forward_hook`
        hook = getattr(vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)
        if hook is not None and self.fused and not self._warned_offload:
            # the fused path keeps references to (re-laid-out) weights, which would pin them on the device
            logger.warning("StreamingWanDecoder(fused=True) does not run with model offloading; using diffusers' path.")
            self._warned_offload = True
        device = next(vae.decoder.parameters()).device
        latents = latents.to(device=device, dtype=vae.dtype)
        for entry in self._feat_cache:
            if isinstance(entry, torch.Tensor) and entry.device != device:
                self._move_cache(device)
                break

        x = vae.post_quant_conv(latents)  # 1x1x1 causal conv: no temporal state
        outputs = []
        for start, stop in self._calls(x.shape[2]):
            first = self.latent_frames_decoded == 0
            if (self.fused and self._steady is None and not first and hook is None
                    and _SteadyStateDecoder.supports(vae, self._feat_cache)):
                self._start_steady_state()
            if self._steady is not None:
                outputs.append(self._steady_call(x[:, :, start:stop]))
            else:
                outputs.append(
                    vae.decoder(x[:, :, start:stop], feat_cache=self._feat_cache, feat_idx=[0], first_chunk=first)
                )
            self.latent_frames_decoded += stop - start
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0) if self.enable_grad else out.clamp_(-1.0, 1.0)

    def _move_cache(self, device) -> None:
        if self._steady is not None:
            raise RuntimeError("the fused decoder's cache cannot move between devices mid-stream; call `reset()` first.")
        self._feat_cache = [t.to(device) if isinstance(t, torch.Tensor) else t for t in self._feat_cache]

    def _start_steady_state(self) -> None:
        cuda = next(self.vae.decoder.parameters()).is_cuda
        memory_format = self.memory_format or (torch.channels_last_3d if cuda else torch.contiguous_format)
        kernel = self.norm_kernel or ("triton" if cuda and triton_available() else "reference")
        if kernel == "compiled":
            norm_silu = torch.compile(rms_norm_silu_with_cache_naive)
        else:
            def norm_silu(x, weight, cache, bias=None):
                return rms_norm_silu_with_cache(x, weight, cache, bias=bias, kernel=kernel)
        self._steady = _SteadyStateDecoder(self.vae, self._feat_cache, memory_format, norm_silu)
        # the list keeps pointing at the live buffers (nbytes, and the entries' order)
        buffers = iter(self._steady.cache)
        self._feat_cache = [next(buffers) if isinstance(t, torch.Tensor) else t for t in self._feat_cache]

    def _steady_call(self, x: torch.Tensor) -> torch.Tensor:
        if not (self._use_cuda_graph and x.is_cuda):
            return self._steady(x)
        if self._graph is not None and self._graph_input.shape == x.shape:
            self._graph_input.copy_(x)
            self._graph.replay()
            self.graph_replays += 1
            return self._graph_output.clone()
        if self._graph_warm_shape != x.shape:  # the first call of a shape runs eagerly (autotuning, compiling)
            self._graph_warm_shape = x.shape
            return self._steady(x)
        # capture records the kernels without running them, so only the replay below advances the cache
        self._graph_input = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_output = self._steady(self._graph_input)
        self._graph = graph
        graph.replay()
        self.graph_replays += 1
        return self._graph_output.clone()
