# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Evaluate a text-to-video pipeline on the shapes domain: sample prompts of a split, score every video with the
suite, and compare with two references scored the same way: the real renders of the same prompts, and their
reconstructions by the pipeline's VAE (the best a latent model can do). Set-level Frechet distances in the
classifier's feature space: generated vs. real, VAE reconstructions vs. real, and real vs. real (other seeds)."""

from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import torch

from .classifier import frechet_distance, load_classifier
from .domain import SceneSpec, render_video, scene_specs
from .metrics import METRICS, score_video
from .video_io import ffmpeg_available, try_write_video

DEFAULT_STEPS = 50  # a WanPipeline's sampling steps and guidance scale when none are given
DEFAULT_GUIDANCE_SCALE = 5.0
ATTRIBUTE_METRICS = (
    "background_color",
    "background_texture",
    "object_color",
    "shape",
    "size",
    "count",
    "direction",
    "speed",
)


def is_streaming_pipeline(path: str) -> bool:
    """Whether `path` holds a `StreamingHybridPipeline` (a distilled causal student) rather than a `WanPipeline`."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path} is not a pipeline folder (no model_index.json)")
    with open(index) as f:
        name = json.load(f).get("_class_name")
    # save_pretrained writes [shim module, class] (remote-code layout) or the bare class name
    return (name[-1] if isinstance(name, list) else name) == "StreamingHybridPipeline"


def load_pipeline(path: str, device=None, dtype=torch.float32):
    """A `WanPipeline` (the teacher) or a `StreamingHybridPipeline` (a student), from its folder's model_index.json."""
    # A local folder only: diffusers would take any other string for a Hub repository and try to download it.
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"no pipeline folder at {path!r}: {os.path.join(path, 'model_index.json')} is missing")
    if is_streaming_pipeline(path):
        from ..pipelines.pipeline_streaming_hybrid import StreamingHybridPipeline as cls
    else:
        from diffusers import WanPipeline as cls

    pipe = cls.from_pretrained(path, dtype=dtype)
    pipe.to(device or "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe, prompts, num_frames=33, height=128, width=128, steps=None, guidance_scale=None, seed=0, batch_size=16
):
    """uint8 videos [N, T, H, W, 3], one per prompt (seed + index for prompt index). A `WanPipeline` samples with
    `steps` (default 50) and `guidance_scale` (default 5.0). A streaming student samples with its own few-step
    schedule and no guidance: it ignores both, and says so with a warning when either is given."""
    from ..pipelines.pipeline_streaming_hybrid import StreamingHybridPipeline

    if isinstance(pipe, StreamingHybridPipeline):
        given = {k: v for k, v in (("steps", steps), ("guidance_scale", guidance_scale)) if v is not None}
        if given:
            warnings.warn(
                f"{', '.join(f'{k}={v}' for k, v in given.items())} ignored: a StreamingHybridPipeline samples with "
                f"its own denoising_step_list ({len(pipe.config.denoising_step_list)} steps) and no guidance.",
                UserWarning,
                stacklevel=2,
            )
        sampling = {}
    else:
        sampling = {
            "num_inference_steps": DEFAULT_STEPS if steps is None else steps,
            "guidance_scale": DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale,
        }
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed + i + j) for j in range(len(chunk))]
        frames = pipe(
            prompt=chunk,
            height=height,
            width=width,
            num_frames=num_frames,
            generator=gens,
            output_type="np",
            **sampling,
        ).frames
        out.append((np.clip(np.asarray(frames), 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def vae_reconstruct(vae, videos: np.ndarray, batch_size: int = 8) -> np.ndarray:
    dev = vae.device
    out = []
    for i in range(0, len(videos), batch_size):
        x = torch.from_numpy(videos[i : i + batch_size]).to(dev).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)
        z = vae.encode(x.to(vae.dtype)).latent_dist.mode()
        y = vae.decode(z).sample.float()
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy())
    return np.concatenate(out)


def summarize(reports: list[dict]) -> dict:
    """Mean of each score over videos, plus `attribute_accuracy` (mean of the eight adherence metrics) and `coverage`
    (per metric, the mean fraction of its units judged). A metric that could not be judged anywhere in a video scores
    0 there (`score_video`), so videos whose objects merge for good do not drop out of these means."""
    out = {}
    for name in list(METRICS) + ["adherence", "temporal", "distribution", "overall"]:
        vals = [r["scores"][name] for r in reports if name in r["scores"]]
        if vals:
            out[name] = float(np.mean(vals))
    out["attribute_accuracy"] = float(np.mean([out[m] for m in ATTRIBUTE_METRICS if m in out]))
    coverage = {}
    for name in METRICS:
        vals = [r["coverage"][name] for r in reports if name in r.get("coverage", {})]
        if vals:
            coverage[name] = float(np.mean(vals))
    out["coverage"] = coverage
    one = [r for r in reports if r.get("num_objects") == 1]
    two = [r for r in reports if r.get("num_objects") == 2]
    for tag, group in (("one_object", one), ("two_objects", two)):
        if group:
            out[f"adherence_{tag}"] = float(np.mean([r["scores"].get("adherence", 0.0) for r in group]))
    out["num_videos"] = len(reports)
    return out


def summarize_windows(reports: list[dict]) -> list[dict]:
    """Mean scores per time window over videos (windows of the same index across videos), to show drift in long
    streams: `[{"start", "end", "num_videos", "adherence", ...}, ...]`."""
    by_index: dict[int, list[dict]] = {}
    for r in reports:
        for i, w in enumerate(r.get("windows", [])):
            by_index.setdefault(i, []).append(w)
    out = []
    for i in sorted(by_index):
        ws = by_index[i]
        row = {"start": ws[0]["start"], "end": ws[0]["end"], "num_videos": len(ws)}
        for name in dict.fromkeys(k for w in ws for k in w["scores"]):  # a window may leave an unjudged metric out
            vals = [w["scores"][name] for w in ws if name in w["scores"]]
            row[name] = float(np.mean(vals))
        out.append(row)
    return out


def _shift_key(scheduler) -> str:
    """The config key of a flow-matching scheduler's sampling shift: `shift` (FlowMatchEulerDiscreteScheduler) or
    `flow_shift` (UniPC / DPM-Solver with flow sigmas, Wan2.1's own default)."""
    for key in ("shift", "flow_shift"):
        if key in scheduler.config:
            return key
    raise ValueError(f"{type(scheduler).__name__} has no sampling shift (`shift` or `flow_shift`) to replace.")


def with_sampling_shift(scheduler, shift: float):
    """A copy of `scheduler` (same class and config) sampling with `shift`."""
    if shift <= 0:
        raise ValueError(f"flow_shift must be positive, got {shift}.")
    return type(scheduler).from_config(scheduler.config, **{_shift_key(scheduler): shift})


def evaluate_pipeline(
    pipeline_path: str,
    split: str = "heldout",
    num_prompts: int = 64,
    num_frames: int = 33,
    resolution: int = 128,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 16,
    device=None,
    dtype: str = "fp32",
    classifier_path: str | None = None,
    save_videos: str | None = None,
    num_saved_videos: int = 8,
    seed: int = 0,
    prompt_seed: int = 2024,
    baselines: bool = True,
    flow_shift: float | None = None,
) -> dict:
    """Generates one video per held-out prompt with the pipeline folder `pipeline_path` and scores them (and, with
    `baselines`, the VAE's reconstructions of the real renders). `steps` / `guidance_scale`: a `WanPipeline`'s
    sampling (None: 50 and 5.0); a streaming student ignores them (with a warning if given). `flow_shift` replaces the
    sampling scheduler's `shift` of a `WanPipeline` (None: the folder's own); a streaming student samples with its
    fixed step list, so the option is refused for one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    t0 = time.time()
    pipe = load_pipeline(pipeline_path, device, torch_dtype)
    streaming = is_streaming_pipeline(pipeline_path)
    if flow_shift is not None:
        if streaming:
            raise ValueError(f"flow_shift={flow_shift} applies to a WanPipeline's sampler; {pipeline_path} is a "
                             "streaming student, which samples with its own `denoising_step_list`.")
        pipe.scheduler = with_sampling_shift(pipe.scheduler, flow_shift)
    classifier = load_classifier(classifier_path, device=device)
    specs = scene_specs(split, num_prompts, base_seed=prompt_seed)
    prompts = [s.prompt for s in specs]
    gen = generate(pipe, prompts, num_frames, resolution, resolution, steps, guidance_scale, seed, batch_size)
    t_gen = time.time() - t0
    real = np.stack([render_video(s, num_frames, resolution, resolution, device=device).cpu().numpy() for s in specs])
    sets = {"generated": gen, "real": real}
    if baselines:
        vae = pipe.vae.to(torch.float32)
        sets["vae_reconstruction"] = vae_reconstruct(vae, real)
        pipe.vae.to(torch_dtype)
    result = {
        "pipeline": pipeline_path,
        "pipeline_class": type(pipe).__name__,
        "split": split,
        "num_prompts": num_prompts,
        "num_frames": num_frames,
        "resolution": resolution,
        "steps": len(pipe.config.denoising_step_list) if streaming else (DEFAULT_STEPS if steps is None else steps),
        "guidance_scale": None if streaming else (DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale),
        "flow_shift": None if streaming else float(pipe.scheduler.config[_shift_key(pipe.scheduler)]),
        "dtype": dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "classifier": classifier is not None,
        "generation_seconds": t_gen,
    }
    reports = {}
    for name, videos in sets.items():
        reps = []
        for spec, video in zip(specs, videos):
            r = score_video(video, spec.prompt, classifier=classifier, device=device)
            r["num_objects"] = len(spec.attrs.objects)
            reps.append(r)
        reports[name] = reps
        result[name] = summarize(reps)
        result[name]["windows"] = summarize_windows(reps)
    if classifier is not None:
        feats = {k: np.concatenate([classifier.video_features(v) for v in vids]) for k, vids in sets.items()}
        other = np.stack(
            [
                render_video(SceneSpec(s.attrs, seed=s.seed + 1), num_frames, resolution, resolution, device=device)
                .cpu()
                .numpy()
                for s in specs
            ]
        )
        ref = np.concatenate([classifier.video_features(v) for v in other])
        result["fd"] = {f"{k}_vs_real": frechet_distance(f, ref) for k, f in feats.items()}
        result["fd"]["note"] = "reference: real renders of the same prompts with other seeds; 16-frame clips, stride 4"
    if save_videos:
        ext = ".mp4" if ffmpeg_available() else ".gif"
        os.makedirs(save_videos, exist_ok=True)
        for i in range(min(num_saved_videos, len(specs))):
            try_write_video(gen[i], os.path.join(save_videos, f"{i:02d}_generated{ext}"))
            try_write_video(real[i], os.path.join(save_videos, f"{i:02d}_real{ext}"))
        with open(os.path.join(save_videos, "prompts.json"), "w") as f:
            json.dump(
                [
                    {"index": i, "prompt": p, "scores": reports["generated"][i]["scores"]}
                    for i, p in enumerate(prompts[:num_saved_videos])
                ],
                f,
                indent=2,
            )
    result["per_video"] = [
        {"prompt": p, "generated": reports["generated"][i]["scores"]} for i, p in enumerate(prompts)
    ]
    result["seconds"] = time.time() - t0
    return result
