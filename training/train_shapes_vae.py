#!/usr/bin/env python
# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Train a small `AutoencoderKLWan` (Wan2.1's VAE class: 16 latent channels, 4x temporal / 8x spatial compression)
on videos of the shapes domain, then fill its `latents_mean` / `latents_std` from data and report reconstruction
PSNR on the held-out split.

    accelerate launch training/train_shapes_vae.py --config training/configs/teacher/vae.yaml --output_dir out/vae

Conventions (shared with the other training scripts): a YAML `--config` whose keys are argument names (command-line
flags override it), `Accelerator(ProjectConfiguration)`, diffusers-format save/load hooks, `checkpoint-{step}`
rotation with `--checkpoints_total_limit`, `--resume_from_checkpoint latest`, validation videos and a progress bar.
Videos are rendered on the fly on the training device (`diffusers_hybrid.shapes`). Output: `{output_dir}/vae/`
(diffusers format, with a model card) and `{output_dir}/measurements.json`.

Long streams (`--stream_frames N`): a causal VAE trained on clips of `num_frames` sees the start of the video in
every frame it is trained on, and need not code what the first frame already holds in later latent frames. The shipped
VAE (33-frame clips) codes dark blue, dark green and brown backgrounds almost only in the first latent frame; its
decoder carries the colour from there for ~39 frames, then turns those backgrounds dark green (session 15 of
`benchmarks/RESULTS.md`). In this mode the VAE trains on whole streams of N frames, coded as the pipeline codes them:
from the first frame on, `--stream_segment_latents` latent frames per optimiser step, with the encoder's and the
decoder's causal caches carried across steps and detached (truncated backpropagation through time), so frames far
from the start are trained too. `--decoder_only` freezes the encoder (and keeps `latents_mean` / `latents_std`), so
that models trained on its latents stay valid; it cannot add what the encoder does not code.

    accelerate launch training/train_shapes_vae.py --config training/configs/teacher/vae_long.yaml \
        --pretrained_model_name_or_path pretrained/shapes/teacher/vae --output_dir out/vae_long
