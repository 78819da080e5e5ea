# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
from .naive import (
    block_mask_from_indices,
    block_sparse_attention_naive,
    check_pooled_key_prefix,
    mean_pool_blocks,
    num_selected_blocks,
    pool_key_blocks_naive,
    select_key_blocks_naive,
)

__all__ = [
    "block_mask_from_indices",
    "block_sparse_attention_naive",
    "check_pooled_key_prefix",
    "mean_pool_blocks",
    "num_selected_blocks",
    "pool_key_blocks_naive",
    "select_key_blocks_naive",
]
