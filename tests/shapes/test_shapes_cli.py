# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Command-line and generation options of the shapes domain: seeds, and sampling options a student ignores."""

import os
import warnings

import numpy as np
import pytest

from diffusers_hybrid.shapes.__main__ import main
from diffusers_hybrid.shapes.domain import SceneSpec, scene_specs

PROMPT = "a small yellow square bouncing slowly to the right on a gray checkered background"


@pytest.mark.parametrize(
    "argv",
    [
        ["render", "--prompt", PROMPT, "--seed", "-1", "--out", "x.npy"],
        ["prompts", "--seed", "-3"],
        ["selfcheck", "--seed", "-2"],
        ["generate", "--prompt", PROMPT, "--seed", "-1", "--out", "x.npy"],
    ],
)
def test_negative_seed_is_a_clear_usage_error(argv, capsys):
    """#13: a negative --seed is refused by argparse, naming the value (it used to end in numpy's traceback)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid seed" in err and argv[argv.index("--seed") + 1] in err


@pytest.mark.parametrize("command", [["prompts"], ["evaluate"], ["render", "--prompt", PROMPT, "--out", "x.npy"]])
def test_unknown_split_is_a_clear_usage_error(command, capsys):
    from diffusers_hybrid.shapes import __main__ as cli
    from diffusers_hybrid.shapes.domain import SPLITS

    assert cli._SPLITS == SPLITS  # the CLI's copy (kept to start without torch) follows the domain's
    with pytest.raises(SystemExit) as e:
        main(command + ["--split", "held-out"])
    assert e.value.code == 2 and "invalid choice: 'held-out'" in capsys.readouterr().err


def test_negative_seed_is_a_clear_value_error():
    with pytest.raises(ValueError, match="non-negative integer, got -1"):
        SceneSpec.from_prompt(PROMPT, -1)
    with pytest.raises(ValueError, match="got -5"):
        scene_specs("train", 2, base_seed=-5)
    assert SceneSpec.from_prompt(PROMPT, np.int64(3)).starts == SceneSpec.from_prompt(PROMPT, 3).starts


class _FakeStudent:
    """Stands in for a StreamingHybridPipeline (a subclass of it, built without loading weights)."""

    @staticmethod
    def make():
        from diffusers_hybrid.pipelines.pipeline_streaming_hybrid import StreamingHybridPipeline

        class Fake(StreamingHybridPipeline):
            def __init__(self):  # no components
                self.calls = []

            @property
            def config(self):
                return type("C", (), {"denoising_step_list": [1000, 750, 500, 250]})()

            def __call__(self, **kwargs):
                self.calls.append(kwargs)
                n = len(kwargs["prompt"])
                frames = np.zeros((n, kwargs["num_frames"], kwargs["height"], kwargs["width"], 3), np.float32)
                return type("Out", (), {"frames": frames})()

        return Fake()


def test_generate_warns_that_a_student_ignores_steps_and_guidance():
    """#11: --steps / --guidance-scale given for a streaming student used to be dropped silently."""
    from diffusers_hybrid.shapes.evaluate import generate

    pipe = _FakeStudent.make()
    with pytest.warns(UserWarning, match=r"steps=4, guidance_scale=2.0 ignored: a StreamingHybridPipeline"):
        out = generate(pipe, [PROMPT], 5, 128, 128, steps=4, guidance_scale=2.0)
    assert out.shape == (1, 5, 128, 128, 3)
    assert "num_inference_steps" not in pipe.calls[0] and "guidance_scale" not in pipe.calls[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing given: no warning
        generate(pipe, [PROMPT], 5, 128, 128)


def test_cli_generate_warns_for_a_student(tmp_path, monkeypatch):
    from diffusers_hybrid.shapes import evaluate

    folder = tmp_path / "student"
    os.makedirs(folder / "transformer")
    (folder / "transformer" / "config.json").write_text("{}")
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a, **k: _FakeStudent.make())
    out = str(tmp_path / "v.npy")
    with pytest.warns(UserWarning, match="steps=8 ignored"):
        main(["generate", "--pipeline", str(folder), "--prompt", PROMPT, "--frames", "5", "--steps", "8", "--out", out])
    assert np.load(out).shape == (5, 128, 128, 3)


def test_missing_local_folders_are_named_not_looked_up_on_the_hub(tmp_path):
    """A path that is not a folder must fail naming it; diffusers would otherwise take it for a Hub id."""
    from diffusers_hybrid.shapes.__main__ import main
    from diffusers_hybrid.shapes.evaluate import load_pipeline

    missing = str(tmp_path / "no-such-vae")
    with pytest.raises(SystemExit, match="no-such-vae.*not a VAE folder"):
        main(["selfcheck", "--num", "1", "--frames", "5", "--mp4", "0", "--vae", missing])
    with pytest.raises(FileNotFoundError, match="no-such-pipeline"):
        load_pipeline(str(tmp_path / "no-such-pipeline"))
