# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Frame analysis: background colour and texture, object detections with colour, shape, size and position.

Plain image analysis, no learning: the domain is rendered by `domain.py`, so its truth is simple to read back.
- background: per-frame median colour -> nearest background palette colour (none if farther than
  `BACKGROUND_MATCH_THRESHOLD`); texture: correlation of the residual
  with the renderer's (fixed) checker pattern;
- objects: each pixel goes to the nearest palette colour among the frame's background model and the 8 object
  colours (within a distance threshold), or to the "unknown" colour if it is far from the background but no object
  colour; per colour, a morphological opening, then connected components (label propagation with max-pooling,
  vectorised over frames);
- per component: area, centroid, bounding box, contact with objects of other colours, and six shape features
  (`FEATURES`) classified against templates measured on renders, clean and through 4:2:0 chroma subsampling.
Frames are processed in chunks (`CHUNK_FRAMES`), so memory is bounded whatever the video's length.
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
    background_image,
    checker_sign,
    circumradius,
    render_batch,
)

OBJECT_PALETTE = torch.tensor(list(OBJECT_COLORS.values()), dtype=torch.float32)  # [8, 3]
BG_PALETTE = torch.tensor(list(BACKGROUND_COLORS.values()), dtype=torch.float32)  # [6, 3]
OBJECT_COLOR_NAMES = list(OBJECT_COLORS)
BG_NAMES = list(BACKGROUND_COLORS)

COLOR_THRESHOLD = 90.0  # a pixel is an object pixel only within this RGB distance of an object colour
TEXTURE_THRESHOLD = CHECKER_AMPLITUDE / 2  # checker amplitude above which the background counts as checkered
# A pixel farther than this (RGB units) from the background model, and not an object pixel, is of an "unknown" colour:
# salient blobs of such pixels are objects in a colour outside the palette (a generator's pink or grey object).
UNKNOWN_THRESHOLD = 60.0
# A background farther than this from every palette background is none of them (a bright green for "gray"), however
# close the nearest one is: the same tolerance as for unknown-colour pixels. A global brightness change of +-25
# (34-43 units) stays within it; the palette's two closest backgrounds are 80 units apart.
BACKGROUND_MATCH_THRESHOLD = UNKNOWN_THRESHOLD
# A pixel within this RGB distance of the segment between the background and an object colour, next to an object of
# that colour, is that object's soft edge (anti-aliasing, blur), not of an unknown colour.
MIX_TOLERANCE = 40.0
UNKNOWN = len(OBJECT_COLORS)  # colour index of the unknown colour in the detections
COLOR_NAMES = list(OBJECT_COLORS) + ["unknown"]
# Components smaller than MIN_AREA_FRACTION of the smallest object's area are specks. Per frame and colour, every
# component of at least EXTRA_OBJECT_FRACTION of it is an object (the area of an object of any shape and size: e.g. a
# small duplicate of a large object), and so is the largest one if it touches no other object (a partly hidden one);
# other pieces are fragments (see `_select`).
MIN_AREA_FRACTION = 0.3
EXTRA_OBJECT_FRACTION = 0.5
CHUNK_FRAMES = 32  # frames analysed at a time: memory is bounded by the chunk, not by the video's length


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
    bg_index: np.ndarray  # [T] index into BG_NAMES; -1: no palette background (see BACKGROUND_MATCH_THRESHOLD)
    bg_rgb: np.ndarray  # [T, 3]
    texture_amplitude: np.ndarray  # [T]
    # Detections, one row per object-like component kept (see `_select`): columns of `DET_COLUMNS`.
    detections: np.ndarray  # [K, len(DET_COLUMNS)]
    flicker_mad: np.ndarray  # [T-1] mean |frame difference| over background pixels, in RGB units
    shape_templates: np.ndarray  # [8, F]: mean features of each (shape, size), row 2 * shape + size

    @property
    def num_frames(self) -> int:
        return len(self.bg_index)

    def frame(self, f: int) -> np.ndarray:
        return self.detections[self.detections[:, 0] == f]


