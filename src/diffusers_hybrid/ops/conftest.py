# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Without CUDA, the Triton kernels of these tests run through Triton's CPU interpreter; the variable must be set
before any kernel module is imported (they are imported inside the tests)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