"""

import argparse
import json
import logging
import os

import diffusers
import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import check_min_version
from tqdm.auto import tqdm

check_min_version("0.42.0")

from diffusers_hybrid.shapes.domain import render_batch, scene_specs  # noqa: E402
from diffusers_hybrid.shapes.video_io import ffmpeg_available, try_write_video  # noqa: E402
from diffusers_hybrid.video.streaming_vae import StreamingWanDecoder, _causal_conv_count  # noqa: E402
from diffusers_hybrid.training_utils import (  # noqa: E402
    TrainingBudget,
    save_rotated_checkpoint,
    str2bool,
    time_budget_lr_scheduler,
)

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def _int_list(text):
    return [int(x) for x in str(text).strip("[]").split(",") if x.strip()]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Train a small Wan VAE on the shapes domain.")
    parser.add_argument("--config", type=str, default=None, help="YAML file of argument defaults.")
    # model
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None, help="Start from this VAE folder.")
    parser.add_argument("--base_dim", type=int, default=16)
    parser.add_argument("--dim_mult", type=_int_list, default=[1, 2, 4, 4])
    parser.add_argument("--num_res_blocks", type=int, default=1)
    parser.add_argument("--z_dim", type=int, default=16)
    # data
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--num_frames", type=int, default=9, help="Training clip length (1 + 4k).")
    parser.add_argument("--max_start_frame", type=int, default=256, help="Clips start at a random frame below this.")
    parser.add_argument(
        "--crop_size", type=int, default=None, help="Train on random square crops of this size (multiple of 8)."
    )
    parser.add_argument(
        "--decoder_only",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="Train only the decoder (and post_quant_conv) of --pretrained_model_name_or_path; the encoder and the "
        "latent statistics stay as they are.",
    )
    parser.add_argument(
        "--stream_frames",
        type=int,
        default=0,
        help="Train on streams of this many frames (1 + 4k), coded from their first frame on, "
        "--stream_segment_latents latent frames per optimiser step, with the causal caches carried across steps "
        "(0: clips of --num_frames).",
    )
    parser.add_argument(
        "--stream_segment_latents", type=int, default=2, help="Latent frames coded per optimiser step of a stream."
    )
    # optimisation
    parser.add_argument("--output_dir", type=str, default="shapes-vae")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument(
        "--max_train_time",
        type=float,
        default=None,
        help="Stop after this many seconds of training, counted from the first step (setup and resuming excluded); "
        "the learning-rate schedule anneals over the same clock.",
    )
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_scheduler", type=str, default="cosine")
    parser.add_argument("--lr_warmup_steps", type=int, default=50)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.99)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-4)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument(
        "--posterior_noise",
        type=float,
        default=1.0,
        help="z = mean + this * std * eps while training (0: deterministic).",
    )
    parser.add_argument("--mse_weight", type=float, default=1.0)
    parser.add_argument(
        "--foreground_weight",
        type=float,
        default=0.0,
        help="Per-pixel reconstruction weight 1 + this * (object coverage): objects fill a few percent of a frame, so "
        "an unweighted loss lets the VAE shift object colours by 100 RGB units while its PSNR looks fine.",
    )
    parser.add_argument("--l1_weight", type=float, default=1.0)
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    # `--allow_tf32` alone is true, `--allow_tf32 false` turns off what a YAML config switched on
    parser.add_argument("--allow_tf32", type=str2bool, nargs="?", const=True, default=False)
    # checkpoints, validation, logging
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help='A checkpoint path or "latest".')
    parser.add_argument("--validation_steps", type=int, default=500)
    parser.add_argument("--num_validation_videos", type=int, default=4)
    parser.add_argument("--report_to", type=str, default="none")
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--tracker_project_name", type=str, default="shapes-vae")
    # final statistics, evaluation and export
    parser.add_argument("--num_stats_videos", type=int, default=256, help="Videos for latents_mean / latents_std.")
    parser.add_argument("--num_eval_videos", type=int, default=32, help="Held-out videos for the final PSNR.")
    parser.add_argument("--eval_frames", type=int, default=33)
    parser.add_argument(
        "--eval_long_frames",
        type=int,
        default=0,
        help="Also measure the held-out PSNR on videos of this many frames (1 + 4k), for frames before and from "
        "--eval_frames on (0: not measured).",
    )
    parser.add_argument("--save_dtype", type=str, default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--max_shard_size", type=str, default="10MB")

    args, _ = parser.parse_known_args(input_args)
    if args.config:
        import yaml

        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown keys in {args.config}: {sorted(unknown)}")
        for key in ("dim_mult",):
            if key in cfg and not isinstance(cfg[key], list):
                cfg[key] = _int_list(cfg[key])
        parser.set_defaults(**cfg)
    args = parser.parse_args(input_args)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if (args.num_frames - 1) % 4:
        raise ValueError("--num_frames must be 1 + 4k (the VAE's temporal compression)")
    if (args.eval_frames - 1) % 4:
        raise ValueError("--eval_frames must be 1 + 4k")
    if args.eval_long_frames and ((args.eval_long_frames - 1) % 4 or args.eval_long_frames <= args.eval_frames):
        raise ValueError(
            f"--eval_long_frames must be 1 + 4k and longer than --eval_frames ({args.eval_frames}), got "
            f"{args.eval_long_frames}"
        )
    if args.decoder_only and not args.pretrained_model_name_or_path:
        raise ValueError("--decoder_only fine-tunes a pretrained VAE: give --pretrained_model_name_or_path")
    if args.stream_frames:
        if (args.stream_frames - 1) % 4 or args.stream_frames < 5:
            raise ValueError(f"--stream_frames must be 1 + 4k with k >= 1, got {args.stream_frames}")
        if args.stream_segment_latents < 1:
            raise ValueError(f"--stream_segment_latents must be >= 1, got {args.stream_segment_latents}")
        if args.crop_size:
            raise ValueError("--crop_size is not supported with --stream_frames (streams are decoded whole)")
    args.local_rank = env_local_rank
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Model wrapper (so that DDP sees one forward) and helpers
# ----------------------------------------------------------------------------------------------------------------------


class VAEWithLoss(nn.Module):
    def __init__(self, vae: AutoencoderKLWan, posterior_noise: float = 1.0):
        super().__init__()
        self.vae = vae
        self.posterior_noise = posterior_noise
        self._encoder_cache: list = []  # a stream's causal caches (`reconstruct_segment`)
        self._decoder = None

    def forward(self, x=None, *, segment=None, first_chunk=False):
        """`x` [B, 3, T, H, W] -> (reconstruction, KL); or, with `segment`, the next pixel frames of a stream
        through `reconstruct_segment`."""
        if segment is not None:
            return self.reconstruct_segment(segment, first_chunk)
        posterior = self.vae.encode(x).latent_dist
        z = self.sample_latents(posterior)
        recon = self.vae.decode(z).sample
        return recon, posterior.kl().mean()

    def sample_latents(self, posterior):
        z = posterior.mean
        if self.posterior_noise:
            z = z + self.posterior_noise * posterior.std * torch.randn_like(z)
        return z

    def reconstruct_segment(self, segment: torch.Tensor, first_chunk: bool):
        """
        Encode and decode the next frames of a stream as `AutoencoderKLWan.encode` / `decode` do a whole video (one
        latent frame at a time through the causal caches) but keeping both caches between calls: `first_chunk`
        starts a new stream. The caches that earlier segments left are detached (truncated backpropagation through
        time); the decoder's is the pipeline's own streaming decoder ([`StreamingWanDecoder`]).

        Args:
            segment: `[B, 3, T, H, W]` in [-1, 1], the pixel frames of the stream's next latent frames: T = 1 + 4k
                for the first segment (frame 0 is a latent frame of its own), 4k after.
        Returns:
            `(reconstruction [B, 3, T, H, W] in [-1, 1], KL of the segment's posterior)`.
        """
        vae = self.vae
        scale = vae.config.scale_factor_temporal
        if vae.config.patch_size is not None:
            raise NotImplementedError("streamed training of a patchified (Wan2.2) VAE")
        if (segment.shape[2] - (1 if first_chunk else 0)) % scale:
            raise ValueError(f"a {'first ' if first_chunk else ''}segment of {segment.shape[2]} frames does not cover "
                             f"whole latent frames of {scale}")
        if first_chunk:
            self._encoder_cache = [None] * _causal_conv_count(vae.encoder)
            self._decoder = StreamingWanDecoder(vae, enable_grad=True)
        else:
            self._encoder_cache = [f.detach() if torch.is_tensor(f) else f for f in self._encoder_cache]
        bounds = [0] + list(range(1, segment.shape[2] + 1, scale)) if first_chunk else list(
            range(0, segment.shape[2] + 1, scale))
        encoded = [
            vae.encoder(segment[:, :, lo:hi], feat_cache=self._encoder_cache, feat_idx=[0])
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        posterior = DiagonalGaussianDistribution(vae.quant_conv(torch.cat(encoded, dim=2)))
        return self._decoder.decode(self.sample_latents(posterior)), posterior.kl().mean()


class _Stream:
    """One batch of training streams (rendered frames and their object coverage) and the next latent frame to code."""

    def __init__(self, x, coverage, temporal_scale: int):
        self.x, self.coverage, self.temporal_scale = x, coverage, temporal_scale
        self.num_latents = 1 + (x.shape[2] - 1) // temporal_scale
        self.next_latent = 0

    @property
    def done(self) -> bool:
        return self.next_latent >= self.num_latents

    def take(self, count: int):
        """The pixel frames and coverage of the next `count` latent frames, and whether they start the stream."""
        start, end = self.next_latent, min(self.next_latent + count, self.num_latents)
        self.next_latent = end
        scale = self.temporal_scale
        pixels = slice(0 if start == 0 else 1 + scale * (start - 1), 1 + scale * (end - 1))
        return self.x[:, :, pixels], self.coverage[:, :, pixels], start == 0


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, coverage: torch.Tensor, args) -> torch.Tensor:
    """L1 + MSE, each a weighted mean with weights 1 + `foreground_weight` * coverage ([B, 1, T, H, W])."""
    weight = 1.0 + args.foreground_weight * coverage
    err = recon - x
    weighted = args.l1_weight * (weight * err.abs()).mean() + args.mse_weight * (weight * err.square()).mean()
    return weighted / weight.mean()


def object_color_error(recon: torch.Tensor, x: torch.Tensor, coverage: torch.Tensor) -> float:
    """Mean absolute RGB error (0..255 units) over the pixels fully covered by an object."""
    inside = (coverage >= 0.999).expand_as(x)
    return float((recon.float().clamp(-1, 1) - x).abs()[inside].mean() * 127.5)


def psnr_uint8(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) between videos in [-1, 1], after quantisation to 8 bits, averaged over videos."""
    qa = ((a.float().clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.float().clamp(-1, 1) + 1) * 127.5).round()
    mse = ((qa - qb) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


@torch.no_grad()
def reconstruct(vae, x, chunk: int = 4):
    outs = []
    for xc in x.split(chunk):
        z = vae.encode(xc.to(vae.dtype)).latent_dist.mode()
        outs.append(vae.decode(z).sample.float())
    return torch.cat(outs)


def random_crops(x: torch.Tensor, size: int, rng) -> torch.Tensor:
    """One random square crop per video (the same for all its frames): [B, C, T, size, size]."""
    h, w = x.shape[-2:]
    ys = rng.integers(0, (h - size) // 8 + 1, size=x.shape[0]) * 8
    xs = rng.integers(0, (w - size) // 8 + 1, size=x.shape[0]) * 8
    return torch.stack([v[..., y : y + size, x0 : x0 + size] for v, y, x0 in zip(x, ys.tolist(), xs.tolist())])


def specs_for_step(step: int, batch: int, rank: int, seed: int):
    """The scenes of micro-batch `step` (counted over the whole run: under gradient accumulation the micro-batches
    of one optimiser step draw different scenes) on process `rank`."""
    return scene_specs("train", batch, base_seed=hash((seed, step, rank)) % (2**31))


def _new_stream(micro_step: int, rank: int, rng, args, device, temporal_scale: int) -> _Stream:
    """Render the next batch of training streams: training-split scenes from random start frames."""
    specs = specs_for_step(micro_step, args.train_batch_size, rank, args.seed)
    starts = rng.integers(0, args.max_start_frame, size=len(specs)).tolist()
    x, coverage = render_batch(
        specs, args.stream_frames, args.resolution, args.resolution, device=device, start_frames=starts,
        return_coverage=True,
    )
    return _Stream(x, coverage, temporal_scale)


def save_model_card(folder: str, args, measurements: dict):
    long_rows = ""
    if "psnr_heldout_long_tail" in measurements:
        long_rows = (
            f"| held-out PSNR over {args.eval_long_frames}-frame videos: frames 0-{args.eval_frames - 1} / from frame "
            f"{args.eval_frames} on | {measurements['psnr_heldout_long_head']:.2f} / "
            f"{measurements['psnr_heldout_long_tail']:.2f} dB |\n"
        )
    stream_note = ""
    if args.stream_frames:
        trained = ("its decoder alone (encoder and latent statistics unchanged)" if args.decoder_only
                   else "encoder and decoder")
        start = f" from `{args.pretrained_model_name_or_path}`" if args.pretrained_model_name_or_path else ""
        stream_note = (
            f"Trained{start} on whole {args.stream_frames}-frame streams coded as the pipeline codes them ({trained}; "
            f"{args.stream_segment_latents} latent frame(s) per step, the causal caches carried across steps), so "
            "that frames far from the start are trained as well as the first ones.\n\n"
        )
    card = f"""---
library_name: diffusers
license: apache-2.0
tags: [diffusers, diffusers-hybrid, shapes, video-autoencoder, wan]
---

# Shapes Wan VAE

A small `AutoencoderKLWan` (the class of Wan2.1's VAE: z_dim {args.z_dim}, temporal downsampling
[False, True, True] = 4x, three spatial downsamplings = 8x) with base_dim {args.base_dim}, dim_mult {args.dim_mult},
{args.num_res_blocks} residual block(s) per stage, trained from scratch on videos of the procedural *shapes* domain
(`diffusers_hybrid.shapes`) with `training/train_shapes_vae.py`. `latents_mean` / `latents_std` in `config.json`
were measured on {args.num_stats_videos} training-split videos, as in Wan2.1 (the pipeline normalises latents with them).

| measurement | value |
| --- | --- |
| held-out reconstruction PSNR ({args.num_eval_videos} videos x {args.eval_frames} frames at {args.resolution}x{args.resolution}, 8-bit) | {measurements.get("psnr_heldout", float("nan")):.2f} dB |
| same, weights as stored ({args.save_dtype}) loaded in float32 | {measurements.get("psnr_heldout_saved", float("nan")):.2f} dB |
| held-out object colour error (mean absolute RGB error inside the objects, 0-255) | {measurements.get("object_color_error_heldout", float("nan")):.1f} |
| reconstruction loss weight on object pixels (`--foreground_weight`) | 1 + {args.foreground_weight:g} |
| training steps / seconds | {measurements.get("steps")} / {measurements.get("train_seconds", 0):.0f} |
| parameters | {measurements.get("parameters")} |
{long_rows}
{stream_note}Weights are stored in {args.save_dtype}; load with `torch_dtype=torch.float32` on CPU.
"""
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)


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
        diffusers.utils.logging.set_verbosity_info()
    else:
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.pretrained_model_name_or_path:
        vae = AutoencoderKLWan.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=torch.float32)
    else:
        vae = AutoencoderKLWan(
            base_dim=args.base_dim,
            z_dim=args.z_dim,
            dim_mult=args.dim_mult,
            num_res_blocks=args.num_res_blocks,
            temperal_downsample=[False, True, True],
        )
    if args.decoder_only:
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
    model = VAEWithLoss(vae, args.posterior_noise)
    model.train()

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for m in models:
                accelerator.unwrap_model(m).vae.save_pretrained(os.path.join(output_dir, "vae"))
                weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            m = models.pop()
            loaded = AutoencoderKLWan.from_pretrained(os.path.join(input_dir, "vae"), torch_dtype=torch.float32)
            accelerator.unwrap_model(m).vae.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    # one clock for the learning-rate schedule and for --max_train_time, started right before the training loop
    budget = TrainingBudget(args.max_train_steps * accelerator.num_processes, args.max_train_time, accelerator)
    lr_scheduler = time_budget_lr_scheduler(optimizer, args, accelerator.num_processes, budget)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
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

    device = accelerator.device
    rank = accelerator.process_index
    val_specs = scene_specs("heldout", args.num_validation_videos, base_seed=args.seed + 99)
    progress = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
        mininterval=5,
    )
    rng = np.random.default_rng([args.seed, rank, global_step])
    stopped_early = False
    micro_step = global_step * args.gradient_accumulation_steps
    stream = None  # --stream_frames: the streams being decoded (a resumed run starts new ones)
    temporal_scale = vae.config.scale_factor_temporal
    budget.start()
    while global_step < args.max_train_steps:
        with accelerator.accumulate(model):
            if args.stream_frames:
                if stream is None or stream.done:
                    stream = _new_stream(micro_step, rank, rng, args, device, temporal_scale)
                micro_step += 1
                x, coverage, first = stream.take(args.stream_segment_latents)
                recon, kl = model(segment=x, first_chunk=first)
            else:
                specs = specs_for_step(micro_step, args.train_batch_size, rank, args.seed)
                micro_step += 1
                starts = rng.integers(0, args.max_start_frame, size=len(specs)).tolist()
                x, coverage = render_batch(
                    specs,
                    args.num_frames,
                    args.resolution,
                    args.resolution,
                    device=device,
                    start_frames=starts,
                    return_coverage=True,
                )
                if args.crop_size and args.crop_size < args.resolution:
                    x, coverage = random_crops(torch.cat([x, coverage], dim=1), args.crop_size, rng).split(
                        [3, 1], dim=1
                    )
                recon, kl = model(x)
            loss = reconstruction_loss(recon.float(), x, coverage, args) + args.kl_weight * kl
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            global_step += 1
            progress.update(1)
            logs = {"loss": loss.detach().item(), "kl": kl.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process:
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    logger.info("Saved state to " + save_rotated_checkpoint(
                        accelerator, args.output_dir, global_step, args.checkpoints_total_limit))
                if args.validation_steps and global_step % args.validation_steps == 0:
                    _validate(accelerator.unwrap_model(model).vae, val_specs, args, global_step, accelerator)
            if budget.out_of_time():
                stopped_early = global_step < args.max_train_steps
                break
    train_seconds = budget.elapsed()
    progress.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.float().eval()
        measurements = {
            "steps": global_step,
            "stopped_by_time_limit": stopped_early,
            "train_seconds": train_seconds,
            "parameters": sum(p.numel() for p in vae.parameters()),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }
        if args.decoder_only:
            measurements["decoder_only_from"] = args.pretrained_model_name_or_path
        else:
            _measure_latent_statistics(vae, args, device)  # the encoder changed
        measurements["latents_mean"] = vae.config.latents_mean
        measurements["latents_std"] = vae.config.latents_std
        # Held-out reconstruction PSNR (full precision, then as stored).
        eval_specs = scene_specs("heldout", args.num_eval_videos, base_seed=args.seed + 777)
        x, coverage = render_batch(
            eval_specs, args.eval_frames, args.resolution, args.resolution, device=device, return_coverage=True
        )
        y = reconstruct(vae, x)
        measurements["psnr_heldout"] = psnr_uint8(y, x)
        measurements["object_color_error_heldout"] = object_color_error(y, x, coverage)
        if args.eval_long_frames:
            long_x = render_batch(eval_specs, args.eval_long_frames, args.resolution, args.resolution, device=device)
            long_y = reconstruct(vae, long_x)
            head = slice(0, args.eval_frames)
            tail = slice(args.eval_frames, None)
            measurements["psnr_heldout_long_head"] = psnr_uint8(long_y[:, :, head], long_x[:, :, head])
            measurements["psnr_heldout_long_tail"] = psnr_uint8(long_y[:, :, tail], long_x[:, :, tail])
            del long_x, long_y
        out = os.path.join(args.output_dir, "vae")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.save_dtype]
        vae.to(dtype).save_pretrained(out, max_shard_size=args.max_shard_size)
        vae.float()
        saved = AutoencoderKLWan.from_pretrained(out, torch_dtype=torch.float32).to(device).eval()
        y = reconstruct(saved, x)
        measurements["psnr_heldout_saved"] = psnr_uint8(y, x)
        measurements["object_color_error_heldout_saved"] = object_color_error(y, x, coverage)
        save_model_card(out, args, measurements)
        with open(os.path.join(args.output_dir, "measurements.json"), "w") as f:
            json.dump(measurements, f, indent=2)
        _validate(saved, val_specs, args, global_step, accelerator, final=True)
        logger.info(
            f"held-out PSNR {measurements['psnr_heldout']:.2f} dB (stored weights: {measurements['psnr_heldout_saved']:.2f} dB),"
            f" object colour error {measurements['object_color_error_heldout']:.1f} RGB units"
        )
    accelerator.end_training()


