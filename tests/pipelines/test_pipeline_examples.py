# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The example scripts run end to end on a tiny saved pipeline (CPU, no downloads)."""

import os
import runpy

import imageio.v3 as iio
import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples")
TINY = ["--height", "32", "--width", "32", "--dtype", "fp32", "--device", "cpu", "--max-sequence-length", "16"]


@pytest.fixture(scope="module")
def model_dir(components, tmp_path_factory):
    folder = tmp_path_factory.mktemp("examples") / "tiny-hybrid"
    components.make_pipeline().save_pretrained(folder)
    return str(folder)


def _script(name):
    return runpy.run_path(os.path.join(EXAMPLES, name))


def test_generate(model_dir, tmp_path, capsys):
    output = tmp_path / "out.mp4"
    video = _script("generate.py")["main"](
        ["--model", model_dir, "--prompt", "a red panda walks", "--num-frames", "21", "--output", str(output),
         "--kernel", "reference", "--mode", "window", *TINY]
    )
    assert video.shape == (21, 32, 32, 3)
    printed = capsys.readouterr().out
    assert "mode: window" in printed and "time to first frame:" in printed and "FPS:" in printed
    assert iio.imread(output).shape[0] == 21


def test_stream_with_switches(model_dir, tmp_path, capsys):
    switches = tmp_path / "switches.txt"
    switches.write_text("# chunk prompt\n2 a blue boat on the sea\n\n3 a dog runs in the snow\n")
    output = tmp_path / "stream.mp4"
    frames = _script("stream.py")["main"](
        ["--model", model_dir, "--prompt", "a red panda walks", "--switches", str(switches), "--num-chunks", "4",
         "--output", str(output), "--recache", "--kernel", "reference", "--fast", *TINY]
    )
    assert frames == 9 + 3 * 12
    printed = capsys.readouterr().out
    assert "-> prompt from chunk 2: a blue boat on the sea" in printed
    assert "[a dog runs in the snow]" in printed and "FPS" in printed
    assert iio.imread(output).shape[0] == 45


def test_stream_switch_file_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("ten a boat\n")
    with pytest.raises(ValueError, match="expected '<chunk> <prompt>'"):
        _script("stream.py")["read_switches"](str(bad))
