# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The shapes training scripts run through `accelerate launch` on tiny configurations (CPU)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def accelerate_config(tmp_path_factory):
    from accelerate.utils import write_basic_config

    path = str(tmp_path_factory.mktemp("accelerate") / "default_config.yaml")
    write_basic_config(mixed_precision="no", save_location=path)
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """vae/ (tiny AutoencoderKLWan), tokenizer/ and text_encoder/ (tiny UMT5): what train_teacher.py starts from."""
    from diffusers import AutoencoderKLWan

    from diffusers_hybrid.shapes.text import TINY_UMT5_CONFIG, save_text_components

    base = tmp_path_factory.mktemp("base")
    save_text_components(str(base), TINY_UMT5_CONFIG)
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).save_pretrained(str(base / "vae"))
    return str(base)


def _launch(repo_root, accelerate_config, script, args):
    env = dict(os.environ, PYTHONPATH=os.path.join(repo_root, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        accelerate_config,
        os.path.join(repo_root, "training", script),
    ] + args
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo_root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _stored_dtypes(folder: str) -> dict[str, str]:
    """{tensor name: safetensors dtype} over every safetensors file of a model folder."""
    from safetensors import safe_open

    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


def test_train_teacher_two_steps_checkpoints_and_resume(repo_root, accelerate_config, tiny_base, tmp_path):
    from diffusers import WanPipeline

    out = str(tmp_path / "teacher")
    cfg = os.path.join(repo_root, "training", "configs", "tiny", "teacher.yaml")
    _launch(
        repo_root,
        accelerate_config,
        "train_teacher.py",
        [
            "--config",
            cfg,
            "--pretrained_model_name_or_path",
            tiny_base,
            "--output_dir",
            out,
            "--num_validation_videos",
            "0",
            "--motion_weight",
            "2",
            "--frame_noise_fraction",
            "1",
            "--start_away_fraction",
            "1",
            "--counterfactual_pairs",
        ],
    )
    # checkpoint rotation (limit 1: only the last), EMA of both trained models, final pipeline, card, validation
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    assert {"transformer", "transformer_ema", "text_encoder", "text_encoder_ema"} <= set(
        os.listdir(os.path.join(out, "checkpoint-2"))
    )
    for sub in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert os.path.isdir(os.path.join(out, sub)), sub
    assert os.path.isfile(os.path.join(out, "README.md"))
    m = json.load(open(os.path.join(out, "measurements.json")))
    assert m["steps"] == 2 and m["validation"] == []
    # stored in bf16 except the modules Wan / UMT5 keep in float32 (a plain `.to(bf16)` used to round those too)
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    for sub, cls in (("transformer", WanTransformer3DModel), ("text_encoder", UMT5EncoderModel)):
        dtypes = _stored_dtypes(os.path.join(out, sub))
        kept = {k: v for k, v in dtypes.items() if set(k.split(".")) & set(cls._keep_in_fp32_modules)}
        assert kept and set(kept.values()) == {"F32"}, (sub, kept)
        assert {v for k, v in dtypes.items() if k not in kept} == {"BF16"}, sub
    assert json.load(open(os.path.join(out, "model_index.json")))["tokenizer"] == [
        "transformers",
        "PreTrainedTokenizerFast",
    ]
    # resume from the last checkpoint and go on to step 3
    _launch(
        repo_root,
        accelerate_config,
        "train_teacher.py",
        [
            "--config",
            cfg,
            "--pretrained_model_name_or_path",
            tiny_base,
            "--output_dir",
            out,
            "--max_train_steps",
            "3",
            "--resume_from_checkpoint",
            "latest",
        ],
    )
    m = json.load(open(os.path.join(out, "measurements.json")))
    assert m["steps"] == 3 and len(m["validation"]) == 1 and 0 <= m["validation"][0]["scores"]["overall"] <= 1
    assert os.listdir(os.path.join(out, "validation", "final"))  # the validation video and its scores
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-3"]
    # the stock WanPipeline loads the result and samples it
    pipe = WanPipeline.from_pretrained(out, torch_dtype=torch.float32)
    frames = pipe(
        "a small red star bouncing slowly upward on a black background",
        height=128,
        width=128,
        num_frames=5,
        num_inference_steps=2,
        output_type="np",
        max_sequence_length=32,
    ).frames
    assert frames.shape == (1, 5, 128, 128, 3) and np.isfinite(frames).all()


def test_train_shapes_vae_two_steps(repo_root, accelerate_config, tmp_path):
    from diffusers import AutoencoderKLWan

    out = str(tmp_path / "vae")
    _launch(
        repo_root,
        accelerate_config,
        "train_shapes_vae.py",
        [
            "--output_dir",
            out,
            "--base_dim",
            "4",
            "--dim_mult",
            "1,2,2,2",
            "--train_batch_size",
            "1",
            "--crop_size",
            "64",
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "2",
            "--validation_steps",
            "0",
            "--num_frames",
            "1",
            "--num_validation_videos",
            "1",
            "--num_stats_videos",
            "1",
            "--num_eval_videos",
            "1",
            "--eval_frames",
            "5",
            "--posterior_noise",
            "0",
            "--foreground_weight",
            "10",
        ],
    )
    m = json.load(open(os.path.join(out, "measurements.json")))
    assert m["steps"] == 2 and np.isfinite(m["psnr_heldout"]) and len(m["latents_std"]) == 16
    assert 0 < m["object_color_error_heldout"] < 255 and 0 < m["object_color_error_heldout_saved"] < 255
    vae = AutoencoderKLWan.from_pretrained(os.path.join(out, "vae"))
    assert vae.config.latents_std == m["latents_std"] and vae.config.temperal_downsample == [False, True, True]
    assert os.path.isdir(os.path.join(out, "checkpoint-2", "vae")) and os.path.isfile(
        os.path.join(out, "vae", "README.md")
    )


def test_vae_reconstruction_loss_weights_the_objects(repo_root):
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_shapes_vae", os.path.join(repo_root, "training", "train_shapes_vae.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 5, 16, 16, generator=g) * 2 - 1) * 0.8  # away from the clamp at +-1
    coverage = (torch.rand(2, 1, 5, 16, 16, generator=g) > 0.9).float()
    recon = x + 0.1 * torch.randn(x.shape, generator=g)
    plain = argparse.Namespace(l1_weight=1.0, mse_weight=0.5, foreground_weight=0.0)
    expected = torch.nn.functional.l1_loss(recon, x) + 0.5 * torch.nn.functional.mse_loss(recon, x)
    torch.testing.assert_close(script.reconstruction_loss(recon, x, coverage, plain), expected)
    # the same error is costlier on an object than on the background, and a uniform error costs the same
    weighted = argparse.Namespace(l1_weight=1.0, mse_weight=0.5, foreground_weight=20.0)
    on_objects = x + 0.3 * coverage
    on_background = x + 0.3 * (1 - coverage) * (coverage.mean() / (1 - coverage).mean())
    assert script.reconstruction_loss(on_objects, x, coverage, weighted) > 5 * script.reconstruction_loss(
        on_background, x, coverage, weighted
    )
    torch.testing.assert_close(
        script.reconstruction_loss(x + 0.2, x, coverage, weighted), script.reconstruction_loss(x + 0.2, x, coverage, plain)
    )
    err = script.object_color_error(x + 0.1 * coverage, x, coverage)
    assert abs(err - 0.1 * 127.5) < 1e-3


