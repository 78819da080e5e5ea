# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Does a shapes VAE keep every background colour far from the start of a video?

    python benchmarks/shapes_vae_horizon.py pretrained/shapes/teacher/vae [OTHER_VAE ...] --frames 81 --out X.json

Per VAE and per background colour of the domain, one real render ("a large red circle bouncing slowly to the right
on a {colour} background", seed 0) is encoded and decoded whole; reported every `--every` frames: the 8-bit PSNR of
the reconstruction and the background the evaluation suite reads in it (`analysis.background_names`: the nearest
palette colour, "none" past the suite's tolerance). Then the encoder alone: for each pair of
background colours, the mean absolute difference between the latents of the same scene on the two backgrounds, per
latent frame, next to the latents' standard deviation. A VAE that codes a colour only in the first latent frame shows
it twice: a pair whose later latents barely differ, and reconstructions that lose that colour past the decoder's
reach (the shipped VAE: dark blue and brown turn dark green from frame ~39). Runs on a CPU in about a minute per VAE.

    python benchmarks/shapes_vae_horizon.py VAE --pipeline pretrained/shapes/student --require-all-backgrounds

`--pipeline DIR` also generates the same prompt on every background with a pipeline folder (a streaming student, seed
0) and reports the backgrounds the suite reads in its frames alike: what a user of the model sees. With
`--require-all-backgrounds` the script exits with status 1, naming each failure, unless every VAE and pipeline keeps
every background right in every reported frame (a gate for `training/run_shapes_vae_fix.sh`).
"""

import argparse
import itertools
import json

import numpy as np
import torch

from diffusers_hybrid.shapes import BACKGROUND_COLORS, SceneSpec, render_video
from diffusers_hybrid.shapes.analysis import background_names


PROMPT = "a large red circle bouncing slowly to the right on a {} background"


@torch.no_grad()
def measure(vae_path: str, num_frames: int, every: int) -> dict:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(vae_path, dtype=torch.float32).eval()
    frames = list(range(0, num_frames, every))
    reconstruction, latents = {}, {}
    for background in BACKGROUND_COLORS:
        spec = SceneSpec.from_prompt(PROMPT.format(background), 0)
        real = render_video(spec, num_frames)  # [T, H, W, 3] uint8
        x = real.float().permute(3, 0, 1, 2)[None] / 127.5 - 1
        z = vae.encode(x).latent_dist.mode()
        latents[background] = z[0]
        y = vae.decode(z).sample[0].clamp(-1, 1)
        recon = ((y + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
        truth = real.numpy().astype(np.float64)
        mse = ((recon - truth) ** 2).reshape(num_frames, -1).mean(1)
        psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
        reconstruction[background] = {
            "psnr": [round(float(psnr[t]), 2) for t in frames],
            "nearest_background": background_names(recon[frames]),
        }
    separation = {
        f"{a} / {b}": [round(float((latents[a][:, f] - latents[b][:, f]).abs().mean()), 4)
                       for f in range(latents[a].shape[1])]
        for a, b in itertools.combinations(BACKGROUND_COLORS, 2)
    }
    spread = [round(float(torch.stack([z[:, f] for z in latents.values()]).std()), 4)
              for f in range(next(iter(latents.values())).shape[1])]
    return {"frames": frames, "reconstruction": reconstruction, "latent_separation": separation,
            "latent_std": spread}


@torch.no_grad()
def measure_pipeline(path: str, num_frames: int, every: int, device: str) -> dict:
    """The background the suite reads every `every` frames of a pipeline's video of `PROMPT` on each background."""
    from diffusers_hybrid.shapes.evaluate import generate, load_pipeline

    pipe = load_pipeline(path, device=device)
    frames = list(range(0, num_frames, every))
    backgrounds = list(BACKGROUND_COLORS)
    videos = [generate(pipe, [PROMPT.format(b)], num_frames=num_frames, seed=0)[0] for b in backgrounds]
    nearest = {b: background_names(np.asarray(video)[frames]) for b, video in zip(backgrounds, videos)}
    return {"frames": frames, "nearest_background": nearest}


def _wrong_backgrounds(frames: list[int], nearest: dict[str, list[str]]) -> dict[str, int]:
    """Background -> the first reported frame where the suite reads another one (or none)."""
    wrong = {}
    for background, names in nearest.items():
        bad = [t for t, name in zip(frames, names) if name != background]
        if bad:
            wrong[background] = bad[0]
    return wrong


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vae", nargs="+", help="VAE folders (AutoencoderKLWan)")
    parser.add_argument("--frames", type=int, default=81, help="video length, 1 + 4k")
    parser.add_argument("--every", type=int, default=8, help="report every this many frames")
    parser.add_argument("--pipeline", nargs="*", default=[], help="pipeline folders to generate with (students)")
    parser.add_argument("--device", default="cpu", help="device of the pipelines' generation")
    parser.add_argument("--require-all-backgrounds", action="store_true",
                        help="exit with status 1 unless every background stays right in every reported frame")
    parser.add_argument("--out", default=None, help="JSON to write")
    a = parser.parse_args(argv)
    if a.frames < 5 or (a.frames - 1) % 4:
        parser.error(f"--frames must be 1 + 4k with k >= 1, got {a.frames}")
    result = {"num_frames": a.frames, "vaes": {}, "pipelines": {}}
    failures = []
    for path in a.vae:
        r = measure(path, a.frames, a.every)
        result["vaes"][path] = r
        print(f"{path}: frames {r['frames']}")
        wrong = _wrong_backgrounds(r["frames"], {b: rec["nearest_background"] for b, rec in r["reconstruction"].items()})
        failures += [f"VAE {path}: {b} wrong from frame {t}" for b, t in wrong.items()]
        for background, rec in r["reconstruction"].items():
            print(f"  {background:>10}: PSNR {min(rec['psnr']):.1f}-{max(rec['psnr']):.1f} dB; "
                  + (f"wrong background from frame {wrong[background]}" if background in wrong
                     else "background right throughout"))
        last = -1
        closest = sorted(r["latent_separation"].items(), key=lambda kv: kv[1][last])[:3]
        print("  closest background pairs in the last latent frame (mean |dz|; latent std "
              f"{r['latent_std'][last]:.3f}): " + ", ".join(f"{k} {v[last]:.3f} (frame 0: {v[0]:.3f})" for k, v in closest))
    for path in a.pipeline:
        r = measure_pipeline(path, a.frames, a.every, a.device)
        result["pipelines"][path] = r
        wrong = _wrong_backgrounds(r["frames"], r["nearest_background"])
        failures += [f"pipeline {path}: {b} wrong from frame {t}" for b, t in wrong.items()]
        print(f"{path} (generated, seed 0): frames {r['frames']}")
        for background, names in r["nearest_background"].items():
            print(f"  {background:>10}: " + (f"wrong background from frame {wrong[background]} ({names})"
                                             if background in wrong else "background right throughout"))
    result["failures"] = failures
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    if a.require_all_backgrounds and failures:
        print("not every background stays right:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
