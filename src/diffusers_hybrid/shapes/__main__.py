# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Command line of the shapes domain and its evaluation suite.

python -m diffusers_hybrid.shapes render --prompt TEXT --frames N --seed S --out X.mp4
python -m diffusers_hybrid.shapes score VIDEO --prompt TEXT            # JSON scores, overall and per window
python -m diffusers_hybrid.shapes generate --prompt TEXT --out X.mp4   # sample the shipped teacher (CPU is fine)
python -m diffusers_hybrid.shapes prompts --split heldout --num 5      # captions from the grammar
python -m diffusers_hybrid.shapes build-text --out DIR                 # tokenizer/ + text_encoder/ folders
python -m diffusers_hybrid.shapes train-classifier --out DIR           # the FD / adherence classifier
python -m diffusers_hybrid.shapes evaluate --pipeline DIR --out X.json # held-out evaluation of a pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_SPLITS = ("train", "heldout")  # domain.SPLITS, not imported here: `--help` should not wait for torch


def _seed(text: str) -> int:
    """argparse type of a --seed: a non-negative integer (numpy's and the renderer's seeds cannot be negative)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: expected a non-negative integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid seed {value}: expected a non-negative integer")
    return value


def _pretrained(name: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "pretrained", "shapes", name))


def cmd_render(a):
    from .domain import SceneSpec, render_video, scene_specs
    from .video_io import write_video

    if a.prompt:
        spec = SceneSpec.from_prompt(a.prompt, a.seed)
    else:
        spec = scene_specs(a.split, 1, base_seed=a.seed)[0]
    video = render_video(spec, a.frames, a.height, a.width, start_frame=a.start_frame)
    write_video(video.numpy(), a.out)
    print(json.dumps({"out": a.out, "prompt": spec.prompt, "seed": spec.seed, "frames": a.frames}))


def cmd_score(a):
    import torch

    from .classifier import load_classifier
    from .metrics import score_video
    from .video_io import read_video

    classifier = None
    if a.classifier != "none":
        if a.classifier is not None and not os.path.isfile(os.path.join(a.classifier, "config.json")):
            sys.exit(f"no classifier at {a.classifier}")
        classifier = load_classifier(a.classifier, device=a.device)
    results = []
    for path in a.videos:
        video = read_video(path)
        with torch.no_grad():
            r = score_video(
                video, a.prompt, window=a.window, classifier=classifier, fd_reference=a.fd_reference, device=a.device
            )
        r["video"] = path
        if classifier is None:
            r["note"] = "no classifier found: distribution metrics (fd, classifier_adherence) omitted"
        if not a.verbose:
            r.pop("measurements")
        results.append(r)
    print(json.dumps(results[0] if len(results) == 1 else results, indent=2))


def cmd_generate(a):
    import torch

    if not os.path.isfile(os.path.join(a.pipeline, "transformer", "config.json")):
        sys.exit(
            f"no trained transformer under {a.pipeline}: train one with training/train_teacher.py "
            "(training/README_shapes.md), or pass --pipeline"
        )
    from .evaluate import generate, load_pipeline
    from .video_io import write_video

    torch.manual_seed(a.seed)
    pipe = load_pipeline(a.pipeline, a.device, torch.float32)
    if a.progress:
        pipe.set_progress_bar_config(disable=False)
    video = generate(pipe, [a.prompt], a.frames, a.height, a.width, a.steps, a.guidance_scale, a.seed, 1)[0]
    write_video(video, a.out)
    out = {"out": a.out, "prompt": a.prompt, "frames": int(video.shape[0])}
    if a.score:
        from .classifier import load_classifier
        from .metrics import score_video

        out["scores"] = score_video(video, a.prompt, classifier=load_classifier(None))["scores"]
    print(json.dumps(out, indent=2))


def cmd_prompts(a):
    from .domain import scene_specs

    for s in scene_specs(a.split, a.num, base_seed=a.seed):
        print(s.prompt)


def cmd_build_text(a):
    from .text import TINY_UMT5_CONFIG, UMT5_CONFIG, save_text_components

    save_text_components(a.out, TINY_UMT5_CONFIG if a.tiny else UMT5_CONFIG, seed=a.seed)
    print(json.dumps({"out": a.out}))


def cmd_train_classifier(a):
    from .classifier import train_classifier

    m = train_classifier(
        a.out,
        steps=a.steps,
        batch_size=a.batch_size,
        learning_rate=a.learning_rate,
        width=a.width,
        feature_dim=a.feature_dim,
        device=a.device,
        seed=a.seed,
        calibration_prompts=a.calibration_prompts,
        log_every=a.log_every,
        train_split=a.train_split,
        heldout_clips=a.heldout_clips,
    )
    print(json.dumps(m, indent=2))


def cmd_evaluate(a):
    from .evaluate import evaluate_pipeline

    r = evaluate_pipeline(
        a.pipeline,
        split=a.split,
        num_prompts=a.num_prompts,
        num_frames=a.frames,
        resolution=a.resolution,
        steps=a.steps,
        guidance_scale=a.guidance_scale,
        batch_size=a.batch_size,
        device=a.device,
        dtype=a.dtype,
        classifier_path=a.classifier,
        save_videos=a.save_videos,
        seed=a.seed,
        baselines=not a.no_baselines,
        flow_shift=a.flow_shift,
    )
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(r, f, indent=2)
    r.pop("per_video", None)
    print(json.dumps(r, indent=2))


def cmd_selfcheck(a):
    """Score real renders (and, optionally, their mp4 round trip and their reconstructions by a VAE)."""
    import tempfile
    import time

    import numpy as np
    import torch

    from .domain import render_video, scene_specs
    from .evaluate import summarize, vae_reconstruct
    from .metrics import score_video
    from .video_io import ffmpeg_available, read_video, write_video

    specs = scene_specs("train", a.num - a.num // 3, base_seed=a.seed) + scene_specs(
        "heldout", a.num // 3, base_seed=a.seed
    )
    out = {"num_videos": len(specs), "frames": a.frames, "torch": torch.__version__}
    t0 = time.time()
    videos = [render_video(s, a.frames).numpy() for s in specs]
    reps = [score_video(v, s.prompt) for v, s in zip(videos, specs)]
    out["seconds_per_video"] = (time.time() - t0) / len(specs)
    out["real"] = summarize(reps)
    out["real_min"] = {
        k: float(min(r["scores"].get(k, 1.0) for r in reps)) for k in out["real"] if k in reps[0]["scores"]
    }
    if a.mp4 and ffmpeg_available():
        with tempfile.TemporaryDirectory() as d:
            reps = []
            for i, (v, s) in enumerate(zip(videos[: a.mp4], specs)):
                write_video(v, f"{d}/{i}.mp4")
                reps.append(score_video(read_video(f"{d}/{i}.mp4"), s.prompt))
        out["real_mp4"] = summarize(reps)
    if a.vae:
        from diffusers import AutoencoderKLWan

        if not os.path.isfile(os.path.join(a.vae, "config.json")):  # not a Hub id: nothing is downloaded here
            raise SystemExit(f"selfcheck: --vae {a.vae!r} is not a VAE folder (no config.json there)")
        vae = AutoencoderKLWan.from_pretrained(a.vae, torch_dtype=torch.float32).eval()
        sub = specs[: a.vae_videos]
        n = 1 + 4 * ((a.frames - 1) // 4)  # the VAE codes 1 + 4k frames
        real = np.stack(videos[: a.vae_videos])[:, :n]
        out["vae_frames"] = n
        rec = vae_reconstruct(vae, real, batch_size=2)
        mse = ((real.astype(np.float64) - rec.astype(np.float64)) ** 2).reshape(len(sub), -1).mean(1)
        out["vae_psnr"] = float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))
        out["vae_reconstruction"] = summarize([score_video(v, s.prompt) for v, s in zip(rec, sub)])
    print(json.dumps(out, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m diffusers_hybrid.shapes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("render", help="render a ground-truth video")
    r.add_argument("--prompt", type=str, default=None, help="caption from the grammar (default: a random one)")
    r.add_argument("--frames", type=int, default=33)
    r.add_argument("--seed", type=_seed, default=0)
    r.add_argument("--height", type=int, default=128)
    r.add_argument("--width", type=int, default=128)
    r.add_argument("--start-frame", type=int, default=0)
    r.add_argument("--split", type=str, default="train", choices=_SPLITS, help="for a random prompt")
    r.add_argument("--out", type=str, required=True)
    r.set_defaults(fn=cmd_render)

    s = sub.add_parser("score", help="score videos against a prompt (JSON)")
    s.add_argument("videos", nargs="+")
    s.add_argument("--prompt", type=str, required=True)
    s.add_argument("--window", type=int, default=16)
    s.add_argument(
        "--classifier", type=str, default=None, help="classifier folder, or 'none' (default: the shipped one)"
    )
    s.add_argument("--fd-reference", type=int, default=6, help="real renders of the prompt in the FD reference set")
    s.add_argument("--device", type=str, default=None)
    s.add_argument("--verbose", action="store_true", help="include the raw measurements")
    s.set_defaults(fn=cmd_score)

    g = sub.add_parser("generate", help="sample a video with a WanPipeline folder (the shipped teacher by default)")
    g.add_argument("--prompt", type=str, required=True)
    g.add_argument("--pipeline", type=str, default=_pretrained("teacher"))
    g.add_argument("--frames", type=int, default=33)
    g.add_argument("--height", type=int, default=128)
    g.add_argument("--width", type=int, default=128)
    g.add_argument("--steps", type=int, default=None, help="WanPipeline sampling steps (default 50; a student: ignored)")
    g.add_argument(
        "--guidance-scale", type=float, default=None, help="WanPipeline guidance (default 5.0; a student: ignored)"
    )
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--device", type=str, default="cpu")
    g.add_argument("--score", action="store_true", help="also print the evaluation suite's scores")
    g.add_argument("--progress", action="store_true")
    g.add_argument("--out", type=str, required=True)
    g.set_defaults(fn=cmd_generate)

    q = sub.add_parser("prompts", help="print captions of a split")
    q.add_argument("--split", type=str, default="heldout", choices=_SPLITS)
    q.add_argument("--num", type=int, default=10)
    q.add_argument("--seed", type=_seed, default=0)
    q.set_defaults(fn=cmd_prompts)

    b = sub.add_parser("build-text", help="write tokenizer/ and text_encoder/ (fresh UMT5) under a folder")
    b.add_argument("--out", type=str, required=True)
    b.add_argument("--tiny", action="store_true")
    b.add_argument("--seed", type=_seed, default=0)
    b.set_defaults(fn=cmd_build_text)

    c = sub.add_parser("train-classifier", help="train the FD / adherence classifier")
    c.add_argument("--out", type=str, required=True)
    c.add_argument("--steps", type=int, default=1500)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--learning-rate", type=float, default=2e-3)
    c.add_argument("--width", type=int, default=32)
    c.add_argument("--feature-dim", type=int, default=128)
    c.add_argument("--calibration-prompts", type=int, default=32)
    c.add_argument("--device", type=str, default=None)
    c.add_argument("--seed", type=_seed, default=0)
    c.add_argument("--log-every", type=int, default=100)
    c.add_argument(
        "--train-split",
        choices=("train", "all"),
        default="train",
        help="'all' trains on every attribute combination (for judging held-out prompts)",
    )
    c.add_argument("--heldout-clips", type=int, default=256, help="held-out clips that measure the accuracy per head")
    c.set_defaults(fn=cmd_train_classifier)

    e = sub.add_parser("evaluate", help="held-out evaluation of a pipeline folder (a WanPipeline teacher or a student)")
    e.add_argument("--pipeline", type=str, default=_pretrained("teacher"),
                   help="a local WanPipeline or StreamingHybridPipeline folder (default: the shipped teacher)")
    e.add_argument("--split", type=str, default="heldout", choices=_SPLITS,
                   help="prompts of attribute combinations seen in training, or never seen (default)")
    e.add_argument("--num-prompts", type=int, default=64, help="one video per prompt (prompt seed 2024)")
    e.add_argument("--frames", type=int, default=33, help="video frames, 1 + 4k (a student: whole chunks)")
    e.add_argument("--resolution", type=int, default=128, help="square side in pixels, a multiple of 16 in [128, 256]")
    e.add_argument("--steps", type=int, default=None, help="WanPipeline sampling steps (default 50; a student: ignored)")
    e.add_argument(
        "--guidance-scale", type=float, default=None, help="WanPipeline guidance (default 5.0; a student: ignored)"
    )
    e.add_argument("--flow-shift", type=float, default=None, help="sampling shift of a WanPipeline (default: its own)")
    e.add_argument("--batch-size", type=int, default=16, help="videos generated at a time")
    e.add_argument("--dtype", type=str, default="fp32", choices=["fp32", "bf16", "fp16"], help="the pipeline's dtype")
    e.add_argument("--classifier", type=str, default=None,
                   help="the suite's classifier folder, for classifier adherence and FD (default: the shipped one; "
                        "without one those metrics are left out)")
    e.add_argument("--save-videos", type=str, default=None, help="a folder to write the first 8 videos to (mp4; gif without ffmpeg)")
    e.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    e.add_argument("--seed", type=_seed, default=0, help="noise seed of the first video (seed + index for the others)")
    e.add_argument("--no-baselines", action="store_true",
                   help="skip scoring the real renders and the VAE's reconstructions of them")
    e.add_argument("--out", type=str, default=None, help="also write the full report (per video) to this JSON")
    e.set_defaults(fn=cmd_evaluate)

    k = sub.add_parser("selfcheck", help="score real renders (the suite's own check), optionally VAE reconstructions")
    k.add_argument("--num", type=int, default=60, help="videos (two thirds train split, one third held-out)")
    k.add_argument("--frames", type=int, default=48)
    k.add_argument("--seed", type=_seed, default=100)
    k.add_argument("--mp4", type=int, default=12, help="how many of them also go through an mp4 round trip")
    k.add_argument("--vae", type=str, default=None, help="a VAE folder: also score its reconstructions")
    k.add_argument("--vae-videos", type=int, default=6)
    k.set_defaults(fn=cmd_selfcheck)

    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
