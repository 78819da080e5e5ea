# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""End-to-end runs of `training/train_hybrid_forcing.py` in subprocesses (tiny models, CPU, offline): the three stages
through `accelerate launch`, resume after a save that was killed, and a 2-process gloo run."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

STEP_KEYS = {"ode_init": ["ode_loss"], "stage1": ["dmd_loss", "critic_loss"], "stage2": ["dmd_loss", "critic_loss"]}


@pytest.fixture(scope="module")
def chain(tiny_models, tmp_path_factory, helpers):
    """`bash training/run_tiny.sh ROOT`: ODE init -> stage 1 -> stage 2, 2 optimiser steps each, each through
    `accelerate launch` with training/configs/tiny/<stage>.yaml, then a generation with ROOT/final."""
    root = str(tmp_path_factory.mktemp("chain"))
    env = helpers.subprocess_env(tiny_models, root, os.path.join(root, "hf_home"))
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", os.path.join(helpers.TRAINING, "run_tiny.sh"), root], env=env, capture_output=True,
                          text=True, timeout=600, cwd=helpers.ROOT)
    assert proc.returncode == 0, f"run_tiny.sh failed\n{proc.stdout[-5000:]}\n{proc.stderr[-12000:]}"
    assert "final pipeline: HybridForcingTransformer3DModel (hybrid), video (33, 32, 32, 3)" in proc.stdout
    return root, env


