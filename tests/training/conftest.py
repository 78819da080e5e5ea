# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Fixtures of the training tests: tiny models written once per session, the training script as a module, and a
runner for `accelerate launch` / plain `python` subprocesses (offline, one CPU thread each)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINING = os.path.join(ROOT, "training")
SCRIPT = os.path.join(TRAINING, "train_hybrid_forcing.py")
TINY_CONFIGS = os.path.join(TRAINING, "configs", "tiny")
ACCELERATE_CONFIGS = os.path.join(TRAINING, "accelerate_configs")


def _load_module(name: str, path: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def train_script():
    """`training/train_hybrid_forcing.py` imported as a module."""
    return _load_module("train_hybrid_forcing", SCRIPT)


@pytest.fixture(scope="session")
def make_tiny():
    return _load_module("make_tiny_models", os.path.join(TRAINING, "make_tiny_models.py"))


@pytest.fixture(scope="session")
def helpers():
    """This module (its subprocess helpers), for test files: with `--import-mode=importlib` they cannot import it."""
    return sys.modules[__name__]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: one thread is ~10x faster than two on a busy 2-core CI machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, make_tiny):
    root = str(tmp_path_factory.mktemp("tiny_models"))
    make_tiny.write_tiny_models(root)
    return root


def subprocess_env(tiny_models: str, output_root: str, hf_home: str) -> dict:
    env = dict(os.environ)
    env.update(
        TINY_MODELS=tiny_models, OUTPUT_DIR=output_root, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=hf_home, TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def run_training(args: list[str], env: dict, launcher: str = "python", accelerate_config: str = "cpu.yaml",
                 expect_ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs the training script in a subprocess: `python SCRIPT ...` or `accelerate launch --config_file ... SCRIPT
    ...`. Raises with the captured output when the exit status is not what `expect_ok` says."""
    if launcher == "python":
        cmd = [sys.executable, SCRIPT, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ACCELERATE_CONFIGS, accelerate_config), SCRIPT, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if (proc.returncode == 0) != expect_ok:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
            f"--- stderr ---\n{proc.stderr[-12000:]}"
        )
    return proc


def read_log(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "logs", "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
