# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The generator: determinism, streaming consistency, grammar round trip, splits."""

import numpy as np
import pytest
import torch

from diffusers_hybrid.shapes.domain import (
    BACKGROUND_COLORS,
    DIRECTIONS,
    HELD_OUT_PAIRS,
    OBJECT_COLORS,
    SHAPES,
    ObjectAttrs,
    SceneAttrs,
    SceneSpec,
    parse_caption,
    render_batch,
    render_video,
    sample_scene,
    scene_specs,
    vocabulary,
)


def test_render_is_deterministic_and_seeded():
    spec = scene_specs("train", 3, base_seed=5)[2]
    a = render_video(spec, 12)
    b = render_video(SceneSpec.from_prompt(spec.prompt, spec.seed), 12)
    assert a.dtype == torch.uint8 and a.shape == (12, 128, 128, 3)
    assert torch.equal(a, b)  # the same prompt and seed give the same pixels
    c = render_video(SceneSpec.from_prompt(spec.prompt, spec.seed + 1), 12)
    assert not torch.equal(a, c)  # another seed moves the objects
    assert [s.prompt for s in scene_specs("train", 8, base_seed=5)] == [
        s.prompt for s in scene_specs("train", 8, base_seed=5)
    ]
    assert [s.prompt for s in scene_specs("train", 8, base_seed=5)] != [
        s.prompt for s in scene_specs("train", 8, base_seed=6)
    ]


def test_streaming_windows_match_one_long_render():
    spec = scene_specs("train", 1, base_seed=11)[0]
    full = render_video(spec, 40)
    for start in (0, 7, 25):
        assert torch.equal(render_video(spec, 15, start_frame=start), full[start : start + 15])
    # and far into a stream, the objects are still in view (bouncing)
    late = render_video(spec, 2, start_frame=100_000)
    bg = torch.tensor(BACKGROUND_COLORS[spec.attrs.background])
    assert (late.float() - bg).abs().sum(-1).gt(60).sum() > 50


def test_render_batch_matches_render_video_and_resolutions():
    specs = scene_specs("heldout", 3, base_seed=1)
    batch = render_batch(specs, 6, output="uint8", start_frames=[0, 3, 9])
    for i, (s, f) in enumerate(zip(specs, [0, 3, 9])):
        assert torch.equal(batch[i], render_video(s, 6, start_frame=f))
    x = render_batch(specs[:1], 5, 256, 160)
    assert x.shape == (1, 3, 5, 256, 160) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="output"):
        render_batch(specs[:1], 2, output="float")
    with pytest.raises(ValueError):
        render_video(specs[0], 4, 120, 128)  # not a multiple of 16
    with pytest.raises(ValueError):
        render_video(specs[0], 4, 272, 272)  # above 256


def test_render_batch_coverage_marks_the_objects():
    from diffusers_hybrid.shapes.domain import background_image

    specs = scene_specs("train", 4, base_seed=3, two_object_prob=1.0)
    video, coverage = render_batch(specs, 5, 144, 128, output="uint8", start_frames=[0, 2, 4, 6], return_coverage=True)
    assert torch.equal(video, render_batch(specs, 5, 144, 128, output="uint8", start_frames=[0, 2, 4, 6]))
    assert coverage.shape == (4, 1, 5, 144, 128) and coverage.min() >= 0 and coverage.max() <= 1
    for i, spec in enumerate(specs):
        bg = background_image(spec.attrs.background, spec.attrs.texture, 144, 128).round().clamp(0, 255)
        frames = video[i].float()  # [T, H, W, 3]
        cov = coverage[i, 0]
        # uncovered pixels are the background, fully covered ones an object colour (the top object's)
        assert torch.equal(frames[cov == 0], bg.expand_as(frames)[cov == 0])
        palette = torch.tensor([OBJECT_COLORS[o.color] for o in spec.attrs.objects], dtype=torch.float32)
        inside = frames[cov >= 0.999]
        assert len(inside) > 100
        assert (inside[:, None, :] - palette[None]).abs().amax(-1).amin(-1).max() <= 0.5
    vae_video, vae_cov = render_batch(specs, 5, 144, 128, return_coverage=True, start_frames=[0, 2, 4, 6])
    assert torch.equal(vae_cov, coverage) and vae_video.shape == (4, 3, 5, 144, 128)


def test_caption_attribute_round_trip():
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(300):
        attrs = sample_scene(rng, "train" if i % 2 else "heldout")
        cap = attrs.caption()
        assert parse_caption(cap) == attrs
        assert parse_caption("  " + cap.upper() + ". ") == attrs  # case, spaces and a final period are tolerated
        assert set(cap.split()) <= set(vocabulary())
        seen.update((o.shape, o.color, o.direction) for o in attrs.objects)
    assert {s for s, _, _ in seen} == set(SHAPES) and {c for _, c, _ in seen} == set(OBJECT_COLORS)
    assert {d for _, _, d in seen} == set(DIRECTIONS)
    example = "a large red circle bouncing quickly to the left on a dark blue background"
    attrs = parse_caption(example)
    assert attrs.background == "dark blue" and attrs.texture == "plain"
    assert attrs.objects == (ObjectAttrs("circle", "red", "large", "quickly", "to the left"),)
    for bad in (
        "a large red circle on a dark blue background",
        "a huge red circle bouncing quickly to the left on a black background",
        "",
    ):
        with pytest.raises(ValueError):
            parse_caption(bad)
    with pytest.raises(ValueError):  # two objects of one colour are outside the domain
        SceneAttrs("black", "plain", (ObjectAttrs("circle", "red", "large", "slowly", "upward"),) * 2)


def test_held_out_split_is_disjoint():
    train = scene_specs("train", 400, base_seed=3)
    held = scene_specs("heldout", 200, base_seed=3)
    assert all((o.color, o.shape) not in HELD_OUT_PAIRS for s in train for o in s.attrs.objects)
    assert all(any((o.color, o.shape) in HELD_OUT_PAIRS for o in s.attrs.objects) for s in held)
    assert {s.attrs.split for s in train} == {"train"} and {s.attrs.split for s in held} == {"heldout"}
    assert 0.3 < np.mean([len(s.attrs.objects) == 2 for s in train]) < 0.7


def test_dataset_splits():
    datasets = pytest.importorskip("datasets")
    from diffusers_hybrid.shapes.dataset import shapes_dataset

    ds = shapes_dataset("heldout", 2, num_frames=5)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 2
    row = ds[0]
    video = np.asarray(row["video"], dtype=np.uint8)
    spec = scene_specs("heldout", 1)[0]
    assert row["prompt"] == spec.prompt and np.array_equal(video, render_video(spec, 5).numpy())
    it = shapes_dataset("train", 2, num_frames=3, streaming=True)
    rows = list(it)
    assert len(rows) == 2 and np.asarray(rows[1]["video"]).shape == (3, 128, 128, 3)
