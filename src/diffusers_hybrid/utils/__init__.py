# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
from .hub_utils import is_known_shim_layout, make_model_card, write_remote_code_shims
from .torch_utils import cast_keeping_fp32_modules

__all__ = ["cast_keeping_fp32_modules", "is_known_shim_layout", "make_model_card", "write_remote_code_shims"]