DET_COLUMNS = (
    "frame",
    "color",  # index into COLOR_NAMES (UNKNOWN: a salient blob of no palette colour)
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
    "solidity",
    "base_fill",
    "touch",  # pixels within 3 px of an object (a kept component) of another colour
    "touch_colors",  # bit c set: within 3 px of an object of colour index c
    "shape",
)
FEATURES = slice(9, 15)  # shape features: fill, compact, radial_cv, cy_rel, solidity, base_fill
COL = {name: i for i, name in enumerate(DET_COLUMNS)}


def _max3(x: torch.Tensor, pad: float = 0.0) -> torch.Tensor:
    """3x3 max filter over the last two dims (padding value `pad`), by shifted maxima: much faster than max_pool2d on
    CPU."""
    p = F.pad(x, (1, 1, 1, 1), value=pad)
    r = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])
    return torch.maximum(torch.maximum(r[..., :-2, :], r[..., 1:-1, :]), r[..., 2:, :])


def _erode(m: torch.Tensor, outside: float = 1.0) -> torch.Tensor:
    """3x3 erosion; `outside`: the mask's value beyond the frame (1: objects at the frame edge are not eroded there)."""
    return 1 - _max3(1 - m, pad=1.0 - outside)


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


def _crop(mask: torch.Tensor, weight: torch.Tensor):
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
    return mask[index] & valid, weight[index] * valid, y0, x0


