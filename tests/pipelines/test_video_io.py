# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""`utils.video_io.write_video` keeps the frame size (the pipeline makes multiples of 8, not of 16)."""

import numpy as np
import pytest

from diffusers_hybrid.utils.video_io import read_video, write_video

pytest.importorskip("imageio_ffmpeg")


@pytest.mark.parametrize("height, width", [(120, 136), (40, 32), (32, 32)])
def test_mp4_keeps_the_frame_size(tmp_path, height, width):
    """Audit: a 120x136 video came back 128x144 (imageio-ffmpeg resized it to multiples of 16)."""
    video = np.random.default_rng(0).random((9, height, width, 3), dtype=np.float32)
    path = write_video(video, str(tmp_path / "v.mp4"))
    back = read_video(path)
    assert back.shape == (9, height, width, 3)
    # lossy, but the same picture (a resize would not even have the same shape)
    assert np.abs(back.astype(np.float32) / 255 - video).mean() < 0.25


def test_mp4_with_an_odd_size_raises(tmp_path):
    video = np.random.default_rng(0).integers(0, 256, (3, 33, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"needs an even frame height and width, got 33x32"):
        write_video(video, str(tmp_path / "odd.mp4"))
    assert not (tmp_path / "odd.mp4").exists()
    write_video(video, str(tmp_path / "odd.gif"))  # gif and npy keep any size
    assert read_video(str(tmp_path / "odd.gif")).shape == (3, 33, 32, 3)