@torch.no_grad()
def _measure_latent_statistics(vae, args, device) -> None:
    """Per-channel latent mean / std over videos, frames and positions (as Wan2.1's config holds), into the config."""
    stats_specs = scene_specs("train", args.num_stats_videos, base_seed=args.seed + 4242)
    z_dim = vae.config.z_dim
    s1 = torch.zeros(z_dim, dtype=torch.float64, device=device)
    s2 = torch.zeros_like(s1)
    count = 0
    for i in range(0, len(stats_specs), 8):
        x = render_batch(stats_specs[i : i + 8], args.eval_frames, args.resolution, args.resolution, device=device)
        z = vae.encode(x).latent_dist.mode().double()
        s1 += z.sum(dim=(0, 2, 3, 4))
        s2 += (z * z).sum(dim=(0, 2, 3, 4))
        count += z.numel() // z_dim
    mean = s1 / count
    std = (s2 / count - mean * mean).clamp(min=1e-8).sqrt()
    vae.register_to_config(
        latents_mean=[round(float(v), 5) for v in mean], latents_std=[round(float(v), 5) for v in std]
    )


def _validate(vae, specs, args, step, accelerator, final=False):
    """Reconstruct validation videos, log PSNR, write original | reconstruction side by side."""
    was_training = vae.training
    vae.eval()
    x = render_batch(specs, args.eval_frames, args.resolution, args.resolution, device=accelerator.device)
    with torch.autocast(accelerator.device.type, enabled=False):
        y = reconstruct(vae, x.to(torch.float32))
    psnr = psnr_uint8(y, x)
    accelerator.log({"val_psnr": psnr}, step=step)
    logger.info(f"step {step}: validation PSNR {psnr:.2f} dB")
    folder = os.path.join(args.output_dir, "validation")
    ext = ".mp4" if ffmpeg_available() else ".gif"
    side = torch.cat([x, y], dim=-1)  # [B, 3, T, H, 2W]
    grid = torch.cat(list(side), dim=-2)  # [3, T, B*H, 2W]
    frames = ((grid.permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    try_write_video(frames, os.path.join(folder, f"{'final' if final else f'step-{step}'}{ext}"))
    if was_training:
        vae.train()
    return psnr


if __name__ == "__main__":
    main(parse_args())
