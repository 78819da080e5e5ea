# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Generate held-out videos once (saved as .npy), then score them, so that two versions of the evaluation suite can be
compared on identical videos (run `score` with each version's `src` on `PYTHONPATH`).

    python benchmarks/shapes_generate_and_score.py generate pretrained/shapes/student 64 student.npy --steps 4
    python benchmarks/shapes_generate_and_score.py score student.npy 64 student_scores.json

The prompts are `evaluate`'s held-out prompts (prompt seed 2024), 33 frames at 128x128, fp32, seed 0, guidance 5 (a
WanPipeline teacher); `--steps` is the teacher's step count (a streaming student uses its own). `--device cuda` runs
either mode on the GPU; `--classifier` picks the classifier that `score` uses (default: the shipped one).
"""

import argparse
import json
import time

import numpy as np
import torch

from diffusers_hybrid.shapes import evaluate as ev
from diffusers_hybrid.shapes.domain import render_video, scene_specs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("generate", "score"))
    parser.add_argument("source", help="generate: a pipeline folder; score: the .npy of generate")
    parser.add_argument("num_prompts", type=int)
    parser.add_argument("out", help="generate: the .npy to write; score: the JSON to write")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classifier", default="pretrained/shapes/classifier")
    a = parser.parse_args(argv)
    specs = scene_specs("heldout", a.num_prompts, base_seed=2024)
    prompts = [s.prompt for s in specs]
    device = torch.device(a.device)
    if a.mode == "generate":
        pipe = ev.load_pipeline(a.source, device, torch.float32)
        t0 = time.time()
        videos = ev.generate(pipe, prompts, 33, 128, 128, a.steps, 5.0, 0, 8)
        np.save(a.out, videos)
        print(f"generated {videos.shape} in {time.time() - t0:.0f}s")
        return
    videos = np.load(a.source)
    if len(videos) != a.num_prompts:
        raise ValueError(f"{a.source} holds {len(videos)} videos, not num_prompts={a.num_prompts}")
    classifier = ev.load_classifier(a.classifier, device=device)
    reports = []
    for spec, video in zip(specs, videos):
        report = ev.score_video(video, spec.prompt, classifier=classifier, device=device)
        report["num_objects"] = len(spec.attrs.objects)
        reports.append(report)
    real = [
        ev.score_video(render_video(s, 33, 128, 128).cpu().numpy(), s.prompt, classifier=classifier, device=device)
        for s in specs
    ]
    result = {
        "classifier": a.classifier,
        "generated": ev.summarize(reports),
        "real": ev.summarize(real),
        "per_video": [{"prompt": p, "scores": r["scores"]} for p, r in zip(prompts, reports)],
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["generated"]))


if __name__ == "__main__":
    main()
