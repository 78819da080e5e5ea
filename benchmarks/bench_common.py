# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which puts this folder on the
import path)."""

import os
import subprocess


def log(*args):
    print(*args, flush=True)


def commit() -> str:
    """The commit the figures belong to: `BENCH_COMMIT` when set (the device machine has no git history), else git's."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"
