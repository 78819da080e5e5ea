#!/usr/bin/env python
# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Prompt -> mp4 with a Hybrid Forcing pipeline; prints the time to first frame and the frame rate.

    python examples/generate.py --model path/or/repo --prompt "A red panda in a bamboo forest" --output panda.mp4

`--model` is a folder / repo written by `StreamingHybridPipeline.save_pretrained`, or a stock Wan2.1 Diffusers repo
together with `--transformer path/to/converted/transformer`.
"""

import argparse
import time

import numpy as np
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--transformer", default=None,
                        help="converted HybridForcingTransformer3DModel folder, when --model is a stock Wan repo")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--output", default="output.mp4")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=81, help="1 + 4k frames in whole chunks: 9, 21, ..., 81")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["dense", "window", "hybrid"], default=None,
                        help="attention mode (default: the checkpoint's)")
    parser.add_argument("--kernel", choices=["reference", "triton"], default="triton",
                        help="self-attention kernels (triton falls back to reference without a GPU)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fps", type=int, default=16, help="frame rate of the written video")
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="needed for Hub repos (local folders written by save_pretrained load without it)")
    parser.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (saves GPU memory)")
    return parser.parse_args(argv)


def load_pipeline(args):
    from diffusers_hybrid import HybridForcingTransformer3DModel, StreamingHybridPipeline

    dtype = DTYPES[args.dtype]
    kwargs = {"dtype": dtype}  # the pipeline's `torch_dtype` is deprecated in diffusers 0.42
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    overrides = {"attention_mode": args.mode} if args.mode else {}
    if args.transformer is not None:
        kwargs["transformer"] = HybridForcingTransformer3DModel.from_pretrained(
            args.transformer, torch_dtype=dtype, **overrides
        )
    elif overrides:
        kwargs["transformer"] = HybridForcingTransformer3DModel.from_pretrained(
            args.model, subfolder="transformer", torch_dtype=dtype, **overrides
        )
    pipe = StreamingHybridPipeline.from_pretrained(args.model, **kwargs)
    pipe.transformer.set_attention_kernel(args.kernel)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=args.device)
    else:
        pipe.to(args.device)
    return pipe


def main(argv=None):
    # not diffusers' `export_to_video`: it resizes frames to multiples of 16; this writes them at their true size
    from diffusers_hybrid.utils.video_io import write_video

    args = parse_args(argv)
    pipe = load_pipeline(args)
    print(f"model: {args.model}  mode: {pipe.transformer.config.attention_mode}  "
          f"kernel: {pipe.transformer.attention_kernel}  device: {args.device}  dtype: {args.dtype}")

    generator = torch.Generator("cpu").manual_seed(args.seed)
    start = time.perf_counter()
    session = pipe.stream(args.prompt, height=args.height, width=args.width, num_frames=args.num_frames,
                          generator=generator, max_sequence_length=args.max_sequence_length)
    text_time = time.perf_counter() - start
    chunks, first_frame = [], None
    with session:
        for chunk in session:
            if first_frame is None:
                first_frame = time.perf_counter() - start
            chunks.append(chunk)
            print(f"chunk {chunk.index:3d}: frames {chunk.frame_start:4d}-{chunk.frame_start + chunk.num_frames - 1:4d}"
                  f"  {chunk.timings['total'] * 1000:7.1f} ms")
    total = time.perf_counter() - start
    video = np.concatenate([c.frames for c in chunks], axis=1)[0]
    write_video(video, args.output, fps=args.fps)  # creates the folder

    frames = video.shape[0]
    generation = sum(c.timings["total"] for c in chunks)
    steady = chunks[1:]
    steady_fps = sum(c.num_frames for c in steady) / sum(c.timings["total"] for c in steady) if steady else float("nan")
    print(f"wrote {args.output}: {frames} frames {args.width}x{args.height}")
    print(f"time to first frame: {first_frame:.3f} s (text encoding {text_time:.3f} s included)")
    print(f"FPS: {frames / generation:.2f} over the whole video, {steady_fps:.2f} after the first chunk "
          f"(text encoding excluded); wall time {total:.2f} s")
    return video


if __name__ == "__main__":
    main()
