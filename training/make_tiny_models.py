# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Writes tiny, randomly initialised models in the real on-disk formats, for CPU tests and `run_tiny.sh`.

Nothing is downloaded: the tokenizer is built with the `tokenizers` library from a fixed word list, every model from a
tiny config with a fixed seed.

    python training/make_tiny_models.py OUTPUT_DIR

writes
    OUTPUT_DIR/wan_base/      a Wan2.1-style diffusers folder: transformer/ (tiny WanTransformer3DModel: the student's
                              and the critic's initialisation), vae/ (tiny AutoencoderKLWan), text_encoder/ (tiny UMT5),
                              tokenizer/, scheduler/, model_index.json
    OUTPUT_DIR/teacher/       a larger tiny WanTransformer3DModel (the frozen real score), config.json + safetensors
    OUTPUT_DIR/prompts.txt    training prompts, one per line
    OUTPUT_DIR/prompts.jsonl  the same as JSON lines ({"prompt": ...})
"""

from __future__ import annotations

import argparse
import json
import os

# a small closed vocabulary: every prompt below tokenizes without <unk>
WORDS = (
    "a an the of in on at with and to from over under near red green blue yellow white black small big large tiny "
    "circle square triangle ball box cube star shape shapes moves slides bounces rotates spins grows shrinks falls "
    "rises drifts left right up down slowly quickly across background foreground scene camera video frame light dark "
    "bright sky sea field city street forest river mountain cat dog bird car boat person walking running flying "
    "sunset night morning rain snow"
).split()

PROMPTS = [
    "a red circle moves left",
    "a blue square slides right",
    "a green triangle bounces up",
    "a yellow ball falls down slowly",
    "a white box rotates quickly",
    "a black star spins in the dark",
    "a small cube grows on a white background",
    "a large circle shrinks near the sea",
    "a bird flying over the mountain at sunset",
    "a car running across the city street at night",
    "a boat drifts on the river in the morning",
    "a dog walking in the forest with rain",
    "a cat running in a field of snow",
    "a person walking under the bright sky",
    "a blue ball rises over a green field",
    "a red box slides across the scene",
]

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    rope_max_seq_len=32,
)
# "may be larger": the teacher differs in width and depth, not in the interface (channels, patch, text dim)
TINY_TEACHER = {**TINY_TRANSFORMER, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 3}


def build_tokenizer(max_length: int = 16):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def build_text_encoder(vocab_size: int, d_model: int = 16):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def build_vae(z_dim: int = 4):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    ).eval()


def write_tiny_models(output_dir: str, seed: int = 0) -> dict[str, str]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    base = os.path.join(output_dir, "wan_base")
    teacher_dir = os.path.join(output_dir, "teacher")
    os.makedirs(base, exist_ok=True)

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(os.path.join(base, "tokenizer"))
    build_text_encoder(len(tokenizer)).save_pretrained(os.path.join(base, "text_encoder"))
    build_vae(TINY_TRANSFORMER["in_channels"]).save_pretrained(os.path.join(base, "vae"))
    WanTransformer3DModel(**TINY_TRANSFORMER).save_pretrained(os.path.join(base, "transformer"))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0).save_pretrained(os.path.join(base, "scheduler"))
    with open(os.path.join(base, "model_index.json"), "w") as f:
        json.dump(
            {
                "_class_name": "WanPipeline",
                "_diffusers_version": "0.42.1",
                "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                "text_encoder": ["transformers", "UMT5EncoderModel"],
                "vae": ["diffusers", "AutoencoderKLWan"],
                "transformer": ["diffusers", "WanTransformer3DModel"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            },
            f,
            indent=2,
        )

    torch.manual_seed(seed + 1)
    WanTransformer3DModel(**TINY_TEACHER).save_pretrained(teacher_dir)

    prompts_txt = os.path.join(output_dir, "prompts.txt")
    with open(prompts_txt, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    prompts_jsonl = os.path.join(output_dir, "prompts.jsonl")
    with open(prompts_jsonl, "w") as f:
        for p in PROMPTS:
            f.write(json.dumps({"prompt": p}) + "\n")
    return {"wan_base": base, "teacher": teacher_dir, "prompts_txt": prompts_txt, "prompts_jsonl": prompts_jsonl}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_tiny_models(args.output_dir, args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
