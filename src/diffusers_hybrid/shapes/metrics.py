# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The evaluation suite: scores a video against its prompt, per time window and overall.

Every score is in [0, 1], higher is better:

prompt adherence (from `analysis.py`):
- `background_color`, `background_texture`: fraction of frames whose background matches the caption (a background
  farther than `BACKGROUND_MATCH_THRESHOLD` from every palette background matches none);
- `object_color`: fraction of (frame, object) pairs where an object of the caption's colour is seen;
- `shape`, `size`: fraction of (frame, object) pairs with the right shape / size (a missing object counts as wrong);
- `count`: fraction of frames with exactly the caption's number of objects (unknown-colour blobs included);
- `direction`: fraction of (transition, object) pairs whose motion has the caption's direction, where a reversal of
  one axis (or no displacement on it) is accepted only next to the wall the object was heading to (a bounce), judged
  from the caption's heading on the video's first frame;
- `speed`: fraction of (window, object) pairs whose median speed is in the caption's class (static counts wrong);

temporal quality:
- `flicker`: exp(-max(MAD - 1, 0) / 5) of the mean absolute frame difference (RGB units) outside the objects;
- `persistence`: fraction of transitions where every object continues (same colour, within a plausible jump) and
  none appears, vanishes or duplicates;
- `speed_constancy`: 1 / (1 + (CV / 0.15)^2) of the speed (over 4 frames, away from the walls of the axes of motion)
  between bounces;

