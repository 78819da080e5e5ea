# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The block-sparse op with its *built-in* launch defaults (no overrides), timed as CUDA graphs in one run against cuDNN
dense attention over the same window, with and without the cached pooled-key prefix and with the fused memory
read-out (checked against attention + a float32 read-out; the attention itself is checked by the gpu-marked tests).
Wan2.1-1.3B at 832x480: 12 heads x 128, one 3-frame chunk (4,680 queries) against sink + window (14,040 keys).

    BENCH_COMMIT=$(git rev-parse --short HEAD) OUT=DIR python3 benchmarks/verify_attention_defaults.py
"""

import json
import os

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusers_hybrid.ops.block_sparse_attention import triton_kernel as bsa
from diffusers_hybrid.ops.linear_memory.naive import linear_memory_read_naive

torch.manual_seed(0)
B, H, D, BS, RATIO = 1, 12, 128, 64, 0.2
# Wan2.1: 8x VAE downsampling, 2x2 patches; chunks of 3 latent frames against 3 sink + 6 local frames
TOKENS_PER_FRAME = (480 // 8 // 2) * (832 // 8 // 2)
CHUNK_FRAMES, WINDOW_FRAMES = 3, 3 + 6
Lq, Lk = CHUNK_FRAMES * TOKENS_PER_FRAME, WINDOW_FRAMES * TOKENS_PER_FRAME
dev, dt = "cuda", torch.bfloat16
q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dt) for L in (Lq, Lk, Lk))
q_raw = torch.randn_like(q)
kv = torch.randn(B, H, D, D, device=dev) * 0.05
km = torch.randn(B, H, D, device=dev).abs() + 0.5
w = torch.randn(D, D, device=dev, dtype=dt) * 0.05
prefix = bsa.pool_key_blocks_triton(k[:, : (Lk - Lq) // BS * BS], BS, "heads")
g = lambda f: triton.testing.do_bench_cudagraph(f, rep=200)
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "commit": os.environ.get("BENCH_COMMIT")}
with torch.no_grad():
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        res["cudnn_dense_ms"] = g(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    res["sparse_default_ms"] = g(lambda: bsa.block_sparse_attention_triton(q, k, v, topk_ratio=RATIO, block_size=BS))
    res["sparse_default_prefix_ms"] = g(lambda: bsa.block_sparse_attention_triton(
        q, k, v, topk_ratio=RATIO, block_size=BS, pooled_key_prefix=prefix))
    res["sparse_memory_fused_prefix_ms"] = g(lambda: bsa.block_sparse_attention_with_memory_triton(
        q, k, v, q_raw, kv, km, proj_weight=w, topk_ratio=RATIO, block_size=BS, pooled_key_prefix=prefix))
    # the fused read-out vs attention + separate float32 read-out (attention correctness: the gpu-marked tests)
    fused = bsa.block_sparse_attention_with_memory_triton(q, k, v, q_raw, kv, km, proj_weight=w, topk_ratio=RATIO,
                                                          block_size=BS, pooled_key_prefix=prefix)
    sep = bsa.block_sparse_attention_triton(q, k, v, topk_ratio=RATIO, block_size=BS, pooled_key_prefix=prefix)
    mem = linear_memory_read_naive(q.float(), q_raw.float(), kv, km)
    ref2 = sep.float() + F.linear(mem, w.float())
    res["rel_err_fused_vs_separate"] = float((fused.float() - ref2).norm() / ref2.norm())
res["speedup_vs_cudnn_prefix"] = res["cudnn_dense_ms"] / res["sparse_default_prefix_ms"]
res["speedup_vs_cudnn_no_prefix"] = res["cudnn_dense_ms"] / res["sparse_default_ms"]
res["memory_fused_overhead_fraction"] = res["sparse_memory_fused_prefix_ms"] / res["sparse_default_prefix_ms"] - 1
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "verify_defaults.json"), "w"), indent=1)
