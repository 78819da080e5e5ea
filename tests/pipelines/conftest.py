# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Tiny, locally built pipeline components (no downloads): a word-level tokenizer, a 1-layer UMT5 encoder, a tiny Wan
VAE and a 2-layer Hybrid Forcing transformer. Videos are 32x32 (latents 4x4, 4 tokens per frame)."""

import pytest
import torch

# small enough for the whole file set to run in well under a minute on 2 CPU cores
TEXT_DIM = 16
MAX_SEQUENCE_LENGTH = 16
WORDS = (
    "a the and of in on at with cat dog red blue green panda walks runs flies through forest city night day boat sea "
    "sunset storm bird tree river mountain snow rain car road light dark big small old young"
).split()

TINY_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=64,
    num_frame_per_block=3,
    sink_frames=3,
    local_attn_frames=6,
    dense_max_frames=9,
    max_rope_frames=12,
    sparse_block_size=8,
    sparse_topk_ratio=0.5,
    attention_mode="hybrid",
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def make_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(1)
    config = UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
    )
    return UMT5EncoderModel(config).eval()


def make_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(2)
    return AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()


def make_transformer(**overrides):
    from diffusers_hybrid import HybridForcingTransformer3DModel

    torch.manual_seed(3)
    model = HybridForcingTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, **overrides}).eval()
    # the linear-memory read-out is zero-initialised; give it weights so that the memory changes the output
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.linear_proj.weight.normal_(0, 0.3)
            block.attn1.linear_proj.bias.normal_(0, 0.1)
    return model


def make_pipeline(**transformer_overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_hybrid import StreamingHybridPipeline

    tokenizer = make_tokenizer()
    pipe = StreamingHybridPipeline(
        tokenizer=tokenizer,
        text_encoder=make_text_encoder(len(tokenizer)),
        vae=make_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=make_transformer(**transformer_overrides),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Components:
    """Factories, reachable from tests through the `components` fixture (test files do not import helpers)."""

    make_tokenizer = staticmethod(make_tokenizer)
    make_text_encoder = staticmethod(make_text_encoder)
    make_vae = staticmethod(make_vae)
    make_transformer = staticmethod(make_transformer)
    make_pipeline = staticmethod(make_pipeline)
    transformer_config = TINY_TRANSFORMER_CONFIG
    max_sequence_length = MAX_SEQUENCE_LENGTH
    words = WORDS
    # 32x32 video: latents 4x4
    call_kwargs = dict(height=32, width=32, max_sequence_length=MAX_SEQUENCE_LENGTH)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models are dominated by per-op overhead: one intra-op thread is faster than two, and much faster when
    the 2 CI cores are shared. Restored after each test (other test folders keep their setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def components():
    return Components


@pytest.fixture(scope="module")
def pipe():
    """A tiny pipeline shared by a test module (tests must not modify it)."""
    return make_pipeline()


@pytest.fixture
def generator():
    return torch.Generator("cpu").manual_seed(0)
