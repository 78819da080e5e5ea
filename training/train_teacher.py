#!/usr/bin/env python
# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Train a bidirectional Wan teacher (diffusers' `WanTransformer3DModel`) with flow matching on the latents of the
shapes domain, and save a complete `WanPipeline` folder.

    accelerate launch training/train_teacher.py --config training/configs/teacher/teacher.yaml \
        --pretrained_model_name_or_path out/base --output_dir out/teacher

`--pretrained_model_name_or_path` holds `vae/` (from `training/train_shapes_vae.py`), `tokenizer/` and
`text_encoder/` (from `python -m diffusers_hybrid.shapes build-text`) and optionally `transformer/` to continue from.
The transformer is built from `--transformer_config` (a mapping in the YAML config, or JSON on the command line).

Training follows Wan's recipe and diffusers' pipeline conventions exactly, so that the stock `WanPipeline` samples
the result: latents normalised with the VAE's `latents_mean` / `latents_std`; prompts encoded as
`WanPipeline._get_t5_prompt_embeds` does (zeros after the last token, padded to `--max_sequence_length`, 512 like
the pipeline's default); x_t = (1 - sigma) x_0 + sigma * noise with sigma drawn from a logit-normal shifted like the
saved `FlowMatchEulerDiscreteScheduler(shift=--flow_shift)`; target noise - x_0; timestep 1000 * sigma; captions
dropped to "" with probability `--caption_dropout` for classifier-free guidance (the pipeline's default negative
prompt is ""). The text encoder can be trained jointly (`--train_text_encoder`).

Conventions (shared with the other training scripts): YAML `--config` (command-line flags override it),
`Accelerator(ProjectConfiguration)`, diffusers-format save/load hooks (`transformer/`, `transformer_ema/`,
`text_encoder/`, ...), `checkpoint-{step}` rotation with `--checkpoints_total_limit`, `--resume_from_checkpoint
latest`, validation videos scored with the shapes evaluation suite, a progress bar, a model card.
"""

import argparse
import copy
import dataclasses
import json
import logging
import os
import shutil

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.training_utils import EMAModel
from diffusers.utils import check_min_version
from tqdm.auto import tqdm
from transformers import AutoTokenizer, UMT5EncoderModel

check_min_version("0.42.0")

from diffusers_hybrid.shapes.domain import DIRECTIONS, SceneSpec, render_batch, scene_specs  # noqa: E402
from diffusers_hybrid.shapes.text import encode_prompts  # noqa: E402
from diffusers_hybrid.shapes.video_io import ffmpeg_available, try_write_video  # noqa: E402
from diffusers_hybrid.utils.torch_utils import cast_keeping_fp32_modules  # noqa: E402
from diffusers_hybrid.training_utils import (  # noqa: E402
    TrainingBudget,
    deepen_transformer,
    repatch_transformer,
    save_rotated_checkpoint,
    str2bool,
    time_budget_lr_scheduler,
)

logger = get_logger(__name__)

DEFAULT_TRANSFORMER = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    freq_dim=256,
    ffn_dim=768,
    num_layers=5,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Train a Wan teacher on the shapes domain with flow matching.")
    # boolean flags: `--flag` alone is true, `--flag false` turns off what a YAML config switched on
    flag = dict(type=str2bool, nargs="?", const=True, default=False)
    parser.add_argument("--config", type=str, default=None, help="YAML file of argument defaults.")
    # models
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=False, default=None)
    parser.add_argument("--transformer_config", default=None, help="Mapping (YAML) or JSON string of Wan arguments.")
    parser.add_argument("--train_text_encoder", **flag)
    parser.add_argument("--text_encoder_lr", type=float, default=None, help="Defaults to --learning_rate / 3.")
    # data
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--num_frames", type=int, default=33, help="Video frames per training clip (1 + 4k).")
    parser.add_argument("--max_start_frame", type=int, default=0, help="Clips start at a random frame below this.")
    parser.add_argument("--two_object_prob", type=float, default=0.5)
    parser.add_argument(
        "--latent_cache_size",
        type=int,
        default=0,
        help="Encode this many clips once and sample from them (0: encode every batch).",
    )
    parser.add_argument(
        "--latent_cache_refresh_every",
        type=int,
        default=0,
        help="Replace a batch of the cache with fresh clips every N batches drawn (0: never); with "
        "--gradient_accumulation_steps a batch is a micro-batch.",
    )
    parser.add_argument("--caption_dropout", type=float, default=0.1)
    parser.add_argument("--max_sequence_length", type=int, default=512)
    # flow matching
    parser.add_argument("--flow_shift", type=float, default=3.0)
    parser.add_argument("--logit_mean", type=float, default=0.0)
    parser.add_argument("--logit_std", type=float, default=1.0)
    parser.add_argument(
        "--high_sigma_fraction",
        type=float,
        default=0.0,
        help="Fraction of noise levels drawn uniformly from [--high_sigma_min, 1] instead of the logit-normal.",
    )
    parser.add_argument("--high_sigma_min", type=float, default=0.97)
    parser.add_argument(
        "--frame_noise_fraction",
        type=float,
        default=0.0,
        help="Fraction of clips whose latent frames get independent noise levels (diffusion forcing); the rest share "
        "one level per clip. A clean frame next to a noisy one leaves the caption to say where the object goes.",
    )
    parser.add_argument(
        "--start_away_fraction",
        type=float,
        default=0.0,
        help="Fraction of clips whose objects start within --start_away_span of their range, at the end away from the "
        "wall their caption's direction heads to (0: the domain's uniform starts). Quick objects bounce within most "
        "uniform clips, so their motion goes against the caption in 61%% of frame transitions.",
    )
    parser.add_argument("--start_away_span", type=float, default=0.3)
    parser.add_argument(
        "--counterfactual_pairs",
        **flag,
        help="Build every batch of pairs: a clip and its twin whose objects move the opposite way from the same starts "
        "(so the same first frame), noised with the same noise at the same level. Within a pair only the caption's "
        "direction tells the two targets apart. Needs an even --train_batch_size.",
    )
    parser.add_argument(
        "--motion_weight",
        type=float,
        default=0.0,
        help="Weight the loss by 1 + this x how much each latent changes between frames (0: plain MSE).",
    )
    # optimisation
    parser.add_argument("--output_dir", type=str, default="shapes-teacher")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument(
        "--max_train_time",
        type=float,
        default=None,
        help="Stop after this many seconds of training, counted from the first step (setup, the latent cache and "
        "resuming excluded); the learning-rate schedule anneals over the same clock.",
    )
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", **flag)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--lr_scheduler", type=str, default="cosine")
    parser.add_argument("--lr_warmup_steps", type=int, default=100)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.99)
    parser.add_argument("--adam_weight_decay", type=float, default=0.01)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--use_ema", **flag)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--allow_tf32", **flag)
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Unused: videos are rendered on device.")
    # checkpoints, validation, logging
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help='A checkpoint path or "latest".')
    parser.add_argument("--validation_steps", type=int, default=500)
    parser.add_argument("--validation_prompts", type=str, nargs="*", default=None, help="Default: held-out prompts.")
    parser.add_argument("--num_validation_videos", type=int, default=4)
    parser.add_argument("--validation_inference_steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--report_to", type=str, default="none")
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--tracker_project_name", type=str, default="shapes-teacher")
    # export
    parser.add_argument("--save_dtype", type=str, default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--max_shard_size", type=str, default="8MB")

    args, _ = parser.parse_known_args(input_args)
    if args.config:
        import yaml

        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown keys in {args.config}: {sorted(unknown)}")
        parser.set_defaults(**cfg)
    args = parser.parse_args(input_args)
    if isinstance(args.transformer_config, str):
        args.transformer_config = json.loads(args.transformer_config)
    if args.pretrained_model_name_or_path is None:
        parser.error("--pretrained_model_name_or_path is required (a folder with vae/, tokenizer/, text_encoder/)")
    if (args.num_frames - 1) % 4:
        raise ValueError("--num_frames must be 1 + 4k (the VAE's temporal compression)")
    if not 0 <= args.high_sigma_fraction <= 1 or not 0 <= args.high_sigma_min < 1:
        parser.error(f"--high_sigma_fraction must lie in [0, 1] and --high_sigma_min in [0, 1), got "
                     f"{args.high_sigma_fraction} and {args.high_sigma_min}")
    if not 0 <= args.frame_noise_fraction <= 1:
        parser.error(f"--frame_noise_fraction must lie in [0, 1], got {args.frame_noise_fraction}")
    if not 0 <= args.start_away_fraction <= 1 or not 0 < args.start_away_span <= 1:
        parser.error(f"--start_away_fraction must lie in [0, 1] and --start_away_span in (0, 1], got "
                     f"{args.start_away_fraction} and {args.start_away_span}")
    if args.counterfactual_pairs and args.train_batch_size % 2:
        parser.error(f"--counterfactual_pairs needs an even --train_batch_size, got {args.train_batch_size}")
    args.local_rank = int(os.environ.get("LOCAL_RANK", -1))
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def start_away_from_heading_walls(spec: SceneSpec, span: float) -> SceneSpec:
    """The same scene with each object's start moved within the fraction `span` of its range farthest from the wall
    its direction heads to (relative position kept; axes it does not move along unchanged), so that its motion follows
    the caption for longer before the first bounce. Two objects keep their original starts if the new ones meet."""
    starts = []
    for obj, fractions in zip(spec.attrs.objects, spec.starts):
        moved = []
        for step, fraction in zip(DIRECTIONS[obj.direction], fractions):
            moved.append(fraction * span if step > 0 else 1 - span + fraction * span if step < 0 else fraction)
        starts.append(tuple(moved))
    candidate = dataclasses.replace(spec, starts=tuple(starts))
    if len(starts) == 2:
        a, b = candidate.object_tracks(1, 128, 128)
        if np.hypot(*(a["centers"][0] - b["centers"][0])) - a["radius"] - b["radius"] <= 2.0:
            return spec
    return candidate


def reverse_directions(spec: SceneSpec) -> SceneSpec:
    """The same scene (seed and starts, hence the same first frame) with every object moving the opposite way; the
    caption says so."""
    opposite = {step: name for name, step in DIRECTIONS.items()}
    objects = tuple(
        dataclasses.replace(obj, direction=opposite[tuple(-s for s in DIRECTIONS[obj.direction])])
        for obj in spec.attrs.objects
    )
    return dataclasses.replace(spec, attrs=dataclasses.replace(spec.attrs, objects=objects))


def with_counterfactual_twins(specs: list[SceneSpec]) -> list[SceneSpec]:
    """`[a, reversed(a), b, reversed(b), ...]` (see [`reverse_directions`])."""
    return [s for spec in specs for s in (spec, reverse_directions(spec))]


def share_within_pairs(*tensors: torch.Tensor) -> None:
    """Copies each even row (dim 0) over the odd row after it, in place: one draw per counterfactual pair."""
    for t in tensors:
        t[1::2] = t[0::2]


class LatentSource:
    """Clips of the training split as normalised VAE latents: encoded per batch, or once into a cache."""

    def __init__(self, vae, args, device, rank, weight_dtype):
        self.vae, self.args, self.device, self.rank = vae, args, device, rank
        self.weight_dtype = weight_dtype
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean, device=device).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(cfg.latents_std, device=device).view(1, -1, 1, 1, 1)
        self.rng = np.random.default_rng([args.seed, rank, 17])
        self.cache = None
        # clips per sampled scene: with --counterfactual_pairs a scene and its twin, in consecutive rows
        self.clips_per_scene = per_scene = 2 if args.counterfactual_pairs else 1
        if args.latent_cache_size > 0:
            lat, prompts = [], []
            specs = scene_specs(
                "train",
                args.latent_cache_size // per_scene,
                base_seed=args.seed * 1000 + rank,
                two_object_prob=args.two_object_prob,
            )
            step = 32 // per_scene
            for i in tqdm(range(0, len(specs), step), desc="Encoding latent cache", disable=rank != 0):
                latents, chunk_prompts = self._encode(specs[i : i + step])
                lat.append(latents)
                prompts += chunk_prompts
            self.cache = (torch.cat(lat), prompts)

    @torch.no_grad()
    def _encode(self, specs):
        """Normalised latents of the clips of `specs` (each followed by its twin with `--counterfactual_pairs`), and
        their captions."""
        if self.args.start_away_fraction > 0:
            away = self.rng.random(len(specs)) < self.args.start_away_fraction
            specs = [start_away_from_heading_walls(s, self.args.start_away_span) if a else s for s, a in zip(specs, away)]
        if self.args.counterfactual_pairs:
            specs = with_counterfactual_twins(specs)
        starts = self.rng.integers(0, max(1, self.args.max_start_frame), size=len(specs)).tolist()
        if self.args.counterfactual_pairs:
            starts[1::2] = starts[0::2]
        x = render_batch(
            specs,
            self.args.num_frames,
            self.args.resolution,
            self.args.resolution,
            device=self.device,
            start_frames=starts,
        )
        with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32):
            z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode()
        return (z.float() - self.mean) * self.inv_std, [s.prompt for s in specs]

    def batch(self, step: int, batch_size: int):
        """`batch_size` clips and their captions for micro-batch `step` (counted over the whole run, so that the
        micro-batches of one optimiser step under gradient accumulation draw different scenes)."""
        every = self.args.latent_cache_refresh_every
        per_scene = self.clips_per_scene
        if self.cache is not None and every and step % every == 0:
            n = min(32, len(self.cache[1])) // per_scene * per_scene
            specs = scene_specs(
                "train",
                n // per_scene,
                base_seed=hash((self.args.seed, step, self.rank, 5)) % (2**31),
                two_object_prob=self.args.two_object_prob,
            )
            slot = (step // every * n) % len(self.cache[1])
            idx = [(slot + j) % len(self.cache[1]) for j in range(n)]
            self.cache[0][idx], prompts = self._encode(specs)
            for j, prompt in zip(idx, prompts):
                self.cache[1][j] = prompt
        if self.cache is not None:
            scenes = self.rng.integers(0, len(self.cache[1]) // per_scene, size=batch_size // per_scene)
            idx = torch.from_numpy(scenes[:, None] * per_scene + np.arange(per_scene)).flatten()
            idx = idx.to(self.cache[0].device)
            return self.cache[0][idx], [self.cache[1][i] for i in idx.tolist()]
        specs = scene_specs(
            "train",
            batch_size // per_scene,
            base_seed=hash((self.args.seed, step, self.rank)) % (2**31),
            two_object_prob=self.args.two_object_prob,
        )
        return self._encode(specs)


def sample_sigmas(n, args, generator, device):
    """`n` noise levels: the shifted logit-normal, except that each one is, with probability
    `--high_sigma_fraction`, drawn uniformly from `[--high_sigma_min, 1]` instead (the levels where nothing of the
    clip is visible yet and the caption alone must decide positions and motion)."""
    u = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(n, generator=generator, device="cpu"))
    s = args.flow_shift
    sigma = s * u / (1 + (s - 1) * u)
    fraction = args.high_sigma_fraction
    if fraction > 0:
        low = args.high_sigma_min
        high = low + (1 - low) * torch.rand(n, generator=generator, device="cpu")
        sigma = torch.where(torch.rand(n, generator=generator, device="cpu") < fraction, high, sigma)
    return sigma.to(device)


def sample_frame_sigmas(n, num_frames, args, generator, device):
    """Noise levels (n, num_frames), one per clip and latent frame: each clip, with probability
    `--frame_noise_fraction`, draws an independent level per frame (`sample_sigmas`), otherwise one for all its
    frames."""
    shared = sample_sigmas(n, args, generator, "cpu")
    sigma = shared[:, None].expand(n, num_frames).clone()
    if args.frame_noise_fraction > 0:
        per_frame = sample_sigmas(n * num_frames, args, generator, "cpu").view(n, num_frames)
        pick = torch.rand(n, generator=generator) < args.frame_noise_fraction
        sigma[pick] = per_frame[pick]
    return sigma.to(device)


def token_timesteps(sigma: torch.Tensor, latent_shape, patch_size) -> torch.Tensor:
    """Wan timesteps for noise levels `sigma` (n, frames): (n,) when every clip has one level (the stock path),
    else one per patch token, (n, frames * height/p_h * width/p_w), which `WanTransformer3DModel` accepts."""
    if bool((sigma == sigma[:, :1]).all()):
        return sigma[:, 0] * 1000
    _, _, frames, height, width = latent_shape
    p_t, p_h, p_w = patch_size
    if p_t != 1:
        raise ValueError(f"per-frame noise needs a temporal patch size of 1, got patch_size={list(patch_size)}")
    per_frame = sigma * 1000
    return per_frame.repeat_interleave((height // p_h) * (width // p_w), dim=1)


def motion_weights(x0: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-element loss weights `1 + strength * m` for clean latents `x0` (B, C, T, H, W): `m` is how much each
    latent position changes to its neighbouring latent frames (the larger of the two absolute differences, mean
    over channels), normalised to mean 1 per clip. Moving objects get the weight; a static clip gets 1 everywhere."""
    diff = (x0[:, :, 1:] - x0[:, :, :-1]).abs().mean(dim=1, keepdim=True)
    change = torch.zeros_like(x0[:, :1])
    change[:, :, 1:] = diff
    change[:, :, :-1] = torch.maximum(change[:, :, :-1], diff)
    scale = change.mean(dim=(1, 2, 3, 4), keepdim=True)
    return 1 + strength * change / scale.clamp_min(1e-6)


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, x0: torch.Tensor, motion_weight: float = 0.0):
    """Mean squared error of the velocity prediction; with `motion_weight > 0` each element weighted by
    `motion_weights(x0, motion_weight)`, divided by the mean weight (the scale of a uniform error is unchanged)."""
    if not motion_weight:
        return F.mse_loss(pred.float(), target.float())
    w = motion_weights(x0.float(), motion_weight)
    err = (pred.float() - target.float()).pow(2)
    return (err * w).mean() / w.mean()  # w is constant over channels: its mean is that of the broadcast weights


