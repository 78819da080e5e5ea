# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Frame analysis: background colour and texture, object detections with colour, shape, size and position.

Plain image analysis, no learning: the domain is rendered by `domain.py`, so its truth is simple to read back.
- background: per-frame median colour -> nearest background palette colour; texture: correlation of the residual
  with the renderer's (fixed) checker pattern;
- objects: each pixel goes to the nearest palette colour among the frame's background model and the 8 object
  colours (within a distance threshold); per colour, a morphological opening, then connected components (label
  propagation with max-pooling, vectorised over frames);
- per component: area, centroid, bounding box, and three shape features (bbox fill ratio, compactness
  4*pi*area/perimeter^2, radial spread of the boundary) classified against templates measured on clean renders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .domain import (
    BACKGROUND_COLORS,
    CHECKER_AMPLITUDE,
    OBJECT_COLORS,
    SHAPES,
    SIZE_EXTENT,
    SIZES,
    SPEED_VALUE,
    ObjectAttrs,
    SceneAttrs,
    SceneSpec,
    _polygon,
    checker_sign,
    circumradius,
    render_video,
)

OBJECT_PALETTE = torch.tensor(list(OBJECT_COLORS.values()), dtype=torch.float32)  # [8, 3]
BG_PALETTE = torch.tensor(list(BACKGROUND_COLORS.values()), dtype=torch.float32)  # [6, 3]
OBJECT_COLOR_NAMES = list(OBJECT_COLORS)
BG_NAMES = list(BACKGROUND_COLORS)

COLOR_THRESHOLD = 90.0  # a pixel is an object pixel only within this RGB distance of an object colour
TEXTURE_THRESHOLD = CHECKER_AMPLITUDE / 2  # checker amplitude above which the background counts as checkered
EXTRA_OBJECT_RATIO = 0.5  # a second component of one colour counts as an object if >= this fraction of the largest


def polygon_area(shape: str, radius: float) -> float:
    poly = _polygon(shape)
    if poly is None:
        return math.pi * radius**2
    angles, radii = poly
    step = 2 * math.pi / len(angles)
    r = radii * radius
    return float(0.5 * np.sum(r * np.roll(r, -1)) * math.sin(step))


def min_object_area(side: int) -> float:
    """The smallest object's area in pixels at a frame whose shorter side is `side`."""
    return min(polygon_area(s, circumradius(s, "small", side)) for s in SHAPES)


@dataclass
class VideoAnalysis:
    """Per-frame measurements of one video (T frames)."""

    height: int
    width: int
    bg_index: np.ndarray  # [T] index into BG_NAMES
    bg_rgb: np.ndarray  # [T, 3]
    texture_amplitude: np.ndarray  # [T]
    # Detections, one row per object-like component kept (see `_select`): columns of `DET_COLUMNS`.
    detections: np.ndarray  # [K, len(DET_COLUMNS)]
    flicker_mad: np.ndarray  # [T-1] mean |frame difference| over background pixels, in RGB units
    shape_templates: np.ndarray  # [4, 3]

    @property
    def num_frames(self) -> int:
        return len(self.bg_index)

    def frame(self, f: int) -> np.ndarray:
        return self.detections[self.detections[:, 0] == f]


DET_COLUMNS = (
    "frame",
    "color",
    "area",
    "cx",
    "cy",
    "x0",
    "x1",
    "y0",
    "y1",
    "fill",
    "compact",
    "radial_cv",
    "cy_rel",
    "touch",
    "shape",
)
FEATURES = slice(9, 13)  # shape features: fill, compact, radial_cv, cy_rel
COL = {name: i for i, name in enumerate(DET_COLUMNS)}


