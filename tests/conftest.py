# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Wan-shaped but tiny: 2 heads of 12 channels (head_dim 12 splits 4/4/4 into t/h/w RoPE), 2 layers.
TINY_WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=64,
)
# Window/RoPE sizes scaled down with the model so that tests reach the steady state in a few chunks.
TINY_HYBRID_CONFIG = dict(
    num_frame_per_block=3,
    sink_frames=3,
    local_attn_frames=6,
    dense_max_frames=9,
    max_rope_frames=12,
    sparse_block_size=8,
    sparse_topk_ratio=0.5,
)


@pytest.fixture
def tiny_wan_config():
    return dict(TINY_WAN_CONFIG)


@pytest.fixture
def tiny_hybrid_config():
    return dict(TINY_HYBRID_CONFIG)