def default_validation_prompts(n):
    return [s.prompt for s in scene_specs("heldout", n, base_seed=31337)]


def save_model_card(args, output_dir, measurements, validation, transformer_config):
    """The output folder's README; `transformer_config` is the trained model's own (not the arguments': a warm start
    keeps BASE's architecture apart from the conversions of `match_requested_config`)."""
    rows = (
        "\n".join(
            f"| `{v['prompt']}` | {v['scores'].get('adherence', float('nan')):.3f} | {v['scores'].get('overall', float('nan')):.3f} |"
            for v in validation
        )
        or "| (no validation prompts) | | |"
    )
    cfg = transformer_config
    architecture = (
        f"{cfg['num_layers']} layers, {cfg['num_attention_heads']} heads x {cfg['attention_head_dim']}, "
        f"ffn {cfg['ffn_dim']},\npatch {list(cfg['patch_size'])}"
    )
    card = f"""---
library_name: diffusers
license: apache-2.0
pipeline_tag: text-to-video
tags: [diffusers, diffusers-hybrid, diffusers-training, text-to-video, wan, shapes, flow-matching]
---

# Shapes Wan teacher

A complete `WanPipeline` trained from scratch on the procedural *shapes* domain (`diffusers_hybrid.shapes`):
a bidirectional `WanTransformer3DModel` ({measurements.get("transformer_parameters", 0) / 1e6:.2f} M parameters:
{architecture}) trained with flow matching by `training/train_teacher.py` on the latents of the small
`AutoencoderKLWan` in `vae/`, conditioned by the small UMT5 encoder in `text_encoder/`
({"trained jointly" if args.train_text_encoder else "frozen"}) and the word-level tokenizer in `tokenizer/`.

```python
import torch
from diffusers import WanPipeline
from diffusers_hybrid.shapes.video_io import write_video

pipe = WanPipeline.from_pretrained("pretrained/shapes/teacher", dtype=torch.float32)
video = pipe("a large red circle bouncing quickly to the left on a dark blue background",
             height={args.resolution}, width={args.resolution}, num_frames={args.num_frames}, num_inference_steps=50,
             guidance_scale={args.guidance_scale}).frames[0]
write_video(video, "video.mp4")
```

Training: {measurements.get("steps")} steps of batch {args.train_batch_size} ({measurements.get("train_seconds", 0):.0f} s on
{measurements.get("device")}), learning rate {args.learning_rate}, {args.mixed_precision or "fp32"}, EMA {args.use_ema}
(decay {args.ema_decay}), caption dropout {args.caption_dropout}, flow shift {args.flow_shift}, motion weight
{args.motion_weight}, per-frame noise for a fraction {args.frame_noise_fraction} of clips, starts away from the heading walls for a fraction {args.start_away_fraction} (span {args.start_away_span}), clips of {args.num_frames} frames at {args.resolution}x{args.resolution}. Weights stored in {args.save_dtype}.

Final validation (held-out prompts: colour-shape pairs never seen in training; scores of the shapes evaluation
suite, `python -m diffusers_hybrid.shapes score`):

| prompt | adherence | overall |
| --- | --- | --- |
{rows}

See `benchmarks/RESULTS.md` for the full held-out evaluation.
"""
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(card)


