# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
from .naive import apply_rope_naive, apply_rotary_emb, rope_chunk_into_window_naive

__all__ = ["apply_rope_naive", "apply_rotary_emb", "rope_chunk_into_window_naive"]
