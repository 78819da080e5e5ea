# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The shared training math (`diffusers_hybrid.training_utils`) against hand-computed values on tiny tensors."""

import math
import os

import pytest
import torch

from diffusers_hybrid import training_utils as tu


def video(values, frames_axis_len=None):
    """`(B, F)` nested list -> `(B, 1, F, 1, 1)` float tensor."""
    t = torch.tensor(values, dtype=torch.float32)
    return t.view(t.shape[0], 1, t.shape[1], 1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# timesteps
# ---------------------------------------------------------------------------------------------------------------------


def test_shift_and_warped_denoising_steps():
    assert tu.shift_sigma(0.75, 5.0) == pytest.approx(0.9375)
    assert tu.shift_sigma(0.5, 5.0) == pytest.approx(2.5 / 3.0)
    assert tu.shift_sigma(1.0, 5.0) == 1.0 and tu.shift_sigma(0.0, 5.0) == 0.0
    steps = tu.denoising_timesteps([1000, 750, 500, 250], shift=5.0)
    # official: [1000, 937.5, 833.33, 625] (spec §5)
    torch.testing.assert_close(steps, torch.tensor([1000.0, 937.5, 2500.0 / 3.0, 625.0], dtype=torch.float64))
    torch.testing.assert_close(tu.denoising_timesteps([1000, 750], 5.0, warp=False),
                               torch.tensor([1000.0, 750.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="decreasing"):
        tu.denoising_timesteps([500, 750], 5.0)
    with pytest.raises(ValueError, match="lie in"):
        tu.denoising_timesteps([1200], 5.0)


def test_warped_steps_match_the_official_grid_lookup():
    # official: timesteps[1000 - t] of the 1000-step shifted FlowMatch grid (sigma_min 0), grid[k] = shift(1 - k/1000)
    grid = tu.shift_sigma(1.0 - torch.arange(1000, dtype=torch.float64) / 1000, 5.0) * 1000
    steps = [1000, 800, 750, 600, 500, 250, 100]
    expected = torch.stack([grid[1000 - t] for t in steps])
    torch.testing.assert_close(tu.denoising_timesteps(steps, 5.0), expected)


def test_training_and_inference_schedules_agree():
    from diffusers_hybrid.pipelines.pipeline_streaming_hybrid import few_step_schedule

    timesteps, _ = few_step_schedule([1000, 750, 500, 250], 5.0, True)
    torch.testing.assert_close(tu.denoising_timesteps([1000, 750, 500, 250], 5.0),
                               torch.tensor(timesteps, dtype=torch.float64))


def test_sample_dmd_timesteps_by_hand():
    g = torch.Generator().manual_seed(123)
    t = tu.sample_dmd_timesteps(64, g, shift=5.0, min_timestep=20.0, max_timestep=980.0)
    g = torch.Generator().manual_seed(123)
    u = torch.randint(0, 1000, (64,), generator=g).double() / 1000
    expected = (1000 * 5 * u / (1 + 4 * u)).clamp(20, 980).float()
    torch.testing.assert_close(t, expected)
    assert t.min() >= 20 and t.max() <= 980
    # the shift pushes timesteps up: with shift 5 the median is far above 500
    big = tu.sample_dmd_timesteps(4000, torch.Generator().manual_seed(0), 5.0, 20.0, 980.0)
    assert big.median() > 750
    flat = tu.sample_dmd_timesteps(4000, torch.Generator().manual_seed(0), 1.0, 0.0, 1000.0)
    assert 450 < flat.median() < 550


def test_flow_sigmas_and_grid_merge():
    torch.testing.assert_close(tu.flow_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(tu.flow_sigmas(2, 5.0), torch.tensor([1.0, 2.5 / 3.0, 0.0], dtype=torch.float64))
    merged = tu.merge_sigma_grids(tu.flow_sigmas(2, 1.0), [0.9375, 0.5])
    torch.testing.assert_close(merged, torch.tensor([1.0, 0.9375, 0.5, 0.0], dtype=torch.float64))


def test_noise_and_x0_conversions():
    x0, eps = video([[1.0, 2.0]]), video([[3.0, -1.0]])
    xt = tu.add_noise(x0, eps, torch.tensor([0.25]))
    torch.testing.assert_close(xt, video([[1.5, 1.25]]))
    v = eps - x0
    torch.testing.assert_close(tu.flow_to_x0(xt, v, torch.tensor([0.25])), x0)
    # per-frame sigma (B, F)
    xt = tu.add_noise(x0, eps, torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(xt, video([[1.0, -1.0]]))
    # diffusers CFG form: uncond + s (cond - uncond)
    torch.testing.assert_close(tu.classifier_free_guidance(torch.tensor(2.0), torch.tensor(1.0), 4.0),
                               torch.tensor(5.0))


# ---------------------------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------------------------


def test_dmd_gradient_and_loss_by_hand():
    x = video([[1.0, 2.0], [3.0, 5.0]]).requires_grad_(True)
    real = video([[0.0, 1.0], [1.0, 1.0]])
    fake = video([[2.0, 3.0], [0.0, 3.0]])
    # per-sample normaliser mean|x - real|: sample 0 -> 1, sample 1 -> (2 + 4) / 2 = 3
    # g = (fake - real) / normaliser: sample 0 -> [2, 2], sample 1 -> [-1/3, 2/3]
    g = tu.dmd_gradient(x, real, fake)
    torch.testing.assert_close(g, video([[2.0, 2.0], [-1 / 3, 2 / 3]]).double())
    loss, _ = tu.dmd_loss(x, real, fake)
    assert loss.dtype == torch.float64
    # L = 1/2 mean g^2 = 1/2 (4 + 4 + 1/9 + 4/9) / 4
    assert loss.item() == pytest.approx(0.5 * (8 + 5 / 9) / 4)
    loss.backward()
    # dL/dx = g / N, N = 4
    torch.testing.assert_close(x.grad, video([[0.5, 0.5], [-1 / 12, 1 / 6]]))

    # frame mask: only frame 1 gets the gradient, N = 2 (the normaliser still uses every frame)
    x.grad = None
    loss, _ = tu.dmd_loss(x, real, fake, torch.tensor([False, True]))
    assert loss.item() == pytest.approx(0.5 * (4 + 4 / 9) / 2)
    loss.backward()
    torch.testing.assert_close(x.grad, video([[0.0, 1.0], [0.0, 1 / 3]]))


def test_dmd_gradient_is_zero_when_scores_agree_and_finite_when_degenerate():
    x = video([[1.0, 2.0]])
    g = tu.dmd_gradient(x, x.clone(), x.clone())  # normaliser 0 -> 0/0 -> nan_to_num -> 0
    assert torch.equal(g, torch.zeros_like(g).double())


def test_critic_flow_loss_by_hand():
    flow, noise, x0 = video([[1.0, 2.0]]), video([[0.5, 0.5]]), video([[0.0, 1.0]])
    # target eps - x0 = [0.5, -0.5]; (flow - target)^2 = [0.25, 6.25]
    assert tu.critic_flow_loss(flow, noise, x0).item() == pytest.approx(3.25)
    assert tu.critic_flow_loss(flow, noise, x0, torch.tensor([False, True])).item() == pytest.approx(6.25)


def test_regression_loss_stops_gradient_to_target():
    pred = video([[1.0, 3.0]]).requires_grad_(True)
    target = video([[0.0, 1.0]]).requires_grad_(True)
    loss = tu.regression_loss(pred, target)
    assert loss.item() == pytest.approx((1 + 4) / 2)  # no 1/2: F.mse_loss, as the official reflow term
    loss.backward()
    torch.testing.assert_close(pred.grad, video([[1.0, 2.0]]))
    assert target.grad is None


# ---------------------------------------------------------------------------------------------------------------------
# teacher ODE / reflow target
# ---------------------------------------------------------------------------------------------------------------------


class LinearTeacher:
    """v(z, t, text) = a · z with a per-row coefficient carried by the text embedding; counts calls and batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, z, t, text):
        self.batches.append(z.shape[0])
        return z * text[:, 0, 0].view(-1, 1, 1, 1, 1)


def text_of(values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


def test_reflow_target_teacher_euler_by_hand():
    teacher = LinearTeacher()
    z0 = video([[1.0, -2.0]])
    cond, uncond = text_of([1.0]), text_of([0.5])
    scale = 3.5
    sigmas = tu.flow_sigmas(2, 1.0)  # [1, 0.5, 0]
    target = tu.euler_ode_solve(lambda z, t: tu.guided_velocity(teacher, z, t, cond, uncond, scale), z0, sigmas)
    # guided coefficient k = 0.5 + 3.5 (1 - 0.5) = 2.25; each Euler step (dsigma = -0.5) multiplies by 1 - 1.125
    torch.testing.assert_close(target, z0 * (1 - 0.5 * 2.25) ** 2)
    assert teacher.batches == [2, 2]  # cond and uncond in one batch of 2B per step


def test_reflow_teacher_is_batch_safe():
    """Rows of a batch give what each row gives alone (the official `repeat(2B)` is only right for B = 1)."""
    teacher = LinearTeacher()
    z = video([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0]])
    cond, uncond = text_of([1.0, 2.0, -1.0]), text_of([0.5])  # one negative prompt for the whole batch
    sigmas = tu.flow_sigmas(3, 5.0)

    def solve(zz, cc):
        return tu.euler_ode_solve(lambda x, t: tu.guided_velocity(teacher, x, t, cc, uncond, 3.5), zz, sigmas)

    batched = solve(z, cond)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], solve(z[i : i + 1], cond[i : i + 1]))
    assert teacher.batches[:3] == [6, 6, 6]


def test_ode_solve_records_states_and_passes_timesteps():
    seen = []

    def velocity(z, t):
        seen.append(t.tolist())
        return torch.ones_like(z)

    z0 = video([[0.0, 0.0]])
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0], dtype=torch.float64)
    final, states = tu.euler_ode_solve(velocity, z0, sigmas, record_sigmas=[1.0, 0.5])
    # v = 1: z(sigma) = sigma - 1
    torch.testing.assert_close(states[:, 0], z0)
    torch.testing.assert_close(states[:, 1], z0 - 0.5)
    torch.testing.assert_close(final, z0 - 1.0)
    assert seen == [[1000.0], [750.0], [500.0]]
    with pytest.raises(ValueError, match="not on the ODE grid"):
        tu.euler_ode_solve(velocity, z0, sigmas, record_sigmas=[0.3])


# ---------------------------------------------------------------------------------------------------------------------
# rollout
# ---------------------------------------------------------------------------------------------------------------------


class FakeCache:
    def __init__(self):
        self.frames_written = 0


class FakeCausalModel(torch.nn.Module):
    """v = c · x + d · (frame offset + 1), with the streaming cache contract of HybridForcingTransformer3DModel."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(0.5))
        self.d = torch.nn.Parameter(torch.tensor(0.1))
        self.calls = []

    def forward(self, x, t, text, cache=None, frame_offset=0, cache_mode="none"):
        assert frame_offset == cache.frames_written, "chunks must be written in order"
        self.calls.append({"mode": cache_mode, "t": t.clone(), "x": x.detach().clone(), "offset": frame_offset,
                           "grad": torch.is_grad_enabled()})
        out = self.c * x + self.d * (frame_offset + 1)
        if cache_mode == "write":
            cache.frames_written += x.shape[2]

        class Out:
            sample = out

        return Out()


def noise_source(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=g)


TIMESTEPS = tu.denoising_timesteps([1000, 750, 500, 250], 5.0)
SIGMAS = [float(t) / 1000 for t in TIMESTEPS]


def run_fake(plan, seed=0, **kwargs):
    model = FakeCausalModel()
    noise = torch.randn(1, 2, plan.num_frames, 2, 2, generator=torch.Generator().manual_seed(seed))
    out = tu.self_forcing_rollout(model, FakeCache, noise, torch.zeros(1, 1, 1), TIMESTEPS, plan, 3,
                                  noise_source(seed + 1), **kwargs)
    return model, noise, out


def test_rollout_renoises_after_step_zero_and_commits_clean_context():
    plan = tu.RolloutPlan(num_frames=6, exit_steps=[2, 2], grad_start_frame=3)
    model, noise, out = run_fake(plan)
    modes = [c["mode"] for c in model.calls]
    assert modes == ["read"] * 3 + ["write"] + ["read"] * 3 + ["write"]  # no warm-up pass, e + 1 reads, one write
    assert out.passes == 8
    redraw = noise_source(1)
    # chunk 0, step 0 sees the initial noise at t = 1000
    torch.testing.assert_close(model.calls[0]["x"], noise[:, :, :3])
    assert model.calls[0]["t"].item() == pytest.approx(1000.0)
    # step 1 sees the step-0 prediction re-noised to sigma_1 (the official code feeds pure noise here when e >= 1)
    x0_step0 = noise[:, :, :3] - SIGMAS[0] * (0.5 * noise[:, :, :3] + 0.1)
    expected = (1 - SIGMAS[1]) * x0_step0 + SIGMAS[1] * redraw((1, 2, 3, 2, 2))
    torch.testing.assert_close(model.calls[1]["x"], expected)
    assert not torch.allclose(model.calls[1]["x"], noise[:, :, :3])
    assert model.calls[1]["t"].item() == pytest.approx(937.5)
    # the write pass gets the exit x0 itself at t = 0 (no sigma ~ 0.005 noise)
    torch.testing.assert_close(model.calls[3]["x"], out.video[:, :, :3].detach())
    assert model.calls[3]["t"].item() == 0.0 and not model.calls[3]["grad"]
    # gradient only through the exit step of chunks in the window (frames >= 3)
    assert [c["grad"] for c in model.calls] == [False] * 6 + [True, False]
    assert out.grad_mask.tolist() == [False] * 3 + [True] * 3
    assert out.step0 is None and not out.step0_mask.any()
    out.video[:, :, 3:].sum().backward()
    assert model.c.grad is not None and model.c.grad != 0


def test_rollout_exit_step_zero_gives_the_one_step_prediction_with_grad():
    plan = tu.RolloutPlan(num_frames=6, exit_steps=[0, 0], grad_start_frame=0)
    model, noise, out = run_fake(plan)
    assert [c["mode"] for c in model.calls] == ["read", "write", "read", "write"]
    assert out.step0_mask.all()
    assert out.step0 is not None and out.step0.requires_grad
    torch.testing.assert_close(out.step0, out.video)


def test_rollout_capture_step0_keeps_the_trajectory():
    plan = tu.RolloutPlan(num_frames=6, exit_steps=[3, 1], grad_start_frame=3)
    model, noise, out = run_fake(plan, capture_step0=True)
    grads = [c["grad"] for c in model.calls]
    # chunk 0 (outside the window): 4 reads + write, no grad; chunk 1: step 0 with grad, step 1 (exit) with grad
    assert grads == [False] * 5 + [True, True, False]
    assert out.step0_mask.tolist() == [False] * 3 + [True] * 3
    # per-chunk exit steps: chunk 0 ran 4 denoising passes, chunk 1 two
    assert [c["mode"] for c in model.calls].count("read") == 6
    # step 1 of chunk 1 starts from the *detached* step-0 output, re-noised
    chunk1_step0 = out.step0[:, :, 3:]
    redraw = noise_source(1)
    for _ in range(3):  # chunk 0 drew 3 re-noising tensors
        redraw((1, 2, 3, 2, 2))
    expected = (1 - SIGMAS[1]) * chunk1_step0.detach() + SIGMAS[1] * redraw((1, 2, 3, 2, 2))
    torch.testing.assert_close(model.calls[6]["x"], expected)


def test_rollout_context_noise_and_no_grad_mode():
    plan = tu.RolloutPlan(num_frames=3, exit_steps=[0], grad_start_frame=0)
    model, noise, out = run_fake(plan, context_timestep=100.0, enable_grad=False)
    write = model.calls[-1]
    assert write["mode"] == "write" and write["t"].item() == pytest.approx(100.0)
    expected = 0.9 * out.video + 0.1 * noise_source(1)((1, 2, 3, 2, 2))
    torch.testing.assert_close(write["x"], expected)
    assert not out.video.requires_grad and not any(c["grad"] for c in model.calls)


def test_rollout_plan_sampling():
    plans = [tu.sample_rollout_plan(torch.Generator().manual_seed(s), chunk_frames=3, min_frames=21, max_frames=54,
                                    gradient_window_frames=21, num_steps=4) for s in range(200)]
    lengths = {p.num_frames for p in plans}
    assert lengths <= set(range(21, 55, 3)) and len(lengths) > 6
    assert all(p.grad_start_frame == p.num_frames - 21 for p in plans)
    assert all(len(set(p.exit_steps)) == 1 and len(p.exit_steps) == p.num_frames // 3 for p in plans)
    assert {p.exit_steps[0] for p in plans} == {0, 1, 2, 3}
    # the same seed on every rank gives the same structure (FSDP needs equal forward counts)
    a = tu.sample_rollout_plan(torch.Generator().manual_seed(5), chunk_frames=3, min_frames=21, max_frames=54,
                               gradient_window_frames=21, num_steps=4)
    b = tu.sample_rollout_plan(torch.Generator().manual_seed(5), chunk_frames=3, min_frames=21, max_frames=54,
                               gradient_window_frames=21, num_steps=4)
    assert a == b
    per_chunk = tu.sample_rollout_plan(torch.Generator().manual_seed(1), chunk_frames=3, min_frames=54,
                                       max_frames=54, gradient_window_frames=21, num_steps=4,
                                       same_exit_step_across_chunks=False)
    assert len(set(per_chunk.exit_steps)) > 1
    last = tu.sample_rollout_plan(None, chunk_frames=3, min_frames=6, max_frames=6, gradient_window_frames=6,
                                  num_steps=4, last_step_only=True)
    assert last.exit_steps == [3, 3]
    with pytest.raises(ValueError, match="multiple"):
        tu.sample_rollout_plan(None, chunk_frames=3, min_frames=20, max_frames=21, gradient_window_frames=21,
                               num_steps=4)
    with pytest.raises(ValueError, match="gradient_window_frames"):
        tu.sample_rollout_plan(None, chunk_frames=3, min_frames=6, max_frames=9, gradient_window_frames=9,
                               num_steps=4)


def test_dmd_clip_reencodes_the_first_frame_and_masks_the_first_chunk():
    x = torch.arange(9, dtype=torch.float32).view(1, 1, 9, 1, 1).expand(2, 2, 9, 2, 2).clone()
    clip, mask = tu.dmd_clip(x, 6, 3)
    assert clip.shape[2] == 6 and mask.tolist() == [False] * 3 + [True] * 3
    torch.testing.assert_close(clip, x[:, :, 3:])
    seen = []

    def reencode(latents):
        seen.append(latents.shape[2])
        return latents[:, :, -1:] * 0 - 7.0

    clip, mask = tu.dmd_clip(x, 6, 3, reencode)
    assert seen == [4]  # frames 0..3 (= F - clip + 1) are decoded
    assert (clip[:, :, 0] == -7).all()
    torch.testing.assert_close(clip[:, :, 1:], x[:, :, 4:])
    full, no_mask = tu.dmd_clip(x[:, :, :6], 6, 3, reencode)
    assert no_mask is None and full.shape[2] == 6 and seen == [4]
    with pytest.raises(ValueError, match="shorter"):
        tu.dmd_clip(x[:, :, :3], 6, 3)


def test_chunk_step_indices():
    idx = tu.sample_chunk_step_indices(2, 9, 3, 4, torch.Generator().manual_seed(0))
    assert idx.shape == (2, 9) and idx.min() >= 0 and idx.max() < 4
    assert (idx.view(2, 3, 3) == idx.view(2, 3, 3)[:, :, :1]).all()  # constant within a chunk


# ---------------------------------------------------------------------------------------------------------------------
# EMA and LoRA
# ---------------------------------------------------------------------------------------------------------------------


def test_parameter_ema_by_hand():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = tu.ParameterEMA(model.named_parameters(), decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model.named_parameters())  # 0.9·1 + 0.1·3 = 1.2
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model.named_parameters())  # 0.9·1.2 = 1.08
    assert ema.shadow["weight"].item() == pytest.approx(1.08)
    ema.store(model.named_parameters())
    ema.copy_to(model.named_parameters())
    assert model.weight.item() == pytest.approx(1.08)
    ema.restore(model.named_parameters())
    assert model.weight.item() == 0.0
    state = ema.state_dict()
    other = tu.ParameterEMA(model.named_parameters(), decay=0.9)
    other.load_state_dict(state)
    assert other.shadow["weight"].item() == pytest.approx(1.08)
    with pytest.raises(KeyError):
        other.load_state_dict({"nope": torch.zeros(1)})


def test_merge_lora_state_dict_matches_peft_merge():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["0"], init_lora_weights=False),
                                    base)
    x = torch.randn(5, 4)
    expected = model(x)
    merged = tu.merge_lora_state_dict(model.state_dict(), 6 / 2)
    assert not any("lora" in k or "base_layer" in k for k in merged)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(x), expected)
    assert not math.isclose(float((merged["0.weight"] - model.state_dict()["0.base_layer.weight"]).abs().sum()), 0.0)


def test_time_budget_lr_scheduler_anneals_by_time(monkeypatch):
    """With --max_train_time the cosine schedule follows the larger of the step and time fractions, so a run stopped
    by its time limit still ends at a learning rate of zero."""
    import math
    import time
    from types import SimpleNamespace

    from diffusers_hybrid.training_utils import time_budget_lr_scheduler

    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    param = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([param], lr=0.5)
    args = SimpleNamespace(max_train_time=100.0, max_train_steps=10_000, lr_warmup_steps=0, lr_scheduler="cosine")
    sched = time_budget_lr_scheduler(opt, args, num_processes=1)
    assert math.isclose(opt.param_groups[0]["lr"], 0.5)
    clock[0] += 50.0  # half the time, 1 step of 10,000
    opt.step()
    sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.25, rel_tol=1e-6)
    clock[0] += 60.0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    args_steps = SimpleNamespace(max_train_time=None, max_train_steps=4, lr_warmup_steps=0, lr_scheduler="linear")
    opt2 = torch.optim.SGD([param], lr=1.0)
    sched2 = time_budget_lr_scheduler(opt2, args_steps, num_processes=1)
    opt2.step()
    sched2.step()
    assert math.isclose(opt2.param_groups[0]["lr"], 0.75)


def test_training_budget_clock_starts_with_the_training_loop(monkeypatch):
    """The time budget is one clock for the learning rate and for stopping, started by the script right before its
    training loop: setup time (loading, prepare, resume, a latent cache) neither anneals the learning rate nor counts
    against --max_train_time."""
    import math
    import time
    from types import SimpleNamespace

    from diffusers_hybrid.training_utils import TrainingBudget, time_budget_lr_scheduler

    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    param = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([param], lr=0.5)
    args = SimpleNamespace(max_train_time=100.0, max_train_steps=10_000, lr_warmup_steps=0, lr_scheduler="cosine")
    budget = TrainingBudget(args.max_train_steps, args.max_train_time)
    sched = time_budget_lr_scheduler(opt, args, num_processes=1, budget=budget)
    clock[0] += 500.0  # setup, five times the budget
    assert budget.elapsed() == 0.0 and not budget.out_of_time()
    budget.start()
    opt.step()
    sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.25 * (1 + math.cos(math.pi * 1e-4)), rel_tol=1e-9)
    clock[0] += 50.0  # half the budget
    opt.step()
    sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.25, rel_tol=1e-6) and not budget.out_of_time()
    clock[0] += 50.0
    assert budget.out_of_time() and budget.elapsed() == 100.0
    assert not TrainingBudget(10, None).out_of_time()


