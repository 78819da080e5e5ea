# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Reading and writing videos (imageio + imageio-ffmpeg for mp4; .npy and .gif need no ffmpeg).

Shared by the training scripts, the shapes evaluation suite and the examples: validation videos must never cost a
training run because a codec is missing (`try_write_video`)."""

from __future__ import annotations

import os

import numpy as np
import torch

# Wan2.1 (and the shapes domain) generate 16 frames per second.
FPS = 16


def to_uint8(video) -> np.ndarray:
    """[T, H, W, 3] uint8 from a uint8 array/tensor, or floats in [0, 1] (diffusers' `output_type="np"`)."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    video = np.asarray(video)
    if video.dtype != np.uint8:
        video = (np.clip(video.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a video [T, H, W, 3], got shape {video.shape}")
    return video


def ffmpeg_available() -> bool:
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def write_video(video, path: str, fps: int = FPS, quality: float = 9.0) -> str:
    """
    Writes a video at its true frame size, chosen by the extension of `path`: `.npy` and `.gif` (no ffmpeg needed), or
    else (`.mp4`, ...) H.264 in yuv420p at high quality, which needs imageio-ffmpeg.

    Unlike `diffusers.utils.export_to_video` (and imageio's default `macro_block_size=16`), frames whose sides are not
    multiples of 16 are not resized: a 120x136 video is written, and reads back, as 120x136. yuv420p subsamples colour
    2x2, so the H.264 path needs even sides: an odd height or width raises a `ValueError` rather than being padded or
    rescaled behind the caller's back (crop or pad the frames, or write `.gif` / `.npy`). The pipeline's outputs are
    always multiples of 8.

    Args:
        video: `[T, H, W, 3]` uint8, or floats in [0, 1] (array or tensor).
        path (`str`): output file; its folder is created.
        fps (`int`, defaults to 16): frame rate.
        quality (`float`, defaults to 9.0): imageio-ffmpeg's quality (0-10), for the H.264 path.

    Returns:
        `str`: `path`.
    """
    frames = to_uint8(video)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".gif") and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise ValueError(
            f"H.264 (yuv420p) needs an even frame height and width, got {frames.shape[1]}x{frames.shape[2]} (height x "
            f"width) for {path!r}; crop or pad the frames, or write a .gif or .npy."
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == ".npy":
        np.save(path, frames)
    elif ext == ".gif":
        import imageio

        imageio.mimsave(path, list(frames), duration=1000.0 / fps, loop=0)
    else:
        import imageio

        # macro_block_size=1: no resizing to multiples of 16 (yuv420p is asked for explicitly: it needs even sides)
        with imageio.get_writer(path, fps=fps, quality=quality, macro_block_size=1, codec="libx264",
                                pixelformat="yuv420p") as w:
            for frame in frames:
                w.append_data(frame)
    return path


def read_video(path: str) -> np.ndarray:
    """[T, H, W, 3] uint8 from .mp4 (or anything imageio/ffmpeg reads), .gif or .npy."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return to_uint8(np.load(path))
    import imageio

    if ext == ".gif":
        frames = imageio.mimread(path)
        return np.stack([np.asarray(f)[..., :3] for f in frames]).astype(np.uint8)
    with imageio.get_reader(path) as r:
        frames = [np.asarray(f)[..., :3] for f in r]
    return np.stack(frames).astype(np.uint8)


def try_write_video(video, path: str, fps: int = FPS) -> str | None:
    """`write_video`, falling back to .gif and then .npy when a writer is missing; never raises (training scripts
    must not lose a run to a missing codec). Returns the path written, or None."""
    import warnings

    root = os.path.splitext(path)[0]
    for candidate in (path, root + ".gif", root + ".npy"):
        try:
            return write_video(video, candidate, fps=fps)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"could not write {candidate}: {e}")
            if os.path.exists(candidate):  # a writer that failed midway leaves a broken file behind
                os.remove(candidate)
    return None
