# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Hybrid Forcing for Hugging Face diffusers: causal Wan2.1 with hybrid (sparse window + linear memory) attention."""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

# Public names -> module that defines them. Imported lazily so that `import diffusers_hybrid` stays cheap and works on
# CPU-only machines (Triton is only imported by the kernels that need it).
_import_structure = {
    "models.transformer_hybrid_forcing": ["HybridForcingTransformer3DModel", "HybridForcingTransformerOutput"],
    "cache": ["HybridCache", "HybridLayerCache"],
    "attention_processors": ["HybridForcingAttnProcessor", "HybridForcingCrossAttnProcessor"],
    "pipelines.pipeline_streaming_hybrid": [
        "StreamingHybridPipeline",
        "StreamingHybridPipelineOutput",
        "StreamingHybridSession",
        "StreamingHybridChunk",
    ],
    "video.streaming_vae": ["StreamingWanDecoder"],
}
_name_to_module = {name: module for module, names in _import_structure.items() for name in names}
__all__ = sorted(_name_to_module) + ["__version__"]


def __getattr__(name):
    if name in _name_to_module:
        module = importlib.import_module(f".{_name_to_module[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover  # the names of __all__, for type checkers (loaded lazily above)
    from .attention_processors import HybridForcingAttnProcessor, HybridForcingCrossAttnProcessor  # noqa: F401
    from .cache import HybridCache, HybridLayerCache  # noqa: F401
    from .models.transformer_hybrid_forcing import (  # noqa: F401
        HybridForcingTransformer3DModel,
        HybridForcingTransformerOutput,
    )
    from .pipelines.pipeline_streaming_hybrid import (  # noqa: F401
        StreamingHybridChunk,
        StreamingHybridPipeline,
        StreamingHybridPipelineOutput,
        StreamingHybridSession,
    )
    from .video.streaming_vae import StreamingWanDecoder  # noqa: F401