def match_requested_config(transformer, requested, base):
    """
    The warm-started transformer of `base`, checked against `--transformer_config`: a different `patch_size` is a
    warm start at that patch size (`repatch_transformer`), a larger `num_layers` one with more blocks
    (`deepen_transformer`); any other difference is an error, never silently ignored.
    """
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    differ = {k for k, v in requested.items() if norm(transformer.config.get(k, v)) != norm(v)}
    if differ - {"patch_size", "num_layers"}:
        detail = ", ".join(
            f"{k}: {requested[k]} vs {transformer.config[k]}" for k in sorted(differ - {"patch_size", "num_layers"})
        )
        raise ValueError(
            f"--transformer_config asks for a different architecture than {base}/transformer ({detail}); only "
            "`patch_size` (finer) and `num_layers` (more) can change on a warm start. Point "
            "--pretrained_model_name_or_path at a folder without transformer/ to train from scratch."
        )
    if "patch_size" in differ:
        logger.info(f"warm start at patch size {requested['patch_size']} (from {list(transformer.config.patch_size)})")
        transformer = repatch_transformer(transformer, requested["patch_size"])
    if "num_layers" in differ:
        logger.info(f"warm start with {requested['num_layers']} blocks (from {transformer.config.num_layers})")
        transformer = deepen_transformer(transformer, requested["num_layers"])
    return transformer


