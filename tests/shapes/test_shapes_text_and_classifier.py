# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The local tokenizer and UMT5 text side; the classifier's Frechet distance and plumbing (tiny, untrained)."""

import json

import numpy as np
import pytest
import torch

from diffusers_hybrid.shapes.classifier import (
    HEADS,
    ShapesVideoClassifier,
    frechet_distance,
    labels_of,
    load_classifier,
)
from diffusers_hybrid.shapes.domain import SceneSpec, parse_caption, render_video, vocabulary
from diffusers_hybrid.shapes.metrics import score_video
from diffusers_hybrid.shapes.text import TINY_UMT5_CONFIG, encode_prompts, save_text_components

PROMPT = "a large red circle bouncing quickly to the left and a small white star bouncing slowly upward on a dark blue checkered background"


def test_tokenizer_and_encoder_load_like_wan(tmp_path):
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    save_text_components(str(tmp_path), TINY_UMT5_CONFIG)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert (
        json.load(open(tmp_path / "tokenizer" / "tokenizer_config.json"))["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    ids = tok(PROMPT).input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT.replace("checkered", "checkered")
    assert all(tok.convert_tokens_to_ids(w) != tok.unk_token_id for w in vocabulary())
    assert tok("A Large RED circle").input_ids == tok("a large red circle").input_ids
    enc = UMT5EncoderModel.from_pretrained(str(tmp_path / "text_encoder"))
    assert enc.config.vocab_size >= len(tok)
    # our batched encoding equals the pipeline's (zeros after the prompt, padded to max_sequence_length)
    pipe = WanPipeline(tokenizer=tok, text_encoder=enc, vae=None, transformer=None, scheduler=None)
    prompts = [PROMPT, "", "a small red star bouncing slowly upward on a black background"]
    ours = encode_prompts(tok, enc, prompts, max_sequence_length=64)
    theirs = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=64, device=torch.device("cpu"))
    assert ours.shape == (3, 64, TINY_UMT5_CONFIG["d_model"])
    torch.testing.assert_close(ours, theirs)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    b = rng.normal(size=(400, 8))
    near = frechet_distance(a, b)
    far = frechet_distance(a, b + 2.0)
    assert 0 <= near < 0.5 and abs(far - 4 * 8) < 3  # the mean shift adds |2|^2 per dimension
    assert frechet_distance(a, b * 3) > near + 5


def test_labels_and_tiny_classifier_round_trip(tmp_path):
    attrs = parse_caption(PROMPT)
    lab = labels_of(attrs)
    assert set(lab) == set(HEADS)
    assert HEADS["color0"][lab["color0"]] == "red" and HEADS["shape1"][lab["shape1"]] == "star"  # canonical order
    assert HEADS["axis1"][lab["axis1"]] == "vertical" and lab["count"] == 1
    one = labels_of(parse_caption("a small red star bouncing slowly upward on a black background"))
    assert HEADS["color1"][one["color1"]] == "none"

    torch.manual_seed(0)
    model = ShapesVideoClassifier(width=8, feature_dim=16).eval()
    model.register_to_config(fd_floor=0.0, fd_scale=1.0)
    model.save_pretrained(str(tmp_path / "cls"))
    loaded = load_classifier(str(tmp_path / "cls"))
    for p, q in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(p, q)
    video = render_video(SceneSpec(attrs, 3), 20)
    feats = loaded.video_features(video)
    assert feats.shape == (len(loaded.clip_starts(20)), 16) == (2, 16)  # clips start at frames 0 and 4
    acc = loaded.window_adherence(video, attrs, [(0, 20)])
    assert len(acc) == 1 and 0.0 <= acc[0] <= 1.0
    assert loaded.fd_score(0.0) == 1.0 and loaded.fd_score(1.0) == pytest.approx(np.exp(-1.0))
    rep = score_video(video, attrs, classifier=loaded, fd_reference=2)
    assert {"classifier_adherence", "fd", "distribution"} <= set(rep["scores"])
    assert all(0 <= v <= 1 for v in rep["scores"].values())
    assert load_classifier(str(tmp_path / "missing")) is None


def _tiny_classifier():
    torch.manual_seed(0)
    model = ShapesVideoClassifier(width=8, feature_dim=16).eval()
    model.register_to_config(fd_floor=0.0, fd_scale=1.0)
    return model


def test_fd_reference_seeds_are_never_a_videos_own(monkeypatch):
    """#12: the FD's reference renders use seeds no default render uses (2**31 on; `scene_specs` draws below 2**31,
    renders default to small seeds); they used to be seeds 1..K, so a render with seed 1 was its own reference."""
    from diffusers_hybrid.shapes import classifier as cls_module

    seeds = []
    real_render = cls_module.render_video

    def spy(spec, *args, **kwargs):
        seeds.append(spec.seed)
        return real_render(spec, *args, **kwargs)

    monkeypatch.setattr(cls_module, "render_video", spy)
    attrs = parse_caption("a small yellow square bouncing slowly to the right on a gray checkered background")
    model = _tiny_classifier()
    fd = model.video_fd(render_video(SceneSpec(attrs, 1), 20), attrs, num_reference=3)
    assert np.isfinite(fd) and fd >= 0
    assert sorted(set(seeds)) == [2**31, 2**31 + 1, 2**31 + 2] == cls_module.fd_reference_seeds(3)


def test_classifier_features_are_computed_in_bounded_batches():
    """#9: clip features of a long video (and the references rendered batch by batch) equal the one-batch result."""
    model = _tiny_classifier()
    attrs = parse_caption(PROMPT)
    video = render_video(SceneSpec(attrs, 2), 60)
    whole = model.video_features(video, batch_size=1000)
    assert whole.shape == (len(model.clip_starts(60)), 16)
    np.testing.assert_allclose(model.video_features(video, batch_size=3), whole, rtol=1e-5, atol=1e-6)
    bounds = [(0, 16), (16, 32), (32, 48), (48, 60)]
    assert model.window_adherence(video, attrs, bounds, batch_size=1) == model.window_adherence(video, attrs, bounds)
    short = render_video(SceneSpec(attrs, 2), 5)  # shorter than a clip: the last frame repeats
    assert model.clips(short, [0]).shape[2] == 16


def test_train_classifier_on_all_combinations(tmp_path, monkeypatch):
    """`train_split="all"` puts held-out (colour, shape) pairs in every batch; the default never does."""
    from diffusers_hybrid.shapes import classifier as cls_mod
    from diffusers_hybrid.shapes.domain import HELD_OUT_PAIRS

    seen = []
    real_batch = cls_mod._batch

    def recording_batch(specs, starts, device, resolution=128):
        seen.append([any((o.color, o.shape) in HELD_OUT_PAIRS for o in s.attrs.objects) for s in specs])
        return real_batch(specs, starts, device, resolution=resolution)

    monkeypatch.setattr(cls_mod, "_batch", recording_batch)
    kwargs = dict(steps=2, batch_size=6, width=8, feature_dim=16, device="cpu", calibration_prompts=2,
                  calibration_frames=17, log_every=0, heldout_clips=3)
    m = cls_mod.train_classifier(str(tmp_path / "all"), train_split="all", **kwargs)
    train_batches, heldout_batch = seen[:2], seen[2]
    assert all(sum(b) >= 3 for b in train_batches)  # the second half of each batch is of the held-out split
    assert all(heldout_batch) and m["train_split"] == "all" and m["heldout_clips"] == 3
    card = (tmp_path / "all" / "README.md").read_text()
    assert "--train-split all" in card and "were seen in training" in card
    assert load_classifier(str(tmp_path / "all")) is not None

    seen.clear()
    m = cls_mod.train_classifier(str(tmp_path / "train"), **kwargs)
    assert not any(any(b) for b in seen[:2]) and m["train_split"] == "train"
    assert "never seen in training" in (tmp_path / "train" / "README.md").read_text()
    with pytest.raises(ValueError, match="train_split"):
        cls_mod.train_classifier(str(tmp_path / "bad"), train_split="heldout", **kwargs)
