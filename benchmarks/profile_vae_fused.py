# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Profile of one steady-state fused decode chunk (eager, Triton norm, channels-last, sub-pixel), kernels grouped by
input shape, to see where the non-convolution time goes. Needs CUDA.

    python benchmarks/profile_vae_fused.py
"""
import torch
from diffusers import AutoencoderKLWan
from torch.profiler import ProfilerActivity, profile

from diffusers_hybrid.video.streaming_vae import StreamingWanDecoder

torch.manual_seed(0)
vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval()
decoder = StreamingWanDecoder(vae, frames_per_call=None, fused=True)
latents = [torch.randn(1, 16, 3, 60, 104, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
with torch.no_grad():
    for z in latents[:3]:
        decoder.decode(z)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        decoder.decode(latents[3])
        torch.cuda.synchronize()
print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=40,
                                                          max_shapes_column_width=90))
