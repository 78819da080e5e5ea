# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Wan VAE streaming decode at 832x480 (Wan2.1 VAE configuration, random weights, bf16, a whole 3-latent-frame chunk
per decoder call, 5 chunks timed after 2 warm-up chunks): the default against `channels_last_3d` weights and inputs
and against a `torch.compile`d decoder; outputs compared with the default's. Needs CUDA.

    python benchmarks/bench_vae_variants.py
"""

import time

import torch
from diffusers import AutoencoderKLWan

from diffusers_hybrid.video.streaming_vae import StreamingWanDecoder

WARMUP_CHUNKS, TIMED_CHUNKS = 2, 5


def _run(vae, latents, memory_format=None):
    """Milliseconds per decoded video frame over the timed chunks, and every chunk's frames (float32)."""
    decoder = StreamingWanDecoder(vae, frames_per_call=None)
    outputs, frames, start = [], 0, None
    for index, z in enumerate(latents):
        if memory_format is not None:
            z = z.contiguous(memory_format=memory_format)
        if index == WARMUP_CHUNKS:
            torch.cuda.synchronize()
            start = time.perf_counter()
        out = decoder.decode(z)
        outputs.append(out.float())
        frames += out.shape[2] if index >= WARMUP_CHUNKS else 0
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / frames * 1e3, outputs


def _channels_last(vae):
    vae.to(memory_format=torch.channels_last_3d)


def _compiled(vae):
    vae.to(memory_format=torch.contiguous_format)
    vae.decoder = torch.compile(vae.decoder, dynamic=False)


@torch.no_grad()
def main():
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval()
    latents = [torch.randn(1, 16, 3, 60, 104, device="cuda", dtype=torch.bfloat16)
               for _ in range(WARMUP_CHUNKS + TIMED_CHUNKS)]
    base_ms, base = _run(vae, latents)
    rows = [("default", base_ms, 0.0)]
    print(rows[-1], flush=True)
    for label, prepare, memory_format in (("channels_last_3d", _channels_last, torch.channels_last_3d),
                                          ("compiled decoder", _compiled, None)):
        try:
            start = time.time()
            prepare(vae)
            ms, outputs = _run(vae, latents, memory_format)
        except Exception as error:  # a variant that does not run is a result too
            print(label, "FAILED", repr(error)[:300], flush=True)
            continue
        diff = max((a - b).abs().max().item() for a, b in zip(outputs, base))
        rows.append((label, ms, diff))
        print(rows[-1], f"({time.time() - start:.0f} s)", flush=True)
    print("| variant | ms per frame | max abs diff vs default |")
    for label, ms, diff in rows:
        print(f"| {label} | {ms:.2f} | {diff:.3g} |")


if __name__ == "__main__":
    main()