def _check_checkpoint(path, stage, tiny_models):
    from diffusers import WanTransformer3DModel

    from diffusers_hybrid.models.transformer_hybrid_forcing import HybridForcingTransformer3DModel

    with open(os.path.join(path, "training_state.json")) as f:
        state = json.load(f)
    assert state["global_step"] == 2 and state["stage"] == stage and state["ema"] is True
    generator = HybridForcingTransformer3DModel.from_pretrained(os.path.join(path, "generator"))
    ema = HybridForcingTransformer3DModel.from_pretrained(os.path.join(path, "generator_ema"))
    assert generator.config.attention_mode == ("hybrid" if stage == "stage2" else "dense")
    drop = lambda c: {k: v for k, v in c.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(ema.config) == drop(generator.config)
    # accelerate's own files (resume): generator (and critic) weights as safetensors, keys of the diffusers models
    acc_generator = load_file(os.path.join(path, "model.safetensors"))
    assert set(acc_generator) == set(generator.state_dict())
    torch.testing.assert_close(acc_generator["proj_out.weight"], generator.proj_out.weight.detach())
    if stage != "ode_init":
        critic = load_file(os.path.join(path, "model_1.safetensors"))
        wan = WanTransformer3DModel.from_pretrained(os.path.join(tiny_models, "wan_base"), subfolder="transformer")
        assert set(critic) == set(wan.state_dict())
    assert os.path.exists(os.path.join(path, "ema", "ema_rank0.safetensors"))
    assert os.path.exists(os.path.join(path, "rng", "rng_rank0.safetensors"))
    return generator


def test_each_stage_runs_two_steps_and_writes_loadable_checkpoints(chain, tiny_models, helpers):
    root, _ = chain
    import datasets

    for stage in ("ode_init", "stage1", "stage2"):
        out = os.path.join(root, stage)
        log = helpers.read_log(out)
        assert [entry["step"] for entry in log] == [1, 2]
        for key in STEP_KEYS[stage]:
            values = [entry[key] for entry in log if key in entry]
            assert values and all(math.isfinite(v) for v in values), (stage, key, log)
        generator = _check_checkpoint(os.path.join(out, "checkpoint-2"), stage, tiny_models)
        linear_proj = sum(float(b.attn1.linear_proj.weight.detach().abs().sum()) for b in generator.blocks)
        if stage == "stage2":
            assert "reflow_loss" in log[0]
            assert linear_proj > 0  # trained from zero (stage 2 is the only stage where the memory exists)
        else:
            assert linear_proj == 0  # frozen in the dense stages
    pairs = datasets.load_from_disk(os.path.join(root, "ode_pairs", "shard-00000"))
    assert len(pairs) == 4 and list(pairs[0]["shape"]) == [5, 4, 6, 4, 4]  # 4 student steps + the ODE endpoint


def test_final_pipeline_loads_and_generates(chain):
    from diffusers_hybrid import HybridForcingTransformer3DModel, StreamingHybridPipeline

    root, _ = chain
    final = os.path.join(root, "final")
    pipe = StreamingHybridPipeline.from_pretrained(final)
    assert isinstance(pipe.transformer, HybridForcingTransformer3DModel)
    assert pipe.transformer.config.attention_mode == "hybrid" and pipe.transformer.config.local_attn_frames == 3
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a red circle moves left", height=32, width=32, num_frames=33, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (1, 33, 32, 32, 3) and frames.min() >= 0 and frames.max() <= 1
    with open(os.path.join(final, "README.md")) as f:
        card = f.read()
    assert "## Training" in card and "stage2" in card and "hybrid-forcing" in card
    # the final transformer is the EMA of the last checkpoint's generator
    ema = load_file(os.path.join(root, "stage2", "checkpoint-2", "generator_ema", "diffusion_pytorch_model.safetensors"))
    torch.testing.assert_close(pipe.transformer.proj_out.weight.detach(), ema["proj_out.weight"])
    assert os.path.exists(os.path.join(root, "stage2", "validation", "final", "00.mp4"))


def test_resume_reproduces_an_uninterrupted_run(chain, tmp_path, helpers):
    """Run A: 4 steps, killed while writing checkpoint-4 (after its files, before the commit). Run B resumes from
    `latest` (checkpoint-2: the interrupted save is discarded) and must reproduce A's steps 3 and 4 exactly, and write
    the same checkpoint-4 (generator, EMA) that A had written."""
    root, env = chain
    env = dict(env, OUTPUT_DIR=str(tmp_path))
    shutil.copytree(os.path.join(root, "stage1"), str(tmp_path / "stage1"))
    args = ["--config", os.path.join(helpers.TINY_CONFIGS, "stage2.yaml"), "--max_train_steps", "4", "--checkpointing_steps",
            "2", "--validation_prompts", "--final_output_dir", str(tmp_path / "final")]
    proc = helpers.run_training(args + ["--debug_fail_during_save_step", "4"], env, expect_ok=False)
    assert "simulated failure while saving checkpoint-4" in proc.stderr
    out = tmp_path / "stage2"
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4.tmp", "logs"]
    interrupted = helpers.read_log(str(out))
    assert [e["step"] for e in interrupted] == [1, 2, 3, 4]
    shutil.copytree(out / "checkpoint-4.tmp", tmp_path / "uninterrupted-4")

    helpers.run_training(args + ["--resume_from_checkpoint", "latest", "--max_shard_size", "20KB"], env)
    log = helpers.read_log(str(out))
    resumed = log[4:]
    assert [e["step"] for e in resumed] == [3, 4]
    assert resumed == interrupted[2:]  # every logged number: losses, grad norms, rollout lengths, exit steps
    assert any("generator_loss" in e for e in resumed) and all("critic_loss" in e for e in resumed)
    assert not (out / "checkpoint-4.tmp").exists() and (out / "checkpoint-4").is_dir()
    for sub in ("generator", "generator_ema"):
        a = load_file(str(tmp_path / "uninterrupted-4" / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(out / "checkpoint-4" / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    a = load_file(str(tmp_path / "uninterrupted-4" / "model_1.safetensors"))  # the critic
    b = load_file(str(out / "checkpoint-4" / "model_1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --max_shard_size: the final transformer in several files; it is the EMA of the last checkpoint (which, after two
    # generator updates, differs from the raw generator: the chain's 2-step runs cannot tell them apart)
    from diffusers_hybrid import HybridForcingTransformer3DModel

    final = tmp_path / "final" / "transformer"
    shards = sorted(f for f in os.listdir(final) if f.endswith(".safetensors"))
    assert len(shards) > 1 and (final / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = HybridForcingTransformer3DModel.from_pretrained(str(final))
    ema = load_file(str(out / "checkpoint-4" / "generator_ema" / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(out / "checkpoint-4" / "generator" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(ema["proj_out.weight"], raw["proj_out.weight"])
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, ema[k].to(v.dtype), rtol=0, atol=0)


def test_two_process_gloo_run_with_lora(chain, tmp_path, helpers):
    """2 CPU processes (torchrun + gloo), stage 2 with LoRA on generator and critic: ranks draw different noise, run
    the same rollout structure, and keep identical weights (gradients are averaged); the final pipeline has the LoRA
    merged."""
    from diffusers_hybrid import StreamingHybridPipeline

    root, env = chain
    env = dict(env, OUTPUT_DIR=str(tmp_path), ACCELERATE_USE_CPU="1")
    shutil.copytree(os.path.join(root, "stage1"), str(tmp_path / "stage1"))
    helpers.run_training(["--config", os.path.join(helpers.TINY_CONFIGS, "stage2.yaml"), "--validation_prompts",
                          "--final_output_dir", str(tmp_path / "final"), "--generator_lora_rank", "2",
                          "--critic_lora_rank", "2"], env, launcher="accelerate", accelerate_config="cpu_2proc.yaml")
    ranks = []
    for r in range(2):
        with open(tmp_path / "stage2" / "logs" / f"rank{r}.json") as f:
            ranks.append(json.load(f))
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["first_noise_sum"] != ranks[1]["first_noise_sum"]
    # step 1: generator rollout + critic rollout, step 2: critic rollout
    assert ranks[0]["rollout_plans"] == ranks[1]["rollout_plans"] and len(ranks[0]["rollout_plans"]) == 3
    assert ranks[0]["generator_checksum"] == pytest.approx(ranks[1]["generator_checksum"], rel=1e-6, abs=1e-6)
    ckpt = tmp_path / "stage2" / "checkpoint-2"
    assert (ckpt / "rng" / "rng_rank0.safetensors").exists() and (ckpt / "rng" / "rng_rank1.safetensors").exists()
    assert [e["step"] for e in helpers.read_log(str(tmp_path / "stage2"))] == [1, 2]
    final = load_file(str(tmp_path / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in final)
    stage1 = load_file(os.path.join(root, "stage1", "checkpoint-2", "generator_ema",
                                    "diffusion_pytorch_model.safetensors"))
    assert set(final) == set(stage1)
    # LoRA targets moved (merged), untargeted weights (the patch embedding) did not, linear_proj trained from zero
    assert not torch.equal(final["blocks.0.attn1.to_q.weight"], stage1["blocks.0.attn1.to_q.weight"])
    assert torch.equal(final["patch_embedding.weight"], stage1["patch_embedding.weight"])
    assert final["blocks.0.attn1.linear_proj.weight"].abs().sum() > 0
    pipe = StreamingHybridPipeline.from_pretrained(str(tmp_path / "final"))
    assert pipe.transformer.config.attention_mode == "hybrid"


def test_max_train_time_and_batched_ode_pairs(chain, helpers, tmp_path):
    """`--max_train_time` stops a run after the step that crosses it and still writes the checkpoint and the final
    pipeline (also with `--checkpointing_steps 0`); `--ode_generation_batch_size` solves several ODE pairs at once and yields the same pairs (up to
    floating-point rounding) as one at a time (the chain made its 4 pairs with the default batch of 8)."""
    import datasets
    import numpy as np

    root, env = chain
    config = os.path.join(helpers.TRAINING, "configs", "tiny", "ode_init.yaml")
    out = str(tmp_path / "ode_timeboxed")
    helpers.run_training(["--config", config, "--output_dir", out, "--ode_pairs_dir", str(tmp_path / "pairs_b1"),
                          "--ode_generation_batch_size", "1", "--max_train_steps", "50", "--max_train_time", "0",
                          "--checkpointing_steps", "0"], env)  # 0: no periodic checkpoints, the last one still
    assert [entry["step"] for entry in helpers.read_log(out)] == [1]
    assert os.path.isdir(os.path.join(out, "checkpoint-1")) and os.path.isdir(os.path.join(out, "final"))
    one_at_a_time = datasets.load_from_disk(str(tmp_path / "pairs_b1" / "shard-00000"))
    batched = datasets.load_from_disk(os.path.join(root, "ode_pairs", "shard-00000"))
    assert one_at_a_time["prompt"] == batched["prompt"]
    a, b = np.stack(one_at_a_time["latents"]), np.stack(batched["latents"])
    assert a.std() > 0.1 and np.abs(a - b).max() < 1e-4 * np.abs(b).max()