def _crofton_perimeter(lab: torch.Tensor, sel: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """Per component: a perimeter from the number of boundary crossings along rows and columns, (pi / 4) *
    (N_rows + N_cols) (the Cauchy-Crofton formula with two directions): exact for a disc, 4 / pi too short for the
    axis-aligned square. Unlike a count of boundary pixels (or of diagonal crossings) it does not grow on staircase
    edges such as a codec's 2x2 chroma blocks, since every row and column still crosses the boundary twice."""
    p = F.pad(lab, (1, 1, 1, 1))
    h, w = lab.shape[1:]
    total = torch.zeros(k, dtype=torch.float64, device=lab.device)
    for y, x in ((1, 2), (1, 0), (2, 1), (0, 1)):  # right, left, down, up neighbours
        out = (p[:, y : y + h, x : x + w] != lab)[sel]
        total += torch.bincount(inv, out.double(), minlength=k)
    return (math.pi / 4) * total


def _hull_area(xs: torch.Tensor, ys: torch.Tensor, inv: torch.Tensor, k: int, directions: int = 16) -> torch.Tensor:
    """Per component: the area of its pixels' (unit squares') bounding polygon with edges in `directions` evenly
    spaced orientations (a close, slightly larger stand-in for the convex hull): area / this is the solidity, ~1 for
    convex shapes (circle, square, triangle, even with blunted corners) and ~0.6 for the star."""
    theta = torch.arange(directions, dtype=torch.float64, device=xs.device) * (2 * math.pi / directions)
    c, s = torch.cos(theta), torch.sin(theta)
    proj = xs[:, None] * c + ys[:, None] * s  # [P, K]
    h = torch.full((k, directions), -float("inf"), dtype=torch.float64, device=xs.device)
    h = h.scatter_reduce(0, inv[:, None].expand(-1, directions), proj, "amax") + 0.5 * (c.abs() + s.abs())
    c1, s1, h1 = c.roll(-1), s.roll(-1), h.roll(-1, dims=1)
    det = math.sin(2 * math.pi / directions)
    vx = (h * s1 - h1 * s) / det  # vertex between edge j and edge j + 1
    vy = (c * h1 - c1 * h) / det
    return (0.5 * (vx * vy.roll(-1, dims=1) - vx.roll(-1, dims=1) * vy).sum(1)).clamp(min=1.0)


def _components(mask: torch.Tensor, weight: torch.Tensor, min_area: float):
    """Stats per component of mask [N, H, W] with at least `min_area` pixels: rows (slice, area, cx, cy, x0, x1, y0,
    y1, fill, compact, radial_cv, cy_rel, solidity, base_fill) in full-frame pixel coordinates, and the kept components' pixels (slice,
    y, x, row index). The centroid is weighted by `weight` (the pixels' coverage by the object's colour) over the
    component grown by one pixel, so that it moves smoothly with sub-pixel motion."""
    dev = mask.device
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    if not bool(mask.any()):
        return torch.zeros(0, 14, dtype=torch.float64, device=dev), (empty, empty, empty, empty)
    mask, weight, oy, ox = _crop(mask, weight)
    n, h, w = mask.shape
    lab = _label(mask)
    sel = lab > 0
    labels, inv = torch.unique(lab[sel].double(), return_inverse=True)
    k = len(labels)
    idx = sel.nonzero()  # [P, 3] (slice, y, x), row-major like lab[sel]
    ys, xs = idx[:, 1].double(), idx[:, 2].double()
    area = torch.bincount(inv, minlength=k).double()
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
    nb = torch.bincount(inv, boundary.double(), minlength=k).clamp(min=1)
    dist = torch.sqrt((xs - cx[inv]) ** 2 + (ys - cy[inv]) ** 2)
    bw = boundary.double()
    rm = torch.bincount(inv, dist * bw, minlength=k) / nb
    rv = torch.bincount(inv, (dist - rm[inv]) ** 2 * bw, minlength=k) / nb
    radial_cv = torch.sqrt(rv) / rm.clamp(min=1e-6)
    fill = area / ((x1 - x0 + 1) * (y1 - y0 + 1))
    solidity = area / _hull_area(xs, ys, inv, k)
    # Fill of the bottom fifth of the bounding box: the triangle's base spans it, the star only has two leg tips there
    # (a codec's blur rounds corners and blunts tips, but keeps that difference).
    height = y1 - y0 + 1
    band_top = torch.ceil(y0 + 0.8 * height - 0.5)
    in_band = (ys >= band_top[inv]).double()
    base_fill = torch.bincount(inv, in_band, minlength=k) / ((y1 - band_top + 1).clamp(min=1) * (x1 - x0 + 1))
    perim = _crofton_perimeter(lab, sel, inv, k).clamp(min=1)
    compact = 4 * math.pi * area / perim**2  # 1 for a disc, 4 / pi for the square
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
            solidity,
            base_fill,
        ],
        1,
    )
    keep = area >= min_area
    row = torch.cumsum(keep.long(), 0) - 1  # component -> row of the kept components
    pix = keep[inv]
    ps = idx[pix, 0]
    pixels = (ps, idx[pix, 1] + oy[ps], idx[pix, 2] + ox[ps], row[inv[pix]])
    return out[keep], pixels


