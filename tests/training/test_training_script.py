# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""In-process tests of `training/train_hybrid_forcing.py`: configuration, prompt loading, the clear errors raised
before any heavy work, checkpoint discovery, and the sampler's exact resumability."""

import json
import os
import shutil

import pytest

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


@pytest.mark.parametrize("name", ["ode_init", "stage1_dense", "stage2_hybrid", "stage1_dense_1.3b_teacher",
                                  "stage2_hybrid_1.3b_teacher"])
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
