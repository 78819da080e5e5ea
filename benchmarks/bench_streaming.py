# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""End-to-end streaming benchmark of StreamingHybridPipeline at real scale (needs a CUDA GPU).

Builds the Wan2.1-T2V-1.3B transformer configuration (`HybridForcingTransformer3DModel()` defaults) and the Wan2.1 VAE
configuration (`AutoencoderKLWan()` defaults) with random weights -- no download; the compute does not depend on the
weights -- in bf16, and streams 832x480 video with the official 4-step schedule plus one cache-write pass per chunk,
batch 1, from precomputed (random) text embeddings: text encoding is excluded, as DESIGN.md's FPS definition says.

Per attention mode (dense, window, hybrid) and kernel (reference, triton), in one process:

- steady-state FPS: decoded 832x480 frames (as `output_type="pt"` tensors on the GPU) per second of wall time over
  chunks >= `--steady-from`, VAE decode included (DESIGN.md "Speed");
- transformer-only FPS: the same stream with `output_type="latent"` (4 denoising passes + the cache-write pass per
  chunk, 12 video frames' worth of latents per chunk);
- time to first frame: from `pipe.stream(...)` to the first chunk's decoded frames, after a warm-up session (so
  Triton compilation / autotuning and cuDNN autotuning are excluded);
- per-component time per chunk (a separate profiled session that synchronises between parts): the 4 denoising
  passes, the cache-write pass, the VAE decode (+ post-processing);
- peak GPU memory (`torch.cuda.max_memory_allocated`) over each stream, and over a long stream (`--long-chunks`,
  default 200) for the configurations in `--long`.

Also: the Wan VAE's streaming decode alone, one latent frame per decoder call (bit-exact with `AutoencoderKLWan.decode`)
versus a whole chunk per call, and a check that `enable_model_cpu_offload` gives the same frames on CUDA.

    python benchmarks/bench_streaming.py [--quick] [--out DIR] [--dry-run]

Writes `bench_streaming.json` and `bench_streaming.md` (a table) to `--out` (default `$OUT` or `.`).
`--dry-run` runs the whole script on CPU with tiny models (checks the script, measures nothing meaningful).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bench_common import commit, log  # noqa: E402
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler  # noqa: E402

from diffusers_hybrid import HybridForcingTransformer3DModel, StreamingHybridPipeline  # noqa: E402
from diffusers_hybrid import cache as cache_module  # noqa: E402
from diffusers_hybrid.video.streaming_vae import StreamingWanDecoder  # noqa: E402

RESULTS: dict = {"runs": [], "errors": []}