def test_train_teacher_warm_start_finer_and_deeper(repo_root, accelerate_config, tiny_base, tmp_path):
    from diffusers import WanTransformer3DModel

    cfg = os.path.join(repo_root, "training", "configs", "tiny", "teacher.yaml")
    first, second = str(tmp_path / "coarse"), str(tmp_path / "fine")
    common = ["--config", cfg, "--num_validation_videos", "0", "--max_train_steps", "1"]
    _launch(repo_root, accelerate_config, "train_teacher.py",
            common + ["--pretrained_model_name_or_path", tiny_base, "--output_dir", first])
    coarse = WanTransformer3DModel.from_pretrained(os.path.join(first, "transformer"))
    assert list(coarse.config.patch_size) == [1, 2, 2]
    _launch(repo_root, accelerate_config, "train_teacher.py",
            common + ["--pretrained_model_name_or_path", first, "--output_dir", second,
                      "--transformer_config", '{"patch_size": [1, 1, 1], "num_layers": 3}'])
    fine = WanTransformer3DModel.from_pretrained(os.path.join(second, "transformer"))
    assert list(fine.config.patch_size) == [1, 1, 1] and (coarse.config.num_layers, fine.config.num_layers) == (1, 3)
    assert fine.proj_out.out_features == coarse.proj_out.out_features // 4
    card = open(os.path.join(second, "README.md")).read()  # describes the trained model, not the arguments
    assert "3 layers" in card and "patch [1, 1, 1]" in card
    # any other architecture change on a warm start is refused, naming the key
    env = dict(os.environ, PYTHONPATH=os.path.join(repo_root, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, os.path.join(repo_root, "training", "train_teacher.py")] + common
        + ["--pretrained_model_name_or_path", first, "--output_dir", str(tmp_path / "bad"),
           "--transformer_config", '{"num_attention_heads": 7}'],
        capture_output=True, text=True, env=env, cwd=repo_root,
    )
    assert r.returncode != 0 and "num_attention_heads: 7 vs" in r.stderr, r.stderr[-2000:]