def _classify_shapes(feats: np.ndarray, templates: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Shape index of the nearest (shape, size) template (features: `FEATURES`), each feature scaled by how much it
    varies among renders of one shape and size (pooled over the templates, `shape_templates`)."""
    if len(feats) == 0:
        return np.zeros(0, dtype=np.int64)
    means, scale = templates
    d = (((feats[:, None, :] - means[None]) / scale) ** 2).sum(-1)
    return d.argmin(1) // len(SIZES)


def _subsample_chroma(video: torch.Tensor, blur: bool = False) -> torch.Tensor:
    """uint8 [T, H, W, 3] through 4:2:0 chroma subsampling as H.264 in yuv420p stores frames (2x2 block means of Cb
    and Cr, bilinear upsampling; `blur`: also a 3x3 tent filter on the subsampled chroma, like a codec's
    quantisation at low contrast): object edges turn into 2-pixel steps and thin tips lose their colour."""
    x = video.float().permute(0, 3, 1, 2)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    chroma = F.avg_pool2d(torch.cat([b - y, r - y], 1), 2)
    if blur:
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3).repeat(2, 1, 1, 1)
        chroma = F.conv2d(F.pad(chroma, (1, 1, 1, 1), mode="replicate"), k, groups=2)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = chroma[:, 0:1], chroma[:, 1:2]
    g = y - (0.114 * cb + 0.299 * cr) / 0.587
    out = torch.cat([y + cr, g, y + cb], 1).round().clamp(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous()


# Renders the shape templates are measured on: (object colour, background, texture, start, codec), codec None (the
# clean render), "420" (4:2:0 chroma subsampling) or "420+blur" (and blurred chroma).
TEMPLATE_RENDERS = (
    ("white", "black", "plain", (0.37, 0.41), None),
    ("red", "dark green", "checkered", (0.61, 0.23), None),
    ("white", "black", "plain", (0.61, 0.23), "420"),
    ("yellow", "beige", "checkered", (0.29, 0.67), "420"),
    ("blue", "gray", "checkered", (0.53, 0.47), "420"),
    ("red", "dark green", "checkered", (0.71, 0.33), "420"),
    ("cyan", "dark blue", "plain", (0.43, 0.59), "420"),
    ("blue", "brown", "checkered", (0.37, 0.41), "420+blur"),
    ("purple", "gray", "checkered", (0.29, 0.67), "420+blur"),
    ("green", "black", "checkered", (0.53, 0.47), "420+blur"),
    ("orange", "beige", "plain", (0.71, 0.33), "420+blur"),
    ("blue", "gray", "checkered", (0.61, 0.23), "420+blur"),
    ("yellow", "beige", "checkered", (0.43, 0.59), "420+blur"),
    ("red", "brown", "checkered", (0.37, 0.41), "420+blur"),
)


def shape_templates(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(means [8, F], scale [F]) of the shape features (`FEATURES`) at this resolution (objects scale with the
    shorter side, so these are the templates of a square frame of that side). Means: per (shape, size), row
    2 * shape + size, over renders (`TEMPLATE_RENDERS`: several colours, backgrounds and sub-pixel positions, clean
    and through a codec's 4:2:0 chroma subsampling), measured with the same pipeline that analyses the videos to
    score. Scale: per feature, its standard deviation among the renders of one (shape, size), pooled over the eight
    (plus a floor), so that a distance counts each feature in units of its own render-to-render noise."""
    return _shape_templates(min(height, width))


@lru_cache(maxsize=16)
def _shape_templates(side: int) -> tuple[np.ndarray, np.ndarray]:
    min_area = MIN_AREA_FRACTION * min_object_area(side)
    classes = [(shape, size) for shape in SHAPES for size in SIZES]  # row 2 * shape + size
    feats = [[] for _ in classes]
    frames = 2  # sub-pixel positions per render
    crop = min(side, 2 * math.ceil(SIZE_EXTENT["large"] * side / 2) + 16)
    for color, background, texture, start, codec in TEMPLATE_RENDERS:
        specs = [
            SceneSpec(
                SceneAttrs(background, texture, (ObjectAttrs(shape, color, size, "quickly", "toward the lower right"),)),
                seed=0,
                starts=(start,),
            )
            for shape, size in classes
        ]
        video = render_batch(specs, frames, side, side, output="uint8").flatten(0, 1)  # [8 * frames, H, W, 3]
        # Analyse a window around each object (with the exact background), not the whole frame: 5x fewer pixels.
        bg = background_image(background, texture, side, side)
        crops, models = [], []
        for i, spec in enumerate(specs):
            centers = spec.object_tracks(frames, side, side)[0]["centers"]
            for f in range(frames):  # even offsets: the codec's 2x2 chroma blocks stay aligned with the frame's
                x0, y0 = (2 * int(np.clip(round(c / 2 - crop / 4), 0, (side - crop) // 2)) for c in centers[f])
                crops.append(video[i * frames + f, y0 : y0 + crop, x0 : x0 + crop])
                models.append(bg[y0 : y0 + crop, x0 : x0 + crop])
        crops = torch.stack(crops)
        if codec is not None:
            crops = _subsample_chroma(crops, blur=codec == "420+blur")
        dets = _detect(crops.float(), min_area, model=torch.stack(models))
        dets = dets[dets[:, COL["color"]] == COLOR_NAMES.index(color)]
        for f in range(len(video)):  # the object: the largest component of its colour
            rows = dets[dets[:, COL["frame"]] == f]
            if len(rows):
                feats[f // frames].append(rows[rows[:, COL["area"]].argmax(), FEATURES])
    feats = [np.stack(x) for x in feats]
    means = np.stack([x.mean(0) for x in feats])
    residuals = np.concatenate([x - x.mean(0) for x in feats])
    return means, np.sqrt((residuals**2).mean(0)) + 0.01


NO_BACKGROUND = "none"  # the name of a frame whose background matches no palette background


def background_names(video: np.ndarray | torch.Tensor) -> list[str]:
    """The palette background the suite reads in each frame of `video` `[T, H, W, 3]` (0..255), or `NO_BACKGROUND`
    farther than `BACKGROUND_MATCH_THRESHOLD` from every one."""
    frames = torch.as_tensor(np.asarray(video), dtype=torch.float32)
    return [BG_NAMES[i] if i >= 0 else NO_BACKGROUND for i in _background(frames)[0].tolist()]


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
    distance, bg_index = torch.cdist(bg_rgb, BG_PALETTE.to(video.device)).min(1)
    bg_index = torch.where(distance <= BACKGROUND_MATCH_THRESHOLD, bg_index, -1)
    model = bg_rgb.view(t, 1, 1, 3) + (amp.view(t, 1) * sign).view(t, h, w, 1)
    return bg_index, bg_rgb, amp, model


def _detect(v: torch.Tensor, min_area: float, model: torch.Tensor | None = None) -> np.ndarray:
    """Detections [K, len(DET_COLUMNS) - 1] (no shape yet) of frames v float [n, H, W, 3] (0..255), frame numbers
    relative to v; `model`: the frames' background model (computed if None)."""
    n, h, w, _ = v.shape
    if model is None:
        model = _background(v)[3]
    pal = OBJECT_PALETTE.to(v.device)
    d_obj = torch.cdist(v.reshape(n, -1, 3), pal).view(n, h, w, -1)  # [n, H, W, 8]
    diff = v - model
    d_bg = diff.norm(dim=-1)
    best, arg = d_obj.min(-1)
    del d_obj
    is_obj = (best < d_bg) & (best < COLOR_THRESHOLD)
    masks = (arg.unsqueeze(1) == torch.arange(pal.shape[0], device=v.device).view(1, -1, 1, 1)) & is_obj.unsqueeze(1)
    active = masks.flatten(2).sum(-1).amax(0) >= min_area  # colours present somewhere in these frames
    colors = active.nonzero().flatten().tolist()
    # Opening: drops anti-aliasing fringes of mixed colours.
    m = _dilate(_erode(masks[:, colors].float())) > 0.5  # [n, C, H, W]
    del masks
    # Coverage of each pixel by each active colour: projection of (pixel - background) on (colour - background). A
    # pixel close to that segment (a mix of the background and the colour) within 5 px of the colour's mask is that
    # object's soft edge (anti-aliasing, a codec's or a decoder's blur), whatever its distance to the palette.
    alpha = torch.empty(n, len(colors) + 1, h, w, device=v.device)
    mix = torch.empty(n, len(colors), h, w, dtype=torch.bool, device=v.device)
    edge = torch.zeros(n, h, w, dtype=torch.bool, device=v.device)
    for j, c in enumerate(colors):
        axis = pal[c].view(1, 1, 1, 3) - model  # [n, H, W, 3]
        proj = ((diff * axis).sum(-1) / (axis * axis).sum(-1).clamp(min=1.0)).clamp(0, 1)
        alpha[:, j] = proj
        mix[:, j] = (diff - proj.unsqueeze(-1) * axis).norm(dim=-1) < MIX_TOLERANCE
        edge |= mix[:, j] & (_max3(_max3(_max3(_max3(_max3(m[:, j].float()))))) > 0)
    # Salient pixels of no palette colour, and no object's soft edge: the unknown colour. Its opening is stricter (5x5,
    # nothing beyond the frame edge), so that colour fringes along an object's edge (a decoder's, a codec's at a wall)
    # form no blob.
    unknown = ~is_obj & ~edge & (d_bg >= UNKNOWN_THRESHOLD)
    del edge, is_obj, diff
    if bool((unknown.flatten(1).sum(1) >= min_area).any()):
        colors.append(UNKNOWN)
        opened = _dilate(_dilate(_erode(_erode(unknown.float(), outside=0.0), outside=0.0)))  # 5x5: fringes are thin
        m = torch.cat([m, (opened > 0.5).unsqueeze(1)], 1)
        alpha[:, -1] = (d_bg / (2 * UNKNOWN_THRESHOLD)).clamp(0, 1)  # saturating at twice the threshold
    else:
        alpha = alpha[:, : len(colors)]
    if not colors:
        return np.zeros((0, len(DET_COLUMNS) - 1))
    nc = len(colors)
    colors = torch.tensor(colors, device=v.device)
    comps, (ps, py, px, row) = _components(m.reshape(-1, h, w), alpha.reshape(-1, h, w), min_area)
    if len(comps) == 0:
        return np.zeros((0, len(DET_COLUMNS) - 1))
    # Contact between objects: pixels within 3 px of a kept component (an object, not a fragment) of another colour.
    kept = torch.zeros(n * nc, h, w, dtype=torch.bool, device=v.device)
    kept[ps, py, px] = True
    near = _max3(_max3(_max3(kept.view(n, nc, h, w).float()))) > 0  # [n, C, H, W]
    del kept
    own = ps % nc
    nv = near[ps // nc, :, py, px]  # [P, C]
    nv[torch.arange(len(ps), device=v.device), own] = False
    k = len(comps)
    per_color = torch.zeros(k, nc, dtype=torch.float64, device=v.device).index_add_(0, row, nv.double())
    touching = torch.bincount(row, nv.any(1).double(), minlength=k)
    bits = ((per_color > 0).double() * (2.0 ** colors.double()).view(1, -1)).sum(1)
    slice_id = comps[:, 0].long()
    frame = (slice_id // nc).double()
    color = colors[slice_id % nc].double()
    out = torch.cat([frame[:, None], color[:, None], comps[:, 1:], touching[:, None], bits[:, None]], 1)
    if colors[-1] == UNKNOWN and nc > 1:
        # An unknown-colour blob that touches an object and is mostly a mix of the background and that object's colour
        # is a faded part of that object (a decoder's colour error), not an object of its own.
        pix = own == nc - 1
        mixv = mix[ps[pix] // nc, :, py[pix], px[pix]].double()  # [P_unknown, C - 1]
        frac = torch.zeros(k, nc - 1, dtype=torch.float64, device=v.device).index_add_(0, row[pix], mixv)
        frac = frac / comps[:, 1:2]
        faded = ((frac >= 0.5) & (per_color[:, : nc - 1] > 0)).any(1) & (color == UNKNOWN)
        out = out[~faded]
    return out.cpu().numpy()


def _select(det: np.ndarray, side: int) -> np.ndarray:
    """Per frame and colour: every component large enough to be an object of any shape and size
    (EXTRA_OBJECT_FRACTION of the smallest object's area: a duplicate, even a small one of a large object), and the
    largest component if it touches no other object (a partly hidden object); smaller pieces are fragments and are
    dropped: an arm cut off by an occluder, a patch of another colour on an object (a decoder's colour error)."""
    if len(det) == 0:
        return det
    extra = EXTRA_OBJECT_FRACTION * min_object_area(side)
    keep = det[:, COL["area"]] >= extra
    keys = det[:, COL["frame"]] * 100 + det[:, COL["color"]]
    order = np.lexsort((-det[:, COL["area"]], keys))  # by key, largest first
    first = np.ones(len(det), dtype=bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    largest = order[first]
    keep[largest[det[largest, COL["touch"]] == 0]] = True
    return det[keep]


def _object_mask(det: np.ndarray, frames: int, h: int, w: int, device) -> torch.Tensor:
    """[frames, H, W] bool: the detections' bounding boxes grown by 3 px (frame numbers relative to the chunk)."""
    obj = torch.zeros(frames, h, w, dtype=torch.bool, device=device)
    for row in det:
        f, x0, x1, y0, y1 = int(row[0]), int(row[5]), int(row[6]), int(row[7]), int(row[8])
        obj[f, max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3] = True
    return obj


def _flicker(frames: torch.Tensor, obj: torch.Tensor) -> np.ndarray:
    """Mean absolute difference of consecutive frames [n, H, W, 3] over pixels that are background (outside `obj`
    [n, H, W]) in both, RGB units: [n - 1]."""
    if frames.shape[0] < 2:
        return np.zeros(0)
    bg = ~(obj[:-1] | obj[1:])
    diff = (frames[1:] - frames[:-1]).abs().mean(-1)
    num = (diff * bg).flatten(1).sum(1)
    den = bg.flatten(1).sum(1).clamp(min=1)
    return (num / den).cpu().numpy()


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another platform)."""
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory freed by the last chunk back to the OS. glibc serves large buffers from its heap once a few have
    been freed, and the small per-chunk results that live on between them fragment it: without this, the resident
    memory of a long video's analysis grows by about twice the video even though every chunk's buffers are freed."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def analyze_video(video, device=None, chunk_frames: int = CHUNK_FRAMES) -> VideoAnalysis:
    """Analyse a video: uint8/float array or tensor [T, H, W, 3] with values in 0..255 (a numpy memmap works too).
    Frames are converted and analysed `chunk_frames` at a time, so memory does not grow with the video's length
    (beyond the per-frame measurements and the detections); the result does not depend on `chunk_frames`."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a video [T, H, W, 3], got {tuple(video.shape)}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    if device is None:
        device = video.device if isinstance(video, torch.Tensor) else "cpu"
    device = torch.device(device)
    t, h, w, _ = video.shape
    side = min(h, w)
    min_area = MIN_AREA_FRACTION * min_object_area(side)
    templates = shape_templates(h, w)
    bg_index, bg_rgb, amp, dets, mad = [], [], [], [], []
    prev = prev_obj = None
    for c0 in range(0, t, chunk_frames):
        chunk = video[c0 : c0 + chunk_frames]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.ascontiguousarray(chunk))
        v = chunk.to(device=device, dtype=torch.float32)
        n = v.shape[0]
        bi, rgb, a, model = _background(v)
        det = _select(_detect(v, min_area, model), side)
        obj = _object_mask(det, n, h, w, device)
        if prev is not None:
            mad.append(_flicker(torch.cat([prev, v]), torch.cat([prev_obj, obj])))
        else:
            mad.append(_flicker(v, obj))
        prev, prev_obj = v[-1:], obj[-1:]
        det[:, COL["frame"]] += c0
        bg_index.append(bi.cpu().numpy())
        bg_rgb.append(rgb.cpu().numpy())
        amp.append(a.cpu().numpy())
        dets.append(det)
        del v, model, obj, chunk
        release_freed_memory()
    det = np.concatenate(dets) if dets else np.zeros((0, len(DET_COLUMNS) - 1))
    shape = _classify_shapes(det[:, FEATURES], templates).astype(np.float64)
    return VideoAnalysis(
        height=h,
        width=w,
        bg_index=np.concatenate(bg_index),
        bg_rgb=np.concatenate(bg_rgb),
        texture_amplitude=np.concatenate(amp),
        detections=np.concatenate([det, shape[:, None]], 1),
        flicker_mad=np.concatenate(mad) if mad else np.zeros(0),
        shape_templates=templates[0],
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
