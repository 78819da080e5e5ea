# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The evaluation suite discriminates: real videos score near perfect; each corruption is caught by the metric
meant to catch it (and only clearly there)."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusers_hybrid.shapes.domain import ObjectAttrs, SceneAttrs, SceneSpec, render_video
from diffusers_hybrid.shapes.metrics import ADHERENCE, TEMPORAL, score_video, window_bounds
from diffusers_hybrid.shapes.video_io import read_video, write_video

T = 48
ONE = "a large red circle bouncing quickly toward the lower right on a dark blue background"
SLOW = "a small yellow square bouncing slowly to the right on a gray checkered background"
TWO = "a large white star bouncing slowly upward and a small green triangle bouncing quickly to the left on a brown checkered background"


def render(prompt, seed=1, frames=T, starts=None, **changes):
    spec = SceneSpec.from_prompt(prompt, seed)
    objs = list(spec.attrs.objects)
    if changes:
        objs[0] = dataclasses.replace(objs[0], **changes)
    spec = SceneSpec(
        SceneAttrs(spec.attrs.background, spec.attrs.texture, tuple(objs)), spec.seed, starts or spec.starts
    )
    return render_video(spec, frames).numpy()


@pytest.fixture(scope="module")
def real_scores():
    return {p: score_video(render(p), p) for p in (ONE, SLOW, TWO)}


def test_real_videos_score_near_perfect(real_scores):
    for prompt, rep in real_scores.items():
        s = rep["scores"]
        for name in ADHERENCE + ("flicker", "persistence"):
            assert s[name] >= 0.95, (prompt, name, s[name])
        assert s["speed_constancy"] >= 0.9, (prompt, s["speed_constancy"])
        assert s["overall"] >= 0.97
        assert all(0.0 <= v <= 1.0 for v in s.values())
        assert [(w["start"], w["end"]) for w in rep["windows"]] == window_bounds(T) == [(0, 16), (16, 32), (32, 48)]
        for w in rep["windows"]:
            assert all(0.0 <= v <= 1.0 for v in w["scores"].values())
            assert w["scores"]["overall"] >= 0.95