def test_teacher_motion_weighted_loss(repo_root):
    """`--motion_weight`: 0 is the plain MSE; otherwise an error where the latents move costs more than the same
    error where they are static, and a uniform error costs the same as without weights."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_teacher", os.path.join(repo_root, "training", "train_teacher.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 5, 8, 8, generator=g) * 0.1
    x0 = x0[:, :, :1].expand(-1, -1, 5, -1, -1).clone()  # a static background...
    for t in range(5):  # ...and a 2x2 object moving one position per latent frame
        x0[:, :, t, 2:4, t : t + 2] += 1.0
    weights = script.motion_weights(x0, 4.0)
    assert weights.shape == (2, 1, 5, 8, 8)
    moving = weights[:, :, :, 2:4].mean()
    static = weights[:, :, :, 6:].mean()
    assert moving > 3 * static and torch.allclose(weights[:, :, :, 6:], torch.ones(()))
    assert torch.allclose(script.motion_weights(torch.ones(1, 2, 3, 4, 4), 4.0), torch.ones(()))  # nothing moves
    pred = torch.randn(x0.shape, generator=g)
    target = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(script.flow_matching_loss(pred, target, x0, 0.0),
                               torch.nn.functional.mse_loss(pred, target))
    torch.testing.assert_close(script.flow_matching_loss(target + 0.3, target, x0, 4.0), torch.tensor(0.09))
    mask = torch.zeros_like(x0)
    mask[:, :, :, 2:4] = 1.0
    on_motion = script.flow_matching_loss(target + 0.3 * mask, target, x0, 4.0)
    on_static = script.flow_matching_loss(target + 0.3 * torch.roll(mask, 4, dims=3), target, x0, 4.0)
    assert on_motion > 2 * on_static


def test_teacher_high_sigma_fraction(repo_root):
    """`--high_sigma_fraction F`: about F of the noise levels are uniform in [--high_sigma_min, 1]; 0 leaves the
    shifted logit-normal unchanged (the same draws)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_teacher", os.path.join(repo_root, "training", "train_teacher.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = ["--pretrained_model_name_or_path", "unused"]
    plain = script.parse_args(base)
    mixed = script.parse_args(base + ["--high_sigma_fraction", "0.25", "--high_sigma_min", "0.98"])
    n = 20000
    sigma_plain = script.sample_sigmas(n, plain, torch.Generator().manual_seed(3), "cpu")
    sigma_mixed = script.sample_sigmas(n, mixed, torch.Generator().manual_seed(3), "cpu")
    assert ((sigma_plain > 0) & (sigma_plain < 1)).all() and ((sigma_mixed > 0) & (sigma_mixed <= 1)).all()
    high_plain = (sigma_plain >= 0.98).float().mean().item()
    high_mixed = (sigma_mixed >= 0.98).float().mean().item()
    assert high_plain < 0.02 and abs(high_mixed - (0.25 + 0.75 * high_plain)) < 0.015, (high_plain, high_mixed)
    changed = sigma_mixed != sigma_plain
    assert (sigma_mixed[changed] >= 0.98).all() and 0.2 < changed.float().mean().item() < 0.3
    with pytest.raises(SystemExit):
        script.parse_args(base + ["--high_sigma_fraction", "1.5"])


