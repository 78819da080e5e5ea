# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
from .streaming_vae import StreamingWanDecoder

__all__ = ["StreamingWanDecoder"]
