# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Math shared by the Hybrid Forcing training scripts (`training/train_hybrid_forcing.py`), unit-tested on its own.

Conventions (flow matching, as Wan): a clean latent `x0`, noise `eps` and a noise level `sigma` in [0, 1] give
`x_t = (1 - sigma) * x0 + sigma * eps`; a model's flow prediction is `v ≈ eps - x0`, so `x0 = x_t - sigma * v`. The
model's `timestep` is `1000 * sigma`. Latents are `(B, C, F, H, W)` as in diffusers.

What lives here:
- timesteps: the shift `sigma -> shift * sigma / (1 + (shift - 1) * sigma)`, the student's warped denoising steps, the
  DMD / critic timestep sampling, the teacher's Euler grid;
- losses: the DMD gradient and loss, the critic's flow-matching loss, the reflow / ODE-regression losses;
- the teacher's classifier-free-guided Euler ODE (batch-safe: cond and uncond are concatenated, never repeated);
- the self-forcing rollout: autoregressive over chunks with the model's streaming cache, gradient through one exit step
  per chunk and only inside a gradient window at the end of the rollout, re-noising between every pair of steps
  (including after step 0), a clean context pass that commits each chunk;
- the DMD clip (the last frames of a rollout, optionally with the first frame re-encoded as an image latent) and its
  gradient mask;
- an exponential moving average of a set of named parameters, and a LoRA merge on state dicts;
- warm starts of a Wan-layout transformer at a finer patch size (`repatch_transformer`) or with more blocks
  (`deepen_transformer`).

Official-code quirks deliberately not reproduced are listed in `docs/deviations.md` and in `training/README.md`.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

# ---------------------------------------------------------------------------------------------------------------------
# timesteps
# ---------------------------------------------------------------------------------------------------------------------


def shift_sigma(sigma, shift: float):
    """The flow-matching timestep shift `shift * s / (1 + (shift - 1) * s)` (Wan / SD3), for floats or tensors."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def denoising_timesteps(step_list: Sequence[float], shift: float, warp: bool = True,
                        num_train_timesteps: int = 1000) -> torch.Tensor:
    """
    The student's few-step timesteps.

    With `warp=True` each entry `t` of `step_list` is mapped to the shifted timestep `num_train_timesteps *
    shift(t / num_train_timesteps)`. This equals the official `timesteps[1000 - t]` lookup into the 1000-step shifted
    grid with sigma_min 0 (whose k-th sigma is `shift(1 - k / 1000)`), without building the grid. `[1000, 750, 500,
    250]` with shift 5 gives `[1000, 937.5, 833.33, 625]`. With `warp=False` the list is used as given.

    Returns a float64 tensor of timesteps in `[0, num_train_timesteps]`, strictly decreasing.
    """
    steps = torch.tensor([float(t) for t in step_list], dtype=torch.float64)
    if steps.numel() == 0:
        raise ValueError("`denoising_step_list` is empty.")
    if (steps < 0).any() or (steps > num_train_timesteps).any():
        raise ValueError(f"Denoising steps must lie in [0, {num_train_timesteps}], got {list(step_list)}.")
    if warp:
        steps = shift_sigma(steps / num_train_timesteps, shift) * num_train_timesteps
    if (steps[1:] >= steps[:-1]).any():
        raise ValueError(f"Denoising steps must be strictly decreasing, got {steps.tolist()}.")
    return steps


def sample_dmd_timesteps(batch_size: int, generator: torch.Generator | None, shift: float, min_timestep: float,
                         max_timestep: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """
    One timestep per sample for the DMD scores and the critic loss (the same for every frame: `uniform_timestep`):
    `u ~ U{0, ..., T-1} / T`, `t = T * shift(u)`, clamped to `[min_timestep, max_timestep]` (official: T = 1000, shift
    5, clamp [20, 980]).

    Returns float32 `(batch_size,)` on the CPU (the generator's device).
    """
    u = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator).double() / num_train_timesteps
    t = shift_sigma(u, shift) * num_train_timesteps
    return t.clamp(min_timestep, max_timestep).float()


def flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """
    The teacher's Euler grid: `num_steps` shifted sigmas `shift(1 - k / num_steps)`, `k = 0 .. num_steps - 1`, then 0
    (FlowMatch, sigma_min 0). Returns float64 `(num_steps + 1,)`, decreasing from 1 to 0.
    """
    if num_steps < 1:
        raise ValueError(f"`num_steps` must be >= 1, got {num_steps}.")
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigma(base, shift), torch.zeros(1, dtype=torch.float64)])


def merge_sigma_grids(grid: torch.Tensor, extra: Iterable[float]) -> torch.Tensor:
    """The union of two decreasing sigma grids (duplicates within 1e-9 removed), decreasing."""
    values = sorted({round(float(s), 12) for s in list(grid.tolist()) + [float(e) for e in extra]}, reverse=True)
    return torch.tensor(values, dtype=torch.float64)


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`sigma` `(B,)` or `(B, F)` -> broadcastable to `like` `(B, C, F, H, W)`."""
    sigma = sigma.to(device=like.device, dtype=like.dtype)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim == 1:
        return sigma.view(-1, 1, 1, 1, 1)
    if sigma.ndim == 2:
        return sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)
    raise ValueError(f"sigma must be a scalar, (B,) or (B, F); got shape {tuple(sigma.shape)}.")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """`(1 - sigma) * x0 + sigma * noise`; `sigma` a float, `(B,)` or per-frame `(B, F)`."""
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(float(sigma))
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """`x0 = x_t - sigma * v`."""
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(float(sigma))
    return x_t - _expand(sigma, x_t) * flow


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """`uncond + scale * (cond - uncond)` (diffusers' convention; the official DMD code writes `cond + s * (cond -
    uncond)` with s = 3.0, which is `scale` = 4.0 here)."""
    return uncond + scale * (cond - uncond)


