# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
import os

import numpy as np
import pytest

from diffusers_hybrid.utils import video_io


def _video(seed=0, frames=5, height=24, width=40):
    return np.random.default_rng(seed).random((frames, height, width, 3), dtype=np.float32)


def test_try_write_video_falls_back_to_gif_without_ffmpeg(tmp_path, monkeypatch):
    """The GPU image of this project has imageio without imageio-ffmpeg: a validation video must still be written."""
    imageio = pytest.importorskip("imageio")

    def no_ffmpeg(path, *args, **kwargs):
        with open(path, "wb") as f:  # like imageio: the file exists before the missing backend is noticed
            f.write(b"partial")
        raise RuntimeError("imageio-ffmpeg is not installed")

    monkeypatch.setattr(imageio, "get_writer", no_ffmpeg)
    video = _video()
    with pytest.warns(UserWarning, match="could not write"):
        written = video_io.try_write_video(video, str(tmp_path / "val" / "00.mp4"))
    assert written == str(tmp_path / "val" / "00.gif")
    assert not os.path.exists(tmp_path / "val" / "00.mp4")
    back = video_io.read_video(written)
    assert back.shape == (5, 24, 40, 3)
    # gif palettes quantise colours; the frames must still be the ones written
    assert np.abs(back.astype(np.int16) - video_io.to_uint8(video).astype(np.int16)).mean() < 24


def test_try_write_video_last_resort_npy_is_exact(tmp_path, monkeypatch):
    imageio = pytest.importorskip("imageio")

    def broken(*args, **kwargs):
        raise RuntimeError("no writer")

    monkeypatch.setattr(imageio, "get_writer", broken)
    monkeypatch.setattr(imageio, "mimsave", broken)
    video = _video(seed=1)
    with pytest.warns(UserWarning):
        written = video_io.try_write_video(video, str(tmp_path / "a.mp4"))
    assert written.endswith("a.npy")
    np.testing.assert_array_equal(video_io.read_video(written), video_io.to_uint8(video))


def test_to_uint8_rejects_wrong_layout():
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        video_io.to_uint8(np.zeros((3, 8, 8), dtype=np.float32) + 0.5)
