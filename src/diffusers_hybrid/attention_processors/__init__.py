# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
from .hybrid_attention import (
    FullSequenceChunk,
    HybridAttentionContext,
    HybridForcingAttnProcessor,
    HybridForcingCrossAttnProcessor,
)

__all__ = [
    "FullSequenceChunk",
    "HybridAttentionContext",
    "HybridForcingAttnProcessor",
    "HybridForcingCrossAttnProcessor",
]
