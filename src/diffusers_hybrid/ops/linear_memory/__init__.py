# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
from .naive import linear_memory_absorb_naive, linear_memory_read_naive

__all__ = ["linear_memory_absorb_naive", "linear_memory_read_naive"]