def fix_tokenizer_class(folder):
    """Record the tokenizer as `PreTrainedTokenizerFast` (loadable by transformers 4.x and 5.x alike)."""
    for path, key in ((os.path.join(folder, "tokenizer", "tokenizer_config.json"), "tokenizer_class"),):
        if os.path.isfile(path):
            with open(path) as f:
                cfg = json.load(f)
            cfg[key] = "PreTrainedTokenizerFast"
            with open(path, "w") as f:
                json.dump(cfg, f, indent=2)
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            cfg = json.load(f)
        cfg["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
        with open(index, "w") as f:
            json.dump(cfg, f, indent=2)


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def main(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project_config,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_warning()
    else:
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    base = args.pretrained_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
    text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(base, "text_encoder"), torch_dtype=torch.float32)
    vae = AutoencoderKLWan.from_pretrained(os.path.join(base, "vae"), torch_dtype=torch.float32)
    vae.requires_grad_(False).eval().to(device)
    if os.path.isfile(os.path.join(base, "transformer", "config.json")):
        transformer = WanTransformer3DModel.from_pretrained(
            os.path.join(base, "transformer"), torch_dtype=torch.float32
        )
        transformer = match_requested_config(transformer, args.transformer_config or {}, base)
    else:
        cfg = {**DEFAULT_TRANSFORMER, **(args.transformer_config or {})}
        cfg["text_dim"] = text_encoder.config.d_model
        cfg["in_channels"] = cfg["out_channels"] = vae.config.z_dim
        transformer = WanTransformer3DModel(**cfg)
    if transformer.config.text_dim != text_encoder.config.d_model:
        raise ValueError("transformer text_dim must equal the text encoder's d_model")
    transformer.train()
    text_encoder.train(args.train_text_encoder).requires_grad_(args.train_text_encoder)
    text_encoder.to(device)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    ema = ema_te = None
    if args.use_ema:
        ema = EMAModel(
            transformer.parameters(),
            decay=args.ema_decay,
            model_cls=WanTransformer3DModel,
            model_config=transformer.config,
            foreach=True,
        )
        ema.to(device)
        if args.train_text_encoder:
            ema_te = EMAModel(text_encoder.parameters(), decay=args.ema_decay, foreach=True)
            ema_te.to(device)

    def save_model_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for m in models:
            u = accelerator.unwrap_model(m)
            if u is accelerator.unwrap_model(transformer_p):
                u.save_pretrained(os.path.join(output_dir, "transformer"))
            elif args.train_text_encoder and u is accelerator.unwrap_model(text_encoder_p):
                u.save_pretrained(os.path.join(output_dir, "text_encoder"))
            weights.pop()
        if ema is not None:
            ema.save_pretrained(os.path.join(output_dir, "transformer_ema"))
        if ema_te is not None:  # the EMA of the text encoder, as a model folder (safetensors)
            shadow = copy.deepcopy(accelerator.unwrap_model(text_encoder_p))
            ema_te.copy_to(shadow.parameters())
            shadow.save_pretrained(os.path.join(output_dir, "text_encoder_ema"))
            with open(os.path.join(output_dir, "text_encoder_ema", "ema_state.json"), "w") as f:
                json.dump({"optimization_step": ema_te.optimization_step}, f)

    def load_model_hook(models, input_dir):
        while models:
            m = models.pop()
            u = accelerator.unwrap_model(m)
            if u is accelerator.unwrap_model(transformer_p):
                loaded = WanTransformer3DModel.from_pretrained(
                    os.path.join(input_dir, "transformer"), torch_dtype=torch.float32
                )
            else:
                loaded = UMT5EncoderModel.from_pretrained(
                    os.path.join(input_dir, "text_encoder"), torch_dtype=torch.float32
                )
            u.load_state_dict(loaded.state_dict())
            del loaded
        if ema is not None:
            loaded = EMAModel.from_pretrained(
                os.path.join(input_dir, "transformer_ema"), WanTransformer3DModel, foreach=True
            )
            ema.load_state_dict(loaded.state_dict())
            ema.to(device)
        if ema_te is not None:
            folder = os.path.join(input_dir, "text_encoder_ema")
            loaded = UMT5EncoderModel.from_pretrained(folder, torch_dtype=torch.float32)
            ema_te.shadow_params = [p.detach().clone().to(device) for p in loaded.parameters()]
            with open(os.path.join(folder, "ema_state.json")) as f:
                ema_te.optimization_step = json.load(f)["optimization_step"]

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    params = [{"params": [p for p in transformer.parameters() if p.requires_grad], "lr": args.learning_rate}]
    if args.train_text_encoder:
        params.append(
            {"params": list(text_encoder.parameters()), "lr": args.text_encoder_lr or args.learning_rate / 3}
        )
    optimizer = torch.optim.AdamW(
        params, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
    )
    # one clock for the learning-rate schedule and for --max_train_time, started right before the training loop
    budget = TrainingBudget(args.max_train_steps * accelerator.num_processes, args.max_train_time, accelerator)
    lr_scheduler = time_budget_lr_scheduler(optimizer, args, accelerator.num_processes, budget)
    if args.train_text_encoder:
        transformer_p, text_encoder_p, optimizer, lr_scheduler = accelerator.prepare(
            transformer, text_encoder, optimizer, lr_scheduler
        )
    else:
        transformer_p, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
        text_encoder_p = text_encoder
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config={k: str(v) for k, v in vars(args).items()})

    global_step = 0
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint != "latest":
            path = args.resume_from_checkpoint
        else:
            dirs = (
                [d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")]
                if os.path.isdir(args.output_dir)
                else []
            )
            dirs = sorted(dirs, key=lambda d: int(d.split("-")[1]))
            path = os.path.join(args.output_dir, dirs[-1]) if dirs else None
        if path is None:
            accelerator.print("No checkpoint found: starting a new training run.")
        else:
            accelerator.print(f"Resuming from {path}")
            accelerator.load_state(path)
            global_step = int(os.path.basename(os.path.normpath(path)).split("-")[1])

    source = LatentSource(vae, args, device, accelerator.process_index, weight_dtype)
    generator = torch.Generator().manual_seed(args.seed + 1000 * accelerator.process_index + global_step)
    val_prompts = args.validation_prompts or default_validation_prompts(args.num_validation_videos)
    logger.info(f"transformer parameters: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M")

    def pipeline_for_validation():
        te = accelerator.unwrap_model(text_encoder_p)
        return WanPipeline(
            tokenizer=tokenizer,
            text_encoder=te,
            vae=vae,
            transformer=accelerator.unwrap_model(transformer_p),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=args.flow_shift),
        )

    progress = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
        mininterval=5,
    )
    stopped_early = False
    loss = None  # stays None when a resumed run has no step left
    if global_step >= args.max_train_steps:
        logger.info(f"Resumed at step {global_step} >= --max_train_steps {args.max_train_steps}: nothing to train.")
    # scenes are seeded per micro-batch (not per optimiser step): the micro-batches of one step differ
    micro_step = global_step * args.gradient_accumulation_steps
    budget.start()

    while global_step < args.max_train_steps:
        models = [transformer_p] + ([text_encoder_p] if args.train_text_encoder else [])
        with accelerator.accumulate(*models):
            x0, prompts = source.batch(micro_step, args.train_batch_size)
            micro_step += 1
            drop = torch.rand(len(prompts), generator=generator) < args.caption_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
            with torch.set_grad_enabled(args.train_text_encoder), accelerator.autocast():
                text = encode_prompts(tokenizer, text_encoder_p, prompts, args.max_sequence_length, device=device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            sigma = sample_frame_sigmas(x0.shape[0], x0.shape[2], args, generator, device)
            if args.counterfactual_pairs:
                share_within_pairs(noise, sigma)
            s = sigma.view(x0.shape[0], 1, x0.shape[2], 1, 1)
            xt = (1 - s) * x0 + s * noise
            timestep = token_timesteps(sigma, x0.shape, accelerator.unwrap_model(transformer_p).config.patch_size)
            with accelerator.autocast():
                pred = transformer_p(
                    hidden_states=xt.to(weight_dtype),
                    timestep=timestep,
                    encoder_hidden_states=text.to(weight_dtype),
                    return_dict=False,
                )[0]
            loss = flow_matching_loss(pred, noise - x0, x0, args.motion_weight)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                params_to_clip = [p for m in models for p in m.parameters() if p.requires_grad]
                accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            global_step += 1
            progress.update(1)
            if ema is not None:
                ema.step(transformer_p.parameters())
            if ema_te is not None:
                ema_te.step(text_encoder_p.parameters())
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process:
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    logger.info("Saved state to " + save_rotated_checkpoint(
                        accelerator, args.output_dir, global_step, args.checkpoints_total_limit))
                if args.validation_steps and global_step % args.validation_steps == 0:
                    with _ema_weights(ema, ema_te, transformer_p, text_encoder_p):
                        log_validation(
                            pipeline_for_validation(), args, accelerator, val_prompts, global_step, weight_dtype
                        )
            if budget.out_of_time():
                stopped_early = global_step < args.max_train_steps
                break
    train_seconds = budget.elapsed()
    progress.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        tr = accelerator.unwrap_model(transformer_p)
        te = accelerator.unwrap_model(text_encoder_p)
        if ema is not None:
            ema.copy_to(tr.parameters())
        if ema_te is not None:
            ema_te.copy_to(te.parameters())
        pipe = pipeline_for_validation()
        validation = log_validation(pipe, args, accelerator, val_prompts, global_step, weight_dtype, final=True)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.save_dtype]
        # Save a copy in the storage dtype, the modules Wan and UMT5 keep in float32 left there (a plain `.to(dtype)`
        # would round them for good); the VAE folder is copied as it is (the VAE script chose its dtype).
        export = WanPipeline(
            tokenizer=tokenizer,
            text_encoder=cast_keeping_fp32_modules(copy.deepcopy(te).to("cpu"), dtype),
            vae=vae,
            transformer=cast_keeping_fp32_modules(copy.deepcopy(tr).to("cpu"), dtype),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=args.flow_shift),
        )
        export.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size)
        shutil.rmtree(os.path.join(args.output_dir, "vae"))
        shutil.copytree(os.path.join(base, "vae"), os.path.join(args.output_dir, "vae"))
        fix_tokenizer_class(args.output_dir)
        measurements = {
            "steps": global_step,
            "stopped_by_time_limit": stopped_early,
            "train_seconds": train_seconds,
            "final_loss": loss.detach().item() if loss is not None else None,
            "transformer_parameters": sum(p.numel() for p in tr.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in te.parameters()),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "validation": validation,
        }
        with open(os.path.join(args.output_dir, "measurements.json"), "w") as f:
            json.dump(measurements, f, indent=2)
        save_model_card(args, args.output_dir, measurements, validation, tr.config)
    accelerator.end_training()


