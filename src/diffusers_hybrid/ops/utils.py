# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Small helpers shared by the Triton launchers (no diffusers imports)."""

import contextlib

import torch

# When True, every buffer a launcher allocates for a kernel to fill is poisoned first (NaN for floats, a large
# out-of-range value for integers), so that tests catch elements a kernel failed to write.
POISON_OUTPUTS = False


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max // 2 if t.dtype != torch.bool else True)


def new_empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.empty`, poisoned under `POISON_OUTPUTS`."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return _poison(t) if POISON_OUTPUTS else t


def new_empty_like(x: torch.Tensor) -> torch.Tensor:
    """`torch.empty_like`, poisoned under `POISON_OUTPUTS`."""
    t = torch.empty_like(x)
    return _poison(t) if POISON_OUTPUTS else t


def last_contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its last dimension is contiguous (all the Triton launchers need), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Context manager that turns `POISON_OUTPUTS` on (tests)."""
    global POISON_OUTPUTS
    previous, POISON_OUTPUTS = POISON_OUTPUTS, enabled
    try:
        yield
    finally:
        POISON_OUTPUTS = previous