def environment(device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    import diffusers

    env["diffusers"] = diffusers.__version__
    return env


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cast_like_from_pretrained(model, dtype):
    """`model.to(dtype)`, keeping `_keep_in_fp32_modules` in float32 as `from_pretrained(torch_dtype=...)` does."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point():
            target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
            tensor.data = tensor.data.to(target)
    return model


def build(args, device, dtype):
    if args.dry_run:
        transformer_config = dict(num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                                  text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
                                  sparse_block_size=8)
        vae_config = dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        text_shape = (1, 16, 16)
    else:
        transformer_config, vae_config, text_shape = {}, {}, (1, 512, 4096)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = HybridForcingTransformer3DModel(**transformer_config)
        vae = AutoencoderKLWan(**vae_config)
    transformer = cast_like_from_pretrained(transformer, dtype).eval()
    vae = cast_like_from_pretrained(vae, dtype).eval()
    with torch.no_grad():  # a non-zero memory read-out, so the hybrid branch is not trivially zero
        for block in transformer.blocks:
            block.attn1.linear_proj.weight.normal_(0, 0.02)
    pipe = StreamingHybridPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds = torch.randn(text_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    params = sum(p.numel() for p in transformer.parameters())
    log(f"transformer: {params / 1e9:.3f} B parameters, {transformer.config.num_layers} layers; "
        f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters; dtype {dtype}")
    return pipe, prompt_embeds


def open_stream(pipe, prompt_embeds, args, output_type="pt", profile=False, seed=0):
    return pipe.stream(prompt_embeds=prompt_embeds, height=args.height, width=args.width, num_frames=None,
                       output_type=output_type, generator=torch.Generator().manual_seed(seed), profile=profile,
                       vae_frames_per_call=args.vae_frames_per_call)


def run_session(pipe, prompt_embeds, args, device, num_chunks, output_type="pt", profile=False,
                memory_at=()) -> dict:
    """Streams `num_chunks` chunks; returns per-chunk (frames, seconds, timings) and memory figures."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    session = open_stream(pipe, prompt_embeds, args, output_type, profile)
    open_time = time.perf_counter() - start
    chunks, memory = [], {}
    with session:
        for chunk in session:
            frames = chunk.num_frames
            chunks.append({"frames": frames, "total": chunk.timings["total"],
                           **{k: chunk.timings[k] for k in ("denoise", "cache_write", "decode") if k in chunk.timings}})
            if chunk.index == 0:
                first = time.perf_counter() - start
            if device.type == "cuda" and chunk.index + 1 in memory_at:
                memory[chunk.index + 1] = torch.cuda.memory_allocated()
            if chunk.index + 1 >= num_chunks:
                break
        state_bytes = session.nbytes()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {"open": open_time, "first_frame": first, "chunks": chunks, "peak": peak, "memory_at": memory,
            "state_bytes": state_bytes}


def steady(chunks, start, key="total"):
    part = chunks[start:]
    return sum(c["frames"] for c in part) / sum(c[key] for c in part), sum(c[key] for c in part) / len(part)


_APPLY_ROPE = cache_module.apply_rope


def _reference_rope(*args, kernel="reference", **kwargs):
    return _APPLY_ROPE(*args, kernel="reference", **kwargs)


def configure(pipe, mode, kernel):
    """`kernel` is "reference" or "triton", optionally followed by "+graphs" (denoising passes replayed from a CUDA
    graph) and "+torch-rope" (the cached passes' RoPE step in plain PyTorch, the selection pooling on its own: the
    processor's `fuse_rope=False`) and "+compile" (the blocks compiled by inductor, `compile_repeated_blocks`; once
    compiled they stay compiled, so list these rows last) and "+fusedvae" (`enable_fused_vae_decode`: the
    fused decode with the Triton normalisation, channels-last, replayed from a graph with "+graphs") and "+fuseqkv"
    (`fuse_qkv_projections`: one Q/K/V matmul per self-attention) and "+torch-commit-rope" (the commit's RoPE of the
    cached keys through the plain-PyTorch reference instead of the Triton `apply_rope` kernel)."""
    base, *extras = kernel.split("+")
    unknown = set(extras) - {"graphs", "torch-rope", "compile", "fusedvae", "fuseqkv", "torch-commit-rope"}
    if unknown:
        raise ValueError(f"unknown kernel options {sorted(unknown)} in {kernel!r}")
    transformer = pipe.transformer
    compiled = getattr(pipe, "_bench_compiled", False)
    if compiled and "compile" not in extras:
        raise ValueError(f"{kernel!r} after a '+compile' row: the blocks are compiled; list '+compile' rows last")
    if "compile" in extras and not compiled:
        # every block shares one compiled graph per input signature; chunk shapes vary until the window is full
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        transformer.compile_repeated_blocks(dynamic=False)
        pipe._bench_compiled = True
    if "fuseqkv" in extras:
        transformer.fuse_qkv_projections()
    else:
        transformer.unfuse_qkv_projections()
    transformer.set_attention_mode(mode)
    transformer.set_attention_kernel(base)
    if transformer.attention_kernel != base:
        raise RuntimeError(f"kernel {base!r} is not available here (got {transformer.attention_kernel!r})")
    for block in transformer.blocks:
        block.attn1.processor.fuse_rope = "torch-rope" not in extras
    cache_module.apply_rope = _reference_rope if "torch-commit-rope" in extras else _APPLY_ROPE
    pipe.enable_cuda_graphs("graphs" in extras)
    pipe.enable_fused_vae_decode("fusedvae" in extras)


@torch.no_grad()
def check_graphs(pipe, prompt_embeds, args, device, mode="hybrid", chunks=10,
                 kernels=("triton", "triton+graphs")) -> dict:
    """Latents of a session with the second kernel option (default: CUDA-graph replay) vs the first (default: eager),
    same seed."""
    outputs = {}
    for kernel in kernels:
        configure(pipe, mode, kernel)
        session = open_stream(pipe, prompt_embeds, args, output_type="latent")
        with session:
            outputs[kernel] = [chunk.latents.float().clone() for _, chunk in zip(range(chunks), session)]
            replays = {mode: graph.replays for mode, graph in session._graphs.items()}
    first, second = (outputs[k] for k in kernels)
    diffs = [(a - b).abs().max().item() for a, b in zip(first, second)]
    scale = max(a.abs().max().item() for a in first)
    result = {"mode": mode, "kernels": list(kernels), "chunks": chunks, "max_abs_diff_per_chunk": diffs,
              "max_abs_latent": scale, "graph_replays": replays}
    log(f"[check {mode}] max |{kernels[0]} - {kernels[1]}| per chunk {diffs} (max |latent| {scale:.3g}), "
        f"{replays} replays")
    return result


def bench_config(pipe, prompt_embeds, args, device, mode, kernel) -> dict:
    configure(pipe, mode, kernel)
    reference = kernel == "reference"
    warmup = args.warmup_ref if reference else args.warmup
    n_main = args.chunks_ref if reference else args.chunks
    s0 = args.steady_from
    result = {"mode": mode, "kernel": kernel}
    t0 = time.perf_counter()

    run_session(pipe, prompt_embeds, args, device, warmup)  # compile / autotune every chunk shape
    main = run_session(pipe, prompt_embeds, args, device, n_main, profile=reference)
    fps, ms = steady(main["chunks"], s0)
    result.update(fps=fps, ms_per_chunk=ms * 1e3, ttff_s=main["first_frame"], open_s=main["open"],
                  first_chunk_ms=main["chunks"][0]["total"] * 1e3, peak_gib=main["peak"] / 2**30,
                  chunks=len(main["chunks"]), cache_mib=main["state_bytes"]["cache"] / 2**20,
                  vae_cache_mib=main["state_bytes"]["vae"] / 2**20)
    if reference:  # slow: per-component times come from the same (profiled) session
        profiled = main
    else:
        profiled = run_session(pipe, prompt_embeds, args, device, args.chunks_profile, profile=True)
    part = profiled["chunks"][s0:]
    for key in ("denoise", "cache_write", "decode"):
        result[f"{key}_ms"] = sum(c[key] for c in part) / len(part) * 1e3
    if reference:
        tf = [dict(c, total=c["denoise"] + c["cache_write"]) for c in main["chunks"]]
        result["transformer_fps"], tf_ms = steady(tf, s0)
        result["transformer_fps_source"] = "denoise + cache_write of the profiled session"
    else:
        latent = run_session(pipe, prompt_embeds, args, device, args.chunks_latent, output_type="latent")
        result["transformer_fps"], tf_ms = steady(latent["chunks"], s0)
        result["transformer_fps_source"] = "output_type='latent' session"
    result["transformer_ms_per_chunk"] = tf_ms * 1e3
    result["wall_s"] = time.perf_counter() - t0
    log(f"[{mode:6s} {kernel:9s}] {fps:6.2f} FPS e2e ({ms * 1e3:7.1f} ms/chunk), transformer-only "
        f"{result['transformer_fps']:6.2f} FPS, TTFF {result['ttff_s'] * 1e3:7.1f} ms, denoise "
        f"{result['denoise_ms']:7.1f} + write {result['cache_write_ms']:6.1f} + decode {result['decode_ms']:6.1f} ms, "
        f"peak {result['peak_gib']:.2f} GiB ({result['wall_s']:.0f} s)")
    return result


def bench_long(pipe, prompt_embeds, args, device, mode, kernel) -> dict:
    configure(pipe, mode, kernel)
    marks = (10, args.long_chunks // 2, args.long_chunks)
    run = run_session(pipe, prompt_embeds, args, device, args.long_chunks, memory_at=marks)
    fps, ms = steady(run["chunks"], args.steady_from)
    times = [c["total"] for c in run["chunks"][args.steady_from:]]
    result = {"mode": mode, "kernel": kernel, "chunks": len(run["chunks"]),
              "frames": sum(c["frames"] for c in run["chunks"]), "fps": fps, "ms_per_chunk": ms * 1e3,
              "ms_per_chunk_min": min(times) * 1e3, "ms_per_chunk_max": max(times) * 1e3,
              "peak_gib": run["peak"] / 2**30,
              "allocated_gib_at": {str(k): v / 2**30 for k, v in run["memory_at"].items()},
              "cache_mib": run["state_bytes"]["cache"] / 2**20, "vae_cache_mib": run["state_bytes"]["vae"] / 2**20}
    log(f"[long {mode} {kernel}] {result['chunks']} chunks / {result['frames']} frames: {fps:.2f} FPS, "
        f"peak {result['peak_gib']:.2f} GiB, allocated {result['allocated_gib_at']}")
    return result


@torch.no_grad()
def bench_vae(pipe, args, device, dtype) -> dict:
    """Streaming decode alone: ms per video frame, per-frame calls vs whole-chunk calls, on 8 chunks."""
    vae = pipe.vae
    h, w = args.height // 8, args.width // 8
    latents = [torch.randn(1, 16, 3, h, w, device=device, dtype=dtype) for _ in range(8)]
    out = {}
    for label, per_call in (("per_frame", 1), ("per_chunk", None)):
        decoder = StreamingWanDecoder(vae, frames_per_call=per_call)
        decoder.decode(latents[0])
        decoder.decode(latents[1])  # warm-up (cuDNN autotuning)
        sync(device)
        start = time.perf_counter()
        frames = 0
        for z in latents[2:]:
            frames += decoder.decode(z).shape[2]
        sync(device)
        out[f"{label}_ms_per_frame"] = (time.perf_counter() - start) / frames * 1e3
        out[f"{label}_cache_mib"] = decoder.nbytes() / 2**20
    log(f"[vae] streaming decode {out['per_frame_ms_per_frame']:.2f} ms/frame (1 latent frame per call), "
        f"{out['per_chunk_ms_per_frame']:.2f} ms/frame (whole chunk per call)")
    return out


@torch.no_grad()
def check_offload(device) -> dict:
    """enable_model_cpu_offload gives the frames of the plain pipeline (tiny models, CUDA)."""
    torch.manual_seed(0)
    transformer = HybridForcingTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                                  out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32,
                                                  num_layers=2, rope_max_seq_len=64, sparse_block_size=8)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    pipe = StreamingHybridPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 16, 16)
    kwargs = dict(prompt_embeds=embeds, height=32, width=32, num_frames=33)
    pipe.to(device)
    plain = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.to("cpu")
    pipe.enable_model_cpu_offload(device=device)
    offloaded = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    where = {name: str(next(getattr(pipe, name).parameters()).device) for name in ("transformer", "vae")}
    diff = float(abs(plain - offloaded).max())
    log(f"[offload] max |plain - offloaded| = {diff:.3g}; after the call: {where}")
    return {"max_abs_diff": diff, "devices_after": where}