def test_teacher_frame_noise_fraction(repo_root):
    """`--frame_noise_fraction F`: about F of the clips get an independent noise level per latent frame, the others
    one level for all frames (with F = 0 the same draws as `sample_sigmas`); the per-frame levels reach Wan as one
    timestep per patch token in the transformer's (frame, row, column) token order, and a clip whose frames share
    a level gives the same output either way."""
    import importlib.util

    from diffusers import WanTransformer3DModel

    spec = importlib.util.spec_from_file_location("train_teacher", os.path.join(repo_root, "training", "train_teacher.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = ["--pretrained_model_name_or_path", "unused"]
    plain = script.parse_args(base)
    mixed = script.parse_args(base + ["--frame_noise_fraction", "0.3"])
    n, frames = 4000, 5
    sigma_plain = script.sample_frame_sigmas(n, frames, plain, torch.Generator().manual_seed(3), "cpu")
    assert sigma_plain.shape == (n, frames) and (sigma_plain == sigma_plain[:, :1]).all()
    assert torch.equal(sigma_plain[:, 0], script.sample_sigmas(n, plain, torch.Generator().manual_seed(3), "cpu"))
    sigma_mixed = script.sample_frame_sigmas(n, frames, mixed, torch.Generator().manual_seed(3), "cpu")
    varied = (sigma_mixed != sigma_mixed[:, :1]).any(1).float().mean().item()
    assert 0.27 < varied < 0.33 and ((sigma_mixed > 0) & (sigma_mixed < 1)).all(), varied
    with pytest.raises(SystemExit):
        script.parse_args(base + ["--frame_noise_fraction", "-0.1"])

    latent_shape = (2, 4, 3, 6, 10)  # (batch, channels, frames, height, width); patch (1, 2, 2): 15 tokens per frame
    sigma = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.3, 0.3]])
    steps = script.token_timesteps(sigma, latent_shape, (1, 2, 2))
    assert steps.shape == (2, 45)
    for f in range(3):
        assert torch.allclose(steps[:, f * 15 : (f + 1) * 15], sigma[:, f : f + 1] * 1000)
    shared = torch.tensor([[0.4] * 3, [0.7] * 3])
    assert torch.allclose(script.token_timesteps(shared, latent_shape, (1, 2, 2)), torch.tensor([400.0, 700.0]))
    with pytest.raises(ValueError, match="temporal patch size"):
        script.token_timesteps(sigma, latent_shape, (2, 2, 2))

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()
    x = torch.randn(latent_shape)
    text = torch.randn(2, 7, 16)
    with torch.no_grad():
        scalar = model(x, timestep=torch.tensor([400.0, 700.0]), encoder_hidden_states=text).sample
        per_token = model(x, timestep=torch.tensor([400.0, 700.0])[:, None].expand(2, 45), encoder_hidden_states=text).sample
        varied_out = model(x, timestep=steps, encoder_hidden_states=text).sample
    assert torch.allclose(scalar, per_token, atol=1e-5)
    assert varied_out.shape == x.shape and not torch.allclose(varied_out[0], scalar[0], atol=1e-3)


