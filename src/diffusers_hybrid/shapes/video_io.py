# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Video reading and writing for the shapes domain: the package-wide helpers of `diffusers_hybrid.utils.video_io`."""

from ..utils.video_io import ffmpeg_available, read_video, to_uint8, try_write_video, write_video

__all__ = ["ffmpeg_available", "read_video", "to_uint8", "try_write_video", "write_video"]