class _ema_weights:
    """Context manager: validate with the EMA weights, then restore the training weights."""

    def __init__(self, ema, ema_te, transformer, text_encoder):
        self.pairs = [(e, m) for e, m in ((ema, transformer), (ema_te, text_encoder)) if e is not None]

    def __enter__(self):
        for e, m in self.pairs:
            e.store(m.parameters())
            e.copy_to(m.parameters())

    def __exit__(self, *exc):
        for e, m in self.pairs:
            e.restore(m.parameters())


@torch.no_grad()
def log_validation(pipe, args, accelerator, prompts, step, weight_dtype, final=False):
    """Generate the validation prompts, write the videos, score them with the evaluation suite."""
    from diffusers_hybrid.shapes.metrics import score_video

    if not prompts:
        return []
    pipe.set_progress_bar_config(disable=True)
    was_training = [m.training for m in (pipe.transformer, pipe.text_encoder)]
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    with accelerator.autocast():
        frames = pipe(
            prompt=prompts,
            height=args.resolution,
            width=args.resolution,
            num_frames=args.num_frames,
            num_inference_steps=args.validation_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
            output_type="np",
            max_sequence_length=args.max_sequence_length,
        ).frames
    folder = os.path.join(args.output_dir, "validation", "final" if final else f"step-{step}")
    ext = ".mp4" if ffmpeg_available() else ".gif"
    results = []
    for i, (prompt, video) in enumerate(zip(prompts, frames)):
        video = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
        try_write_video(video, os.path.join(folder, f"{i:02d}{ext}"))
        rep = score_video(video, prompt)
        results.append({"prompt": prompt, "scores": rep["scores"]})
    adherence = float(np.mean([r["scores"].get("adherence", 0.0) for r in results]))
    overall = float(np.mean([r["scores"].get("overall", 0.0) for r in results]))
    accelerator.log({"val_adherence": adherence, "val_overall": overall}, step=step)
    logger.info(f"step {step}: validation adherence {adherence:.3f}, overall {overall:.3f}")
    with open(os.path.join(folder, "scores.json"), "w") as f:
        json.dump(results, f, indent=2)
    for m, t in zip((pipe.transformer, pipe.text_encoder), was_training):
        m.train(t)
    return results


if __name__ == "__main__":
    main(parse_args())
