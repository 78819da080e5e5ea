# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""A small video classifier trained on the shapes domain: the feature space of the domain's Frechet distance (its
analogue of FVD) and a second, learned check of prompt adherence.

Input: 16-frame clips resized to 64x64. Output: logits for the background colour and texture, the object count,
and per object slot (canonical order, see `SceneAttrs.canonical`) colour, shape, size, speed and motion axis (slot 2
has an extra "none" class). The motion axis (horizontal / vertical / diagonal) is what a clip shows at any time, since
bounces flip directions but never the axis.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .analysis import release_freed_memory
from .domain import (
    AXES,
    BACKGROUND_COLORS,
    OBJECT_COLORS,
    SHAPES,
    SIZES,
    SPEEDS,
    TEXTURES,
    SceneAttrs,
    SceneSpec,
    axis_of,
    render_batch,
    render_video,
    scene_specs,
)

CLIP_FRAMES = 16
CLIP_STRIDE = 4
CLIP_BATCH = 64  # clips per forward pass (bounds memory on long videos)
# The FD's reference renders use seeds FD_REFERENCE_SEED, FD_REFERENCE_SEED + 1, ...: `scene_specs` draws seeds below
# 2**31 and renders default to small seeds, so a video to score is never one of its own references.
FD_REFERENCE_SEED = 2**31


def fd_reference_seeds(num_reference: int) -> list[int]:
    """The seeds of the FD's reference renders of a caption."""
    return [FD_REFERENCE_SEED + k for k in range(num_reference)]


class _Rendered:
    """A video rendered on demand: `shape` and slicing [a:b] like a [T, H, W, 3] array."""

    def __init__(self, render, t: int, h: int, w: int):
        self.render, self.shape = render, (t, h, w, 3)

    def __getitem__(self, sl: slice):
        a, b, _ = sl.indices(self.shape[0])
        return self.render(a, b)


SLOT_HEADS = {
    "color": list(OBJECT_COLORS),
    "shape": list(SHAPES),
    "size": list(SIZES),
    "speed": list(SPEEDS),
    "axis": list(AXES),
}
HEADS = {"background": list(BACKGROUND_COLORS), "texture": list(TEXTURES), "count": ["1", "2"]}
for _slot in (0, 1):
    for _name, _classes in SLOT_HEADS.items():
        HEADS[f"{_name}{_slot}"] = _classes + (["none"] if _slot == 1 else [])