def _max3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max filter over the last two dims (zero padding), by shifted maxima: much faster than max_pool2d on CPU."""
    p = F.pad(x, (1, 1, 1, 1))
    r = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])
    return torch.maximum(torch.maximum(r[..., :-2, :], r[..., 1:-1, :]), r[..., 2:, :])


def _erode(m: torch.Tensor) -> torch.Tensor:
    return 1 - _max3(1 - m)


def _dilate(m: torch.Tensor) -> torch.Tensor:
    return _max3(m)


def _label(mask: torch.Tensor, max_iters: int = 1024) -> torch.Tensor:
    """Connected components (8-connectivity) of a bool mask [N, H, W]: each pixel gets the largest 1-based linear
    index within its component (0 outside), by repeated 3x3 max-pooling restricted to the mask."""
    n, h, w = mask.shape
    dtype = torch.float32 if n * h * w < 2**24 else torch.float64  # labels must be exact integers
    m = mask.to(dtype)
    lab = torch.arange(1, n * h * w + 1, dtype=dtype, device=mask.device).view(n, h, w) * m
    for i in range(max_iters):
        new = _max3(lab) * m
        if i % 4 == 3 and torch.equal(new, lab):
            break
        lab = new
    return lab


def _crop(mask: torch.Tensor, weight: torch.Tensor, touch: torch.Tensor):
    """Crop every slice of mask [N, H, W] (and weight, alike) to the common size of the largest per-slice bounding box
    grown by one pixel (labelling cost scales with the crop, and objects are small). Returns the crops [N, h, w] and
    per-slice offsets (y0, x0)."""
    n, h, w = mask.shape
    rows, cols = mask.any(2), mask.any(1)  # [N, H], [N, W]
    ar_h = torch.arange(h, device=mask.device)
    ar_w = torch.arange(w, device=mask.device)
    y0 = (torch.where(rows, ar_h, h).amin(1) - 1).clamp(0, h - 1)
    y1 = torch.where(rows, ar_h, -1).amax(1).clamp(min=0) + 1
    x0 = (torch.where(cols, ar_w, w).amin(1) - 1).clamp(0, w - 1)
    x1 = torch.where(cols, ar_w, -1).amax(1).clamp(min=0) + 1
    hc = int((y1 - y0).clamp(min=0).max()) + 1
    wc = int((x1 - x0).clamp(min=0).max()) + 1
    yy = y0[:, None] + torch.arange(hc, device=mask.device)  # [N, hc]
    xx = x0[:, None] + torch.arange(wc, device=mask.device)
    valid = (yy < h)[:, :, None] & (xx < w)[:, None, :]
    index = (
        torch.arange(n, device=mask.device)[:, None, None],
        yy.clamp(max=h - 1)[:, :, None],
        xx.clamp(max=w - 1)[:, None, :],
    )
    return mask[index] & valid, weight[index] * valid, touch[index] & valid, y0, x0


def _components(mask: torch.Tensor, weight: torch.Tensor, touch: torch.Tensor, min_area: float) -> torch.Tensor:
    """Stats per component of mask [N, H, W]: rows (slice, area, cx, cy, x0, x1, y0, y1, fill, compact, radial_cv,
    cy_rel, touch) in full-frame pixel coordinates. The centroid is weighted by `weight` (the pixels' coverage by the
    object's colour) over the component grown by one pixel, so that it moves smoothly with sub-pixel motion; `touch`
    counts the component's pixels flagged in the bool map `touch` (next to another object)."""
    dev = mask.device
    if not bool(mask.any()):
        return torch.zeros(0, 13, dtype=torch.float64, device=dev)
    mask, weight, touch, oy, ox = _crop(mask, weight, touch)
    n, h, w = mask.shape
    lab = _label(mask)
    sel = lab > 0
    labels, inv = torch.unique(lab[sel].double(), return_inverse=True)
    k = len(labels)
    idx = sel.nonzero()  # [P, 3] (slice, y, x), row-major like lab[sel]
    ys, xs = idx[:, 1].double(), idx[:, 2].double()
    area = torch.bincount(inv, minlength=k).double()
    touching = torch.bincount(inv, touch[sel].double(), minlength=k)
    # Weighted centroid over the grown component.
    grown = _max3(lab) * (weight > 0.02)
    gsel = grown > 0
    ginv = torch.searchsorted(labels, grown[gsel].double()).clamp(max=k - 1)
    gidx = gsel.nonzero()
    gw = weight[gsel].double() * (labels[ginv] == grown[gsel].double())
    wsum = torch.bincount(ginv, gw, minlength=k).clamp(min=1e-6)
    cx = torch.bincount(ginv, gidx[:, 2].double() * gw, minlength=k) / wsum
    cy = torch.bincount(ginv, gidx[:, 1].double() * gw, minlength=k) / wsum
    big = float("inf")
    x0 = torch.full((k,), big, dtype=torch.float64, device=dev).scatter_reduce(0, inv, xs, "amin")
    x1 = torch.full((k,), -big, dtype=torch.float64, device=dev).scatter_reduce(0, inv, xs, "amax")
    y0 = torch.full((k,), big, dtype=torch.float64, device=dev).scatter_reduce(0, inv, ys, "amin")
    y1 = torch.full((k,), -big, dtype=torch.float64, device=dev).scatter_reduce(0, inv, ys, "amax")
    # Boundary pixels: in the mask, with a 4-neighbour outside it.
    mf = F.pad(mask.float(), (1, 1, 1, 1))
    inner = (mf[:, :-2, 1:-1] * mf[:, 2:, 1:-1] * mf[:, 1:-1, :-2] * mf[:, 1:-1, 2:]) > 0
    boundary = (mask & ~inner)[sel]
    perim = torch.bincount(inv, boundary.double(), minlength=k).clamp(min=1)
    dist = torch.sqrt((xs - cx[inv]) ** 2 + (ys - cy[inv]) ** 2)
    bw = boundary.double()
    rm = torch.bincount(inv, dist * bw, minlength=k) / perim
    rv = torch.bincount(inv, (dist - rm[inv]) ** 2 * bw, minlength=k) / perim
    radial_cv = torch.sqrt(rv) / rm.clamp(min=1e-6)
    fill = area / ((x1 - x0 + 1) * (y1 - y0 + 1))
    compact = 4 * math.pi * area / perim**2
    cy_rel = (cy - y0 + 0.5) / (y1 - y0 + 1)  # 0.5 for symmetric shapes, 2/3 for the upward triangle
    slice_id = torch.div(labels.long() - 1, h * w, rounding_mode="floor")
    dy, dx = oy[slice_id].double(), ox[slice_id].double()
    out = torch.stack(
        [
            slice_id.double(),
            area,
            cx + dx + 0.5,
            cy + dy + 0.5,
            x0 + dx,
            x1 + dx + 1,
            y0 + dy,
            y1 + dy + 1,
            fill,
            compact,
            radial_cv,
            cy_rel,
            touching,
        ],
        1,
    )
    return out[area >= min_area]


def _classify_shapes(feats: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Shape index of the nearest (shape, size) template (features: fill, compact, radial_cv, cy_rel), each feature scaled by
    its spread over the templates."""
    if len(feats) == 0:
        return np.zeros(0, dtype=np.int64)
    scale = templates.std(0) + 1e-6
    d = (((feats[:, None, :] - templates[None]) / scale) ** 2).sum(-1)
    return d.argmin(1) // len(SIZES)


@lru_cache(maxsize=8)
def shape_templates(height: int, width: int) -> np.ndarray:
    """Mean shape features (fill, compact, radial_cv, cy_rel) of each (shape, size), row 2 * shape + size, measured on clean renders at this
    resolution (several sub-pixel positions), with the same pipeline that analyses the videos to score."""
    feats = np.zeros((len(SHAPES) * len(SIZES), 4))
    for si, shape in enumerate(SHAPES):
        for zi, size in enumerate(SIZES):
            obj = ObjectAttrs(
                shape=shape, color="white", size=size, speed="quickly", direction="toward the lower right"
            )
            spec = SceneSpec(SceneAttrs("black", "plain", (obj,)), seed=0, starts=((0.37, 0.41),))
            video = render_video(spec, 4, height, width)
            dets = _detect(video.float(), None)
            feats[2 * si + zi] = dets[:, FEATURES].mean(0)
    return feats


def _background(video: torch.Tensor):
    """video float [T, H, W, 3] (0..255) -> bg_index [T], bg_rgb [T, 3], texture amplitude [T], bg model [T,H,W,3].

    The checker pattern is fixed, so the pixels of its light and dark cells are summarised separately (medians,
    robust to the objects): their mean is the background colour, half their difference the texture amplitude."""
    t, h, w, _ = video.shape
    sign = checker_sign(h, w, video.device).flatten()
    flat = video.reshape(t, -1, 3)
    light = flat[:, sign > 0].median(dim=1).values  # [T, 3]
    dark = flat[:, sign < 0].median(dim=1).values
    bg_rgb = (light + dark) / 2
    amp = ((light - dark).mean(-1) / 2).clamp(min=0)
    bg_index = torch.cdist(bg_rgb, BG_PALETTE.to(video.device)).argmin(1)
    model = bg_rgb.view(t, 1, 1, 3) + (amp.view(t, 1) * sign).view(t, h, w, 1)
    return bg_index, bg_rgb, amp, model


def _detect(video: torch.Tensor, templates: np.ndarray | None, chunk: int = 32):
    """Detections [K, len(DET_COLUMNS)] of video float [T, H, W, 3] (0..255)."""
    t, h, w, _ = video.shape
    side = min(h, w)
    min_area = 0.3 * min_object_area(side)
    pal = OBJECT_PALETTE.to(video.device)
    rows = []
    for c0 in range(0, t, chunk):
        v = video[c0 : c0 + chunk]
        n = v.shape[0]
        _, _, _, model = _background(v)
        d_obj = torch.cdist(v.reshape(n, -1, 3), pal).view(n, h, w, -1)  # [n, H, W, 8]
        diff = v - model
        d_bg = diff.norm(dim=-1)
        best, arg = d_obj.min(-1)
        is_obj = (best < d_bg) & (best < COLOR_THRESHOLD)
        masks = F.one_hot(arg, pal.shape[0]).permute(0, 3, 1, 2).bool() & is_obj.unsqueeze(1)  # [n, 8, H, W]
        active = masks.flatten(2).sum(-1).amax(0) >= min_area  # colours present somewhere in the chunk
        colors = active.nonzero().flatten()
        if len(colors) == 0:
            continue
        m = masks[:, colors].reshape(-1, h, w).float()
        m = _dilate(_erode(m)) > 0.5  # opening: drops anti-aliasing fringes of mixed colours
        # Pixels within 3 px of an object of another colour (occlusion: shapes and centroids are unreliable there).
        mc = m.view(n, len(colors), h, w)
        others = (mc.sum(1, keepdim=True) - mc.float()) > 0
        near = _max3(_max3(_max3(others.float()))) > 0
        touch = (mc & near).reshape(-1, h, w)
        # Coverage of each pixel by each active colour: projection of (pixel - background) on (colour - background).
        axis = pal[colors].view(1, -1, 1, 1, 3) - model.unsqueeze(1)  # [n, C, H, W, 3]
        alpha = ((diff.unsqueeze(1) * axis).sum(-1) / (axis * axis).sum(-1).clamp(min=1.0)).clamp(0, 1)
        comps = _components(m, alpha.reshape(-1, h, w), touch, min_area)
        if len(comps) == 0:
            continue
        slice_id = comps[:, 0].long()
        frame = (slice_id // len(colors) + c0).double()
        color = colors[slice_id % len(colors)].double()
        rows.append(torch.cat([frame[:, None], color[:, None], comps[:, 1:]], 1).cpu())
    if not rows:
        return np.zeros((0, len(DET_COLUMNS)))
    det = torch.cat(rows).numpy()
    shape = _classify_shapes(det[:, FEATURES], templates) if templates is not None else np.zeros(len(det))
    return np.concatenate([det, shape[:, None].astype(np.float64)], 1)


def _select(det: np.ndarray) -> np.ndarray:
    """Per frame and colour: the largest component, plus any other component at least EXTRA_OBJECT_RATIO as large
    (a duplicated object); smaller fragments (e.g. an arm cut off by an occluder) are dropped."""
    if len(det) == 0:
        return det
    keep = np.zeros(len(det), dtype=bool)
    keys = det[:, 0] * 100 + det[:, 1]
    for key in np.unique(keys):
        idx = np.nonzero(keys == key)[0]
        largest = det[idx, 2].max()
        keep[idx[det[idx, 2] >= EXTRA_OBJECT_RATIO * largest]] = True
    return det[keep]


def _flicker(video: torch.Tensor, det: np.ndarray) -> np.ndarray:
    """Mean absolute difference of consecutive frames over pixels that are background in both, RGB units."""
    t, h, w, _ = video.shape
    if t < 2:
        return np.zeros(0)
    obj = torch.zeros(t, 1, h, w, device=video.device)
    for row in det:  # bounding boxes of detections, grown by 3 px
        f, x0, x1, y0, y1 = int(row[0]), int(row[5]), int(row[6]), int(row[7]), int(row[8])
        obj[f, 0, max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3] = 1
    bg = (obj[:-1] + obj[1:]).squeeze(1) == 0  # [T-1, H, W]
    diff = (video[1:] - video[:-1]).abs().mean(-1)
    num = (diff * bg).flatten(1).sum(1)
    den = bg.flatten(1).sum(1).clamp(min=1)
    return (num / den).cpu().numpy()


def analyze_video(video, device=None) -> VideoAnalysis:
    """Analyse a video: uint8/float array or tensor [T, H, W, 3] with values in 0..255."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    device = torch.device(device) if device is not None else video.device
    v = video.to(device=device, dtype=torch.float32)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected a video [T, H, W, 3], got {tuple(v.shape)}")
    t, h, w, _ = v.shape
    bg_index, bg_rgb, amp, _ = _background(v)
    templates = shape_templates(h, w)
    det = _select(_detect(v, templates))
    return VideoAnalysis(
        height=h,
        width=w,
        bg_index=bg_index.cpu().numpy(),
        bg_rgb=bg_rgb.cpu().numpy(),
        texture_amplitude=amp.cpu().numpy(),
        detections=det,
        flicker_mad=_flicker(v, det),
        shape_templates=templates,
    )


def size_of(extent_px: float, side: int) -> int:
    """0 = small, 1 = large, from the larger bbox side (threshold at the geometric mean of the two extents)."""
    thr = math.sqrt(SIZE_EXTENT["small"] * SIZE_EXTENT["large"]) * side
    return int(extent_px >= thr)


def speed_class(speed_px: float, side: int) -> int:
    """0 = static, 1 = slowly, 2 = quickly."""
    slow, fast = SPEED_VALUE["slowly"] * side, SPEED_VALUE["quickly"] * side
    if speed_px < 0.5 * slow:
        return 0
    return 1 if speed_px < math.sqrt(slow * fast) else 2
