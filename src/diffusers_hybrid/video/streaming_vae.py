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

__all__ = ["StreamingWanDecoder"]


def _causal_conv_count(decoder: torch.nn.Module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in decoder.modules())


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

    Example:

    ```py
    >>> decoder = StreamingWanDecoder(vae)
    >>> for latents in latent_chunks:  # de-normalised latents (b, z_dim, f, h, w), see `denormalize`
    ...     video = decoder.decode(latents)  # (b, 3, 9 or 12, H, W) in [-1, 1]
    >>> decoder.reset()  # before another video
    ```
    """

    def __init__(self, vae, frames_per_call: int | None = 1):
        if frames_per_call is not None and frames_per_call < 1:
            raise ValueError(f"`frames_per_call` must be >= 1 or None, got {frames_per_call}.")
        if getattr(vae, "use_tiling", False):
            raise ValueError("StreamingWanDecoder does not support a VAE with tiling enabled; call `vae.disable_tiling()`.")
        self.vae = vae
        self.frames_per_call = frames_per_call
        self._num_convs = _causal_conv_count(vae.decoder)
        self._feat_cache: list = [None] * self._num_convs
        self.latent_frames_decoded = 0

    # ------------------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forgets the causal cache: the next chunk starts a new video."""
        self._feat_cache = [None] * self._num_convs
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

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """
        Decodes the next latent frames of the stream.

        Args:
            latents (`torch.Tensor` of shape `(batch_size, z_dim, num_frames, height, width)`): de-normalised latents
                (what `AutoencoderKLWan.decode` takes).

        Returns:
            `torch.Tensor` of shape `(batch_size, 3, num_output_frames, 8·height, 8·width)`, clamped to [-1, 1], in
            the VAE's dtype and device.
        """
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
            outputs.append(
                vae.decoder(x[:, :, start:stop], feat_cache=self._feat_cache, feat_idx=[0], first_chunk=first)
            )
            self.latent_frames_decoded += stop - start
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp_(-1.0, 1.0)

    def _move_cache(self, device) -> None:
        self._feat_cache = [t.to(device) if isinstance(t, torch.Tensor) else t for t in self._feat_cache]
