# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""In-process tests of `training/train_hybrid_forcing.py`: configuration, prompt loading, the clear errors raised
before any heavy work, checkpoint discovery, the sampler's exact resumability, and trainer pieces run on the tiny
models (validation, ODE initialisation, the ODE-pair cache, Hub revisions and variants)."""

import argparse
import dataclasses
import json
import logging
import os
import shutil

import pytest
import torch

TINY_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "training", "configs", "tiny")


@pytest.fixture
def tiny_env(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_MODELS", tiny_models)
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "out"))
    return tmp_path


def args_for(train_script, stage, *extra):
    return train_script.parse_args(["--config", os.path.join(TINY_CONFIGS, f"{stage}.yaml"), *extra])


def test_yaml_config_env_expansion_and_cli_precedence(train_script, tiny_env, tiny_models):
    args = args_for(train_script, "stage2", "--reflow_weight", "0.2", "--use_ema", "false",
                    "--student_config", '{"attention_mode": "window"}')
    assert args.stage == "stage2"
    assert args.pretrained_model_name_or_path == os.path.join(tiny_models, "wan_base")
    assert args.output_dir == str(tiny_env / "out" / "stage2")
    assert args.reflow_weight == 0.2 and args.use_ema is False  # the command line wins over the YAML
    assert args.student_config == {"attention_mode": "window"}
    assert args.learning_rate == 1e-4 and args.denoising_step_list == [1000.0, 750.0, 500.0, 250.0]
    defaults = train_script.parse_args(["--stage", "stage1"])
    assert defaults.guidance_scale == 4.0 and defaults.dfake_gen_update_ratio == 5 and defaults.ema_decay == 0.99
    assert defaults.adam_beta1 == 0.0 and defaults.adam_beta2 == 0.999 and defaults.adam_weight_decay == 0.01


def test_unknown_yaml_key_is_rejected(train_script, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: stage1\nlearning_rat: 1.0\n")
    with pytest.raises(train_script.TrainingSetupError, match="learning_rat"):
        train_script.parse_args(["--config", str(bad)])


def test_every_tiny_stage_passes_preflight(train_script, tiny_env):
    for stage in ("ode_init", "stage1", "stage2"):
        args = args_for(train_script, stage)
        if stage == "stage1":
            args.init_checkpoint = None
        if stage == "stage2":  # a stage-1 "checkpoint": any model folder will do for the pre-flight checks
            args.stage1_checkpoint = os.path.join(os.environ["TINY_MODELS"], "wan_base")
        pre = train_script.preflight(args)
        assert pre.prompts and pre.chunk_frames == 3 and (pre.latent_height, pre.latent_width) == (4, 4)


# ---------------------------------------------------------------------------------------------------------------------
# clear errors before heavy work
# ---------------------------------------------------------------------------------------------------------------------


def expect_setup_error(train_script, args, match):
    with pytest.raises(train_script.TrainingSetupError, match=match):
        train_script.preflight(args)


def test_unknown_stage(train_script, tiny_env):
    expect_setup_error(train_script, args_for(train_script, "stage1", "--stage", "stage3"), "Unknown stage 'stage3'")


def test_stage2_without_stage1_checkpoint(train_script, tiny_env):
    args = args_for(train_script, "stage2", "--stage1_checkpoint", "")
    expect_setup_error(train_script, args, "stage2 needs the stage-1 student")
    args = args_for(train_script, "stage2", "--stage1_checkpoint", str(tiny_env / "nowhere"))
    expect_setup_error(train_script, args, "stage-1 checkpoint .* does not exist")
    empty = tiny_env / "empty_run"
    empty.mkdir()
    args = args_for(train_script, "stage2", "--stage1_checkpoint", str(empty))
    expect_setup_error(train_script, args, "holds no model")


@pytest.mark.parametrize("content,suffix", [("", ".txt"), ("\n  \n\n", ".txt"), ('{"prompt": ""}\n', ".jsonl"),
                                            ("prompt\n", ".csv")])
def test_empty_prompt_set(train_script, tiny_env, content, suffix):
    path = tiny_env / f"prompts{suffix}"
    path.write_text(content)
    args = args_for(train_script, "stage1", "--train_data", str(path), "--init_checkpoint", "")
    expect_setup_error(train_script, args, "empty")


def _copy_transformer(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    # no weights: the check must fail on the config alone, before anything is loaded
    os.remove(os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    return dst


@pytest.mark.parametrize("change,match", [({"text_dim": 32}, "teacher does not match .*text_dim"),
                                          ({"in_channels": 8, "out_channels": 8}, "teacher does not match .*in_channels"),
                                          ({"patch_size": [1, 1, 1]}, "teacher does not match .*patch_size")])
def test_mismatched_teacher(train_script, tiny_env, change, match):
    teacher = _copy_transformer(os.path.join(os.environ["TINY_MODELS"], "teacher"), str(tiny_env / "bad_teacher"),
                                **change)
    args = args_for(train_script, "stage1", "--teacher_model_name_or_path", teacher, "--init_checkpoint", "")
    expect_setup_error(train_script, args, match)


def test_mismatched_critic_and_missing_models(train_script, tiny_env):
    base = os.path.join(os.environ["TINY_MODELS"], "wan_base", "transformer")
    critic = _copy_transformer(base, str(tiny_env / "bad_critic"), text_dim=8)
    args = args_for(train_script, "stage1", "--critic_model_name_or_path", critic, "--init_checkpoint", "")
    expect_setup_error(train_script, args, "critic does not match .*text_dim")
    args = args_for(train_script, "stage1", "--teacher_model_name_or_path", str(tiny_env / "no_teacher"),
                    "--init_checkpoint", "")
    expect_setup_error(train_script, args, "teacher .* does not exist")
    args = args_for(train_script, "stage1", "--teacher_model_name_or_path", str(tiny_env), "--init_checkpoint", "")
    expect_setup_error(train_script, args, "Cannot read the teacher")


def test_mismatched_student_checkpoint(train_script, tiny_env):
    base = os.path.join(os.environ["TINY_MODELS"], "wan_base", "transformer")
    student = _copy_transformer(base, str(tiny_env / "bad_student"), in_channels=8, out_channels=8)
    args = args_for(train_script, "stage2", "--stage1_checkpoint", student)
    expect_setup_error(train_script, args, "does not match the student")


def test_stage_and_attention_mode_must_agree(train_script, tiny_env):
    args = args_for(train_script, "stage1", "--init_checkpoint", "", "--student_config", '{"attention_mode": "hybrid"}')
    expect_setup_error(train_script, args, "stage1 is the dense stage")
    args = args_for(train_script, "stage2", "--stage1_checkpoint", os.path.join(os.environ["TINY_MODELS"], "wan_base"),
                    "--student_config", '{"attention_mode": "dense"}')
    expect_setup_error(train_script, args, "stage2 switches on")
    args = args_for(train_script, "stage1", "--init_checkpoint", "", "--student_config", '{"sink_frame": 3}')
    expect_setup_error(train_script, args, "Unknown --student_config keys")


def test_rollout_lengths_are_checked(train_script, tiny_env):
    args = args_for(train_script, "stage1", "--init_checkpoint", "", "--num_training_frames", "8")
    expect_setup_error(train_script, args, "multiple of the chunk")
    args = args_for(train_script, "stage1", "--init_checkpoint", "", "--dmd_clip_frames", "9",
                    "--min_training_frames", "6")
    expect_setup_error(train_script, args, "dmd_clip_frames")


# ---------------------------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------------------------


def test_prompt_sources(train_script, tmp_path):
    import datasets

    (tmp_path / "p.txt").write_text("a red  circle\n\n  a blue square \n")
    assert train_script.load_prompts(str(tmp_path / "p.txt")) == ["a red circle", "a blue square"]
    (tmp_path / "p.jsonl").write_text('{"caption": "x y", "id": 1}\n{"caption": "z", "id": 2}\n')
    assert train_script.load_prompts(str(tmp_path / "p.jsonl")) == ["x y", "z"]
    (tmp_path / "p.csv").write_text("id,text\n1,hello world\n2,bye\n")
    assert train_script.load_prompts(str(tmp_path / "p.csv")) == ["hello world", "bye"]
    assert train_script.load_prompts(str(tmp_path / "p.csv"), prompt_column="id") == ["1", "2"]
    datasets.Dataset.from_dict({"prompt": ["saved one", "saved two"]}).save_to_disk(str(tmp_path / "saved"))
    assert train_script.load_prompts(str(tmp_path / "saved")) == ["saved one", "saved two"]
    with pytest.raises(train_script.TrainingSetupError, match="column"):
        train_script.load_prompts(str(tmp_path / "p.csv"), prompt_column="nope")
    with pytest.raises(train_script.TrainingSetupError, match="Unsupported"):
        (tmp_path / "p.parquetx").write_text("x")
        train_script.load_prompts(str(tmp_path / "p.parquetx"))


def test_prompts_from_a_hub_dataset_name(train_script, monkeypatch):
    """A name that is not a local path goes to `datasets.load_dataset` (no network here: the loader is replaced)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config_name=None, split=None, **kwargs):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_dict({"id": [1, 2], "text": ["from the hub", "second  prompt"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert train_script.load_prompts("someone/prompts") == ["from the hub", "second prompt"]
    assert calls == [("someone/prompts", None, "train")]


def test_push_to_hub_uploads_the_final_pipeline_folder(tmp_path, monkeypatch):
    """`--push_to_hub` calls `hub_utils.upload_pipeline_folder`: it creates the repo, then uploads the folder as is."""
    from diffusers_hybrid.utils import hub_utils

    created, uploaded = [], []

    class _Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def fake_create_repo(repo_id, private=None, token=None, exist_ok=False):
        created.append((repo_id, private, token, exist_ok))
        return _Repo(f"user/{repo_id}")

    def fake_upload_folder(**kwargs):
        uploaded.append(kwargs)
        return "commit-url"

    monkeypatch.setattr(hub_utils, "create_repo", fake_create_repo)
    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload_folder)
    (tmp_path / "final").mkdir()
    result = hub_utils.upload_pipeline_folder(tmp_path / "final", "my-student", token="t", commit_message="End")
    assert result == "commit-url"
    assert created == [("my-student", None, "t", True)]
    assert uploaded == [dict(repo_id="user/my-student", folder_path=str(tmp_path / "final"), token="t",
                             commit_message="End", create_pr=False)]


def test_sharded_sampler_is_disjoint_and_resumable(train_script):
    s0 = train_script.ShardedIndexSampler(10, seed=3, rank=0, world_size=2)
    s1 = train_script.ShardedIndexSampler(10, seed=3, rank=1, world_size=2)
    a, b = s0.next(5), s1.next(5)
    assert sorted(a + b) == list(range(10))  # one epoch split between the ranks
    state = s0.state_dict()
    continued = s0.next(7)
    fresh = train_script.ShardedIndexSampler(10, seed=3, rank=0, world_size=2)
    fresh.load_state_dict(state)
    assert fresh.next(7) == continued


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints on disk
# ---------------------------------------------------------------------------------------------------------------------


def _fake_checkpoint(path, complete=True):
    os.makedirs(path)
    if complete:
        with open(os.path.join(path, "training_state.json"), "w") as f:
            json.dump({"global_step": 1}, f)


def test_latest_checkpoint_ignores_incomplete_saves(train_script, tmp_path):
    out = str(tmp_path)
    _fake_checkpoint(os.path.join(out, "checkpoint-2"))
    _fake_checkpoint(os.path.join(out, "checkpoint-10"))
    _fake_checkpoint(os.path.join(out, "checkpoint-12.tmp"))  # a save that was killed
    _fake_checkpoint(os.path.join(out, "checkpoint-11"), complete=False)
    assert train_script.latest_checkpoint(out) == os.path.join(out, "checkpoint-10")
    train_script.recover_interrupted_saves(out)
    assert not os.path.exists(os.path.join(out, "checkpoint-12.tmp"))
    # killed between the two renames of a re-save: the moved-aside copy comes back
    os.replace(os.path.join(out, "checkpoint-10"), os.path.join(out, "checkpoint-10.old"))
    train_script.recover_interrupted_saves(out)
    assert train_script.latest_checkpoint(out) == os.path.join(out, "checkpoint-10")
    train_script.rotate_checkpoints(out, 1)  # keeps the newest complete checkpoint only
    assert sorted(os.listdir(out)) == ["checkpoint-10", "checkpoint-11"]


def test_resolve_transformer_source(train_script, tmp_path, tiny_models):
    run = tmp_path / "run"
    for step in (2, 4):
        for sub in ("generator", "generator_ema"):
            d = run / f"checkpoint-{step}" / sub
            d.mkdir(parents=True)
            (d / "config.json").write_text("{}")
        (run / f"checkpoint-{step}" / "training_state.json").write_text("{}")
    resolve = train_script.resolve_transformer_source
    assert resolve(str(run), True, "x") == ("folder", str(run / "checkpoint-4" / "generator_ema"))
    assert resolve(str(run), False, "x") == ("folder", str(run / "checkpoint-4" / "generator"))
    assert resolve(os.path.join(tiny_models, "wan_base"), True, "x") == (
        "folder", os.path.join(tiny_models, "wan_base", "transformer"))
    pt = tmp_path / "stage1.pt"
    pt.write_bytes(b"")
    assert resolve(str(pt), True, "x") == ("file", str(pt))


@pytest.mark.parametrize("name", ["ode_init", "stage1_dense", "stage2_hybrid", "ode_init_1.3b_teacher",
                                  "stage1_dense_1.3b_teacher", "stage2_hybrid_1.3b_teacher"])
def test_real_configs_parse(train_script, name):
    """The Wan2.1 configs only use known flags and carry the spec's values."""
    path = os.path.join(os.path.dirname(TINY_CONFIGS), f"{name}.yaml")
    args = train_script.parse_args(["--config", path])
    assert args.pretrained_model_name_or_path == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert args.mixed_precision == "bf16" and args.gradient_checkpointing
    assert args.denoising_step_list == [1000.0, 750.0, 500.0, 250.0] and args.timestep_shift == 5.0
    if args.stage == "stage2":
        assert args.student_config["attention_mode"] == "hybrid" and args.student_config["sparse_topk_ratio"] == 0.2
        assert args.reflow_weight == 0.05 and args.reflow_num_steps == 25 and args.num_training_frames == 54
        assert (args.learning_rate, args.critic_learning_rate) == (1.5e-6, 2e-7)
    if args.stage == "stage1":
        assert args.student_config["attention_mode"] == "dense" and args.reflow_weight == 0
        assert (args.learning_rate, args.critic_learning_rate) == (2e-6, 4e-7)
    if args.stage != "ode_init":
        assert args.guidance_scale == 4.0 and args.dfake_gen_update_ratio == 5 and args.dmd_clip_frames == 21


def test_one_gpu_1_3b_teacher_recipe_chains(train_script):
    """The 1.3B-teacher configs form a chain that starts: its ODE initialisation uses the 1.3B teacher and writes what
    stage 1 starts from, stage 2 starts from stage 1; their headers show their own one-GPU commands, and the README's
    one-GPU recipe runs all three."""
    configs = os.path.dirname(TINY_CONFIGS)

    def load(name):
        return train_script.parse_args(["--config", os.path.join(configs, f"{name}.yaml")])

    ode, stage1, stage2 = (load(n) for n in ("ode_init_1.3b_teacher", "stage1_dense_1.3b_teacher",
                                              "stage2_hybrid_1.3b_teacher"))
    teacher = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert (ode.stage, stage1.stage, stage2.stage) == ("ode_init", "stage1", "stage2")
    assert ode.teacher_model_name_or_path == stage1.teacher_model_name_or_path == \
        stage2.teacher_model_name_or_path == teacher
    assert stage1.init_checkpoint == ode.output_dir and stage2.stage1_checkpoint == stage1.output_dir
    official = load("ode_init")
    assert ode.output_dir != official.output_dir and ode.ode_pairs_dir != official.ode_pairs_dir  # other pairs
    with open(os.path.join(os.path.dirname(configs), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    recipe = readme[readme.index("its own teacher, one GPU"):]
    for name in ("ode_init_1.3b_teacher", "stage1_dense_1.3b_teacher", "stage2_hybrid_1.3b_teacher"):
        with open(os.path.join(configs, f"{name}.yaml"), encoding="utf-8") as f:
            header = "".join(line for line in f if line.startswith("#"))
        assert f"--config training/configs/{name}.yaml" in header, name
        assert "14B" not in header, name
        assert f"training/configs/{name}.yaml" in recipe, name


# ---------------------------------------------------------------------------------------------------------------------
# trainer pieces on the tiny models (in process, no training loop)
# ---------------------------------------------------------------------------------------------------------------------


def make_trainer(train_script, stage, *extra):
    """A `Trainer` of a tiny config with its models loaded (setup and load_models, no step run)."""
    args = args_for(train_script, stage, *extra)
    trainer = train_script.Trainer(args, train_script.preflight(args))
    trainer.setup()
    trainer.load_models()
    return trainer


def test_validation_leaves_first_frame_reencoding_off(train_script, tiny_env):
    """`--reencode_first_frame false`: validation loads a VAE of its own and leaves the training codec unset, so after
    a mid-run validation the DMD and critic clips are still the rollout's last frames (the validation used to store its
    VAE as the codec: re-encoding switched on, on the main process only, and a resumed run differed)."""
    trainer = make_trainer(train_script, "stage1", "--init_checkpoint", "", "--reencode_first_frame", "false",
                           "--validation_prompts", "a red circle moves left", "--num_validation_frames", "3")
    video = torch.randn(2, 4, 9, 4, 4, generator=torch.Generator().manual_seed(0))
    expected_clip, expected_mask = trainer.clip_of(video)
    torch.testing.assert_close(expected_clip, video[:, :, 3:])
    trainer.validate(1)
    assert os.listdir(os.path.join(trainer.args.output_dir, "validation", "step-1"))
    assert trainer.codec is None and trainer.validation_vae is not None
    clip, mask = trainer.clip_of(video)
    torch.testing.assert_close(clip, expected_clip)
    assert torch.equal(mask, expected_mask)
    # with re-encoding on, validation borrows the training codec's VAE instead of loading another
    reencoding = make_trainer(train_script, "stage1", "--init_checkpoint", "", "--validation_prompts", "a red circle",
                              "--num_validation_frames", "3")
    reencoding.validate(1)
    assert reencoding.codec is not None and reencoding.validation_vae is None


def test_ode_init_step_indices_are_drawn_per_rank(train_script, tiny_env, monkeypatch):
    """ODE initialisation: each chunk's denoising-step index is a noise level, drawn from the rank's own stream; the
    stream shared by all ranks (rollout structure) is left alone, so two ranks regress from different levels."""
    from diffusers_hybrid import training_utils

    trainer = make_trainer(train_script, "ode_init", "--ode_num_pairs", "0")
    trainer.ode_pairs, trainer.first_noise_sum = None, None
    drawn = []
    original = training_utils.sample_chunk_step_indices

    def spy(*args, **kwargs):
        drawn.append(original(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(training_utils, "sample_chunk_step_indices", spy)
    shared = trainer.shared_gen.get_state()
    for rank in (0, 1):  # what two ranks hold: the same shared stream, their own noise streams
        trainer.shared_gen.set_state(shared)
        trainer.noise_gen.manual_seed(training_utils.seed_for_rank(0, rank) + 1_000_000_007)
        trainer.ode_step()
        assert torch.equal(trainer.shared_gen.get_state(), shared)
    assert len(drawn) == 2 and drawn[0].shape == (2, 6)
    assert not torch.equal(drawn[0], drawn[1])


def test_stage2_ddp_needs_a_memory_read_in_the_gradient_window(train_script, tiny_env):
    """A stage-2 rollout whose gradient window never reads the linear memory leaves `linear_proj` without gradient,
    which DDP (without find_unused_parameters) turns into a crash at the next step. Pre-flight lists those rollout
    lengths; under DDP find_unused_parameters is then switched on, and an explicit `false` is an error naming the
    values. Single processes and FSDP need nothing."""
    stage1 = os.path.join(os.environ["TINY_MODELS"], "wan_base")
    wide = json.dumps({"attention_mode": "hybrid", "rope_mode": "relative", "max_rope_frames": 9,
                       "num_frame_per_block": 3, "sink_frames": 3, "local_attn_frames": 6, "sparse_topk_ratio": 0.5,
                       "sparse_block_size": 4})
    args = args_for(train_script, "stage2", "--stage1_checkpoint", stage1, "--student_config", wide,
                    "--min_training_frames", "6", "--num_training_frames", "12")
    pre = train_script.preflight(args)
    # the last chunk of a 6-frame rollout (frames 3-5) still sees frames 0-2 in its 6-frame window: nothing evicted
    assert pre.memory_free_rollouts == [6]
    resolve = train_script.resolve_ddp_find_unused_parameters
    assert resolve(args, pre, ddp=False) is False
    assert resolve(args, pre, ddp=True) is True  # unset: switched on
    args.ddp_find_unused_parameters = True
    assert resolve(args, pre, ddp=True) is True
    args.ddp_find_unused_parameters = False
    with pytest.raises(train_script.TrainingSetupError,
                       match=r"rollouts of 6 latent frames .*--min_training_frames=6.*local_attn_frames=6.*"
                             r"--min_training_frames 9"):
        resolve(args, pre, ddp=True)
    # when the sink frames stay out of the memory (absorb_sink_frames=False) it fills later
    no_sink = json.dumps({**json.loads(wide), "absorb_sink_frames": False})
    args = args_for(train_script, "stage2", "--stage1_checkpoint", stage1, "--student_config", no_sink,
                    "--min_training_frames", "6", "--num_training_frames", "12")
    assert train_script.preflight(args).memory_free_rollouts == [6, 9]
    # the tiny stage-2 config (3 local frames) reads the memory in every rollout
    args = args_for(train_script, "stage2", "--stage1_checkpoint", stage1, "--ddp_find_unused_parameters", "false")
    pre = train_script.preflight(args)
    assert pre.memory_free_rollouts == [] and resolve(args, pre, ddp=True) is False


def test_revision_and_variant_reach_every_model(train_script, tiny_env, monkeypatch):
    """`--revision` / `--variant` reach every load of the Wan folder's models (student initialisation, critic, VAE,
    text encoder; the tokenizer takes the revision), for training, validation and the final pipeline;
    `--teacher_revision` / `--teacher_variant` the teacher's. The weights here exist only as `fp16` variants."""
    import diffusers
    import transformers

    models = tiny_env / "variant_models"
    shutil.copytree(os.environ["TINY_MODELS"], models)
    for folder in ("wan_base/transformer", "wan_base/vae", "teacher"):
        os.replace(models / folder / "diffusion_pytorch_model.safetensors",
                   models / folder / "diffusion_pytorch_model.fp16.safetensors")
    os.replace(models / "wan_base/text_encoder/model.safetensors", models / "wan_base/text_encoder/model.fp16.safetensors")
    monkeypatch.setenv("TINY_MODELS", str(models))

    calls = []

    def spy(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            calls.append((f"{owner.__name__}.{name}", str(path), kwargs.get("revision"), kwargs.get("variant")))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for owner in (diffusers.WanTransformer3DModel, diffusers.AutoencoderKLWan):
        spy(owner, "from_pretrained")
        spy(owner, "load_config")
    for owner in (transformers.UMT5EncoderModel, transformers.AutoTokenizer, transformers.AutoConfig):
        spy(owner, "from_pretrained")

    trainer = make_trainer(train_script, "stage1", "--init_checkpoint", "", "--reencode_first_frame", "false",
                           "--revision", "v1", "--variant", "fp16", "--teacher_revision", "t1",
                           "--teacher_variant", "fp16", "--validation_prompts", "a red circle",
                           "--num_validation_frames", "3")
    trainer.validate(1)
    trainer.save_final(0)
    teacher = str(models / "teacher")
    loads = {name for name, *_ in calls}
    assert {"WanTransformer3DModel.from_pretrained", "AutoencoderKLWan.from_pretrained",
            "UMT5EncoderModel.from_pretrained", "AutoTokenizer.from_pretrained", "AutoConfig.from_pretrained"} <= loads
    for name, path, revision, variant in calls:
        assert revision == ("t1" if path == teacher else "v1"), (name, path, revision)
        if name.endswith("from_pretrained") and not name.startswith(("AutoTokenizer", "AutoConfig")):
            assert variant == "fp16", (name, path, variant)
    assert sum(path == teacher for _, path, *_ in calls) >= 2  # its config (pre-flight) and its weights
    assert any(name == "AutoencoderKLWan.from_pretrained" for name, *_ in calls)
    # a teacher elsewhere does not inherit the base repo's revision or variant; the same repo does
    args = args_for(train_script, "stage1", "--revision", "v1", "--variant", "fp16")
    assert train_script.hub_kwargs(args, "teacher") == {"revision": None, "variant": None}
    assert train_script.hub_kwargs(args, "critic") == {"revision": "v1", "variant": "fp16"}
    args.teacher_model_name_or_path = args.pretrained_model_name_or_path
    assert train_script.hub_kwargs(args, "teacher") == {"revision": "v1", "variant": "fp16"}


def test_ode_pair_cache_records_every_input(train_script, tiny_env, caplog):
    """The cached ODE pairs are reused only when everything they depend on matches: a change of the prompt set, the
    negative prompt, the sequence length or the timestep shift (which moves the teacher's Euler grid even when the
    student's steps are not warped) is refused, naming it. A cache written before these were recorded is stale: it is
    generated again, with a warning."""
    pairs = str(tiny_env / "pairs")
    trainer = make_trainer(train_script, "ode_init", "--ode_pairs_dir", pairs, "--ode_num_pairs", "2",
                           "--warp_denoising_step", "false")
    trainer.prepare_ode_pairs()
    assert len(trainer.ode_pairs) == 2
    args, pre = trainer.args, trainer.pre
    for key, change in (("negative_prompt", {"negative_prompt": "bright"}),
                        ("max_sequence_length", {"max_sequence_length": 12}),
                        ("timestep_shift", {"timestep_shift": 3.0})):
        trainer.args = argparse.Namespace(**{**vars(args), **change})
        with pytest.raises(train_script.TrainingSetupError, match=rf"other settings \({key}: cached"):
            trainer.prepare_ode_pairs()
    trainer.args = args
    trainer.pre = dataclasses.replace(pre, prompts=pre.prompts[:-1])
    with pytest.raises(train_script.TrainingSetupError, match="prompts: cached"):
        trainer.prepare_ode_pairs()
    trainer.pre = pre
    trainer.prepare_ode_pairs()  # unchanged settings: reused

    marker = os.path.join(pairs, "ode_pairs.json")
    with open(marker) as f:
        meta = json.load(f)
    old_keys = ("num_pairs", "frames", "latent", "sigmas", "ode_num_steps", "guidance_scale", "teacher", "seed",
                "shards")
    with open(marker, "w") as f:
        json.dump({k: meta[k] for k in old_keys}, f)
    with caplog.at_level(logging.WARNING, logger="train_hybrid_forcing"):
        trainer.prepare_ode_pairs()
    assert "older version" in caplog.text and "negative_prompt" in caplog.text
    with open(marker) as f:
        assert json.load(f) == meta
    assert len(trainer.ode_pairs) == 2
