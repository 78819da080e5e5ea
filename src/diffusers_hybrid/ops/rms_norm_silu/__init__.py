# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
from .naive import rms_norm_silu_with_cache_naive

__all__ = ["rms_norm_silu_with_cache_naive"]
