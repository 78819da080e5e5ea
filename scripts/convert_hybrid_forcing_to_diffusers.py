#!/usr/bin/env python
# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Convert an original-format checkpoint to a diffusers `HybridForcingTransformer3DModel` folder.

Accepted inputs (safetensors, or .pt/.pth read with `torch.load(weights_only=True)`):
  (a) original Wan2.1 files (`blocks.N.self_attn.q.weight`, optionally under `model.diffusion_model.`; a folder of
      shards works too),
  (b) Self-Forcing checkpoints (`{"generator": ..., "generator_ema": ...}` with `model.` prefixes),
  (c) official Hybrid Forcing checkpoints (the same, plus `self_attn.linear_proj`).
Missing `linear_proj` weights (a, b) are set to zero explicitly; any other missing or unknown key is an error.

Example:
    python scripts/convert_hybrid_forcing_to_diffusers.py --checkpoint_path hybrid_forcing.pt \
        --config Wan2.1-T2V-1.3B-Diffusers/transformer --output_path hf-1.3b/transformer --dtype bf16

    # then assemble a pipeline from the stock Wan repo:
    python scripts/convert_hybrid_forcing_to_diffusers.py ... --pipeline_base Wan2.1-T2V-1.3B-Diffusers \
        --pipeline_output hybrid-forcing-1.3b
"""

import argparse

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True, help="original checkpoint file or folder of shards")
    parser.add_argument("--config", default=None,
                        help="diffusers transformer folder or config.json (Wan or Hybrid Forcing); inferred if absent")
    parser.add_argument("--output_path", required=True, help="where to write the diffusers transformer folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--use_ema", action="store_true", help="take `generator_ema` (default: `generator` first)")
    parser.add_argument("--attention_mode", choices=["dense", "window", "hybrid"], default=None)
    parser.add_argument("--sink_frames", type=int, default=None)
    parser.add_argument("--local_attn_frames", type=int, default=None)
    parser.add_argument("--sparse_topk_ratio", type=float, default=None)
    parser.add_argument("--rope_mode", choices=["relative", "absolute"], default=None)
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--pipeline_base", default=None,
                        help="optional Wan2.1 diffusers pipeline folder to assemble a StreamingHybridPipeline from")
    parser.add_argument("--pipeline_output", default=None, help="where to save the assembled pipeline")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from diffusers_hybrid import HybridForcingTransformer3DModel

    overrides = {
        k: getattr(args, k)
        for k in ("attention_mode", "sink_frames", "local_attn_frames", "sparse_topk_ratio", "rope_mode")
        if getattr(args, k) is not None
    }
    # `torch_dtype` leaves the modules diffusers keeps in float32 (norms, time embedder, ...) in float32
    model = HybridForcingTransformer3DModel.from_original_checkpoint(
        args.checkpoint_path, config=args.config, use_ema=args.use_ema, torch_dtype=DTYPES[args.dtype], **overrides
    )
    model.save_pretrained(args.output_path, max_shard_size=args.max_shard_size)
    print(f"Saved {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
          f"to {args.output_path}")
    if args.pipeline_base:
        if not args.pipeline_output:
            raise ValueError("--pipeline_base needs --pipeline_output.")
        from diffusers_hybrid import StreamingHybridPipeline

        pipe = StreamingHybridPipeline.from_pretrained(args.pipeline_base, transformer=model)
        pipe.save_pretrained(args.pipeline_output)
        print(f"Saved StreamingHybridPipeline to {args.pipeline_output}")


if __name__ == "__main__":
    main()