def test_teacher_start_away_from_heading_walls(repo_root):
    """`--start_away_fraction`: objects start at the end of their range away from the wall they head to, so that the
    clip's motion follows the caption's direction for longer (the fraction of frame transitions that move as the caption
    says rises); axes an object does not move along keep their start; the caption is unchanged."""
    import importlib.util

    import numpy as np

    from diffusers_hybrid.shapes.domain import DIRECTIONS, SceneSpec, sample_scene

    spec = importlib.util.spec_from_file_location("train_teacher", os.path.join(repo_root, "training", "train_teacher.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = np.random.default_rng(0)
    agree = {"uniform": [], "away": []}
    for seed in range(120):
        scene = SceneSpec(sample_scene(rng, "train", two_object_prob=0.5), seed=seed)
        moved = script.start_away_from_heading_walls(scene, 0.3)
        assert moved.prompt == scene.prompt and len(moved.starts) == len(scene.starts)
        if moved.starts == scene.starts:  # two objects whose moved starts would meet
            assert len(scene.starts) == 2
            continue
        for obj, before, after in zip(scene.attrs.objects, scene.starts, moved.starts):
            for step, b, a in zip(DIRECTIONS[obj.direction], before, after):
                assert a == b if step == 0 else (a <= 0.3 if step > 0 else a >= 0.7)
        for label, which in (("uniform", scene), ("away", moved)):
            track, obj = which.object_tracks(33, 128, 128)[0], which.attrs.objects[0]
            motion = np.diff(track["centers"], axis=0)
            ok = np.ones(len(motion), bool)
            for axis, step in enumerate(DIRECTIONS[obj.direction]):
                if step:
                    ok &= np.sign(motion[:, axis]) == np.sign(step)
            agree[label].append(ok.mean())
    assert np.mean(agree["away"]) > np.mean(agree["uniform"]) + 0.15, {k: np.mean(v) for k, v in agree.items()}
    base = ["--pretrained_model_name_or_path", "unused"]
    with pytest.raises(SystemExit):
        script.parse_args(base + ["--start_away_fraction", "1.5"])
    with pytest.raises(SystemExit):
        script.parse_args(base + ["--start_away_span", "0"])


def test_teacher_counterfactual_pairs(repo_root):
    """`--counterfactual_pairs`: each scene is followed by its twin whose objects start where they do and move the
    opposite way (the caption says so, the first frame is the same, later frames differ); pairs share their noise and
    noise level; an odd batch is refused."""
    import importlib.util

    import numpy as np

    from diffusers_hybrid.shapes.domain import DIRECTIONS, SceneSpec, parse_caption, render_batch, sample_scene

    spec = importlib.util.spec_from_file_location("train_teacher", os.path.join(repo_root, "training", "train_teacher.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = np.random.default_rng(1)
    scenes = [SceneSpec(sample_scene(rng, "train", two_object_prob=0.5), seed=seed) for seed in range(40)]
    paired = script.with_counterfactual_twins(scenes)
    assert len(paired) == 80 and paired[0::2] == scenes
    for scene, twin in zip(paired[0::2], paired[1::2]):
        assert twin.starts == scene.starts and twin.attrs.split == "train"
        assert script.reverse_directions(twin) == scene
        parsed = parse_caption(twin.prompt).objects
        for obj, twin_obj, track, twin_track in zip(scene.attrs.objects, parsed, scene.object_tracks(9, 128, 128),
                                                    twin.object_tracks(9, 128, 128)):
            assert DIRECTIONS[twin_obj.direction] == tuple(-s for s in DIRECTIONS[obj.direction])
            assert (twin_obj.shape, twin_obj.color, twin_obj.size, twin_obj.speed) == (obj.shape, obj.color, obj.size,
                                                                                     obj.speed)
            np.testing.assert_allclose(twin_track["velocity"], [-v for v in track["velocity"]])
            np.testing.assert_allclose(twin_track["centers"][0], track["centers"][0])
    video = render_batch(paired[:2], 9, 128, 128)
    assert torch.equal(video[0, :, 0], video[1, :, 0]) and not torch.equal(video[0, :, 8], video[1, :, 8])
    noise, sigma = torch.randn(6, 4, 3), torch.rand(6, 3)
    before = noise.clone()
    script.share_within_pairs(noise, sigma)
    assert torch.equal(noise[0::2], before[0::2]) and torch.equal(noise[1::2], noise[0::2])
    assert torch.equal(sigma[1::2], sigma[0::2])
    base = ["--pretrained_model_name_or_path", "unused", "--counterfactual_pairs"]
    assert script.parse_args(base + ["--train_batch_size", "4"]).counterfactual_pairs
    with pytest.raises(SystemExit):
        script.parse_args(base + ["--train_batch_size", "3"])


# ----------------------------------------------------------------------------------------------------------------------
# In-process runs (main() called directly): the time budget, gradient accumulation, resuming a finished run, flags
# ----------------------------------------------------------------------------------------------------------------------


def _load_script(repo_root, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo_root, "training", f"{name}.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _teacher_args(script, repo_root, tiny_base, out, *extra):
    cfg = os.path.join(repo_root, "training", "configs", "tiny", "teacher.yaml")
    return script.parse_args(
        ["--config", cfg, "--pretrained_model_name_or_path", tiny_base, "--output_dir", out, "--num_validation_videos",
         "0", *extra]
    )


def _vae_args(script, out, *extra):
    return script.parse_args(
        ["--output_dir", out, "--base_dim", "4", "--dim_mult", "1,2,2,2", "--train_batch_size", "1", "--crop_size",
         "64", "--num_frames", "1", "--checkpointing_steps", "0", "--validation_steps", "0", "--num_validation_videos",
         "1", "--num_stats_videos", "1", "--num_eval_videos", "1", "--eval_frames", "5", "--posterior_noise", "0",
         *extra]
    )


class _Progress:
    """Stands in for tqdm: records the learning rate of every logged step in `lrs`."""

    lrs = []

    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix(self, **logs):
        self.lrs.append(logs["lr"])

    def close(self):
        pass


def test_time_budget_starts_with_the_training_loop(repo_root, tiny_base, tmp_path, monkeypatch):
    """`--max_train_time`: the learning-rate schedule and the stop share one clock that starts right before the first
    step. Setup that takes ten times the budget (the teacher's latent cache; the VAE script's setup, here its
    validation scenes) must not anneal the learning rate to zero (it did: the schedule's clock started when the
    scheduler was built)."""
    import time

    clock = [1.0e6]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    budget = ("--max_train_steps", "2", "--max_train_time", "100", "--lr_scheduler", "linear", "--lr_warmup_steps",
              "0", "--checkpointing_steps", "0")

    teacher = _load_script(repo_root, "train_teacher")
    original_init = teacher.LatentSource.__init__

    def slow_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        clock[0] += 1000.0

    monkeypatch.setattr(teacher.LatentSource, "__init__", slow_init)
    monkeypatch.setattr(teacher, "tqdm", _Progress)
    monkeypatch.setattr(_Progress, "lrs", [])
    out = str(tmp_path / "teacher")
    teacher.main(_teacher_args(teacher, repo_root, tiny_base, out, *budget, "--latent_cache_size", "2",
                               "--latent_cache_refresh_every", "0"))
    # linear over the 2 steps (no time has passed since the loop started): 1e-3 * (1 - 1/2), then 0
    assert _Progress.lrs == pytest.approx([5e-4, 0.0])
    m = json.load(open(os.path.join(out, "measurements.json")))
    assert m["train_seconds"] == 0.0 and m["stopped_by_time_limit"] is False

    vae = _load_script(repo_root, "train_shapes_vae")
    original_specs = vae.scene_specs

    def slow_specs(split, *args, **kwargs):
        if split == "heldout":
            clock[0] += 1000.0
        return original_specs(split, *args, **kwargs)

    monkeypatch.setattr(vae, "scene_specs", slow_specs)
    monkeypatch.setattr(vae, "tqdm", _Progress)
    monkeypatch.setattr(_Progress, "lrs", [])
    out = str(tmp_path / "vae")
    vae.main(_vae_args(vae, out, *budget))
    assert _Progress.lrs == pytest.approx([5e-4, 0.0])
    m = json.load(open(os.path.join(out, "measurements.json")))
    assert m["train_seconds"] == 0.0 and m["stopped_by_time_limit"] is False


def test_train_teacher_resuming_a_finished_run_still_exports(repo_root, tiny_base, tmp_path):
    """`--resume_from_checkpoint latest` on a run that already reached --max_train_steps trains nothing and writes the
    pipeline and its measurements again (it crashed on the loss of a step that never ran)."""
    script = _load_script(repo_root, "train_teacher")
    out = str(tmp_path / "teacher")
    steps = ("--max_train_steps", "1", "--checkpointing_steps", "1")
    script.main(_teacher_args(script, repo_root, tiny_base, out, *steps))
    shutil.rmtree(os.path.join(out, "transformer"))
    os.remove(os.path.join(out, "measurements.json"))
    script.main(_teacher_args(script, repo_root, tiny_base, out, *steps, "--resume_from_checkpoint", "latest"))
    m = json.load(open(os.path.join(out, "measurements.json")))
    assert m["steps"] == 1 and m["final_loss"] is None and m["stopped_by_time_limit"] is False
    assert os.path.isfile(os.path.join(out, "transformer", "config.json"))


def test_gradient_accumulation_draws_new_scenes_for_every_micro_batch(repo_root, tiny_base, tmp_path, monkeypatch):
    """With --gradient_accumulation_steps 2, the two micro-batches of an optimiser step render different scenes, in
    the teacher (without a latent cache) and in the VAE script (both used to seed scenes from the optimiser step)."""
    teacher = _load_script(repo_root, "train_teacher")
    teacher_scenes = []
    original_encode = teacher.LatentSource._encode

    def encode(self, specs):
        teacher_scenes.append(tuple(s.seed for s in specs))
        return original_encode(self, specs)

    monkeypatch.setattr(teacher.LatentSource, "_encode", encode)
    teacher.main(_teacher_args(teacher, repo_root, tiny_base, str(tmp_path / "teacher"), "--max_train_steps", "1",
                               "--gradient_accumulation_steps", "2", "--latent_cache_size", "0",
                               "--checkpointing_steps", "0"))
    assert len(teacher_scenes) == 2 and not set(teacher_scenes[0]) & set(teacher_scenes[1])

    vae = _load_script(repo_root, "train_shapes_vae")
    vae_scenes = []
    original_specs = vae.specs_for_step

    def specs_for_step(*args, **kwargs):
        specs = original_specs(*args, **kwargs)
        vae_scenes.append(tuple(s.seed for s in specs))
        return specs

    monkeypatch.setattr(vae, "specs_for_step", specs_for_step)
    vae.main(_vae_args(vae, str(tmp_path / "vae"), "--max_train_steps", "1", "--gradient_accumulation_steps", "2"))
    assert len(vae_scenes) == 2 and vae_scenes[0] != vae_scenes[1]


def test_boolean_flags_set_in_yaml_can_be_switched_off(repo_root, tmp_path):
    """Boolean flags take a value (`--use_ema false`), so the command line can switch off what a YAML config switched
    on; a flag alone still means true, and a value that is not a boolean is refused, naming it."""
    teacher = _load_script(repo_root, "train_teacher")
    cfg = os.path.join(repo_root, "training", "configs", "tiny", "teacher.yaml")  # train_text_encoder, use_ema: true
    base = ["--config", cfg, "--pretrained_model_name_or_path", "unused"]
    on = teacher.parse_args(base)
    assert on.use_ema and on.train_text_encoder and not on.gradient_checkpointing and not on.counterfactual_pairs
    off = teacher.parse_args(base + ["--use_ema", "false", "--train_text_encoder", "no", "--gradient_checkpointing",
                                     "--allow_tf32", "0", "--counterfactual_pairs", "off"])
    assert (off.use_ema, off.train_text_encoder, off.gradient_checkpointing, off.allow_tf32,
            off.counterfactual_pairs) == (False, False, True, False, False)
    with pytest.raises(SystemExit):
        teacher.parse_args(base + ["--use_ema", "maybe"])

    vae = _load_script(repo_root, "train_shapes_vae")
    yaml_path = tmp_path / "vae.yaml"
    yaml_path.write_text("allow_tf32: true\n")
    assert vae.parse_args(["--config", str(yaml_path)]).allow_tf32 is True
    assert vae.parse_args(["--config", str(yaml_path), "--allow_tf32", "false"]).allow_tf32 is False
    assert vae.parse_args(["--allow_tf32"]).allow_tf32 is True and vae.parse_args([]).allow_tf32 is False


def test_vae_stream_segments_code_like_the_whole_video(repo_root):
    """`--stream_frames`: a stream encoded and decoded segment by segment through the kept causal caches gives the
    frames of `AutoencoderKLWan.encode` + `decode` of the whole video, and each segment's targets are the pixel frames
    it codes."""
    from diffusers import AutoencoderKLWan

    script = _load_script(repo_root, "train_shapes_vae")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()
    model = script.VAEWithLoss(vae, posterior_noise=0.0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 25, 40, 48, generator=g) * 2 - 1  # 7 latent frames: segments of 3 leave a last one of 1
    with torch.no_grad():
        whole = vae.decode(vae.encode(x).latent_dist.mode()).sample
        stream = script._Stream(x, x[:, :1], vae.config.scale_factor_temporal)
        parts, targets, firsts = [], [], []
        while not stream.done:
            segment, coverage, first = stream.take(3)
            parts.append(model(segment=segment, first_chunk=first)[0])
            targets.append(segment)
            firsts.append(first)
            assert parts[-1].shape == segment.shape and coverage.shape[2] == segment.shape[2]
    assert firsts == [True, False, False] and [p.shape[2] for p in parts] == [9, 12, 4]
    assert torch.equal(torch.cat(targets, 2), x)
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="whole latent frames"):
        model(segment=x[:, :, :6], first_chunk=True)


def test_vae_stream_backpropagates_through_the_segment_only(repo_root):
    """Truncated backpropagation through time: the second segment's loss reaches the encoder and the decoder through
    its own frames; the caches that the first segment left are detached (a second backward through them would
    raise)."""
    from diffusers import AutoencoderKLWan

    script = _load_script(repo_root, "train_shapes_vae")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    model = script.VAEWithLoss(vae, posterior_noise=0.0)
    x = torch.rand(1, 3, 13, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    model(segment=x[:, :, :5], first_chunk=True)[0].square().mean().backward()
    vae.zero_grad()
    model(segment=x[:, :, 5:], first_chunk=False)[0].square().mean().backward()
    for part in (vae.encoder, vae.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(gr is not None for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0


def test_train_shapes_vae_decoder_only_streams(repo_root, tmp_path):
    """`--decoder_only` (here with `--stream_frames`): the decoder learns, the encoder and the latent statistics that
    models were trained with stay exactly as they were; the long-video PSNR is measured and on the card."""
    from diffusers import AutoencoderKLWan

    script = _load_script(repo_root, "train_shapes_vae")
    torch.manual_seed(0)
    base = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            latents_mean=[0.1 * i for i in range(16)], latents_std=[1.0 + 0.1 * i for i in range(16)])
    base.save_pretrained(str(tmp_path / "base"))
    out = str(tmp_path / "out")
    args = script.parse_args(
        ["--output_dir", out, "--pretrained_model_name_or_path", str(tmp_path / "base"), "--decoder_only",
         "--stream_frames", "13", "--stream_segment_latents", "2", "--train_batch_size", "1", "--max_train_steps", "3",
         "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--checkpointing_steps", "0", "--validation_steps", "0",
         "--num_validation_videos", "1", "--num_eval_videos", "1", "--eval_frames", "5", "--eval_long_frames", "13",
         "--posterior_noise", "0", "--save_dtype", "fp32"]
    )
    script.main(args)
    m = json.load(open(os.path.join(out, "measurements.json")))
    assert m["steps"] == 3 and np.isfinite(m["psnr_heldout_long_head"]) and np.isfinite(m["psnr_heldout_long_tail"])
    tuned = AutoencoderKLWan.from_pretrained(os.path.join(out, "vae"))
    assert tuned.config.latents_mean == base.config.latents_mean
    assert tuned.config.latents_std == base.config.latents_std
    before, after = base.state_dict(), tuned.state_dict()
    frozen = [n for n in before if not n.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("decoder."))
    card = open(os.path.join(out, "vae", "README.md")).read()
    assert "13-frame streams" in card and "decoder alone" in card and "from frame 5 on" in card


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--decoder_only"], "give --pretrained_model_name_or_path"),
        (["--stream_frames", "12"], "1 \\+ 4k"),
        (["--eval_long_frames", "5"], "longer than --eval_frames"),
    ],
)
def test_train_shapes_vae_stream_arguments(repo_root, extra, message):
    script = _load_script(repo_root, "train_shapes_vae")
    with pytest.raises(ValueError, match=message):
        script.parse_args(["--eval_frames", "9", *extra])
