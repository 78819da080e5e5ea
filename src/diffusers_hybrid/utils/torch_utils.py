# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Small tensor helpers shared by the model, the conversion script and the training scripts."""

from __future__ import annotations

import torch


def cast_keeping_fp32_modules(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` that leaves the modules named in its `_keep_in_fp32_modules` in float32, as
    `from_pretrained(torch_dtype=dtype)` does (diffusers' Wan keeps its RoPE, time embedder, modulation tables and
    norms there; transformers' T5 family its `wo` projections). Floating-point parameters and buffers are cast in
    place; returns `model`. A module path matches when one of its dotted components is a kept name."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep.intersection(name.split(".")) else dtype)
    return model