def labels_of(attrs: SceneAttrs) -> dict[str, int]:
    """Class index per head for a scene (canonical object order)."""
    attrs = attrs.canonical()
    out = {
        "background": HEADS["background"].index(attrs.background),
        "texture": HEADS["texture"].index(attrs.texture),
        "count": len(attrs.objects) - 1,
    }
    for slot in (0, 1):
        if slot < len(attrs.objects):
            o = attrs.objects[slot]
            vals = {"color": o.color, "shape": o.shape, "size": o.size, "speed": o.speed, "axis": axis_of(o.direction)}
            for name, v in vals.items():
                out[f"{name}{slot}"] = HEADS[f"{name}{slot}"].index(v)
        else:
            for name in SLOT_HEADS:
                out[f"{name}{slot}"] = HEADS[f"{name}{slot}"].index("none")
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.cov(a, rowvar=False) if len(a) > 1 else np.zeros((a.shape[1],) * 2)
    s2 = np.cov(b, rowvar=False) if len(b) > 1 else np.zeros((b.shape[1],) * 2)
    s1 = s1 + eps * np.eye(len(s1))
    s2 = s2 + eps * np.eye(len(s2))
    w, v = np.linalg.eigh(s1)
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1h @ s2 @ s1h
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _block(cin: int, cout: int, stride) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class ShapesVideoClassifier(ModelMixin, ConfigMixin):
    """3D-CNN over [B, 3, 16, 64, 64] clips in [-1, 1]; `features` (the FD's space) and per-head logits."""

    @register_to_config
    def __init__(
        self,
        width: int = 32,
        feature_dim: int = 128,
        clip_frames: int = CLIP_FRAMES,
        resolution: int = 64,
        fd_floor: float = 0.0,
        fd_scale: float = 1.0,
        fd_calibration_frames: int = 33,
    ):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _block(3, w, (1, 2, 2)),
            _block(w, 2 * w, (2, 2, 2)),
            _block(2 * w, 4 * w, (2, 2, 2)),
            _block(4 * w, 4 * w, (2, 1, 1)),
        )
        self.proj = nn.Linear(4 * w, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(classes)) for name, classes in HEADS.items()})

    def preprocess(self, video) -> torch.Tensor:
        """uint8 [T, H, W, 3] (or [B, T, H, W, 3]) -> float [B, 3, T, r, r] in [-1, 1] on the model's device."""
        if isinstance(video, np.ndarray):
            video = torch.from_numpy(np.ascontiguousarray(video))
        if video.ndim == 4:
            video = video.unsqueeze(0)
        b, t, h, w, _ = video.shape
        x = video.to(self.device).float().div(127.5).sub(1.0).permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w)
        r = self.config.resolution
        if (h, w) != (r, r):
            x = F.interpolate(x, size=(r, r), mode="area")
        return x.view(b, t, 3, r, r).permute(0, 2, 1, 3, 4).contiguous()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x.to(self.dtype)).mean(dim=(2, 3, 4))
        return F.silu(self.proj(h))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}

    # -- clips ----------------------------------------------------------------------------------------------------

    def clips(self, video, starts) -> torch.Tensor:
        """[N, 3, 16, r, r] clips of `video` [T, H, W, 3] starting at `starts` (short videos: last frame repeated).
        Only the frames the clips cover are converted (a long video is never converted whole)."""
        t = video.shape[0]
        n = self.config.clip_frames
        starts = list(starts)
        if not starts:
            r = self.config.resolution
            return torch.zeros(0, 3, n, r, r, device=self.device)
        lo, hi = min(starts), min(t, max(starts) + n)
        x = self.preprocess(video[lo:hi])[0]  # [3, hi - lo, r, r]
        if hi - lo < max(starts) - lo + n:  # short video: repeat the last frame
            x = torch.cat([x, x[:, -1:].expand(-1, max(starts) - lo + n - (hi - lo), -1, -1)], 1)
        return torch.stack([x[:, s - lo : s - lo + n] for s in starts])

    def clip_starts(self, num_frames: int, stride: int = CLIP_STRIDE) -> list[int]:
        n = self.config.clip_frames
        if num_frames <= n:
            return [0]
        starts = list(range(0, num_frames - n + 1, stride))
        if starts[-1] != num_frames - n:
            starts.append(num_frames - n)
        return starts

    @torch.no_grad()
    def video_features(self, video, stride: int = CLIP_STRIDE, batch_size: int = CLIP_BATCH) -> np.ndarray:
        """Features [N, D] of a video's sliding clips (16 frames, stride 4), `batch_size` clips at a time: only the
        frames of one batch are converted at once, so memory is bounded by the batch, not by the video's length.
        `video`: [T, H, W, 3] (anything with `shape` that slices along frames)."""
        starts = self.clip_starts(video.shape[0], stride)
        out = []
        for i in range(0, len(starts), batch_size):
            out.append(self.features(self.clips(video, starts[i : i + batch_size])).float().cpu())
            release_freed_memory()
        return torch.cat(out).numpy()

    # -- scores ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def window_adherence(self, video, attrs: SceneAttrs, bounds, device=None, batch_size: int = CLIP_BATCH) -> list[float]:
        """Per window (start, end): fraction of heads whose prediction matches the caption, on the window's clip
        (its first 16 frames, or the 16 frames ending at its end if it is shorter)."""
        t = video.shape[0]
        n = self.config.clip_frames
        starts = [max(0, min(s, t - n)) for s, _ in bounds]
        labels = labels_of(attrs)
        acc = np.zeros(len(bounds))
        for i in range(0, len(starts), batch_size):
            logits = self(self.clips(video, starts[i : i + batch_size]))
            for name, lg in logits.items():
                acc[i : i + batch_size] += (lg.argmax(-1).cpu().numpy() == labels[name]).astype(float)
            del logits
            release_freed_memory()
        return list(acc / len(HEADS))

    def video_fd(self, video, attrs: SceneAttrs, num_reference: int = 6, device=None) -> float:
        """FD between the video's clip features and those of `num_reference` real renders of the same caption, of
        the same size and length, with the seeds `fd_reference_seeds(num_reference)` (2**31, 2**31 + 1, ...): seeds
        that `scene_specs` (below 2**31) and the default render seeds never use, so that a video is never compared
        with a reference set that contains itself. The references are rendered clip batch by clip batch."""
        t, h, w = video.shape[0], video.shape[1], video.shape[2]
        gen = self.video_features(video)
        ref = []
        for seed in fd_reference_seeds(num_reference):
            spec = SceneSpec(attrs, seed=seed)

            def render(a, b, spec=spec):
                return render_video(spec, b - a, h, w, start_frame=a, device=self.device)

            ref.append(self.video_features(_Rendered(render, t, h, w)))
        return frechet_distance(gen, np.concatenate(ref))

    def fd_score(self, fd: float) -> float:
        """exp(-max(FD - floor, 0) / scale): ~1 for real videos of the caption, ~exp(-1) for a video of another one."""
        return float(math.exp(-max(fd - self.config.fd_floor, 0.0) / max(self.config.fd_scale, 1e-6)))


