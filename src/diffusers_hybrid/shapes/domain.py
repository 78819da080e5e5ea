# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The "shapes" world: attributes, the caption grammar and a deterministic renderer.

A scene is one or two flat objects (circle, square, triangle, star; 8 colours; small or large) that move at a
constant speed and bounce off the frame edges, over a plain or checkered background of a named colour. Everything is
defined in resolution-independent units (fractions of the shorter frame side, per frame at 16 fps), so the same
`SceneSpec` renders the same motion at 128x128 or 256x256, and any number of frames: positions are a closed-form
triangle wave of time, so a stream can be rendered window by window without drift.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

FPS = 16
MIN_RESOLUTION = 128
MAX_RESOLUTION = 256

# Saturated object colours and darker/muted background colours, chosen so that every object colour is at least ~80
# RGB units from every other palette colour (nearest-colour classification stays unambiguous).
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "orange": (250, 130, 20),
    "yellow": (240, 230, 40),
    "green": (60, 200, 80),
    "cyan": (50, 215, 225),
    "blue": (60, 100, 240),
    "purple": (165, 70, 225),
    "white": (245, 245, 245),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (110, 110, 110),
    "dark blue": (20, 35, 110),
    "dark green": (25, 90, 40),
    "brown": (110, 65, 25),
    "beige": (215, 200, 165),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
SPEEDS = ("slowly", "quickly")
TEXTURES = ("plain", "checkered")
# Direction name -> unit vector in image coordinates (x to the right, y downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "to the left": (-1, 0),
    "to the right": (1, 0),
    "upward": (0, -1),
    "downward": (0, 1),
    "toward the upper left": (-1, -1),
    "toward the upper right": (1, -1),
    "toward the lower left": (-1, 1),
    "toward the lower right": (1, 1),
}
# Motion axis, invariant under bounces: the classifier predicts this one.
AXES = ("horizontal", "vertical", "diagonal")

# Geometry, as fractions of min(height, width). Extent = max(bbox width, bbox height) of the object.
SIZE_EXTENT = {"small": 0.17, "large": 0.32}
# Speed in units of min(height, width) per frame (at 16 fps).
SPEED_VALUE = {"slowly": 0.012, "quickly": 0.032}
CHECKER_CELLS = 8  # checkered background: 8 x 8 cells over the shorter side
CHECKER_AMPLITUDE = 14.0  # +-14 RGB units
STAR_INNER_RATIO = 0.45

# (colour, shape) pairs that never occur in the training split; the held-out split uses at least one of them.
HELD_OUT_PAIRS = frozenset(
    {
        ("red", "star"),
        ("orange", "circle"),
        ("yellow", "square"),
        ("green", "triangle"),
        ("cyan", "star"),
        ("blue", "circle"),
        ("purple", "triangle"),
        ("white", "square"),
    }
)
SPLITS = ("train", "heldout")


def axis_of(direction: str) -> str:
    dx, dy = DIRECTIONS[direction]
    if dx and dy:
        return "diagonal"
    return "horizontal" if dx else "vertical"


