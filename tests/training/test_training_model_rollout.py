# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The rollout with the real (tiny) HybridForcingTransformer3DModel: train/inference consistency, gradients through
the cache with gradient checkpointing, and stage 2 at its first step (hybrid student == stage-1 student)."""

import os
import types

import pytest
import torch

from diffusers_hybrid import training_utils as tu
from diffusers_hybrid.models.transformer_hybrid_forcing import HybridForcingTransformer3DModel

TIMESTEPS = tu.denoising_timesteps([1000, 750, 500, 250], 5.0)
LATENT = 4  # 32x32 pixels / 8


def wan_base(tiny_models):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(os.path.join(tiny_models, "wan_base"), subfolder="transformer")


def rollout(model, noise, text, plan, seed, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return tu.self_forcing_rollout(
        model, lambda: model.init_cache(noise.shape[0], LATENT, LATENT), noise, text, TIMESTEPS, plan,
        model.config.num_frame_per_block, lambda shape: torch.randn(shape, generator=g), **kwargs,
    )


def test_rollout_equals_the_inference_pipeline(tiny_models):
    """With the last step as exit step everywhere, the training rollout is exactly what StreamingHybridPipeline
    generates from the same noise (same re-noising draws): training sees the inference trajectory (no skipped step, no
    context-pass noise)."""
    from diffusers_hybrid.pipelines.pipeline_streaming_hybrid import StreamingHybridPipeline

    pipe = StreamingHybridPipeline.from_pretrained(os.path.join(tiny_models, "wan_base"),
                                                   transformer=HybridForcingTransformer3DModel.from_wan(
                                                       wan_base(tiny_models), attention_mode="hybrid", sink_frames=3,
                                                       local_attn_frames=3, sparse_block_size=4,
                                                       sparse_topk_ratio=0.5, max_rope_frames=6))
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for block in pipe.transformer.blocks:  # memory switched on, so that absorption matters
            block.attn1.linear_proj.weight.normal_(std=0.3)
    noise = torch.randn(1, 4, 9, LATENT, LATENT, generator=torch.Generator().manual_seed(1))
    text = pipe.encode_prompt("a red circle moves left", max_sequence_length=16)
    latents = pipe(prompt_embeds=text, height=32, width=32, num_frames=33, latents=noise,
                   generator=torch.Generator().manual_seed(2), output_type="latent").frames
    plan = tu.RolloutPlan(num_frames=9, exit_steps=[3, 3, 3], grad_start_frame=3)
    with torch.no_grad():
        out = rollout(pipe.transformer, noise, text, plan, seed=2, enable_grad=False)
    torch.testing.assert_close(out.video, latents.float())
    # the comparison is sensitive: a different re-noising stream changes the result
    with torch.no_grad():
        other = rollout(pipe.transformer, noise, text, plan, seed=3, enable_grad=False)
    assert (other.video - latents).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_rollout_gradients_with_checkpointing(tiny_models, mode):
    """Gradients flow through the exit steps of the window chunks only (earlier chunks are context), and gradient
    checkpointing gives the same gradients as plain autograd."""
    if mode == "dense":
        kwargs = dict(attention_mode="dense", rope_mode="absolute", dense_max_frames=9)
    else:
        kwargs = dict(attention_mode="hybrid", sink_frames=3, local_attn_frames=3, sparse_block_size=4,
                      sparse_topk_ratio=0.5, max_rope_frames=6)
    base = wan_base(tiny_models)
    grads = []
    for checkpointing in (False, True):
        model = HybridForcingTransformer3DModel.from_wan(base, **kwargs)
        torch.manual_seed(0)
        with torch.no_grad():
            for block in model.blocks:
                block.attn1.linear_proj.weight.normal_(std=0.3)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        noise = torch.randn(1, 4, 9, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
        text = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
        plan = tu.RolloutPlan(num_frames=9, exit_steps=[1, 1, 1], grad_start_frame=3)
        out = rollout(model, noise, text, plan, seed=5)
        params = [p for p in model.parameters() if p.requires_grad]
        outside = torch.autograd.grad(out.video[:, :, :3].sum(), params, allow_unused=True, retain_graph=True)
        assert all(g is None or g.abs().sum() == 0 for g in outside)  # chunk 0 is outside the gradient window
        (out.video[:, :, 3:] ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
    lp = [n for n in grads[0] if "linear_proj" in n]
    if mode == "hybrid":
        # the memory read-out receives gradient once frames were absorbed (chunk 2 reads frames 3..5)
        assert lp and all(grads[0][n].abs().sum() > 0 for n in lp)
    else:
        assert all(grads[0][n].abs().sum() == 0 for n in lp)


# ---------------------------------------------------------------------------------------------------------------------
# stage 2 at its first step
# ---------------------------------------------------------------------------------------------------------------------


def _stage1_checkpoint(tiny_models, root):
    """A stage-1 style checkpoint folder (generator/ and generator_ema/) whose linear_proj is *not* zero, as in a
    checkpoint whose zero-init was overwritten (spec §9.1)."""
    model = HybridForcingTransformer3DModel.from_wan(wan_base(tiny_models), attention_mode="dense",
                                                     rope_mode="absolute", dense_max_frames=12)
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.linear_proj.weight.normal_(std=0.5)
            block.attn1.linear_proj.bias.normal_(std=0.5)
    model.save_pretrained(os.path.join(root, "generator_ema"))
    raw = HybridForcingTransformer3DModel.from_config(model.config)
    raw.load_state_dict(model.state_dict())
    with torch.no_grad():
        raw.proj_out.weight.add_(1.0)  # the non-EMA weights differ
    raw.save_pretrained(os.path.join(root, "generator"))
    return model, raw


def _stage2_args(tiny_models, stage1, student_config, **extra):
    return types.SimpleNamespace(
        stage="stage2", stage1_checkpoint=stage1, init_checkpoint=None, load_ema=True, reset_linear_proj=True,
        pretrained_model_name_or_path=os.path.join(tiny_models, "wan_base"), student_config=student_config, **extra,
    )


def test_stage2_first_step_equals_stage1(tiny_models, tmp_path, train_script):
    """Stage 2 loads the stage-1 student (EMA preferred), zeroes linear_proj, and with a window and top-k ratio that
    cover the rollout produces exactly the stage-1 student's rollout."""
    stage1_ema, stage1_raw = _stage1_checkpoint(tiny_models, str(tmp_path))
    covering = dict(attention_mode="hybrid", rope_mode="relative", max_rope_frames=9, sink_frames=3,
                    local_attn_frames=6, sparse_topk_ratio=1.0, sparse_block_size=4)
    args = _stage2_args(tiny_models, str(tmp_path), covering)
    source = train_script.resolve_transformer_source(args.stage1_checkpoint, True, "stage-1 checkpoint")
    assert source == ("folder", os.path.join(str(tmp_path), "generator_ema"))
    pre = types.SimpleNamespace(student_config=covering, student_source=source)
    student = train_script.load_student(args, pre)
    assert student.config.attention_mode == "hybrid" and student.config.local_attn_frames == 6
    for block in student.blocks:
        assert block.attn1.linear_proj.weight.abs().sum() == 0 and block.attn1.linear_proj.bias.abs().sum() == 0
    torch.testing.assert_close(student.proj_out.weight, stage1_ema.proj_out.weight)  # EMA weights, not raw

    noise = torch.randn(1, 4, 9, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    plan = tu.RolloutPlan(num_frames=9, exit_steps=[2, 2, 2], grad_start_frame=3)
    with torch.no_grad():
        dense = rollout(stage1_ema, noise, text, plan, seed=3, enable_grad=False).video
        hybrid = rollout(student, noise, text, plan, seed=3, enable_grad=False).video
    torch.testing.assert_close(hybrid, dense, rtol=1e-5, atol=1e-5)

    # sensitivity: a window that does not cover the rollout (3 sink + 3 local frames) changes the output
    small = dict(covering, local_attn_frames=3, max_rope_frames=6)
    pre_small = types.SimpleNamespace(student_config=small, student_source=source)
    windowed = train_script.load_student(_stage2_args(tiny_models, str(tmp_path), small), pre_small)
    with torch.no_grad():
        out = rollout(windowed, noise, text, plan, seed=3, enable_grad=False).video
    assert (out - dense).abs().max() > 1e-3


def test_stage2_memory_is_switched_off_until_linear_proj_trains(tiny_models, tmp_path, train_script):
    """With a window shorter than the rollout, frames are absorbed into the memory; with linear_proj at zero the hybrid
    student equals the same student without memory ("window" mode), and the loaded non-zero linear_proj (kept with
    --reset_linear_proj false) would change it."""
    _stage1_checkpoint(tiny_models, str(tmp_path))
    config = dict(attention_mode="hybrid", rope_mode="relative", max_rope_frames=6, sink_frames=3,
                  local_attn_frames=3, sparse_topk_ratio=1.0, sparse_block_size=4)
    source = ("folder", os.path.join(str(tmp_path), "generator_ema"))
    models = {}
    for name, cfg, reset in (("hybrid", config, True), ("window", dict(config, attention_mode="window"), True),
                             ("hybrid_kept", config, False)):
        args = _stage2_args(tiny_models, str(tmp_path), cfg)
        args.reset_linear_proj = reset
        models[name] = train_script.load_student(args, types.SimpleNamespace(student_config=cfg,
                                                                              student_source=source))
    noise = torch.randn(1, 4, 12, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    plan = tu.RolloutPlan(num_frames=12, exit_steps=[1, 1, 1, 1], grad_start_frame=6)
    outs = {}
    with torch.no_grad():
        for name, model in models.items():
            outs[name] = rollout(model, noise, text, plan, seed=3, enable_grad=False).video
    torch.testing.assert_close(outs["hybrid"], outs["window"], rtol=1e-5, atol=1e-5)
    assert (outs["hybrid_kept"] - outs["window"]).abs().max() > 1e-3


def test_stage2_loads_an_original_format_stage1_file(tiny_models, tmp_path, train_script):
    """`--stage1_checkpoint stage1.pt` in the Self-Forcing / official layout ({"generator", "generator_ema"}, original
    key names under `model.`, no linear_proj): the EMA weights are taken (--load_ema), the architecture comes from the
    Wan base config, and the memory read-out starts at zero."""
    from diffusers_hybrid.models.transformer_hybrid_forcing import _ORIGINAL_KEY_RENAMES

    def to_original(key):
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            if rest.startswith("norm2."):
                rest = "norm3." + rest[len("norm2."):]
            elif rest.startswith("norm3."):
                rest = "norm2." + rest[len("norm3."):]
            for old, new in _ORIGINAL_KEY_RENAMES:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
                    break
            return f"model.blocks.{index}.{rest}"
        for old, new in _ORIGINAL_KEY_RENAMES:
            if key.startswith(new + "."):
                return "model." + old + key[len(new):]
        return "model." + key

    wan = wan_base(tiny_models)
    ema = {to_original(k): v.clone() for k, v in wan.state_dict().items()}
    raw = {k: v + 1.0 if k.endswith("head.head.weight") else v.clone() for k, v in ema.items()}
    path = tmp_path / "stage1.pt"
    torch.save({"generator": raw, "generator_ema": ema}, str(path))

    config = dict(attention_mode="hybrid", sink_frames=3, local_attn_frames=3, sparse_block_size=4, max_rope_frames=6)
    args = _stage2_args(tiny_models, str(path), config)
    source = train_script.resolve_transformer_source(str(path), True, "stage-1 checkpoint")
    assert source == ("file", str(path))
    base_config = {k: v for k, v in wan.config.items() if not k.startswith("_")}
    student = train_script.load_student(
        args, types.SimpleNamespace(student_config=config, student_source=source, base_config=base_config))
    torch.testing.assert_close(student.proj_out.weight, wan.proj_out.weight)  # generator_ema, not generator
    assert all(b.attn1.linear_proj.weight.abs().sum() == 0 for b in student.blocks)
    assert student.config.attention_mode == "hybrid" and student.config.num_layers == wan.config.num_layers
