# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Per-latent-frame denoising error of shapes teachers on held-out clips (CPU is enough).

For each teacher folder (a `WanPipeline` folder: `vae/`, `tokenizer/`, `text_encoder/`, `transformer/`), renders the
same held-out clips, encodes them with the first teacher's VAE, noises them with the same noise at each `--sigmas`
level (`x_t = (1 - sigma) x_0 + sigma * noise`, as in `train_teacher.py`), and reports the mean squared error of the
predicted clean latent `x_t - sigma * v` per latent frame. A lower error at high sigma is a better fit of what the
teacher must decide first (positions, motion); the first latent frame holds a single video frame, the others four.

    python benchmarks/shapes_denoising_error.py TEACHER [TEACHER ...] [--num-clips 16] [--sigmas 0.2 0.5 0.8 0.95]

Prints one line per teacher and sigma, and writes JSON with `--out`.

`--caption-probe`: also the mean error with the caption of every clip changed in one attribute of its objects (the
opposite direction, the other speed, another colour), at the same clips and noise: how much each attribute of the
caption informs the prediction at each noise level (no difference: the teacher does not use it there).
"""

import argparse
import dataclasses
import json
import os

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import AutoTokenizer, UMT5EncoderModel

from diffusers_hybrid.shapes.domain import DIRECTIONS, OBJECT_COLORS, SPEEDS, SceneAttrs, render_batch, scene_specs
from diffusers_hybrid.shapes.text import encode_prompts


def _opposite_direction(direction: str) -> str:
    dx, dy = DIRECTIONS[direction]
    return next(name for name, vec in DIRECTIONS.items() if vec == (-dx, -dy))


CAPTION_CHANGES = {
    "opposite_direction": lambda o: dataclasses.replace(o, direction=_opposite_direction(o.direction)),
    "other_speed": lambda o: dataclasses.replace(o, speed=SPEEDS[1 - SPEEDS.index(o.speed)]),
    "other_color": lambda o: dataclasses.replace(
        o, color=list(OBJECT_COLORS)[(list(OBJECT_COLORS).index(o.color) + 1) % len(OBJECT_COLORS)]),
}


def changed_prompts(specs, change) -> list[str]:
    """The clips' captions with `change` applied to every object."""
    return [SceneAttrs(s.attrs.background, s.attrs.texture, tuple(change(o) for o in s.attrs.objects)).caption()
            for s in specs]


def normalized_latents(vae, video):
    z = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (z - mean) / std


@torch.no_grad()
def denoising_error(folder, x0, noise, prompts, sigmas, batch_size, max_sequence_length):
    """{sigma: [MSE of the predicted x0 per latent frame]} of the teacher in `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder"), torch_dtype=torch.float32)
    transformer = WanTransformer3DModel.from_pretrained(os.path.join(folder, "transformer"), torch_dtype=torch.float32)
    text_encoder.eval()
    transformer.eval()
    text = encode_prompts(tokenizer, text_encoder, prompts, max_sequence_length, device=torch.device("cpu"))
    out = {}
    for sigma in sigmas:
        x_t = (1 - sigma) * x0 + sigma * noise
        flow = torch.cat([
            transformer(
                hidden_states=x_t[i : i + batch_size],
                timestep=torch.full((len(x_t[i : i + batch_size]),), 1000.0 * sigma),
                encoder_hidden_states=text[i : i + batch_size],
                return_dict=False,
            )[0]
            for i in range(0, len(x_t), batch_size)
        ])
        error = (x_t - sigma * flow - x0).pow(2).mean(dim=(0, 1, 3, 4))
        out[sigma] = [round(float(e), 4) for e in error]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teachers", nargs="+", help="WanPipeline folders of shapes teachers.")
    parser.add_argument("--num-clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=33, help="Video frames per clip (1 + 4k).")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.2, 0.5, 0.8, 0.95])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-sequence-length", type=int, default=512, help="As the teachers were trained.")
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--out", type=str, default=None, help="Write the results as JSON here.")
    parser.add_argument("--caption-probe", action="store_true",
                        help="Also the error with each clip's caption changed in one attribute (see above).")
    args = parser.parse_args(argv)
    if (args.frames - 1) % 4:
        parser.error(f"--frames must be 1 + 4k (the VAE's temporal compression), got {args.frames}")
    if any(not 0 < s <= 1 for s in args.sigmas):
        parser.error(f"--sigmas must lie in (0, 1], got {args.sigmas}")

    torch.manual_seed(args.seed)
    specs = scene_specs("heldout", args.num_clips, base_seed=args.seed)
    vae = AutoencoderKLWan.from_pretrained(os.path.join(args.teachers[0], "vae"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        video = render_batch(specs, args.frames, args.resolution, args.resolution, device=torch.device("cpu"))
        x0 = normalized_latents(vae, video)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    prompts = [s.prompt for s in specs]

    results = {}
    for folder in args.teachers:
        results[folder] = denoising_error(
            folder, x0, noise, prompts, args.sigmas, args.batch_size, args.max_sequence_length
        )
        for sigma, per_frame in results[folder].items():
            print(f"{folder}  sigma {sigma}: x0 MSE per latent frame {per_frame}", flush=True)
        if args.caption_probe:
            probe = {}
            for name, change in CAPTION_CHANGES.items():
                errors = denoising_error(folder, x0, noise, changed_prompts(specs, change), args.sigmas,
                                         args.batch_size, args.max_sequence_length)
                probe[name] = {sigma: round(sum(e) / len(e), 4) for sigma, e in errors.items()}
            probe["correct"] = {sigma: round(sum(e) / len(e), 4) for sigma, e in results[folder].items()}
            results[folder] = {"per_latent_frame": results[folder], "caption_probe_mean": probe}
            for name, by_sigma in probe.items():
                print(f"{folder}  caption {name}: mean x0 MSE by sigma {by_sigma}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "x0_mse_per_latent_frame": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