@dataclass(frozen=True)
class ObjectAttrs:
    shape: str
    color: str
    size: str
    speed: str
    direction: str

    def __post_init__(self):
        for value, allowed, name in (
            (self.shape, SHAPES, "shape"),
            (self.color, OBJECT_COLORS, "color"),
            (self.size, SIZES, "size"),
            (self.speed, SPEEDS, "speed"),
            (self.direction, DIRECTIONS, "direction"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT_PAIRS

    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} bouncing {self.speed} {self.direction}"


@dataclass(frozen=True)
class SceneAttrs:
    background: str
    texture: str
    objects: tuple[ObjectAttrs, ...]

    def __post_init__(self):
        if self.background not in BACKGROUND_COLORS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {list(BACKGROUND_COLORS)}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; expected one of {list(TEXTURES)}")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError("a scene has one or two objects")
        if len({o.color for o in self.objects}) != len(self.objects):
            raise ValueError("the objects of a scene have distinct colours")

    @property
    def split(self) -> str:
        return "heldout" if any(o.held_out for o in self.objects) else "train"

    def canonical(self) -> "SceneAttrs":
        """Objects in canonical order: large before small, then by palette order of the colour."""
        colors = list(OBJECT_COLORS)
        objs = sorted(self.objects, key=lambda o: (SIZES.index(o.size) * -1, colors.index(o.color)))
        return SceneAttrs(self.background, self.texture, tuple(objs))

    def caption(self) -> str:
        bg = self.background if self.texture == "plain" else f"{self.background} checkered"
        return " and ".join(o.caption() for o in self.objects) + f" on a {bg} background"

    def to_dict(self) -> dict:
        return {"background": self.background, "texture": self.texture, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "SceneAttrs":
        return cls(d["background"], d["texture"], tuple(ObjectAttrs(**o) for o in d["objects"]))


# ----------------------------------------------------------------------------------------------------------------------
# Caption grammar
# ----------------------------------------------------------------------------------------------------------------------


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT_RE = (
    rf"a (?P<size{{i}}>{_alt(SIZES)}) (?P<color{{i}}>{_alt(OBJECT_COLORS)}) (?P<shape{{i}}>{_alt(SHAPES)}) "
    rf"bouncing (?P<speed{{i}}>{_alt(SPEEDS)}) (?P<direction{{i}}>{_alt(DIRECTIONS)})"
)
_BG_RE = rf"on a (?P<background>{_alt(BACKGROUND_COLORS)})(?P<checkered> checkered)? background"
_CAPTION_RES = [
    re.compile("^" + _OBJECT_RE.format(i=0) + " " + _BG_RE + "$"),
    re.compile("^" + _OBJECT_RE.format(i=0) + " and " + _OBJECT_RE.format(i=1) + " " + _BG_RE + "$"),
]


def normalize_caption(text: str) -> str:
    text = text.strip().lower().rstrip(".")
    return re.sub(r"\s+", " ", text)


def parse_caption(text: str) -> SceneAttrs:
    """Inverse of `SceneAttrs.caption()`. Raises `ValueError` on text outside the grammar."""
    text = normalize_caption(text)
    for n, pattern in enumerate(_CAPTION_RES, start=1):
        m = pattern.match(text)
        if m:
            objs = tuple(
                ObjectAttrs(
                    shape=m[f"shape{i}"],
                    color=m[f"color{i}"],
                    size=m[f"size{i}"],
                    speed=m[f"speed{i}"],
                    direction=m[f"direction{i}"],
                )
                for i in range(n)
            )
            return SceneAttrs(m["background"], "checkered" if m["checkered"] else "plain", objs)
    raise ValueError(f"caption outside the shapes grammar: {text!r}")


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the tokenizer's vocabulary)."""
    words = {"a", "and", "on", "background", "bouncing", "checkered"}
    for group in (SIZES, SHAPES, SPEEDS, OBJECT_COLORS, BACKGROUND_COLORS, DIRECTIONS):
        for phrase in group:
            words.update(phrase.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling scenes
# ----------------------------------------------------------------------------------------------------------------------


def _sample_object(rng: np.random.Generator, split: str, exclude_colors=(), force_held_out=False) -> ObjectAttrs:
    while True:
        color = rng.choice([c for c in OBJECT_COLORS if c not in exclude_colors])
        shape = SHAPES[rng.integers(len(SHAPES))]
        held = (color, shape) in HELD_OUT_PAIRS
        if split == "train" and held:
            continue
        if force_held_out and not held:
            continue
        return ObjectAttrs(
            shape=shape,
            color=str(color),
            size=SIZES[rng.integers(len(SIZES))],
            speed=SPEEDS[rng.integers(len(SPEEDS))],
            direction=list(DIRECTIONS)[rng.integers(len(DIRECTIONS))],
        )


def sample_scene(rng: np.random.Generator, split: str = "train", two_object_prob: float = 0.5) -> SceneAttrs:
    """A random scene of `split`: "train" never uses a held-out (colour, shape) pair, "heldout" always does."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    n = 2 if rng.random() < two_object_prob else 1
    first = _sample_object(rng, split, force_held_out=(split == "heldout"))
    objs = [first]
    if n == 2:
        objs.append(_sample_object(rng, "train" if split == "train" else "any", exclude_colors=(first.color,)))
    bg = list(BACKGROUND_COLORS)[rng.integers(len(BACKGROUND_COLORS))]
    tex = TEXTURES[rng.integers(len(TEXTURES))]
    return SceneAttrs(bg, tex, tuple(objs)).canonical()


# ----------------------------------------------------------------------------------------------------------------------
# Geometry and motion
# ----------------------------------------------------------------------------------------------------------------------


def _polygon(shape: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(vertex angles, vertex radii) of a unit-circumradius polygon, equally spaced in angle; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        n, radii = 4, np.ones(4)
        start = math.pi / 4
    elif shape == "triangle":  # pointing up (image y points down)
        n, radii = 3, np.ones(3)
        start = -math.pi / 2
    elif shape == "star":  # five points, one pointing up
        n, radii = 10, np.array([1.0, STAR_INNER_RATIO] * 5)
        start = -math.pi / 2
    else:
        raise ValueError(shape)
    angles = start + 2 * math.pi * np.arange(n) / n
    return angles, radii


def shape_offsets(shape: str) -> tuple[float, float, float, float]:
    """(xmin, xmax, ymin, ymax) of the unit-circumradius shape around its centre."""
    poly = _polygon(shape)
    if poly is None:
        return -1.0, 1.0, -1.0, 1.0
    angles, radii = poly
    xs, ys = radii * np.cos(angles), radii * np.sin(angles)
    return float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())


def circumradius(shape: str, size: str, side: float) -> float:
    """Circumradius in pixels such that the object's extent is SIZE_EXTENT[size] * side."""
    x0, x1, y0, y1 = shape_offsets(shape)
    return SIZE_EXTENT[size] * side / max(x1 - x0, y1 - y0)


def _triangle_wave(p0: np.ndarray | torch.Tensor, lo, hi, v: float, t):
    """Position at time t of a point starting at p0 in [lo, hi] with velocity v, reflecting at lo and hi."""
    length = hi - lo
    if length <= 0:
        return lo + 0 * t
    x = (p0 - lo + v * t) % (2 * length)
    x = (
        torch.where(x > length, 2 * length - x, x)
        if isinstance(x, torch.Tensor)
        else np.where(x > length, 2 * length - x, x)
    )
    return lo + x


@dataclass(frozen=True)
class SceneSpec:
    """A scene's attributes plus everything a seed decides (start positions)."""

    attrs: SceneAttrs
    seed: int = 0
    # Start position of each object, as fractions in [0, 1] of its allowed range along x and y.
    starts: tuple[tuple[float, float], ...] = field(default=())

    def __post_init__(self):
        if not self.starts:
            if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
                raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
            # Start positions from the seed; two objects start apart (their circumscribed circles do not meet at
            # 128x128), so that objects moving alike do not overlap for a whole video.
            rng = np.random.default_rng([self.seed, 7919])
            for _ in range(100):
                starts = tuple((float(rng.random()), float(rng.random())) for _ in self.attrs.objects)
                object.__setattr__(self, "starts", starts)
                if len(starts) < 2:
                    break
                (a, b) = self.object_tracks(1, 128, 128)
                gap = np.hypot(*(a["centers"][0] - b["centers"][0])) - a["radius"] - b["radius"]
                if gap > 2.0:
                    break

    @classmethod
    def from_prompt(cls, prompt: str, seed: int = 0) -> "SceneSpec":
        return cls(parse_caption(prompt), seed)

    @property
    def prompt(self) -> str:
        return self.attrs.caption()

    def object_tracks(self, num_frames: int, height: int, width: int, start_frame: int = 0) -> list[dict]:
        """Per object: circumradius (px), bounds, and centre positions [T, 2] (x, y) in pixels (float64)."""
        side = min(height, width)
        t = np.arange(start_frame, start_frame + num_frames, dtype=np.float64)
        tracks = []
        for obj, (fx, fy) in zip(self.attrs.objects, self.starts):
            r = circumradius(obj.shape, obj.size, side)
            x0, x1, y0, y1 = (r * o for o in shape_offsets(obj.shape))
            xlo, xhi, ylo, yhi = -x0, width - x1, -y0, height - y1
            dx, dy = DIRECTIONS[obj.direction]
            norm = math.hypot(dx, dy)
            speed = SPEED_VALUE[obj.speed] * side
            vx, vy = speed * dx / norm, speed * dy / norm
            px = _triangle_wave(xlo + fx * (xhi - xlo), xlo, xhi, vx, t)
            py = _triangle_wave(ylo + fy * (yhi - ylo), ylo, yhi, vy, t)
            tracks.append(
                {"radius": r, "bounds": (xlo, xhi, ylo, yhi), "velocity": (vx, vy), "centers": np.stack([px, py], 1)}
            )
        return tracks


def check_resolution(height: int, width: int) -> None:
    for v in (height, width):
        if not (MIN_RESOLUTION <= v <= MAX_RESOLUTION and v % 16 == 0):
            raise ValueError(
                f"resolution must be a multiple of 16 between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {height}x{width}"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Rendering (torch, vectorised over frames; runs on CPU or GPU)
# ----------------------------------------------------------------------------------------------------------------------


def _convex_pieces(shape: str) -> list[np.ndarray]:
    """The shape (unit circumradius) as a union of convex polygons, each given by its vertices [n, 2]."""
    angles, radii = _polygon(shape)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    if shape != "star":
        return [pts]
    # Five convex kites (inner vertex, tip, inner vertex, a point behind the centre) that overlap around the centre, so
    # that no piece boundary runs through the star's interior (it would show as a seam in the anti-aliasing).
    kites = []
    for k in range(5):
        tip = pts[2 * k]
        back = -0.35 * STAR_INNER_RATIO / 0.45 * tip
        kites.append(np.stack([back, pts[(2 * k - 1) % 10], tip, pts[2 * k + 1]]))
    return kites


def _half_planes(shape: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per convex piece: outward unit normals [n, 2] and offsets [n] (n . p <= offset inside, unit circumradius)."""
    out = []
    for poly in _convex_pieces(shape):
        centre = poly.mean(0)
        a, b = poly, np.roll(poly, -1, axis=0)
        e = b - a
        nrm = np.stack([e[:, 1], -e[:, 0]], 1)
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        off = (nrm * a).sum(1)
        flip = (nrm * centre).sum(1) > off  # make the normals point away from the piece's centre
        nrm[flip], off[flip] = -nrm[flip], -off[flip]
        out.append((nrm, off))
    return out


def _coverage(shape: str, radius: float, centers: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage [T, H, W] in [0, 1] of a shape at pixel centres xs [W], ys [H]: a one-pixel linear ramp
    of the signed distance to the boundary (exact for the circle, the max of half-plane distances for each convex
    piece, the min over pieces). Coverage varies continuously with the position, so centroids do too."""
    dx = xs.view(1, 1, -1) - centers[:, 0].view(-1, 1, 1)
    dy = ys.view(1, -1, 1) - centers[:, 1].view(-1, 1, 1)
    if isinstance(radius, torch.Tensor):  # one radius per object: [n, 1, 1, 1] against centres [n * T, 2]
        n = radius.shape[0]
        radius = radius.repeat_interleave(centers.shape[0] // n, dim=0).view(-1, 1, 1)
    if shape == "circle":
        sd = torch.sqrt(dx * dx + dy * dy) - radius
    else:
        sd = None
        for nrm, off in _half_planes(shape):
            piece = None
            for (nx, ny), o in zip(nrm.tolist(), off.tolist()):
                d = nx * dx + ny * dy - o * radius
                piece = d if piece is None else torch.maximum(piece, d)
            sd = piece if sd is None else torch.minimum(sd, piece)
    return (0.5 - sd).clamp(0, 1)


def background_image(background: str, texture: str, height: int, width: int, device=None) -> torch.Tensor:
    """[H, W, 3] float32 RGB in 0..255."""
    base = torch.tensor(BACKGROUND_COLORS[background], dtype=torch.float32, device=device).view(1, 1, 3)
    img = base.expand(height, width, 3).clone()
    if texture == "checkered":
        img = img + CHECKER_AMPLITUDE * checker_sign(height, width, device).unsqueeze(-1)
    return img


def checker_sign(height: int, width: int, device=None) -> torch.Tensor:
    """[H, W] in {-1, +1}: the checkered texture's pattern (cells of min(H, W) / CHECKER_CELLS pixels)."""
    cell = min(height, width) / CHECKER_CELLS
    iy = (torch.arange(height, device=device) / cell).floor().long()
    ix = (torch.arange(width, device=device) / cell).floor().long()
    return ((iy.view(-1, 1) + ix.view(1, -1)) % 2).float() * 2 - 1


def _render_frames(specs, num_frames: int, height: int, width: int, start_frames, device):
    """Unrounded RGB frames [B, T, H, W, 3] in 0..255 of several scenes, vectorised over scenes, objects and frames
    (objects of one shape are drawn together; each scene draws its large object(s) first), and the objects'
    anti-aliased coverage [B, T, H, W] in [0, 1] (the union of the objects)."""
    b = len(specs)
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    base = torch.tensor([BACKGROUND_COLORS[s.attrs.background] for s in specs], dtype=torch.float32, device=device)
    amp = torch.tensor(
        [CHECKER_AMPLITUDE * (s.attrs.texture == "checkered") for s in specs], dtype=torch.float32, device=device
    )
    sign = checker_sign(height, width, device)
    frames = (
        (base.view(b, 1, 1, 3) + (amp.view(b, 1, 1) * sign).unsqueeze(-1)).unsqueeze(1).repeat(1, num_frames, 1, 1, 1)
    )
    cov = torch.zeros(b, 2, num_frames, height, width, device=device)
    color = torch.zeros(b, 2, 3, device=device)
    groups: dict[str, list] = {}
    for v, (spec, f0) in enumerate(zip(specs, start_frames)):
        objs = spec.attrs.objects
        tracks = spec.object_tracks(num_frames, height, width, f0)
        order = sorted(range(len(objs)), key=lambda i: SIZES.index(objs[i].size), reverse=True)
        for layer, i in enumerate(order):
            groups.setdefault(objs[i].shape, []).append((v, layer, tracks[i]["radius"], tracks[i]["centers"]))
            color[v, layer] = torch.tensor(OBJECT_COLORS[objs[i].color], dtype=torch.float32, device=device)
    for shape, items in groups.items():
        centers = torch.as_tensor(np.stack([it[3] for it in items]), dtype=torch.float32, device=device)  # [n, T, 2]
        radius = torch.tensor([it[2] for it in items], dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        c = _coverage(shape, radius, centers.reshape(-1, 2), xs, ys).view(len(items), num_frames, height, width)
        vid = torch.tensor([it[0] for it in items], device=device)
        lay = torch.tensor([it[1] for it in items], device=device)
        cov[vid, lay] = c
    for layer in range(2):
        a = cov[:, layer].unsqueeze(-1)
        frames = frames * (1 - a) + color[:, layer].view(b, 1, 1, 1, 3) * a
    return frames, 1 - (1 - cov[:, 0]) * (1 - cov[:, 1])


def render_video(
    spec: SceneSpec,
    num_frames: int,
    height: int = 128,
    width: int = 128,
    start_frame: int = 0,
    device: str | torch.device | None = None,
    chunk_frames: int = 64,
) -> torch.Tensor:
    """Render frames [start_frame, start_frame + num_frames) of a scene: uint8 tensor [T, H, W, 3]."""
    check_resolution(height, width)
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    device = torch.device(device or "cpu")
    out = torch.empty(num_frames, height, width, 3, dtype=torch.uint8, device=device)
    for c0 in range(0, num_frames, chunk_frames):
        c1 = min(num_frames, c0 + chunk_frames)
        frames, _ = _render_frames([spec], c1 - c0, height, width, [start_frame + c0], device)
        out[c0:c1] = frames[0].round().clamp(0, 255).to(torch.uint8)
    return out


def render_batch(
    specs: list[SceneSpec],
    num_frames: int,
    height: int = 128,
    width: int = 128,
    device=None,
    start_frames=None,
    output: str = "vae",
    return_coverage: bool = False,
):
    """Several scenes at once (vectorised; the same pixels as `render_video`). `output="vae"`: float
    [B, C=3, T, H, W] in [-1, 1] (the VAE's input convention); `output="uint8"`: uint8 [B, T, H, W, 3].
    `return_coverage=True` also returns where the objects are: float [B, 1, T, H, W] in [0, 1] (anti-aliased
    union of the objects), e.g. to weight a reconstruction loss towards the objects."""
    check_resolution(height, width)
    if output not in ("vae", "uint8"):
        raise ValueError(f"output must be 'vae' or 'uint8', got {output!r}")
    device = torch.device(device or "cpu")
    start_frames = list(start_frames) if start_frames is not None else [0] * len(specs)
    frames, coverage = _render_frames(specs, num_frames, height, width, start_frames, device)
    frames = frames.round().clamp(0, 255)
    video = frames.to(torch.uint8) if output == "uint8" else frames.permute(0, 4, 1, 2, 3).div(127.5).sub(1.0)
    return (video, coverage.unsqueeze(1)) if return_coverage else video


def scene_specs(split: str, count: int, base_seed: int = 0, two_object_prob: float = 0.5) -> list[SceneSpec]:
    """`count` deterministic specs of a split: spec i draws its attributes and positions from seed (base_seed, i)."""
    if isinstance(base_seed, bool) or not isinstance(base_seed, (int, np.integer)) or base_seed < 0:
        raise ValueError(f"base_seed must be a non-negative integer, got {base_seed!r}")
    specs = []
    offset = 0 if split == "train" else 1_000_003
    for i in range(count):
        rng = np.random.default_rng([base_seed, offset + i])
        attrs = sample_scene(rng, split, two_object_prob)
        specs.append(SceneSpec(attrs, seed=int(rng.integers(2**31))))
    return specs
