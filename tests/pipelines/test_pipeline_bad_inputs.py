# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Bad input raises a clear ValueError naming the value, before any work is done; long prompts are truncated with a
warning."""

import logging

import numpy as np
import pytest
import torch

PROMPT = "a red panda walks through the forest"


@pytest.fixture
def call(pipe, components):
    def run(*args, **kwargs):
        kwargs = {"num_frames": 9, "output_type": "latent", **components.call_kwargs, **kwargs}
        return pipe(*args, **kwargs)

    return run


@pytest.mark.parametrize("prompt, match", [
    ("", "must not be empty, got ''"),
    ("   ", "must not be empty, got '   '"),
    ([PROMPT, ""], "must not be empty, got ''"),
    ([], "empty list"),
    (None, "exactly one of `prompt` and `prompt_embeds`"),
    (3, "string or a list of strings, got int: 3"),
])
def test_bad_prompt(call, prompt, match):
    with pytest.raises(ValueError, match=match):
        call(prompt)


def test_prompt_list_differs_from_batch(call, pipe, components):
    latents = torch.randn(1, 16, 3, 4, 4)
    with pytest.raises(ValueError, match=r"list of 2 prompt\(s\) .* batch of 2\) but `latents` has a batch of 1"):
        call([PROMPT, "a blue boat"], latents=latents)
    with pipe.stream([PROMPT, "a blue boat"], output_type="latent", **components.call_kwargs) as session:
        with pytest.raises(ValueError, match=r"list of 1 prompts but the batch has 2 prompt\(s\): \['a dog'\]"):
            session.set_prompt(["a dog"])


@pytest.mark.parametrize("height, width", [(30, 32), (32, 40), (0, 32)])
def test_height_width_not_multiple_of_16(call, height, width):
    with pytest.raises(ValueError, match=f"multiples of 16, got height={height}, width={width}"):
        call(PROMPT, height=height, width=width)


@pytest.mark.parametrize("num_frames, nearest", [
    (80, "69 and 81"),  # not 1 + 4k
    (17, "9 and 21"),  # 1 + 4k, but 5 latent frames are not whole chunks of 3
    (5, "9"),
    (0, "9"),
    (82, "81 and 93"),
])
def test_invalid_num_frames(call, pipe, components, num_frames, nearest):
    message = rf"`num_frames`={num_frames} is not a valid length: .* nearest valid values are {nearest}\."
    with pytest.raises(ValueError, match=message):
        call(PROMPT, num_frames=num_frames)
    with pytest.raises(ValueError, match=message):
        pipe.stream(PROMPT, num_frames=num_frames, **components.call_kwargs)


def test_unbounded_call(call):
    with pytest.raises(ValueError, match="`num_frames`=None would never end"):
        call(PROMPT, num_frames=None)


def test_generator_list_of_wrong_length(call):
    with pytest.raises(ValueError, match="list of 2 generators but the batch has 3 videos"):
        call([PROMPT, "a blue boat", "a dog"], generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="list of 1 generators but the batch has 2 videos"):
        call(PROMPT, num_videos_per_prompt=2, generator=[torch.Generator()])


@pytest.mark.parametrize("output_type", ["mp4", "numpy", None])
def test_unknown_output_type(call, output_type):
    with pytest.raises(ValueError, match=f"Unknown `output_type`={output_type!r}"):
        call(PROMPT, output_type=output_type)


def test_set_prompt_on_closed_session(pipe, components):
    session = pipe.stream(PROMPT, output_type="latent", **components.call_kwargs)
    session.close()
    with pytest.raises(ValueError, match="`set_prompt` was called on a closed StreamingHybridSession"):
        session.set_prompt("a blue boat")


def test_other_bad_values(call, pipe, components):
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 16, 3, 4, 4\)"):
        call(PROMPT, latents=torch.randn(1, 16, 6, 4, 4))
    with pytest.raises(ValueError, match="`denoising_step_list` must be strictly decreasing"):
        call(PROMPT, denoising_step_list=[250, 500])
    with pytest.raises(ValueError, match="`context_noise` must be in"):
        call(PROMPT, context_noise=-1)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        call(PROMPT, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError, match="latents.*needs a bounded `num_frames`"):
        pipe.stream(PROMPT, latents=torch.randn(1, 16, 3, 4, 4), **components.call_kwargs)


def test_long_prompt_is_truncated_with_a_warning(pipe, components, caplog):
    words = components.words
    long_prompt = " ".join(words[i % len(words)] for i in range(components.max_sequence_length + 5))
    short_prompt = " ".join(long_prompt.split()[: components.max_sequence_length - 1])
    with caplog.at_level(logging.WARNING):
        with torch.no_grad():
            long_embeds = pipe.encode_prompt(long_prompt, max_sequence_length=components.max_sequence_length)
    assert "truncated to `max_sequence_length`=16" in caplog.text
    assert " ".join(long_prompt.split()[components.max_sequence_length - 1 :]) in caplog.text  # the dropped words
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with torch.no_grad():
            short_embeds = pipe.encode_prompt(short_prompt, max_sequence_length=components.max_sequence_length)
    assert "truncated" not in caplog.text
    assert long_embeds.shape == short_embeds.shape == (1, components.max_sequence_length, 16)
    torch.testing.assert_close(long_embeds, short_embeds)  # same kept tokens (+ EOS)


def test_integral_num_frames_of_other_types(call):
    """NumPy / torch integers and integral floats are valid lengths (audit: rejected with a message suggesting the
    same value); a non-integral or non-numeric value is rejected for its type."""
    reference = call(PROMPT, num_frames=9, generator=torch.Generator().manual_seed(0)).frames
    for num_frames in (np.int64(9), np.int32(9), torch.tensor(9), 9.0, np.float32(9.0)):
        out = call(PROMPT, num_frames=num_frames, generator=torch.Generator().manual_seed(0)).frames
        assert torch.equal(out, reference), num_frames
    for bad, kind in ((9.5, "float 9.5"), ("9", "str '9'"), (True, "bool True")):
        with pytest.raises(ValueError, match=f"`num_frames` must be an integer, got {kind}"):
            call(PROMPT, num_frames=bad)


@pytest.mark.parametrize("name, value, kind", [
    ("height", 32.5, "float 32.5"),
    ("width", "32", "str '32'"),
    ("num_videos_per_prompt", 1.5, "float 1.5"),
])
def test_non_integer_sizes(call, name, value, kind):
    with pytest.raises(ValueError, match=f"`{name}` must be an integer, got {kind}"):
        call(PROMPT, **{name: value})


def test_integral_sizes_of_other_types(call):
    """Audit: `height=128.0` and `num_videos_per_prompt=2.0` passed the checks and failed deep inside torch."""
    out = call(PROMPT, height=32.0, width=np.int64(32), num_videos_per_prompt=2.0).frames
    assert out.shape == (2, 16, 3, 4, 4)


def test_prompt_embeds_of_another_text_encoder(pipe, components, call):
    """Embeddings whose hidden size is not the transformer's `text_dim` (e.g. UMT5-XXL's 4096 for a small model) are
    rejected up front, in `__call__`/`stream` and in `set_prompt`, naming both sizes (audit: a matmul error later)."""
    wrong = torch.randn(1, components.max_sequence_length, 24)
    message = r"`prompt_embeds` have hidden size 24 \(shape \(1, 16, 24\)\) but the transformer's `text_dim` is 16"
    with pytest.raises(ValueError, match=message):
        call(prompt_embeds=wrong)
    with pipe.stream(PROMPT, output_type="latent", **components.call_kwargs) as session:
        with pytest.raises(ValueError, match=message):
            session.set_prompt(prompt_embeds=wrong)
        next(session)  # the session is unharmed


def test_constructor_with_swapped_transformer_and_scheduler(pipe):
    """The DESIGN-order call `(tokenizer, text_encoder, vae, transformer, scheduler)` names the real order instead of
    pointing at a Wan conversion."""
    from diffusers_hybrid import StreamingHybridPipeline

    message = (r"got FlowMatchEulerDiscreteScheduler \(and `scheduler` is a HybridForcingTransformer3DModel\): the "
               r"arguments look swapped\. The order is \(tokenizer, text_encoder, vae, scheduler, transformer\)")
    with pytest.raises(ValueError, match=message):
        StreamingHybridPipeline(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.transformer, pipe.scheduler)
    with pytest.raises(ValueError, match="convert a Wan transformer"):  # a genuinely wrong model keeps its message
        StreamingHybridPipeline(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.scheduler, pipe.vae)