@torch.no_grad()
def trace_config(pipe, prompt_embeds, args, device, mode, kernel, num_chunks=2) -> dict:
    """torch.profiler over `num_chunks` steady-state chunks: where a chunk's time goes, and how busy the GPU is."""
    from torch.profiler import ProfilerActivity, profile

    configure(pipe, mode, kernel)
    run_session(pipe, prompt_embeds, args, device, args.warmup)  # compile / autotune / capture every chunk shape
    out = {"mode": mode, "kernel": kernel}
    for output_type in ("latent", "pt"):
        session = open_stream(pipe, prompt_embeds, args, output_type)
        with session:
            for _ in range(args.steady_from + 1):
                next(session)
            sync(device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                for _ in range(num_chunks):
                    next(session)
                sync(device)
                wall = time.perf_counter() - start
        events = prof.key_averages()
        # kernel rows only: an aten op's row repeats the device time of the kernels it launched
        device_us = sum(e.self_device_time_total for e in events
                        if e.device_type == torch.autograd.DeviceType.CUDA) if device.type == "cuda" else 0
        table = events.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                             row_limit=40, max_name_column_width=70)
        out[output_type] = {"wall_ms_per_chunk": wall / num_chunks * 1e3,
                            "gpu_busy_ms_per_chunk": device_us / 1e3 / num_chunks,
                            "gpu_busy_fraction": device_us / 1e6 / wall if wall else 0.0, "table": table}
        log(f"[trace {mode} {kernel} {output_type}] {wall / num_chunks * 1e3:.1f} ms/chunk wall (profiled), GPU kernels "
            f"{device_us / 1e3 / num_chunks:.1f} ms/chunk = {out[output_type]['gpu_busy_fraction'] * 100:.0f}% busy")
        log(table)
    return out