def test_save_rotated_checkpoint_keeps_the_newest(tmp_path):
    from diffusers_hybrid.training_utils import save_rotated_checkpoint

    class _Accelerator:
        def save_state(self, path):
            os.makedirs(path)

    acc = _Accelerator()
    for step in (5, 10, 15, 20):
        save_rotated_checkpoint(acc, str(tmp_path), step, total_limit=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-15", "checkpoint-20"]
    save_rotated_checkpoint(acc, str(tmp_path), 25, total_limit=None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-15", "checkpoint-20", "checkpoint-25"]


def _tiny_wan(patch_size, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(patch_size=patch_size, num_attention_heads=2, attention_head_dim=12, in_channels=3, out_channels=5,
               text_dim=8, freq_dim=16, ffn_dim=20, num_layers=1, rope_max_seq_len=64)
    model = WanTransformer3DModel(**{**cfg, **overrides})
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight non-trivial anyway
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_repatch_transformer_embeds_and_projects_like_the_coarse_model():
    coarse = _tiny_wan([1, 2, 2])
    fine = tu.repatch_transformer(coarse, [1, 1, 1])
    assert list(fine.config.patch_size) == [1, 1, 1] and type(fine) is type(coarse)
    # every weight other than the two patch layers is copied unchanged
    cs, fs = coarse.state_dict(), fine.state_dict()
    for key in cs:
        if not key.startswith(("patch_embedding.", "proj_out.")):
            torch.testing.assert_close(fs[key], cs[key], rtol=0, atol=0)

    # a latent constant inside each 2x2 patch (awkward 3 x 5 patch grid): each fine token embeds as its coarse patch
    small = torch.randn(2, 3, 2, 3, 5)
    latent = small.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    with torch.no_grad():
        coarse_tokens = coarse.patch_embedding(latent)  # (B, D, 2, 3, 5)
        fine_tokens = fine.patch_embedding(latent)  # (B, D, 2, 6, 10)
    expected = coarse_tokens.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    torch.testing.assert_close(fine_tokens, expected, rtol=1e-5, atol=1e-5)

    # the fine output projection is the coarse one averaged over the 4 sub-patches of each token
    hidden = torch.randn(7, coarse.proj_out.in_features)
    with torch.no_grad():
        coarse_out = coarse.proj_out(hidden).view(7, 2, 2, 5)  # rows ordered (ph, pw, C)
        fine_out = fine.proj_out(hidden)
    torch.testing.assert_close(fine_out, coarse_out.mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)

    # the converted model runs at the fine patch size
    x = torch.randn(1, 3, 2, 6, 10)
    with torch.no_grad():
        out = fine(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 4, 8),
                   return_dict=False)[0]
    assert out.shape == (1, 5, 2, 6, 10) and torch.isfinite(out).all()


def test_repatch_transformer_rejects_bad_patch_sizes():
    coarse = _tiny_wan([1, 2, 2])
    with pytest.raises(ValueError, match=r"multiple of the new one \[1, 3, 1\]"):
        tu.repatch_transformer(coarse, [1, 3, 1])
    with pytest.raises(ValueError, match="three positive integers"):
        tu.repatch_transformer(coarse, [1, 0, 1])


@pytest.mark.parametrize("num_layers", [2, 5])
def test_deepen_transformer_keeps_the_function(num_layers):
    shallow = _tiny_wan([1, 2, 2], num_layers=2)
    deep = tu.deepen_transformer(shallow, num_layers)
    assert deep.config.num_layers == num_layers and len(deep.blocks) == num_layers
    x, text = torch.randn(2, 3, 3, 6, 10), torch.randn(2, 5, 8)
    t = torch.tensor([130.0, 870.0])
    with torch.no_grad():
        a = shallow(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        b = deep(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the old blocks appear in order; each new one copies its predecessor except for zeroed output projections
    old_ids = [id_ for id_ in range(num_layers) if deep.blocks[id_].attn1.to_out[0].weight.abs().sum() > 0]
    assert len(old_ids) == 2
    for new, block in enumerate(deep.blocks):
        zeroed = block.ffn.net[2].weight.abs().sum() == 0
        assert zeroed == (new not in old_ids)
        if zeroed:
            assert block.attn2.to_out[0].bias.abs().sum() == 0
            torch.testing.assert_close(block.attn1.to_q.weight, deep.blocks[new - 1].attn1.to_q.weight)
    # the new blocks learn: their output projections receive gradients
    deep.train()
    out = deep(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    out.square().mean().backward()
    if num_layers > 2:
        assert deep.blocks[1].ffn.net[2].weight.grad.abs().sum() > 0


def test_deepen_transformer_rejects_fewer_layers():
    with pytest.raises(ValueError, match=r"`num_layers` \(1\) must be at least the current number of blocks \(2\)"):
        tu.deepen_transformer(_tiny_wan([1, 2, 2], num_layers=2), 1)


def test_repatch_transformer_on_the_hybrid_model():
    from diffusers_hybrid import HybridForcingTransformer3DModel

    torch.manual_seed(1)
    coarse = HybridForcingTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=3, out_channels=5,
        text_dim=8, freq_dim=16, ffn_dim=20, num_layers=1, rope_max_seq_len=64, attention_mode="window",
        num_frame_per_block=1, sink_frames=1, local_attn_frames=2, dense_max_frames=3, sparse_block_size=7,
    ).eval()
    fine = tu.repatch_transformer(coarse, [1, 1, 1]).eval()
    assert type(fine) is HybridForcingTransformer3DModel and fine.config.attention_mode == "window"
    latent = torch.randn(1, 3, 2, 3, 5).repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    with torch.no_grad():
        expected = coarse.patch_embedding(latent).repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        torch.testing.assert_close(fine.patch_embedding(latent), expected, rtol=1e-5, atol=1e-5)
        out = fine(hidden_states=latent, timestep=torch.tensor([300.0]), encoder_hidden_states=torch.randn(1, 4, 8),
                   return_dict=False)[0]
    assert out.shape == (1, 5, 2, 6, 10) and torch.isfinite(out).all()


def test_training_budget_shares_the_slowest_clock_between_ranks(monkeypatch):
    """With several processes the time-based learning rate must be the same on every rank (else their weights drift
    apart under DDP) and all ranks must stop at the same step: both follow the slowest rank's clock, taken at the
    collective `out_of_time` call."""
    import time
    from types import SimpleNamespace

    from diffusers_hybrid.training_utils import TrainingBudget

    clock = [0.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    other_rank = [0.0]  # the other process's elapsed time, as the all-reduce would return it
    accelerator = SimpleNamespace(
        num_processes=2, device=torch.device("cpu"),
        reduce=lambda tensor, reduction: torch.maximum(tensor, torch.tensor(other_rank[0], dtype=tensor.dtype)),
    )
    budget = TrainingBudget(1000, 100.0, accelerator)
    budget.start()
    clock[0], other_rank[0] = 30.0, 60.0
    assert budget.fraction(0) == 0.0  # the schedule reads the shared time of the last collective call only
    assert not budget.out_of_time() and budget.fraction(0) == 0.6
    clock[0], other_rank[0] = 70.0, 101.0
    assert budget.out_of_time() and budget.fraction(0) == 1.0  # this rank stops although its own clock says 70 s
    single = TrainingBudget(1000, 100.0, SimpleNamespace(num_processes=1))  # one process: its own live clock
    single.start()
    clock[0] += 50.0
    assert single.fraction(0) == 0.5 and not single.out_of_time()