distribution quality (needs the trained classifier, `classifier.py`):
- `classifier_adherence`: accuracy of the classifier's attribute predictions on each window;
- `fd` (whole video only; a window's `distribution` is its `classifier_adherence`): exp(-max(FD - floor, 0) / scale)
  of the Frechet distance between the classifier features of the video's clips and those of real renders of the same
  prompt (seeds 2**31 on, never a video's own); floor and scale are calibrated at training.

Occlusion: where two captioned objects touch (and where one is hidden behind the other), the metrics occlusion biases
are not judged; `coverage` says which fraction of each metric's units was judged. A metric judged nowhere in the video
scores 0 (except `speed_constancy`, left out), and in a window judged nowhere the video's value stands in for it in the
window's group means.

`adherence`, `temporal` and `distribution` average their group; `overall` averages the groups.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .analysis import (
    BG_NAMES,
    CHUNK_FRAMES,
    COL,
    COLOR_NAMES,
    NO_BACKGROUND,
    TEXTURE_THRESHOLD,
    analyze_video,
    size_of,
    speed_class,
)
from .domain import DIRECTIONS, FPS, SHAPES, SIZES, SPEED_VALUE, SPEEDS, SceneAttrs, parse_caption

WINDOW = 16
# Metrics that count as failed (0) for a video where occlusion left them unjudged everywhere: real objects start
# apart, so these always have frames to be judged on. speed_constancy needs 5 clean frames in a row away from the
# walls, which two real objects crossing back and forth can deny a whole video: it is left out there instead.
FAIL_IF_UNJUDGED = ("object_color", "shape", "size", "count", "direction", "speed", "persistence")
ADHERENCE = ("background_color", "background_texture", "object_color", "shape", "size", "count", "direction", "speed")
TEMPORAL = ("flicker", "persistence", "speed_constancy")
DISTRIBUTION = ("classifier_adherence", "fd")
GROUPS = {"adherence": ADHERENCE, "temporal": TEMPORAL, "distribution": DISTRIBUTION}
METRICS = ADHERENCE + TEMPORAL + DISTRIBUTION


def window_bounds(num_frames: int, window: int = WINDOW) -> list[tuple[int, int]]:
    """Consecutive windows of `window` frames; a last piece shorter than half a window joins the one before."""
    bounds = [(s, min(s + window, num_frames)) for s in range(0, num_frames, window)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < window / 2:
        bounds[-2] = (bounds[-2][0], bounds[-1][1])
        bounds.pop()
    return bounds


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


def _in_contact(a: np.ndarray, b: np.ndarray, margin: float = 3.0) -> bool:
    """Whether detections a and b (rows of `DET_COLUMNS`) touch: one is within 3 px of an object of the other's colour,
    and their bounding boxes, grown by `margin`, overlap (so that it is b itself, not another blob of its colour)."""
    ca, cb = int(a[COL["color"]]), int(b[COL["color"]])
    bits = (int(a[COL["touch_colors"]]) >> cb) & 1 or (int(b[COL["touch_colors"]]) >> ca) & 1
    if not bits:
        return False
    x0, x1, y0, y1 = COL["x0"], COL["x1"], COL["y0"], COL["y1"]
    return bool(
        a[x0] - margin < b[x1] and b[x0] - margin < a[x1] and a[y0] - margin < b[y1] and b[y0] - margin < a[y1]
    )


def _track(analysis, attrs: SceneAttrs):
    """Match caption objects to detections per frame. Returns per-object dicts of per-frame arrays, the number of
    objects detected per frame, and the frames where two captioned objects touch (`contact`).

    An object is `occluded` only where it touches another captioned object (the detection matched to it): that is
    the overlap the scene itself explains (two objects crossing). Contact with anything else (a blob of a colour the
    caption does not name, a fragment, a second blob of the other object's colour elsewhere) is not occlusion: the
    object is judged as it looks."""
    t = analysis.num_frames
    det = analysis.detections
    objs = attrs.objects
    cap_colors = {COLOR_NAMES.index(o.color) for o in objs}
    out = [
        {
            "present": np.zeros(t, bool),
            "color_ok": np.zeros(t, bool),
            "occluded": np.zeros(t, bool),
            "shape": np.full(t, -1),
            "size": np.full(t, -1),
            "center": np.full((t, 2), np.nan),
            "bbox": np.full((t, 4), np.nan),
        }
        for _ in objs
    ]
    frames = det[:, COL["frame"]].astype(int) if len(det) else np.zeros(0, int)
    side = min(analysis.height, analysis.width)
    last = [None] * len(objs)
    count = np.zeros(t, int)
    contact = np.zeros(t, bool)
    for f in range(t):
        rows = det[frames == f]
        count[f] = len(rows)
        claimed = set()
        order = list(range(len(objs)))
        match = {}
        for i in order:  # same colour: the largest component of that colour
            ci = COLOR_NAMES.index(objs[i].color)
            cand = [j for j in range(len(rows)) if int(rows[j, COL["color"]]) == ci]
            if cand:
                j = max(cand, key=lambda j: rows[j, COL["area"]])
                match[i] = (j, True)
                claimed.add(j)
        for i in order:  # otherwise: an object of a colour the caption does not name, the nearest to the last position
            if i in match:
                continue
            cand = [j for j in range(len(rows)) if j not in claimed and int(rows[j, COL["color"]]) not in cap_colors]
            if not cand:
                continue
            if last[i] is not None:
                j = min(cand, key=lambda j: np.hypot(*(rows[j, [COL["cx"], COL["cy"]]] - last[i])))
            else:
                j = max(cand, key=lambda j: rows[j, COL["area"]])
            match[i] = (j, False)
            claimed.add(j)
        for i, (j, ok) in match.items():
            r = rows[j]
            o = out[i]
            o["present"][f] = True
            o["color_ok"][f] = ok
            o["shape"][f] = int(r[COL["shape"]])
            o["size"][f] = size_of(max(r[COL["x1"]] - r[COL["x0"]], r[COL["y1"]] - r[COL["y0"]]), side)
            o["center"][f] = r[[COL["cx"], COL["cy"]]]
            o["bbox"][f] = r[[COL["x0"], COL["x1"], COL["y0"], COL["y1"]]]
            last[i] = o["center"][f]
        matched = sorted(match)
        for a_i, i in enumerate(matched):  # two captioned objects crossing: both may be reshaped or split there
            for k in matched[a_i + 1 :]:
                if _in_contact(rows[match[i][0]], rows[match[k][0]]):
                    out[i]["occluded"][f] = out[k]["occluded"][f] = True
                    contact[f] = True
    for o in out:  # hidden behind another object: a gap in the track whose neighbours overlap another object
        o["hidden"] = _hidden_frames(o["present"], o["occluded"])
    return out, count, contact


def _hidden_frames(present: np.ndarray, occluded: np.ndarray) -> np.ndarray:
    """Frames of runs where the object is missing and every neighbouring frame of the run (before and/or after)
    shows it overlapping another object: it is behind that object, which the renderer allows for two large ones."""
    t = len(present)
    hidden = np.zeros(t, bool)
    f = 0
    while f < t:
        if present[f]:
            f += 1
            continue
        e = f
        while e < t and not present[e]:
            e += 1
        sides = ([occluded[f - 1]] if f > 0 else []) + ([occluded[e]] if e < t else [])
        if sides and all(sides):
            hidden[f:e] = True
        f = e
    return hidden


def _sign(v: float, dz: float) -> int:
    return 0 if abs(v) < dz else (1 if v > 0 else -1)


def _motion(track: dict, obj, height: int, width: int):
    """Per transition: direction correctness (1/0/nan), speed sample (px/frame or nan), near-wall flag."""
    t = len(track["present"])
    side = min(height, width)
    slow, fast = SPEED_VALUE["slowly"] * side, SPEED_VALUE["quickly"] * side
    dz = 0.35 * slow
    margin = 2 * fast + 2
    state = list(DIRECTIONS[obj.direction])
    dir_ok = np.full(max(t - 1, 0), np.nan)
    speed = np.full(max(t - 1, 0), np.nan)
    speed_any = np.full(max(t - 1, 0), np.nan)  # also next to walls (used when a window has nothing else)
    near_wall = np.zeros(t, bool)
    bb = track["bbox"]
    with np.errstate(invalid="ignore"):
        lo = np.stack([bb[:, 0] <= margin, bb[:, 2] <= margin], 1)  # near left / top wall
        hi = np.stack([bb[:, 1] >= width - margin, bb[:, 3] >= height - margin], 1)  # near right / bottom wall
    # Only the walls of the axes the object moves along matter: an object gliding along the top edge never bounces
    # there, and its speed between bounces is measured as anywhere else.
    moving = np.array(DIRECTIONS[obj.direction]) != 0
    near_wall = ((lo | hi) & moving).any(1)
    # Frames since the last judged transition (occluded or missing ones are not judged) may hide a bounce: a reversal
    # is accepted if the object was next to the wall ahead at any of them, or anywhere if it went missing.
    since = [f0 for f0 in range(0)]
    missing_gap = False
    for f in range(t - 1):
        p0, p1 = track["present"][f], track["present"][f + 1]
        since.append(f)
        if not (p0 and p1):
            if not (track["hidden"][f] or track["hidden"][f + 1]):
                dir_ok[f] = 0.0
            missing_gap = True
            continue
        if track["occluded"][f] or track["occluded"][f + 1]:
            continue
        frames = since + [f + 1]
        v = track["center"][f + 1] - track["center"][f]
        speed_any[f] = float(np.hypot(*v))
        if not (near_wall[f] or near_wall[f + 1]):
            speed[f] = speed_any[f]
        ok = True
        for a in (0, 1):
            o = _sign(v[a], dz)
            s = state[a]
            if s == 0:
                ok &= o == 0
                continue
            ahead = missing_gap or (hi if s > 0 else lo)[frames, a].any()  # next to the wall it was heading to
            if o == -s and ahead:
                state[a] = o  # a bounce
            elif o == 0 and ahead:
                # The bounce happened within this transition (the displacement cancels out): the object now heads
                # away from that wall, so a frozen object passes at most this one transition.
                state[a] = -s
            else:
                ok &= o == s
        dir_ok[f] = float(ok)
        since, missing_gap = [], False
    return dir_ok, speed, near_wall, speed_any


def _constancy_samples(track: dict, near_wall: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, int]:
    """Speeds over 4 frames, |c[f+2] - c[f-2]| / 4, for centres f in [lo, hi) with a clean 5-frame neighbourhood
    (seen, not touching another captioned object, away from the walls of its axes of motion); and how many centres
    would have one if occlusion were ignored (what the window could have judged)."""
    t = len(track["present"])
    good = track["present"] & ~track["occluded"] & ~near_wall
    possible = (track["present"] | track["hidden"]) & ~near_wall
    out, n_possible = [], 0
    for f in range(max(lo, 2), min(hi, t - 2)):
        n_possible += bool(possible[f - 2 : f + 3].all())
        if good[f - 2 : f + 3].all():
            out.append(np.hypot(*(track["center"][f + 2] - track["center"][f - 2])) / 4)
    return np.asarray(out), n_possible


def _persistence(analysis, max_jump: float, overlap: np.ndarray) -> np.ndarray:
    det = analysis.detections
    t = analysis.num_frames
    frames = det[:, COL["frame"]].astype(int) if len(det) else np.zeros(0, int)
    per = [det[frames == f] for f in range(t)]
    ok = np.zeros(max(t - 1, 0))
    for f in range(t - 1):
        a, b = per[f], per[f + 1]
        if overlap[f] or overlap[f + 1]:
            ok[f] = np.nan
            continue
        if len(a) != len(b):
            continue
        used, good = set(), True
        for r in a:
            cand = [
                j
                for j in range(len(b))
                if j not in used
                and b[j, COL["color"]] == r[COL["color"]]
                and np.hypot(b[j, COL["cx"]] - r[COL["cx"]], b[j, COL["cy"]] - r[COL["cy"]]) <= max_jump
            ]
            if not cand:
                good = False
                break
            used.add(min(cand, key=lambda j: np.hypot(b[j, COL["cx"]] - r[COL["cx"]], b[j, COL["cy"]] - r[COL["cy"]])))
        ok[f] = float(good)
    return ok


def _group_scores(scores: dict, fill: dict | None = None) -> dict:
    """Adds the group means and `overall` to `scores`. `fill`: values that stand in for metrics missing from `scores`
    in the group means only (in a window, a metric that could not be judged there: the whole video's value)."""
    out = dict(scores)
    both = {**(fill or {}), **scores}
    groups = {}
    for g, names in GROUPS.items():
        vals = [both[n] for n in names if n in both]
        if vals:
            groups[g] = float(np.mean(vals))
    out.update(groups)
    if groups:
        out["overall"] = float(np.mean(list(groups.values())))
    return out


def _clean(d: dict) -> dict:
    return {k: float(min(1.0, max(0.0, v))) for k, v in d.items() if v is not None and not math.isnan(v)}


def _judged(values: np.ndarray) -> tuple[float, float] | None:
    """(mean over the judged units, fraction of units judged) of per-unit values, NaN marking a unit left unjudged by
    occlusion; None where there are no units."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    ok = ~np.isnan(values)
    return (float(values[ok].mean()) if ok.any() else float("nan")), float(ok.mean())


def score_video(
    video,
    prompt: str | SceneAttrs,
    *,
    window: int = WINDOW,
    classifier=None,
    fd_reference: int = 6,
    device=None,
    chunk_frames: int = CHUNK_FRAMES,
) -> dict:
    """Score a video [T, H, W, 3] (uint8 or 0..255 values; an array, a tensor or a numpy memmap) against its prompt.

    Returns a JSON-able dict with `scores` (whole video), `coverage` (for each metric that occlusion can leave
    unjudged: the fraction of its units that were judged), `windows` (per time window: `start`, `end`, `scores`,
    `coverage`) and `measurements` (raw values behind the scores). `classifier`: a `ShapesVideoClassifier` (or None
    to skip the distribution metrics); `fd_reference`: how many real renders of the prompt form the Frechet
    distance's reference set; `chunk_frames`: frames analysed at a time (bounds memory; the scores do not depend on
    it).

    Frames where two captioned objects touch are not judged on the metrics that occlusion biases. A metric that could
    not be judged anywhere in the video scores 0 (failed) for the video; in a window where it could not be judged,
    the whole video's value stands in for it in the window's group means, and the window's `scores` leave it out."""
    attrs = parse_caption(prompt) if isinstance(prompt, str) else prompt
    attrs = attrs.canonical()
    analysis = analyze_video(video, device=device, chunk_frames=chunk_frames)
    t, h, w = analysis.num_frames, analysis.height, analysis.width
    side = min(h, w)
    fast = SPEED_VALUE["quickly"] * side
    tracks, count, overlap = _track(analysis, attrs)
    n_obj = len(attrs.objects)
    for tr in tracks:
        overlap |= tr["hidden"]

    per_frame = {
        "background_color": (analysis.bg_index == BG_NAMES.index(attrs.background)).astype(float),
        "background_texture": (
            (analysis.texture_amplitude >= TEXTURE_THRESHOLD) == (attrs.texture == "checkered")
        ).astype(float),
    }
    color = np.stack([np.where(tr["hidden"], np.nan, tr["color_ok"].astype(float)) for tr in tracks], 1)
    shape = np.full((t, n_obj), np.nan)
    size = np.full((t, n_obj), np.nan)
    for i, (tr, obj) in enumerate(zip(tracks, attrs.objects)):
        vis = tr["present"] & ~tr["occluded"]
        missing = ~tr["present"] & ~tr["hidden"]
        shape[missing, i] = 0.0
        size[missing, i] = 0.0
        shape[vis, i] = (tr["shape"][vis] == SHAPES.index(obj.shape)).astype(float)
        size[vis, i] = (tr["size"][vis] == SIZES.index(obj.size)).astype(float)
    # Per-unit values, NaN where a unit is left unjudged (touching another captioned object, or hidden behind it).
    units = {
        "object_color": color,
        "shape": shape,
        "size": size,
        "count": np.where(overlap, np.nan, (count == n_obj).astype(float)),
    }
    motion = [_motion(tr, obj, h, w) for tr, obj in zip(tracks, attrs.objects)]
    direction = np.stack([m[0] for m in motion], 1) if t > 1 else np.zeros((0, n_obj))
    flicker_mad = analysis.flicker_mad
    flicker = np.exp(-np.maximum(flicker_mad - 1.0, 0.0) / 5.0)
    persistence = _persistence(analysis, 1.5 * fast + 0.04 * side, overlap)

    windows = []
    speeds_measured = []
    for s, e in window_bounds(t, window):
        sc = {k: _nanmean(v[s:e]) for k, v in per_frame.items()}
        te = min(e, t - 1)  # transitions f -> f + 1 with f in the window
        judged = {k: _judged(v[s:e]) for k, v in units.items()}
        if te > s:
            sc["flicker"] = _nanmean(flicker[s:te])
            judged["direction"] = _judged(direction[s:te])
            judged["persistence"] = _judged(persistence[s:te])
        spd, const, measured = [], [], []
        n_const = 0
        for i, (tr, obj) in enumerate(zip(tracks, attrs.objects)):
            samples = motion[i][1][s:te]
            samples = samples[~np.isnan(samples)]
            if not len(samples):
                samples = motion[i][3][s:te]
                samples = samples[~np.isnan(samples)]
            if len(samples):
                med = float(np.median(samples))
                measured.append(med)
                spd.append(float(speed_class(med, side) == SPEEDS.index(obj.speed) + 1))
            elif te > s and not (tr["occluded"][s:e] | tr["hidden"][s:e]).any():
                spd.append(0.0)  # missing, or never seen in two consecutive frames, and not for occlusion
                measured.append(None)
            c, possible = _constancy_samples(tr, motion[i][2], s, e)
            if len(c) >= 3:
                mean = c.mean()
                if mean < 0.25 * SPEED_VALUE["slowly"] * side:
                    const.append(1.0)
                else:
                    const.append(1.0 / (1.0 + (c.std() / mean / 0.15) ** 2))
            n_const += len(c) >= 3 or possible >= 3
        if te > s:  # one unit per object
            judged["speed"] = (float(np.mean(spd)) if spd else float("nan")), len(spd) / n_obj
        if n_const:  # objects with enough frames away from walls (if occlusion were ignored)
            judged["speed_constancy"] = (float(np.mean(const)) if const else float("nan")), len(const) / n_const
        cov = {}
        for k, jv in judged.items():
            if jv is None:
                continue
            cov[k] = jv[1]
            if jv[1] > 0:
                sc[k] = jv[0]
        speeds_measured.append(measured)
        windows.append({"start": s, "end": e, "scores": sc, "coverage": cov})

    if classifier is not None:
        cls = classifier.window_adherence(video, attrs, [(wd["start"], wd["end"]) for wd in windows], device=device)
        for wd, acc in zip(windows, cls):
            wd["scores"]["classifier_adherence"] = acc
    # Whole-video scores: means of the per-window values weighted by the frames each window judged (frames x
    # coverage); a metric that had units but none judged anywhere counts as failed (0).
    frames_w = np.array([wd["end"] - wd["start"] for wd in windows], dtype=float)
    total, coverage = {}, {}
    for name in METRICS:
        vals = np.array([wd["scores"].get(name, np.nan) for wd in windows], dtype=float)
        has = np.array([name in wd["coverage"] for wd in windows], dtype=bool)
        weights = frames_w * np.array([wd["coverage"].get(name, 1.0) for wd in windows], dtype=float)
        m = ~np.isnan(vals) & (weights > 0)
        if m.any():
            total[name] = float((vals[m] * weights[m]).sum() / weights[m].sum())
        elif has.any() and name in FAIL_IF_UNJUDGED:
            total[name] = 0.0
        if has.any():
            coverage[name] = float(weights[has].sum() / frames_w[has].sum())
    measurements = {
        "background": [  # the most frequent palette background (NO_BACKGROUND: frames that match none)
            Counter(BG_NAMES[i] if i >= 0 else NO_BACKGROUND for i in analysis.bg_index).most_common(1)[0][0]
        ],
        "texture_amplitude": float(np.median(analysis.texture_amplitude)),
        "flicker_mad": float(flicker_mad.mean()) if len(flicker_mad) else 0.0,
        "speed_px_per_frame": speeds_measured,
        "objects_per_frame": float(count.mean()),
    }
    if classifier is not None and fd_reference > 0:
        fd = classifier.video_fd(video, attrs, num_reference=fd_reference, device=device)
        total["fd"] = classifier.fd_score(fd)
        measurements["fd"] = fd
    total = _clean(total)
    for wd in windows:
        unjudged = {k: total[k] for k, c in wd["coverage"].items() if c == 0 and k in total}
        wd["scores"] = _group_scores(_clean(wd["scores"]), fill=unjudged)
    return {
        "prompt": attrs.caption(),
        "num_frames": t,
        "height": h,
        "width": w,
        "fps": FPS,
        "window": window,
        "scores": _group_scores(total),
        "coverage": coverage,
        "windows": windows,
        "measurements": measurements,
    }