def default_classifier_path() -> str | None:
    """$DIFFUSERS_HYBRID_SHAPES_CLASSIFIER, else `pretrained/shapes/classifier` of a source checkout."""
    env = os.environ.get("DIFFUSERS_HYBRID_SHAPES_CLASSIFIER")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.normpath(os.path.join(here, "..", "..", "..", "pretrained", "shapes", "classifier"))
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def load_classifier(path: str | None = None, device=None) -> ShapesVideoClassifier | None:
    """The classifier at `path` (default: `default_classifier_path()`), or None where there is none: the suite then
    reports the image-analysis metrics only."""
    path = path or default_classifier_path()
    if path is None or not os.path.isfile(os.path.join(path, "config.json")):
        if path is not None:
            import warnings

            warnings.warn(f"no shapes classifier at {path}: distribution metrics are skipped")
        return None
    model = ShapesVideoClassifier.from_pretrained(path, torch_dtype=torch.float32)
    return model.to(device or "cpu").eval()


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def _batch(specs, starts, device, resolution=128):
    return render_batch(specs, CLIP_FRAMES, resolution, resolution, device=device, start_frames=starts, output="uint8")


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur, noise and colour jitter, so that the features tolerate a decoder's softness."""
    b = x.shape[0]
    dev = x.device
    blur = torch.rand(b, generator=gen, device="cpu").to(dev) < 0.5
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25], device=dev)
        kk = (k[:, None] * k[None, :]).view(1, 1, 1, 3, 3).repeat(3, 1, 1, 1, 1)
        xb = F.conv3d(F.pad(x, (1, 1, 1, 1, 0, 0), mode="replicate"), kk, groups=3)
        x = torch.where(blur.view(b, 1, 1, 1, 1), xb, x)
    noise = torch.randn(x.shape, generator=gen, device="cpu").to(dev) * 0.02
    gain = 1 + 0.04 * (torch.rand(b, 3, 1, 1, 1, generator=gen, device="cpu").to(dev) - 0.5)
    return (x * gain + noise).clamp(-1, 1)