# ---------------------------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------------------------


def _masked_mean(values: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` `(B, C, F, H, W)` over the frames where `frame_mask` `(F,)` or `(B, F)` is true."""
    if frame_mask is None:
        return values.mean()
    mask = frame_mask.to(device=values.device, dtype=torch.bool)
    mask = mask.view(1, 1, -1, 1, 1) if mask.ndim == 1 else mask.view(mask.shape[0], 1, mask.shape[1], 1, 1)
    mask = mask.expand_as(values)
    count = mask.sum()
    if count == 0:
        return values.sum() * 0.0
    return values[mask].sum() / count


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """
    The DMD gradient direction `g = (fake_x0 - real_x0) / mean_{C,F,H,W} |x - real_x0|`, normalised per sample,
    computed in float64 with NaN/inf set to 0 (official `_compute_kl_grad`). Gradient-free.
    """
    with torch.no_grad():
        x, real_x0, fake_x0 = x.double(), real_x0.double(), fake_x0.double()
        normaliser = (x - real_x0).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


def dmd_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor,
             frame_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The DMD generator loss `L = 1/2 · mean_masked (x - sg(x - g))^2` in float64, whose gradient with respect to `x` is
    `g / N` on the masked elements (N = their count) and 0 elsewhere.

    Args:
        x: the generator's samples `(B, C, F, H, W)`, with grad.
        real_x0 / fake_x0: the teacher's (guided) and the critic's x0 predictions at a noised copy of `x`.
        frame_mask: `(F,)` / `(B, F)` bool, frames that receive the gradient (None = all).

    Returns `(loss, g)`.
    """
    g = dmd_gradient(x, real_x0, fake_x0)
    xd = x.double()
    target = (xd - g).detach()
    return 0.5 * _masked_mean((xd - target) ** 2, frame_mask), g


def critic_flow_loss(flow_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor,
                     frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The critic's (fake score's) flow-matching loss `mean (v - (eps - x0))^2`, in float64."""
    target = noise.double() - x0.double()
    return _masked_mean((flow_pred.double() - target) ** 2, frame_mask)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`mean_masked (pred - sg(target))^2` in float64: the reflow regulariser and the ODE-initialisation loss."""
    return _masked_mean((pred.double() - target.detach().double()) ** 2, frame_mask)


# ---------------------------------------------------------------------------------------------------------------------
# teacher ODE
# ---------------------------------------------------------------------------------------------------------------------

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guided_velocity(model_fn: VelocityFn, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                    uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """
    Classifier-free-guided flow of a bidirectional model. Cond and uncond run as one batch `[x; x]` of size 2B, which is
    correct for any B (the official reflow teacher repeats the input `2B` times, which is only right for B = 1).

    Args:
        model_fn: `(x, timestep (B,), text) -> flow`.
        cond / uncond: text embeddings `(B, L, D)`; `uncond=None` or `guidance_scale == 1` skips guidance.
    """
    if uncond is None or guidance_scale == 1.0:
        return model_fn(x, timestep, cond).float()
    if uncond.shape[0] == 1 and cond.shape[0] > 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    flow = model_fn(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([cond, uncond])).float()
    flow_cond, flow_uncond = flow.chunk(2)
    return classifier_free_guidance(flow_cond, flow_uncond, guidance_scale)


@torch.no_grad()
def euler_ode_solve(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                    sigmas: torch.Tensor, record_sigmas: Sequence[float] | None = None,
                    num_train_timesteps: int = 1000):
    """
    Integrates the probability-flow ODE `dz/dsigma = v(z, sigma)` with Euler steps `z <- z + v · (sigma_{k+1} -
    sigma_k)` from `sigma_0` (pure noise at 1) to the last sigma (0): the teacher's deterministic sample from `noise`.

    Args:
        velocity_fn: `(z, timestep (B,)) -> v` (guided), with `timestep = num_train_timesteps * sigma`.
        noise: `(B, C, F, H, W)`, the starting point.
        sigmas: decreasing float grid, first entry the starting sigma.
        record_sigmas: sigmas (members of `sigmas`) at which to also return the state.

    Returns the final state (float32), or `(final, states)` with `states` `(B, K, C, F, H, W)` in the order of
    `record_sigmas` when it is given.
    """
    z = noise.float()
    grid = [float(s) for s in sigmas.tolist()]
    wanted = {}
    if record_sigmas is not None:
        for s in record_sigmas:
            matches = [k for k, g in enumerate(grid) if abs(g - float(s)) < 1e-9]
            if not matches:
                raise ValueError(f"sigma {s} is not on the ODE grid.")
            wanted[matches[0]] = None
    batch = z.shape[0]
    for k in range(len(grid)):
        if k in wanted:
            wanted[k] = z.clone()
        if k == len(grid) - 1:
            break
        timestep = torch.full((batch,), grid[k] * num_train_timesteps, device=z.device, dtype=torch.float32)
        v = velocity_fn(z, timestep).float()
        z = z + v * (grid[k + 1] - grid[k])
    if record_sigmas is None:
        return z
    order = [next(k for k, g in enumerate(grid) if abs(g - float(s)) < 1e-9) for s in record_sigmas]
    return z, torch.stack([wanted[k] for k in order], dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# self-forcing rollout
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class RolloutPlan:
    """
    The structural random choices of one rollout, drawn from a generator that is identical on every rank (so that all
    ranks run the same number of forward passes: required by FSDP), while noise is drawn per rank.

    Args:
        num_frames (`int`): latent frames generated.
        exit_steps (`list[int]`): per chunk, the denoising step whose output is kept (and, in the gradient window,
            differentiated).
        grad_start_frame (`int`): chunks starting at or after this frame are in the gradient window.
    """

    num_frames: int
    exit_steps: list[int]
    grad_start_frame: int


def sample_rollout_plan(generator: torch.Generator | None, *, chunk_frames: int, min_frames: int, max_frames: int,
                        gradient_window_frames: int, num_steps: int, same_exit_step_across_chunks: bool = True,
                        last_step_only: bool = False) -> RolloutPlan:
    """
    Draws the rollout length `F = chunk · U{min/chunk .. max/chunk}` and the exit steps (`U{0 .. num_steps-1}`, one for
    all chunks or one per chunk; always the last with `last_step_only`). The gradient window is the last
    `gradient_window_frames` frames (the DMD clip): official F ~ 3·U{7..18}, window 21.
    """
    for name, value in (("min_frames", min_frames), ("max_frames", max_frames),
                        ("gradient_window_frames", gradient_window_frames)):
        if value % chunk_frames or value <= 0:
            raise ValueError(f"`{name}`={value} must be a positive multiple of the chunk ({chunk_frames} frames).")
    if not gradient_window_frames <= min_frames <= max_frames:
        raise ValueError(
            f"Need gradient_window_frames ({gradient_window_frames}) <= min_frames ({min_frames}) <= max_frames "
            f"({max_frames})."
        )
    low, high = min_frames // chunk_frames, max_frames // chunk_frames
    num_chunks = int(torch.randint(low, high + 1, (1,), generator=generator))
    if last_step_only:
        exits = [num_steps - 1] * num_chunks
    elif same_exit_step_across_chunks:
        exits = [int(torch.randint(0, num_steps, (1,), generator=generator))] * num_chunks
    else:
        exits = torch.randint(0, num_steps, (num_chunks,), generator=generator).tolist()
    num_frames = num_chunks * chunk_frames
    return RolloutPlan(num_frames=num_frames, exit_steps=exits, grad_start_frame=num_frames - gradient_window_frames)


@dataclass
class RolloutOutput:
    """
    Args:
        video: `(B, C, F, H, W)` float32, each chunk's x0 at its exit step (with grad inside the gradient window when
            the rollout ran with grad).
        step0: `(B, C, F, H, W)` or None: the one-step x0 from pure noise at the first step, for the frames in
            `step0_mask` (with grad); zeros elsewhere.
        step0_mask: `(F,)` bool, frames whose `step0` was computed with grad.
        grad_mask: `(F,)` bool, frames in the gradient window.
        noise: `(B, C, F, H, W)`, the initial noise of every chunk (the reflow teacher starts from it).
        passes: number of generator forward passes run (all chunks).
    """

    video: torch.Tensor
    step0: torch.Tensor | None
    step0_mask: torch.Tensor
    grad_mask: torch.Tensor
    noise: torch.Tensor
    passes: int = 0
    trace: list[dict] = field(default_factory=list)


def self_forcing_rollout(
    model: Callable,
    init_cache: Callable[[], object],
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    timesteps: torch.Tensor,
    plan: RolloutPlan,
    chunk_frames: int,
    noise_fn: Callable[[tuple], torch.Tensor],
    *,
    enable_grad: bool = True,
    capture_step0: bool = False,
    context_timestep: float = 0.0,
    num_train_timesteps: int = 1000,
    record_trace: bool = False,
) -> RolloutOutput:
    """
    Self-Forcing rollout of a causal student with its streaming cache.

    For each chunk (frames `[f0, f0 + chunk)`): start from `noise[..., f0:f0+chunk, :, :]`; for step `i` with timestep
    `t_i` predict `x0 = x - sigma_i · v` with `cache_mode="read"`; at the chunk's exit step keep `x0` and stop,
    otherwise re-noise `x = (1 - sigma_{i+1}) · x0 + sigma_{i+1} · eps` with fresh noise and go on (also after step 0:
    the official `or i == 0` exit without re-noising is not reproduced). Then the chunk is committed with one
    `cache_mode="write"` pass on its x0 under `no_grad` (timestep `context_timestep`, 0 by default: the same clean
    context as inference; with a positive value the x0 is noised to that level first).

    Gradients: only inside `enable_grad`, only for chunks starting at or after `plan.grad_start_frame`, and only through
    the exit step (plus the first step when `capture_step0`, the reflow regulariser's one-step prediction; the
    trajectory then continues from its detached output). Context K/V are detached by the model.

    Args:
        model: `(x, timestep (B,), text, cache=, frame_offset=, cache_mode=) -> output with .sample (flow)`; call it
            through the distributed wrapper.
        init_cache: `() -> cache` for this batch and latent size.
        noise: `(B, C, F, H, W)` with `F = plan.num_frames`.
        timesteps: the student's timesteps (decreasing), e.g. [1000, 937.5, 833.3, 625].
        noise_fn: `shape -> fresh standard normal noise` (the re-noising draws; per-rank generator).
    """
    batch, _, num_frames, _, _ = noise.shape
    if num_frames != plan.num_frames or num_frames % chunk_frames:
        raise ValueError(f"Noise has {num_frames} frames; the plan wants {plan.num_frames} (chunks of {chunk_frames}).")
    num_chunks = num_frames // chunk_frames
    if len(plan.exit_steps) != num_chunks:
        raise ValueError(f"{len(plan.exit_steps)} exit steps for {num_chunks} chunks.")
    sigmas = [float(t) / num_train_timesteps for t in timesteps]
    device = noise.device
    cache = init_cache()

    outputs, step0_parts = [], []
    step0_mask = torch.zeros(num_frames, dtype=torch.bool)
    grad_mask = torch.zeros(num_frames, dtype=torch.bool)
    trace: list[dict] = []
    passes = 0

    def run(x, sigma, f0, mode, grad):
        nonlocal passes
        passes += 1
        t = torch.full((batch,), sigma * num_train_timesteps, device=device, dtype=torch.float32)
        with torch.set_grad_enabled(grad):
            flow = model(x, t, encoder_hidden_states, cache=cache, frame_offset=f0, cache_mode=mode).sample
            x0 = flow_to_x0(x.float(), flow.float(), sigma)
        if record_trace:
            trace.append({"frame": f0, "mode": mode, "sigma": sigma, "grad": grad, "input": x.detach().clone()})
        return x0

    for n in range(num_chunks):
        f0 = n * chunk_frames
        frames = slice(f0, f0 + chunk_frames)
        in_window = enable_grad and f0 >= plan.grad_start_frame
        grad_mask[frames] = f0 >= plan.grad_start_frame
        exit_step = plan.exit_steps[n]
        x = noise[:, :, frames]
        step0 = None
        for i, sigma in enumerate(sigmas):
            last = i == exit_step
            want_step0 = capture_step0 and i == 0
            x0 = run(x, sigma, f0, "read", in_window and (last or want_step0))
            if i == 0 and in_window and (last or want_step0):
                step0 = x0
            if last:
                break
            x = add_noise(x0.detach(), noise_fn(tuple(x0.shape)).to(device=device, dtype=x0.dtype), sigmas[i + 1])
        outputs.append(x0)
        if step0 is not None:
            step0_mask[frames] = True
        step0_parts.append(step0)

        context = x0.detach()
        if context_timestep > 0:
            context = add_noise(context, noise_fn(tuple(context.shape)).to(device=device, dtype=context.dtype),
                                context_timestep / num_train_timesteps)
        with torch.no_grad():
            run(context, context_timestep / num_train_timesteps, f0, "write", False)

    video = torch.cat(outputs, dim=2)
    step0_video = None
    if step0_mask.any():
        step0_video = torch.cat(
            [p if p is not None else torch.zeros_like(o).detach() for p, o in zip(step0_parts, outputs)], dim=2
        )
    return RolloutOutput(video=video, step0=step0_video, step0_mask=step0_mask, grad_mask=grad_mask, noise=noise,
                         passes=passes, trace=trace)


def dmd_clip(video: torch.Tensor, clip_frames: int, chunk_frames: int,
             reencode_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """
    The clip that the bidirectional teacher and critic score: the last `clip_frames` frames of a rollout (official: 21,
    the teacher's training length, here from the config).

    When the rollout is longer than the clip, its first frame is, with `reencode_fn`, replaced by an image latent:
    `reencode_fn(video[:, :, :F - clip + 1])` decodes those latents and re-encodes the last pixel frame as one latent
    frame (the teacher was trained on clips whose first latent frame encodes one image). The first chunk of the clip is
    then excluded from the generator's gradient (official `gradient_mask`).

    Returns `(clip (B, C, clip_frames, H, W), frame_mask (clip_frames,) bool or None)`.
    """
    num_frames = video.shape[2]
    if num_frames < clip_frames:
        raise ValueError(f"The rollout ({num_frames} frames) is shorter than the DMD clip ({clip_frames}).")
    if num_frames == clip_frames:
        return video, None
    start = num_frames - clip_frames
    if reencode_fn is not None:
        with torch.no_grad():
            first = reencode_fn(video[:, :, : start + 1].detach()).to(video.dtype)
        if first.shape[2] != 1 or first.shape[:2] != video.shape[:2] or first.shape[3:] != video.shape[3:]:
            raise ValueError(f"`reencode_fn` must return one latent frame, got shape {tuple(first.shape)}.")
        clip = torch.cat([first, video[:, :, start + 1 :]], dim=2)
    else:
        clip = video[:, :, start:]
    mask = torch.ones(clip_frames, dtype=torch.bool)
    mask[:chunk_frames] = False
    return clip, mask


def sample_chunk_step_indices(batch_size: int, num_frames: int, chunk_frames: int, num_steps: int,
                              generator: torch.Generator | None) -> torch.Tensor:
    """ODE initialisation: one random denoising-step index per sample and chunk, repeated over the chunk's frames.
    The index is a noise level, not a structural choice (every index runs one forward pass): draw it from the per-rank
    stream, so that the ranks of a distributed run regress from different levels. Returns int64 `(B, F)`."""
    index = torch.randint(0, num_steps, (batch_size, num_frames // chunk_frames), generator=generator)
    return index.repeat_interleave(chunk_frames, dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------------------------


class ParameterEMA:
    """
    Exponential moving average `s <- decay · s + (1 - decay) · p` of a model's trainable parameters, kept in float32
    (optionally on the CPU), keyed by parameter name. Works on whatever local tensors the parameters are (full under
    DDP, shards under FSDP with `use_orig_params`), so under FSDP every rank holds and saves its own shard.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], decay: float,
                 device: torch.device | str | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        self.decay = decay
        self.device = device
        self.shadow: dict[str, torch.Tensor] = {}
        for name, p in named_parameters:
            self.shadow[name] = p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
        self._backup: dict[str, torch.Tensor] | None = None

    def _match(self, named_parameters) -> list[tuple[torch.Tensor, torch.nn.Parameter]]:
        params = dict(named_parameters)
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise KeyError(f"EMA tracks parameters the model does not have: {missing[:5]}")
        return [(self.shadow[name], params[name]) for name in self.shadow]

    @torch.no_grad()
    def update(self, named_parameters) -> None:
        for s, p in self._match(named_parameters):
            s.lerp_(p.detach().to(device=s.device, dtype=torch.float32), 1.0 - self.decay)

    @torch.no_grad()
    def store(self, named_parameters) -> None:
        self._backup = {name: p.detach().clone() for name, p in named_parameters if name in self.shadow}

    @torch.no_grad()
    def copy_to(self, named_parameters) -> None:
        for s, p in self._match(named_parameters):
            p.data.copy_(s.to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def restore(self, named_parameters) -> None:
        if self._backup is None:
            raise RuntimeError("`restore` called without `store`.")
        params = dict(named_parameters)
        for name, value in self._backup.items():
            params[name].data.copy_(value)
        self._backup = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: s.detach().cpu().contiguous() for name, s in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise KeyError(
                f"EMA state does not match the model: missing {sorted(set(self.shadow) - set(state))[:5]}, unexpected "
                f"{sorted(set(state) - set(self.shadow))[:5]}"
            )
        for name, value in state.items():
            self.shadow[name].copy_(value.to(self.shadow[name].device, torch.float32))


# ---------------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------------

_LORA_A = re.compile(r"^(?P<prefix>.*)\.lora_A\.(?P<adapter>[^.]+)\.weight$")


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor],
                          scaling: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """
    Folds PEFT LoRA layers of a state dict into plain weights: `W = W_base + scaling · B @ A` for every
    `X.base_layer.weight` with `X.lora_A.<adapter>.weight` / `X.lora_B.<adapter>.weight`, drops the LoRA tensors and
    renames `X.base_layer.*` to `X.*`. Works on full (gathered) state dicts, so it is the same under DDP and FSDP.

    Args:
        scaling: `lora_alpha / r`, one value or one per adapter name.
    """
    out: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for key, a in state_dict.items():
        match = _LORA_A.match(key)
        if not match:
            continue
        prefix, adapter = match.group("prefix"), match.group("adapter")
        b = state_dict[f"{prefix}.lora_B.{adapter}.weight"]
        scale = scaling[adapter] if isinstance(scaling, dict) else scaling
        delta = (b.float() @ a.float()) * scale
        deltas[prefix] = deltas.get(prefix, 0) + delta
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key or ".lora_embedding_" in key or ".lora_magnitude_vector" in key:
            continue
        if ".base_layer." in key:
            prefix, suffix = key.split(".base_layer.", 1)
            new_key = f"{prefix}.{suffix}"
            if suffix == "weight" and prefix in deltas:
                value = (value.float() + deltas[prefix]).to(value.dtype)
            out[new_key] = value
        else:
            out[key] = value
    return out


def repatch_transformer(transformer, patch_size: Sequence[int]):
    """
    A copy of a Wan-layout transformer (`patch_embedding` Conv3d + `proj_out` Linear, e.g. diffusers'
    `WanTransformer3DModel` or `HybridForcingTransformer3DModel`) at a finer `patch_size`, as a warm start.

    Every entry of the old patch size must be a multiple of the new one. The new patch embedding sums the old kernel
    over its sub-patches, so a latent that is constant across the sub-patches of an old patch embeds every new token
    exactly as the old model embedded that patch. The new output projection averages the old one over the
    sub-patches, so each new token predicts the mean of what the old token predicted for its region. Every other
    weight is copied unchanged (RoPE positions follow the new patch grid from the config).

    Args:
        transformer: the model to convert; left untouched.
        patch_size (`Sequence[int]`): the new `(p_t, p_h, p_w)`.

    Returns:
        A new model of the same class in float32 with `config.patch_size == patch_size`.
    """
    old = tuple(int(p) for p in transformer.config.patch_size)
    new = tuple(int(p) for p in patch_size)
    if len(new) != 3 or min(new) < 1:
        raise ValueError(f"`patch_size` must be three positive integers, got {list(patch_size)}.")
    if any(o % n for o, n in zip(old, new)):
        raise ValueError(f"Each entry of the old patch size {list(old)} must be a multiple of the new one {list(new)}.")
    ratio = tuple(o // n for o, n in zip(old, new))
    state = {k: v.detach().float().clone() for k, v in transformer.state_dict().items()}

    weight = state["patch_embedding.weight"]  # (D, C, pt, ph, pw) -> split each kernel axis into (ratio, new)
    dim, channels = weight.shape[:2]
    weight = weight.reshape(dim, channels, ratio[0], new[0], ratio[1], new[1], ratio[2], new[2])
    state["patch_embedding.weight"] = weight.sum(dim=(2, 4, 6))

    # proj_out rows are ordered (pt, ph, pw, C), matching the model's unpatchify
    out_channels = transformer.config.out_channels
    w, b = state["proj_out.weight"], state["proj_out.bias"]
    w = w.reshape(ratio[0], new[0], ratio[1], new[1], ratio[2], new[2], out_channels, w.shape[-1])
    b = b.reshape(ratio[0], new[0], ratio[1], new[1], ratio[2], new[2], out_channels)
    state["proj_out.weight"] = w.mean(dim=(0, 2, 4)).reshape(-1, w.shape[-1])
    state["proj_out.bias"] = b.mean(dim=(0, 2, 4)).reshape(-1)

    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    model = type(transformer).from_config({**config, "patch_size": list(new)})
    model.load_state_dict(state, strict=True)
    return model.float()


# The layers that write a Wan block's output into the residual stream: zeroed, they make the block the identity.
_BLOCK_OUTPUT_LAYERS = ("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2.")


def deepen_transformer(transformer, num_layers: int):
    """
    A copy of a diffusers `WanTransformer3DModel` with `num_layers` blocks that computes exactly the same function,
    as a warm start for a deeper model.

    The new blocks are spread evenly between the old ones; each starts as a copy of the block before it, with the
    layers that write into the residual stream (self-attention, cross-attention and feed-forward output projections)
    set to zero, so it passes its input through unchanged until training moves those projections.

    Args:
        transformer: the model to deepen; left untouched.
        num_layers (`int`): the new number of blocks, at least the current one.

    Returns:
        A new model of the same class in float32 with `config.num_layers == num_layers`.
    """
    old_layers = int(transformer.config.num_layers)
    if int(num_layers) < old_layers:
        raise ValueError(f"`num_layers` ({num_layers}) must be at least the current number of blocks ({old_layers}).")
    extra = int(num_layers) - old_layers
    # after which old block each new one goes (evenly spread, repeats allowed when extra > old_layers)
    if extra == 1:
        after = [old_layers // 2]
    else:
        after = [round(i * (old_layers - 1) / (extra - 1)) for i in range(extra)]
    order = []  # (source block, is_new)
    for j in range(old_layers):
        order.append((j, False))
        order += [(j, True)] * after.count(j)

    state = {k: v.detach().float().clone() for k, v in transformer.state_dict().items()}
    blocks = {}
    for key in [k for k in state if k.startswith("blocks.")]:
        index, rest = key[len("blocks."):].split(".", 1)
        blocks.setdefault(int(index), {})[rest] = state.pop(key)
    for new_index, (source, is_new) in enumerate(order):
        for rest, value in blocks[source].items():
            if is_new and rest.startswith(_BLOCK_OUTPUT_LAYERS):
                value = torch.zeros_like(value)
            state[f"blocks.{new_index}.{rest}"] = value.clone()

    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    model = type(transformer).from_config({**config, "num_layers": int(num_layers)})
    model.load_state_dict(state, strict=True)
    return model.float()


def count_parameters(parameters: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def seed_for_rank(seed: int, rank: int) -> int:
    """Per-rank seed (`seed + rank`): every rank draws different noise (the official code uses the same seed on all
    ranks)."""
    return int(seed) + int(rank)


def is_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


__all__ = [
    "shift_sigma", "denoising_timesteps", "sample_dmd_timesteps", "flow_sigmas", "merge_sigma_grids", "add_noise",
    "flow_to_x0", "classifier_free_guidance", "dmd_gradient", "dmd_loss", "critic_flow_loss", "regression_loss",
    "guided_velocity", "euler_ode_solve", "RolloutPlan", "sample_rollout_plan", "RolloutOutput",
    "self_forcing_rollout", "dmd_clip", "sample_chunk_step_indices", "ParameterEMA", "merge_lora_state_dict",
    "count_parameters", "seed_for_rank", "is_finite", "TrainingBudget", "time_budget_lr_scheduler",
    "save_rotated_checkpoint", "str2bool", "repatch_transformer", "deepen_transformer",
]

# ---------------------------------------------------------------------------------------------------------------------
# Schedules and checkpoints shared by the shapes training scripts (train_shapes_vae.py, train_teacher.py)
# ---------------------------------------------------------------------------------------------------------------------


class TrainingBudget:
    """
    The clock and the progress of a run limited by steps and, optionally, by time: one clock for the learning-rate
    schedule of [`time_budget_lr_scheduler`] and for the decision to stop.

    The clock starts with [`~TrainingBudget.start`], which a training script calls right before its training loop, so
    that setup (loading, `accelerator.prepare`, resuming, encoding a latent cache) does not use up the budget. Until
    then only the step fraction counts.

    With several processes, pass the `accelerator`: every rank then calls [`~TrainingBudget.out_of_time`] at the same
    step, which takes the slowest rank's clock, and the schedule reads the time of that last call, so that all ranks
    keep one learning rate (their weights stay equal) and stop at the same step.

    Args:
        max_steps (`int`): steps of the learning-rate schedule (scheduler steps, i.e. optimiser steps times the number
            of processes when the scheduler is prepared by accelerate).
        max_time (`float`, *optional*): the time budget in seconds (`--max_train_time`); `None` or 0: no time limit.
        accelerator (`accelerate.Accelerator`, *optional*): shares the clock between processes (see above).
    """

    def __init__(self, max_steps: int, max_time: float | None, accelerator=None):
        self.max_steps, self.max_time, self.t0 = max_steps, max_time, None
        self.accelerator = accelerator if accelerator is not None and accelerator.num_processes > 1 else None
        self.shared_elapsed = 0.0  # the slowest rank's time at the last `out_of_time` (several processes)

    def start(self) -> None:
        """Starts (or restarts) the clock."""
        self.t0 = time.time()
        self.shared_elapsed = 0.0

    def elapsed(self) -> float:
        """Seconds since [`~TrainingBudget.start`] on this process (0 before it)."""
        return 0.0 if self.t0 is None else time.time() - self.t0

    def out_of_time(self) -> bool:
        """Whether the time budget is used up (never without one, never before the clock started). With an
        `accelerator`, a collective call: every rank must make it at the same step."""
        if self.t0 is None:
            return False
        elapsed = self.elapsed()
        if self.accelerator is not None:
            clock = torch.tensor(elapsed, device=self.accelerator.device, dtype=torch.float64)
            elapsed = self.shared_elapsed = float(self.accelerator.reduce(clock, "max"))
        return bool(self.max_time) and elapsed >= self.max_time

    def fraction(self, step: int) -> float:
        """Progress in [0, 1]: the larger of the step fraction and, with a time budget, the time fraction (so that a
        time-limited run still completes its learning-rate schedule)."""
        frac = step / max(1, self.max_steps)
        if self.max_time and self.t0 is not None:
            elapsed = self.shared_elapsed if self.accelerator is not None else self.elapsed()
            frac = max(frac, elapsed / self.max_time)
        return min(1.0, frac)


def time_budget_lr_scheduler(optimizer, args, num_processes: int, budget: TrainingBudget | None = None):
    """
    `--lr_scheduler` from diffusers or, with `--max_train_time`, a warmup + cosine / linear / constant schedule over
    the run's progress ([`TrainingBudget.fraction`]).

    Args:
        optimizer: the optimiser whose learning rate the scheduler sets.
        args: `max_train_time`, `max_train_steps`, `lr_warmup_steps`, `lr_scheduler`.
        num_processes (`int`): accelerate steps a prepared scheduler once per process: steps are scaled by it.
        budget ([`TrainingBudget`], *optional*): the run's clock; start it right before the training loop and stop on
            its [`~TrainingBudget.out_of_time`]. Without one, a budget is made here and its clock starts now.
    """
    if not args.max_train_time:
        from diffusers.optimization import get_scheduler

        return get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * num_processes,
            num_training_steps=args.max_train_steps * num_processes,
        )
    if budget is None:
        budget = TrainingBudget(args.max_train_steps * num_processes, args.max_train_time)
        budget.start()
    warm = args.lr_warmup_steps * num_processes

    def factor(step):
        w = min(1.0, (step + 1) / warm) if warm else 1.0
        p = budget.fraction(step)
        if args.lr_scheduler == "cosine":
            return w * 0.5 * (1 + math.cos(math.pi * p))
        if args.lr_scheduler == "linear":
            return w * (1 - p)
        return w

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def str2bool(value) -> bool:
    """
    `argparse` type of the boolean flags of the training scripts, used with `nargs="?", const=True`: `--flag` alone
    means true, `--flag false` (or `no`, `0`, `off`) turns off a flag that a YAML config switched on.
    """
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "n", "off"):
        return False
    import argparse

    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0, on/off), got {value!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def save_rotated_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """`accelerator.save_state` into `output_dir/checkpoint-{step}`, first deleting the oldest checkpoints so that at
    most `total_limit` remain (None: keep all). Returns the new checkpoint's path."""
    import os
    import shutil

    if total_limit is not None:
        ckpts = sorted((d for d in os.listdir(output_dir) if d.startswith("checkpoint-")),
                       key=lambda d: int(d.split("-")[1]))
        for d in ckpts[: max(0, len(ckpts) - total_limit + 1)]:
            shutil.rmtree(os.path.join(output_dir, d))
    path = os.path.join(output_dir, f"checkpoint-{step}")
    accelerator.save_state(path)
    return path
