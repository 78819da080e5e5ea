# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The shapes domain as a Hugging Face `datasets` dataset (cached, or generated on the fly when streaming).

Splits: "train" never contains a held-out (colour, shape) pair; "heldout" always contains one (see
`domain.HELD_OUT_PAIRS`). Example i of a split is fully determined by (split, base_seed, i).
"""

from __future__ import annotations

import json

from .domain import SPLITS, SceneSpec, render_video, scene_specs


def _examples(
    split: str, num_videos: int, num_frames: int, height: int, width: int, base_seed: int, two_object_prob: float
):
    for spec in scene_specs(split, num_videos, base_seed=base_seed, two_object_prob=two_object_prob):
        yield example(spec, num_frames, height, width, split)


def example(spec: SceneSpec, num_frames: int, height: int = 128, width: int = 128, split: str | None = None) -> dict:
    return {
        "video": render_video(spec, num_frames, height, width).numpy(),
        "prompt": spec.prompt,
        "seed": spec.seed,
        "attributes": json.dumps(spec.attrs.to_dict()),
        "starts": json.dumps(spec.starts),
        "split": split or spec.attrs.split,
    }


def features(num_frames: int, height: int, width: int):
    from datasets import Array4D, Features, Value

    return Features(
        {
            "video": Array4D(shape=(num_frames, height, width, 3), dtype="uint8"),
            "prompt": Value("string"),
            "seed": Value("int64"),
            "attributes": Value("string"),
            "starts": Value("string"),
            "split": Value("string"),
        }
    )


def shapes_dataset(
    split: str = "train",
    num_videos: int = 1000,
    num_frames: int = 33,
    height: int = 128,
    width: int = 128,
    base_seed: int = 0,
    two_object_prob: float = 0.5,
    streaming: bool = False,
    cache_dir: str | None = None,
):
    """A `datasets.Dataset` (rendered once and cached by `datasets`) or, with `streaming=True`, a
    `datasets.IterableDataset` that renders each video when it is read. Columns: video (uint8 [T, H, W, 3]),
    prompt, seed, attributes (JSON of `SceneAttrs.to_dict()`), starts (JSON), split."""
    import datasets

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    kwargs = dict(
        split=split,
        num_videos=num_videos,
        num_frames=num_frames,
        height=height,
        width=width,
        base_seed=base_seed,
        two_object_prob=two_object_prob,
    )
    feats = features(num_frames, height, width)
    if streaming:
        return datasets.IterableDataset.from_generator(_examples, features=feats, gen_kwargs=kwargs)
    return datasets.Dataset.from_generator(_examples, features=feats, gen_kwargs=kwargs, cache_dir=cache_dir)


def shapes_dataset_dict(num_train: int = 1000, num_heldout: int = 200, **kwargs):
    """`datasets.DatasetDict` with the "train" and "heldout" splits."""
    import datasets

    return datasets.DatasetDict(
        {
            "train": shapes_dataset("train", num_train, **kwargs),
            "heldout": shapes_dataset("heldout", num_heldout, **kwargs),
        }
    )