def markdown(env, results) -> str:
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}; "
        f"commit {env['commit']}; {env['date']}.",
        "",
        "| mode | kernel | e2e FPS | ms/chunk | transformer-only FPS | TTFF ms | denoise ms | cache-write ms | "
        "decode ms | peak GiB | cache MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['mode']} | {r['kernel']} | {r['fps']:.2f} | {r['ms_per_chunk']:.1f} | {r['transformer_fps']:.2f} | "
            f"{r['ttff_s'] * 1e3:.0f} | {r['denoise_ms']:.1f} | {r['cache_write_ms']:.1f} | {r['decode_ms']:.1f} | "
            f"{r['peak_gib']:.2f} | {r['cache_mib']:.0f} |"
        )
    for r in results.get("long", []):
        lines += ["", f"Long stream ({r['mode']}, {r['kernel']}): {r['chunks']} chunks = {r['frames']} frames, "
                      f"{r['fps']:.2f} FPS (chunk {r['ms_per_chunk_min']:.1f}-{r['ms_per_chunk_max']:.1f} ms), "
                      f"peak {r['peak_gib']:.2f} GiB, allocated GiB by chunk {r['allocated_gib_at']}."]
    if "vae" in results:
        v = results["vae"]
        lines += ["", f"VAE streaming decode: {v['per_frame_ms_per_frame']:.2f} ms/frame (1 latent frame per call), "
                      f"{v['per_chunk_ms_per_frame']:.2f} ms/frame (whole chunk per call)."]
    for e in results["errors"]:
        lines += ["", f"ERROR {e['what']}: {e['error']}"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="dense,window,hybrid")
    parser.add_argument("--kernels", default="triton,reference", help="run in this order (the long stream runs after "
                        "the first kernel's configurations)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--chunks", type=int, default=16, help="chunks of the main session (triton)")
    parser.add_argument("--chunks-ref", type=int, default=5, help="chunks of the main session (reference)")
    parser.add_argument("--chunks-profile", type=int, default=6)
    parser.add_argument("--chunks-latent", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--warmup-ref", type=int, default=2)
    parser.add_argument("--steady-from", type=int, default=3, help="first steady-state chunk (window full)")
    parser.add_argument("--long", default="hybrid:triton", help="mode:kernel pairs for the long stream")
    parser.add_argument("--long-chunks", type=int, default=200)
    parser.add_argument("--vae-frames-per-call", default="chunk", help="'1' (bit-exact) or 'chunk'")
    parser.add_argument("--skip-offload-check", action="store_true")
    parser.add_argument("--skip-vae", action="store_true", help="skip the VAE-alone measurement")
    parser.add_argument("--trace", default=None, help="only profile MODE:KERNEL with torch.profiler (no benchmark)")
    parser.add_argument("--trace-chunks", type=int, default=2, help="steady-state chunks per profiled session")
    parser.add_argument("--quick", action="store_true", help="fewer chunks, no long stream")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models: checks the script only")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    args.vae_frames_per_call = None if args.vae_frames_per_call == "chunk" else int(args.vae_frames_per_call)
    if args.quick or args.dry_run:
        args.chunks, args.chunks_ref, args.chunks_profile, args.chunks_latent = 5, 4, 4, 4
        args.warmup, args.warmup_ref, args.long_chunks = 2, 1, 12
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        args.height = args.width = 32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_streaming.py needs a CUDA GPU (use --dry-run to check the script on CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)

    env = environment(device)
    RESULTS["environment"] = env
    RESULTS["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    log(json.dumps(env))

    def save():
        with open(os.path.join(args.out, "bench_streaming.json"), "w") as f:
            json.dump(RESULTS, f, indent=2)
        with open(os.path.join(args.out, "bench_streaming.md"), "w") as f:
            f.write(markdown(env, RESULTS))

    def attempt(what, fn):
        try:
            return fn()
        except Exception as e:  # keep going: every configuration is reported separately
            traceback.print_exc()
            RESULTS["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}"[:2000]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        finally:
            save()

    if args.trace:
        pipe, prompt_embeds = build(args, device, dtype)
        mode, kernel = args.trace.split(":")
        RESULTS["trace"] = attempt("trace", lambda: trace_config(pipe, prompt_embeds, args, device, mode, kernel,
                                                                   args.trace_chunks))
        save()
        return
    if not args.skip_offload_check:
        RESULTS["offload"] = attempt("offload check", lambda: check_offload(device))
    pipe, prompt_embeds = build(args, device, dtype)
    if "triton+graphs" in args.kernels.split(","):
        RESULTS["graphs_check"] = attempt("graphs check", lambda: check_graphs(pipe, prompt_embeds, args, device))
    if not args.skip_vae:
        RESULTS["vae"] = attempt("vae", lambda: bench_vae(pipe, args, device, dtype))
    RESULTS["long"] = []
    for index, kernel in enumerate(args.kernels.split(",")):
        if "compile" in kernel.split("+") and "compile_check" not in RESULTS:  # eager first, then it compiles
            eager = "+".join(part for part in kernel.split("+") if part != "compile")
            RESULTS["compile_check"] = attempt("compile check", lambda: check_graphs(
                pipe, prompt_embeds, args, device, kernels=(eager, kernel)))
        for mode in args.modes.split(","):
            result = attempt(f"{mode}/{kernel}", lambda: bench_config(pipe, prompt_embeds, args, device, mode, kernel))
            if result is not None:
                RESULTS["runs"].append(result)
        if index == 0 and not args.quick:
            for pair in filter(None, args.long.split(",")):
                long_mode, long_kernel = pair.split(":")
                result = attempt(f"long {pair}",
                                 lambda: bench_long(pipe, prompt_embeds, args, device, long_mode, long_kernel))
                if result is not None:
                    RESULTS["long"].append(result)
    save()
    log("\n" + markdown(env, RESULTS))


if __name__ == "__main__":
    main()
