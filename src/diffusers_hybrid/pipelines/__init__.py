# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
from .pipeline_streaming_hybrid import (
    StreamingHybridChunk,
    StreamingHybridPipeline,
    StreamingHybridPipelineOutput,
    StreamingHybridSession,
    few_step_schedule,
)

__all__ = [
    "StreamingHybridChunk",
    "StreamingHybridPipeline",
    "StreamingHybridPipelineOutput",
    "StreamingHybridSession",
    "few_step_schedule",
]
