# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Generate held-out videos once (saved as .npy), then score them, so that two versions of the evaluation suite can be
compared on identical videos (run `score` with each version's `src` on `PYTHONPATH`).

    python benchmarks/shapes_generate_and_score.py generate pretrained/shapes/student 64 student.npy 4
    python benchmarks/shapes_generate_and_score.py score student.npy 64 student_scores.json

The prompts are `evaluate`'s held-out prompts (prompt seed 2024), 33 frames at 128x128, fp32, seed 0, guidance 5 (a
WanPipeline teacher); the last `generate` argument is the teacher's step count (a streaming student uses its own).
"""

import json
import sys
import time

import numpy as np
import torch

from diffusers_hybrid.shapes import evaluate as ev
from diffusers_hybrid.shapes.domain import render_video, scene_specs


def main(mode: str, source: str, num_prompts: int, out: str, steps: int = 50) -> None:
    specs = scene_specs("heldout", num_prompts, base_seed=2024)
    prompts = [s.prompt for s in specs]
    device = torch.device("cpu")
    if mode == "generate":
        pipe = ev.load_pipeline(source, device, torch.float32)
        t0 = time.time()
        videos = ev.generate(pipe, prompts, 33, 128, 128, steps, 5.0, 0, 8)
        np.save(out, videos)
        print(f"generated {videos.shape} in {time.time() - t0:.0f}s")
        return
    videos = np.load(source)
    classifier = ev.load_classifier("pretrained/shapes/classifier", device=device)
    reports = []
    for spec, video in zip(specs, videos):
        report = ev.score_video(video, spec.prompt, classifier=classifier, device=device)
        report["num_objects"] = len(spec.attrs.objects)
        reports.append(report)
    real = [ev.score_video(render_video(s, 33, 128, 128).cpu().numpy(), s.prompt, classifier=classifier, device=device)
            for s in specs]
    result = {
        "generated": ev.summarize(reports),
        "real": ev.summarize(real),
        "per_video": [{"prompt": p, "scores": r["scores"]} for p, r in zip(prompts, reports)],
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["generated"]))


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] not in ("generate", "score"):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], *(int(a) for a in sys.argv[5:6]))
