# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""The domain's text side: a word-level tokenizer built locally with `tokenizers` (loaded by `AutoTokenizer` like
Wan's UMT5 tokenizer), and a small `UMT5EncoderModel` configuration."""

from __future__ import annotations

import os

import torch

from .domain import vocabulary

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

# The shipped encoder: 2 UMT5 layers of width 128 (text_dim of the teacher transformer).
UMT5_CONFIG = dict(
    d_model=128,
    d_kv=32,
    num_heads=4,
    d_ff=256,
    num_layers=2,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=64,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)
TINY_UMT5_CONFIG = dict(UMT5_CONFIG, d_model=32, d_kv=8, d_ff=64, num_layers=1)


def build_tokenizer(model_max_length: int = 512):
    """A `PreTrainedTokenizerFast`: lower-cased words of the grammar (+ <pad>=0, </s>=1, <unk>=2), </s> appended."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for w in words:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
    )


def vocab_size_padded(tokenizer) -> int:
    return ((len(tokenizer) + 15) // 16) * 16


def build_text_encoder(tokenizer, config: dict | None = None, seed: int = 0):
    """A freshly initialised `UMT5EncoderModel` for the tokenizer's vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = dict(UMT5_CONFIG if config is None else config)
    cfg.update(vocab_size=vocab_size_padded(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(**cfg))


def set_tokenizer_class(folder: str, name: str = "PreTrainedTokenizerFast") -> None:
    """Record the tokenizer class as `PreTrainedTokenizerFast` in tokenizer_config.json (transformers 5 writes its
    internal `TokenizersBackend`, which transformers 4.x cannot load); both versions load the folder then."""
    import json

    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = name
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def save_text_components(output_dir: str, config: dict | None = None, seed: int = 0) -> None:
    """Write `tokenizer/` and `text_encoder/` folders (the layout of a Wan pipeline) under output_dir."""
    tokenizer = build_tokenizer()
    encoder = build_text_encoder(tokenizer, config, seed)
    tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))
    set_tokenizer_class(os.path.join(output_dir, "tokenizer"))
    encoder.save_pretrained(os.path.join(output_dir, "text_encoder"))


def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int = 512, device=None):
    """Exactly `WanPipeline._get_t5_prompt_embeds`: embeddings of the real tokens, zeros after them, padded to
    `max_sequence_length`. The encoder runs on the batch's longest prompt only (cheaper, and the same numbers:
    the padding is masked out)."""
    device = device or text_encoder.device
    inputs = tokenizer(
        prompts,
        padding="longest",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    pad = max_sequence_length - hidden.shape[1]
    if pad > 0:
        hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], pad, hidden.shape[2])], 1)
    return hidden