def test_scores_survive_mp4_round_trip(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    path = str(tmp_path / "real.mp4")
    write_video(render(TWO), path)
    video = read_video(path)
    assert video.shape == (T, 128, 128, 3)
    s = score_video(video, TWO)["scores"]
    assert min(s[n] for n in ADHERENCE) >= 0.95 and s["flicker"] >= 0.95 and s["overall"] >= 0.95


def test_wrong_colour_is_caught_by_object_color(real_scores):
    s = score_video(render(ONE, color="green"), ONE)["scores"]
    assert s["object_color"] <= 0.05
    # the rest of the object is still judged right: shape, size, motion
    assert min(s["shape"], s["size"], s["direction"], s["speed"]) >= 0.9
    assert s["adherence"] < real_scores[ONE]["scores"]["adherence"] - 0.1
    s = score_video(render(ONE, shape="square"), ONE)["scores"]
    assert s["shape"] <= 0.05 and s["object_color"] >= 0.95
    s = score_video(render(ONE, size="small"), ONE)["scores"]
    assert s["size"] <= 0.05
    s = score_video(render(ONE), ONE.replace("dark blue", "brown"))["scores"]
    assert s["background_color"] == 0.0


def test_frozen_object_is_caught_by_speed_and_direction(real_scores):
    video = render(ONE)
    frozen = np.repeat(video[:1], T, axis=0)
    s = score_video(frozen, ONE)["scores"]
    assert s["speed"] == 0.0 and s["direction"] <= 0.05
    assert s["object_color"] >= 0.95 and s["flicker"] >= 0.95  # nothing else is wrong
    # a wrong speed class and a wrong direction, on their own
    assert score_video(render(ONE, speed="slowly"), ONE)["scores"]["speed"] <= 0.05
    # moving the opposite way from the middle of the frame: wrong until the first (wrong) bounce
    rep = score_video(render(SLOW, starts=((0.5, 0.5),), direction="to the left"), SLOW)
    assert rep["windows"][0]["scores"]["direction"] <= 0.05 and rep["scores"]["direction"] <= 0.5
    assert score_video(render(SLOW, starts=((0.5, 0.5),)), SLOW)["scores"]["direction"] >= 0.95
    assert score_video(render(SLOW, direction="upward"), SLOW)["scores"]["direction"] <= 0.1  # wrong axis


def test_spurious_object_is_caught_by_count(real_scores):
    spec = SceneSpec.from_prompt(SLOW, 1)
    extra = ObjectAttrs("circle", "purple", "small", "quickly", "downward")
    two = SceneSpec(
        SceneAttrs(spec.attrs.background, spec.attrs.texture, spec.attrs.objects + (extra,)),
        1,
        spec.starts + ((0.1, 0.2),),
    )
    s = score_video(render_video(two, T).numpy(), SLOW)["scores"]
    assert s["count"] <= 0.2 and real_scores[SLOW]["scores"]["count"] >= 0.95
    # a duplicate of the same colour is an extra object too: draw a second square in another colour, repaint it
    twin = dataclasses.replace(spec.attrs.objects[0], color="purple", direction="to the left")
    far = (0.05, 0.05 if spec.starts[0][1] > 0.5 else 0.95)  # the other half of the frame, moving along its edge
    scene = SceneSpec(
        SceneAttrs(spec.attrs.background, spec.attrs.texture, spec.attrs.objects + (twin,)), 1, spec.starts + (far,)
    )
    video = render_video(scene, T).numpy()
    purple = np.abs(video.astype(int) - np.array([165, 70, 225])).sum(-1) < 60
    video[purple] = np.array([240, 230, 40], dtype=np.uint8)  # yellow, like the captioned square
    s = score_video(video, SLOW)["scores"]
    assert s["count"] <= 0.2 and s["object_color"] >= 0.95


def test_vanishing_object_is_caught_by_persistence(real_scores):
    video = render(ONE)
    blank = render_video(
        SceneSpec(
            SceneAttrs("dark blue", "plain", (ObjectAttrs("circle", "red", "large", "quickly", "upward"),)),
            1,
            ((0.5, 0.5),),
        ),
        1,
    ).numpy()[0]
    bg_only = np.empty_like(blank)
    bg_only[:] = np.array([20, 35, 110], dtype=np.uint8)
    blinking = video.copy()
    blinking[1::4] = bg_only  # the object vanishes one frame in four
    s = score_video(blinking, ONE)["scores"]
    assert s["persistence"] <= 0.6 and real_scores[ONE]["scores"]["persistence"] >= 0.95


def test_flicker_is_caught_by_flicker(real_scores):
    video = render(TWO).astype(np.int16)
    rng = np.random.default_rng(0)
    noisy = np.clip(video + rng.integers(-25, 26, size=(T, 1, 1, 1)), 0, 255).astype(np.uint8)  # random brightness
    s = score_video(noisy, TWO)["scores"]
    assert s["flicker"] <= 0.4 and real_scores[TWO]["scores"]["flicker"] >= 0.95
    assert s["background_color"] >= 0.95 and s["object_color"] >= 0.9  # attributes are still read right
    strobe = np.clip(video + 10 * (-1) ** np.arange(T).reshape(T, 1, 1, 1), 0, 255).astype(
        np.uint8
    )  # +-10, alternating
    assert score_video(strobe, TWO)["scores"]["flicker"] <= 0.05


def test_gradual_colour_drift_shows_in_late_windows():
    a = render(ONE).astype(np.float32)
    b = render(ONE, color="blue").astype(np.float32)
    w = np.linspace(0, 1, T, dtype=np.float32).reshape(T, 1, 1, 1)
    drift = ((1 - w) * a + w * b).round().astype(np.uint8)
    rep = score_video(drift, ONE)
    first, last = rep["windows"][0]["scores"], rep["windows"][-1]["scores"]
    assert first["object_color"] >= 0.8 and last["object_color"] <= 0.1
    assert first["adherence"] > last["adherence"] + 0.1 and first["overall"] > last["overall"]
    # the background drifting to another colour is caught the same way
    c = render(ONE.replace("dark blue", "beige")).astype(np.float32)
    bgdrift = ((1 - w) * a + w * c).round().astype(np.uint8)
    rep = score_video(bgdrift, ONE)
    assert (
        rep["windows"][0]["scores"]["background_color"] >= 0.6
        and rep["windows"][-1]["scores"]["background_color"] == 0.0
    )


def test_jerky_motion_is_caught_by_speed_constancy(real_scores):
    video = render(ONE, frames=3 * T)
    idx = np.concatenate([np.arange(k * 6, k * 6 + 4).tolist() + [k * 6 + 3] * 2 for k in range(T // 6)])[
        :T
    ]  # go, stop
    s = score_video(video[idx], ONE)["scores"]
    assert s["speed_constancy"] <= 0.6 and real_scores[ONE]["scores"]["speed_constancy"] >= 0.9


def test_cli_render_and_score(tmp_path, repo_root):
    out = str(tmp_path / "v.npy")
    env = dict(os.environ, PYTHONPATH=os.path.join(repo_root, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "diffusers_hybrid.shapes"]
    r = subprocess.run(
        cmd + ["render", "--prompt", SLOW, "--frames", "20", "--seed", "4", "--out", out],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(out), render_video(SceneSpec.from_prompt(SLOW, 4), 20).numpy())
    r = subprocess.run(
        cmd + ["score", out, "--prompt", SLOW, "--classifier", "none"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert set(ADHERENCE + TEMPORAL) <= set(rep["scores"]) and rep["scores"]["overall"] >= 0.95
    assert len(rep["windows"]) == 1 and all(0 <= v <= 1 for v in rep["scores"].values())