def train_classifier(
    output_dir: str,
    steps: int = 1500,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    width: int = 32,
    feature_dim: int = 128,
    device: str | None = None,
    seed: int = 0,
    calibration_prompts: int = 32,
    calibration_frames: int = 33,
    log_every: int = 100,
    max_start_frame: int = 256,
    train_split: str = "train",
    heldout_clips: int = 256,
) -> dict:
    """Train the classifier on rendered clips (random start frames), calibrate the FD score, save in diffusers format
    (config.json + safetensors) with a model card, and return the measurements.

    Args:
        train_split (`str`, defaults to `"train"`):
            `"train"`: clips of the training split only, so the held-out accuracy measures generalisation to unseen
            (colour, shape) pairs. `"all"`: half of every batch from each split, so that the classifier knows every
            attribute combination; this is the choice for an *evaluator* of held-out prompts (a classifier that never
            saw a held-out pair reads its shape from its colour). Its held-out accuracy is then on new clips of seen
            combinations.
    """
    if train_split not in ("train", "all"):
        raise ValueError(f"train_split must be 'train' or 'all', got {train_split!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = ShapesVideoClassifier(width=width, feature_dim=feature_dim).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for step in range(steps):
        base_seed = int(rng.integers(2**31))
        if train_split == "all":
            held = batch_size // 2
            specs = scene_specs("train", batch_size - held, base_seed) + scene_specs("heldout", held, base_seed)
        else:
            specs = scene_specs("train", batch_size, base_seed=base_seed)
        starts = rng.integers(0, max_start_frame, size=batch_size).tolist()
        x = _augment(model.preprocess(_batch(specs, starts, device)), gen)
        labels = [labels_of(s.attrs) for s in specs]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = sum(
            F.cross_entropy(lg.float(), torch.tensor([lab[n] for lab in labels], device=device))
            for n, lg in logits.items()
        ) / len(logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[classifier] step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    metrics = {"train_steps": steps, "train_seconds": time.time() - t0, "train_split": train_split}
    # Held-out accuracy per head (clips of the held-out split at random times).
    specs = scene_specs("heldout", heldout_clips, base_seed=12345)
    starts = np.random.default_rng(1).integers(0, max_start_frame, size=len(specs)).tolist()
    correct = {n: 0 for n in HEADS}
    with torch.no_grad():
        for i in range(0, len(specs), 64):
            sp, st = specs[i : i + 64], starts[i : i + 64]
            logits = model(model.preprocess(_batch(sp, st, device)))
            for n, lg in logits.items():
                pred = lg.argmax(-1).cpu().numpy()
                correct[n] += int(sum(int(p == labels_of(s.attrs)[n]) for p, s in zip(pred, sp)))
    metrics["heldout_clips"] = len(specs)
    metrics["heldout_accuracy"] = {n: c / len(specs) for n, c in correct.items()}
    metrics["heldout_accuracy_mean"] = float(np.mean(list(metrics["heldout_accuracy"].values())))
    # FD calibration: a real render of the caption (another seed) vs. the reference set, and a render of another
    # caption vs. the same reference set.
    cal = scene_specs("train", calibration_prompts, base_seed=777)
    real, other = [], []
    with torch.no_grad():
        for i, s in enumerate(cal):
            v = render_video(SceneSpec(s.attrs, seed=1000 + i), calibration_frames, device=device)
            real.append(model.video_fd(v, s.attrs))
            o = cal[(i + 1) % len(cal)]
            v2 = render_video(SceneSpec(o.attrs, seed=2000 + i), calibration_frames, device=device)
            other.append(model.video_fd(v2, s.attrs))
    floor = float(np.percentile(real, 90))
    scale = max(float(np.median(other)) - floor, 1e-3)
    model.register_to_config(fd_floor=floor, fd_scale=scale, fd_calibration_frames=calibration_frames)
    metrics.update(
        fd_real_median=float(np.median(real)),
        fd_other_caption_median=float(np.median(other)),
        fd_floor=floor,
        fd_scale=scale,
        fd_calibration_frames=calibration_frames,
        fd_score_real_mean=float(np.mean([model.fd_score(x) for x in real])),
        fd_score_other_caption_mean=float(np.mean([model.fd_score(x) for x in other])),
    )
    os.makedirs(output_dir, exist_ok=True)
    model.to("cpu").save_pretrained(output_dir)
    with open(os.path.join(output_dir, "measurements.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    write_classifier_card(output_dir, metrics)
    return metrics


def write_classifier_card(output_dir: str, metrics: dict) -> None:
    acc = metrics.get("heldout_accuracy", {})
    split = metrics.get("train_split", "train")
    trained_on = (
        "rendered clips of both splits of the *shapes* domain, so that it knows every attribute combination (the "
        "held-out colour-shape pairs included) and can judge held-out prompts;"
        if split == "all"
        else "rendered clips of the training split of the *shapes* domain;"
    )
    heldout_note = (
        "new clips of the held-out split, whose attribute combinations were seen in training"
        if split == "all"
        else "attribute combinations never seen in training"
    )
    rows = "\n".join(f"| {n} | {a:.3f} |" for n, a in acc.items())
    card = f"""---
library_name: diffusers
license: apache-2.0
tags: [diffusers-hybrid, shapes, video-classification, evaluation]
---

# Shapes video classifier

A small 3D CNN (`ShapesVideoClassifier` in `diffusers_hybrid.shapes.classifier`) trained on
{trained_on} 16 frames, resized to 64x64. Its pooled features are
the space of the domain's Frechet distance (the analogue of FVD), and its attribute predictions are a second, learned
adherence check (`classifier_adherence` in `python -m diffusers_hybrid.shapes score`).

- Trained with `python -m diffusers_hybrid.shapes train-classifier --train-split {split}` ({metrics.get("train_steps")} steps,
  {metrics.get("train_seconds", 0):.0f} s).
- FD score calibration ({metrics.get("fd_calibration_frames", 33)}-frame videos vs. 6 real renders of the caption):
  floor {metrics.get("fd_floor", 0):.3f} (90th percentile over real videos), scale {metrics.get("fd_scale", 0):.3f}
  (median over videos of another caption, minus the floor). Real videos score {metrics.get("fd_score_real_mean", 0):.3f}
  on average, videos of another caption {metrics.get("fd_score_other_caption_mean", 0):.3f}.

Held-out split accuracy per head ({metrics.get("heldout_clips", 256)} clips at random times, {heldout_note}):

| head | accuracy |
| --- | --- |
{rows}

Mean: {metrics.get("heldout_accuracy_mean", 0):.3f}.
"""
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(card)
