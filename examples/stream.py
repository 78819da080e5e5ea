#!/usr/bin/env python
# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Unbounded (or long) streaming: frames are written as they are generated, with per-chunk timing; the prompt can be
switched from a file of `(chunk, prompt)` lines or interactively from stdin.

    # endless stream into an mp4 (Ctrl-C to stop; the file stays valid)
    python examples/stream.py --model path/or/repo --prompt "A sailing boat at sunset" --output boat.mp4

    # scripted prompt switches: each line is "<chunk> <prompt>", the prompt applies from that chunk on
    python examples/stream.py --model ... --prompt "A calm sea" --switches switches.txt --num-chunks 60

    # interactive: type a new prompt (or "<chunk> <prompt>") and press Enter
    python examples/stream.py --model ... --prompt "A calm sea" --stdin

A switch for chunk 0 replaces `--prompt`. An interactive "<chunk> <prompt>" for a chunk that was already generated
applies from the next chunk, with a warning.

A switches file:

    # chunk  prompt
    10 The same sea under a thunderstorm at night
    25 Dawn breaks over the sea, golden light
"""

import argparse
import os
import queue
import sys
import threading
import time

import numpy as np
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--transformer", default=None, help="converted transformer, when --model is a stock Wan repo")
    parser.add_argument("--prompt", required=True, help="the first prompt")
    parser.add_argument("--switches", default=None, help="file of '<chunk> <prompt>' lines")
    parser.add_argument("--stdin", action="store_true", help="read new prompts from stdin while streaming")
    parser.add_argument("--recache", action="store_true",
                        help="on a switch, re-encode the attention window with the new prompt (LongLive recache)")
    parser.add_argument("--num-chunks", type=int, default=None, help="stop after this many chunks (default: never)")
    parser.add_argument("--output", default="stream.mp4", help="mp4 written frame by frame ('' to write nothing)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["dense", "window", "hybrid"], default=None)
    parser.add_argument("--kernel", choices=["reference", "triton"], default="triton")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--fast", action="store_true",
                        help="the fused VAE decode of whole chunks; on CUDA also CUDA-graph replay and blocks compiled by "
                             "torch.compile (the fastest setting in benchmarks/RESULTS.md; the first chunks compile "
                             "for a minute)")
    return parser.parse_args(argv)


def read_switches(path: str) -> dict[int, str]:
    """`<chunk> <prompt>` lines (blank lines and '#' comments ignored) -> {chunk: prompt}."""
    switches = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            head, _, prompt = line.partition(" ")
            if not head.isdigit() or not prompt.strip():
                raise ValueError(f"{path}:{number}: expected '<chunk> <prompt>', got {line!r}")
            switches[int(head)] = prompt.strip()
    return switches


def take_switches(lines: queue.Queue, switches: dict[int, str], next_index: int) -> str | None:
    """
    Drains the lines typed so far: `<chunk> <prompt>` schedules a switch (into `switches`), any other line switches
    from the next chunk. A scheduled chunk that was already generated (`< next_index`) cannot be changed: its prompt
    applies from the next chunk, with a warning. Returns the prompt of chunk `next_index`, or None to keep the prompt.
    """
    new_prompt = None
    while not lines.empty():
        line = lines.get()
        head, _, rest = line.partition(" ")
        if head.isdigit() and rest.strip():
            if int(head) < next_index:
                print(f"warning: chunk {int(head)} was already generated; '{rest.strip()}' applies from chunk "
                      f"{next_index} instead", flush=True)
                new_prompt = rest.strip()
            else:
                switches[int(head)] = rest.strip()
        else:
            new_prompt = line
    return switches.get(next_index, new_prompt)


def _stdin_reader(lines: queue.Queue):
    for line in sys.stdin:
        if line.strip():
            lines.put(line.strip())


def _load(args):
    from diffusers_hybrid import HybridForcingTransformer3DModel, StreamingHybridPipeline

    dtype = DTYPES[args.dtype]
    kwargs = {"dtype": dtype}  # the pipeline's `torch_dtype` is deprecated in diffusers 0.42
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    overrides = {"attention_mode": args.mode} if args.mode else {}
    if args.transformer is not None:
        kwargs["transformer"] = HybridForcingTransformer3DModel.from_pretrained(args.transformer, torch_dtype=dtype,
                                                                                **overrides)
    elif overrides:
        kwargs["transformer"] = HybridForcingTransformer3DModel.from_pretrained(
            args.model, subfolder="transformer", torch_dtype=dtype, **overrides
        )
    pipe = StreamingHybridPipeline.from_pretrained(args.model, **kwargs)
    pipe.transformer.set_attention_kernel(args.kernel)
    pipe.set_progress_bar_config(disable=True)
    if args.fast:
        pipe.enable_fused_vae_decode()
        if torch.device(args.device).type == "cuda":
            pipe.enable_cuda_graphs()
            # chunk shapes change until the window is full: one compiled graph per shape, then no more recompiles
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            pipe.transformer.compile_repeated_blocks(dynamic=False)
    return pipe.to(args.device)


def main(argv=None):
    args = parse_args(argv)
    switches = read_switches(args.switches) if args.switches else {}
    pipe = _load(args)
    lines: queue.Queue = queue.Queue()
    if args.stdin:
        threading.Thread(target=_stdin_reader, args=(lines,), daemon=True).start()

    writer = None
    if args.output:
        import imageio

        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        writer = imageio.get_writer(args.output, fps=args.fps, codec="libx264", quality=8, macro_block_size=1)

    prompt = args.prompt
    if 0 in switches:  # the prompt of chunk 0 is the one the stream starts with
        prompt = switches.pop(0)
        print(f"-> prompt from chunk 0 (switches file, instead of --prompt): {prompt}", flush=True)
    start = time.perf_counter()
    session = pipe.stream(prompt, height=args.height, width=args.width, num_frames=None,
                          generator=torch.Generator("cpu").manual_seed(args.seed), recache_on_switch=args.recache,
                          max_sequence_length=args.max_sequence_length,
                          vae_frames_per_call=None if args.fast else 1)  # a whole chunk per decoder call: faster
    print(f"streaming '{prompt}' ({pipe.transformer.config.attention_mode}, {pipe.transformer.attention_kernel} "
          f"kernels, {args.width}x{args.height}); Ctrl-C to stop", flush=True)
    frames_written, log = 0, []
    try:
        with session:
            for chunk in session:
                if writer is not None:
                    for frame in chunk.frames[0]:
                        writer.append_data((np.clip(frame, 0, 1) * 255).round().astype(np.uint8))
                frames_written += chunk.num_frames
                fps = chunk.num_frames / chunk.timings["total"]
                print(f"chunk {chunk.index:5d}  frames {chunk.frame_start:6d}+{chunk.num_frames:<2d} "
                      f"{chunk.timings['total'] * 1000:7.1f} ms  {fps:6.1f} FPS  "
                      f"[{chunk.prompt[:60] if isinstance(chunk.prompt, str) else chunk.prompt}]", flush=True)
                log.append((chunk.num_frames, chunk.timings["total"]))

                next_index = chunk.index + 1
                new_prompt = take_switches(lines, switches, next_index)
                if new_prompt:
                    session.set_prompt(new_prompt)
                    print(f"-> prompt from chunk {next_index}: {new_prompt}", flush=True)
                if args.num_chunks is not None and next_index >= args.num_chunks:
                    break
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        if writer is not None:
            writer.close()
    total = time.perf_counter() - start
    steady = log[1:]
    if steady:
        frames, seconds = sum(n for n, _ in steady), sum(t for _, t in steady)
        print(f"{len(log)} chunks, {frames_written} frames in {total:.1f} s; after the first chunk "
              f"{seconds / len(steady) * 1000:.1f} ms per chunk = {frames / seconds:.2f} FPS; first chunk "
              f"{log[0][1] * 1000:.1f} ms", flush=True)
    return frames_written


if __name__ == "__main__":
    main()
