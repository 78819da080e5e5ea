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


def test_stream_switch_for_chunk_0_and_late_stdin_switches(model_dir, tmp_path, capsys, monkeypatch):
    """Audit: a switches-file line for chunk 0 was never applied, and a typed "<chunk> <prompt>" for a chunk already
    generated vanished. Now chunk 0's line is the first prompt, and a late line applies from the next chunk with a
    warning."""
    import io
    import sys

    switches = tmp_path / "switches.txt"
    switches.write_text("0 a blue boat on the sea\n")
    # typed while chunk 0 is generated: "0 ..." is late whenever it is read (a daemon thread reads it)
    monkeypatch.setattr(sys, "stdin", io.StringIO("0 a dog runs in the snow\n"))
    _script("stream.py")["main"](
        ["--model", model_dir, "--prompt", "a red panda walks", "--switches", str(switches), "--stdin",
         "--num-chunks", "3", "--output", "", "--kernel", "reference", *TINY]
    )
    printed = capsys.readouterr().out
    chunk_lines = [line for line in printed.splitlines() if line.startswith("chunk ")]
    assert "streaming 'a blue boat on the sea'" in printed and "[a blue boat on the sea]" in chunk_lines[0]
    assert not [line for line in chunk_lines if "a red panda" in line]
    assert "warning: chunk 0 was already generated; 'a dog runs in the snow' applies from chunk" in printed
    assert "[a dog runs in the snow]" in chunk_lines[-1]


def test_take_switches(tmp_path, capsys):
    import queue

    take = _script("stream.py")["take_switches"]
    lines, switches = queue.Queue(), {5: "a scheduled boat"}
    for line in ("7 a later dog", "2 a late bird", "a typed cat"):
        lines.put(line)
    assert take(lines, switches, 4) == "a typed cat"  # the last unscheduled line wins
    assert switches == {5: "a scheduled boat", 7: "a later dog"}
    assert "warning: chunk 2 was already generated; 'a late bird' applies from chunk 4 instead" in capsys.readouterr().out
    lines.put("a typed cat")
    assert take(lines, switches, 5) == "a scheduled boat"  # a switch scheduled for that very chunk wins
    assert take(lines, switches, 6) is None


def test_generate_keeps_sizes_that_are_not_multiples_of_16(components, tmp_path):
    """Audit: `examples/generate.py` wrote through diffusers' `export_to_video`, which resizes 40x32 to 48x32. A patch-1
    model takes sizes in multiples of 8."""
    folder = tmp_path / "patch1"
    components.make_pipeline(patch_size=(1, 1, 1)).save_pretrained(folder)
    output = tmp_path / "out.mp4"
    args = ["--model", str(folder), "--prompt", "a red panda walks", "--num-frames", "9", "--output", str(output),
            "--kernel", "reference", *TINY]
    args[args.index("--height") + 1] = "40"
    video = _script("generate.py")["main"](args)
    assert video.shape == (9, 40, 32, 3)
    assert iio.imread(output).shape == (9, 40, 32, 3)
