# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The "shapes" domain: a procedural text-to-video world whose truth is known, and its evaluation suite.

- `domain`: attributes, caption grammar (`parse_caption`), deterministic renderer (`render_video`), splits;
- `dataset`: the domain as a `datasets` dataset;
- `analysis` + `metrics`: the evaluation suite (`score_video`), per time window;
- `classifier`: the small video classifier behind the Frechet distance and the learned adherence check;
- `text`: the locally built tokenizer and the small UMT5 configuration;
- `evaluate`: held-out evaluation of a `WanPipeline`; `video_io`: mp4/gif/npy reading and writing.

Command line: `python -m diffusers_hybrid.shapes --help`.
"""

from .domain import (
    BACKGROUND_COLORS,
    DIRECTIONS,
    FPS,
    HELD_OUT_PAIRS,
    OBJECT_COLORS,
    SHAPES,
    SIZES,
    SPEEDS,
    TEXTURES,
    ObjectAttrs,
    SceneAttrs,
    SceneSpec,
    parse_caption,
    render_batch,
    render_video,
    sample_scene,
    scene_specs,
)
from .metrics import METRICS, score_video, window_bounds
from .video_io import read_video, write_video

__all__ = [
    "BACKGROUND_COLORS",
    "DIRECTIONS",
    "FPS",
    "HELD_OUT_PAIRS",
    "METRICS",
    "OBJECT_COLORS",
    "SHAPES",
    "SIZES",
    "SPEEDS",
    "TEXTURES",
    "ObjectAttrs",
    "SceneAttrs",
    "SceneSpec",
    "parse_caption",
    "read_video",
    "render_batch",
    "render_video",
    "sample_scene",
    "scene_specs",
    "score_video",
    "window_bounds",
    "write_video",
]
