# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
from .hub_utils import is_known_shim_layout, make_model_card, write_remote_code_shims

__all__ = ["is_known_shim_layout", "make_model_card", "write_remote_code_shims"]
