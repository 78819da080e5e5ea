# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Wan VAE streaming decode at 832x480 (Wan2.1 VAE configuration, random weights, bf16, a whole 3-latent-frame chunk
per decoder call): diffusers' decoder path against `StreamingWanDecoder(fused=True)` with its normalisation in PyTorch,
or as the Triton kernel, channels-first or channels-last, eager or replayed from a CUDA graph, the upsampling as
diffusers does it or in sub-pixel form. Every variant decodes the same latent chunks from a fresh
stream; the first chunks are warm-up (the stream's first chunk, the first steady-state call, the graph capture), the
rest are timed; outputs are compared with the diffusers path's and with a float32 decode. Needs CUDA.

    python benchmarks/bench_vae_variants.py [--json OUT.json] [--profile]
"""

import argparse
import json
import os
import time

import torch
from diffusers import AutoencoderKLWan

from diffusers_hybrid.video import streaming_vae
from diffusers_hybrid.video.streaming_vae import StreamingWanDecoder

WARMUP_CHUNKS, TIMED_CHUNKS = 3, 6
LATENT_SHAPE = (1, 16, 3, 60, 104)  # one chunk of 3 latent frames at 832x480


def _decoder(vae, variant):
    streaming_vae.SUBPIXEL_UPSAMPLING = not variant.get("no_subpixel", False)
    decoder = StreamingWanDecoder(
        vae, frames_per_call=None, fused=variant.get("fused", False), norm_kernel=variant.get("norm"),
        memory_format=torch.channels_last_3d if variant.get("channels_last") else torch.contiguous_format,
    )
    if variant.get("graph"):
        decoder.enable_cuda_graph()
    return decoder


def _run(vae, latents, variant, profile=False):
    """ms per decoded frame over the timed chunks, every chunk's frames (float32), peak memory (GiB), profile table."""
    decoder = _decoder(vae, variant)
    outputs, frames, start = [], 0, None
    torch.cuda.reset_peak_memory_stats()
    for index, z in enumerate(latents):
        if index == WARMUP_CHUNKS:
            torch.cuda.synchronize()
            start = time.perf_counter()
        out = decoder.decode(z)
        outputs.append(out.float())
        frames += out.shape[2] if index >= WARMUP_CHUNKS else 0
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / frames * 1e3
    table = None
    if profile:  # one more chunk under the profiler
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder.decode(latents[-1])
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    return ms, outputs, torch.cuda.max_memory_allocated() / 2**30, decoder.graph_replays, table


VARIANTS = [
    ("diffusers path (cudnn.benchmark off)", dict(cudnn_benchmark=False)),
    ("diffusers path", dict()),
    ("fused, PyTorch norm", dict(fused=True, norm="reference")),
    ("fused, PyTorch norm, channels_last_3d", dict(fused=True, norm="reference", channels_last=True)),
    ("fused, Triton norm", dict(fused=True, norm="triton")),
    ("fused, Triton norm, channels_last_3d", dict(fused=True, norm="triton", channels_last=True)),
    ("fused, Triton norm, CUDA graph, channels_last_3d, upsample + 3x3 conv", dict(
        fused=True, norm="triton", graph=True, channels_last=True, no_subpixel=True)),
    ("fused, Triton norm, CUDA graph, channels_last_3d, sub-pixel (pipeline default)", dict(
        fused=True, norm="triton", graph=True, channels_last=True)),
    ("the same, cudnn.benchmark off globally (the fused path autotunes its own convolutions)", dict(
        fused=True, norm="triton", graph=True, channels_last=True, cudnn_benchmark=False)),
]


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the first and best variant")
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, commit {os.environ.get('BENCH_COMMIT')}",
          flush=True)
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to("cuda").eval()
    for name, p in vae.named_parameters():  # random gammas and biases: rounding differences are not hidden by 1s and 0s
        if name.endswith("gamma"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.05 * torch.randn_like(p))
    latents = [torch.randn(LATENT_SHAPE, device="cuda") for _ in range(WARMUP_CHUNKS + TIMED_CHUNKS)]
    reference = _run(vae, latents, {})[1]  # the float32 diffusers path
    vae = vae.to(torch.bfloat16)
    latents = [z.bfloat16() for z in latents]

    def rel(outputs):
        return max(((a - r).norm() / r.norm()).item() for a, r in zip(outputs, reference))

    rows, base = [], None
    for label, variant in VARIANTS:
        torch.backends.cudnn.benchmark = variant.get("cudnn_benchmark", True)
        try:
            start = time.time()
            ms, outputs, peak, replays, table = _run(vae, latents, variant, profile=args.profile and not variant)
        except Exception as error:  # a variant that does not run is a result too
            print(label, "FAILED", repr(error)[:400], flush=True)
            rows.append(dict(variant=label, failed=repr(error)[:400]))
            continue
        if base is None:
            base = outputs
        diff = max((a - b).abs().max().item() for a, b in zip(outputs, base))
        rows.append(dict(variant=label, ms_per_frame=ms, max_abs_diff_vs_diffusers=diff, rel_err_vs_fp32=rel(outputs),
                         peak_gib=peak, graph_replays=replays, seconds=time.time() - start))
        print(rows[-1], flush=True)
        if table:
            print(table, flush=True)
        del outputs
    if args.profile:
        best = min((r for r in rows if "ms_per_frame" in r), key=lambda r: r["ms_per_frame"])
        variant = dict(VARIANTS)[best["variant"]]
        print("profile of", best["variant"])
        print(_run(vae, latents, variant, profile=True)[4], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           commit=os.environ.get("BENCH_COMMIT"), rows=rows), f, indent=1)
    print("| variant | ms per frame | max abs diff vs diffusers path | rel. error vs float32 | peak GiB | replays |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['variant']} | failed: {r['failed'][:80]} | | | | |")
        else:
            print(f"| {r['variant']} | {r['ms_per_frame']:.2f} | {r['max_abs_diff_vs_diffusers']:.3g} | "
                  f"{r['rel_err_vs_fp32']:.3g} | {r['peak_gib']:.2f} | {r['graph_replays']} |")


if __name__ == "__main__":
    main()
