# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""StreamingHybridPipeline on tiny CPU components: outputs, stream == __call__, schedule, constant memory."""

import numpy as np
import PIL.Image
import pytest
import torch

PROMPT = "a red panda walks through the forest"


def _gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_output_types_shapes_and_ranges(pipe, components, output_type):
    out = pipe(PROMPT, num_frames=21, generator=_gen(), output_type=output_type, **components.call_kwargs)
    frames = out.frames
    if output_type == "np":
        assert isinstance(frames, np.ndarray) and frames.shape == (1, 21, 32, 32, 3)
        assert frames.dtype == np.float32 and 0.0 <= frames.min() and frames.max() <= 1.0
        assert frames.std() > 1e-3  # not a constant image
    elif output_type == "pt":
        assert isinstance(frames, torch.Tensor) and frames.shape == (1, 21, 3, 32, 32)
        assert 0.0 <= frames.min().item() and frames.max().item() <= 1.0
    elif output_type == "pil":
        assert isinstance(frames, list) and len(frames) == 1 and len(frames[0]) == 21
        assert all(isinstance(f, PIL.Image.Image) and f.size == (32, 32) for f in frames[0])
    else:
        assert isinstance(frames, torch.Tensor) and frames.shape == (1, 16, 6, 4, 4)
        assert torch.isfinite(frames).all()
    tuple_out = pipe(PROMPT, num_frames=21, generator=_gen(), output_type=output_type, return_dict=False,
                     **components.call_kwargs)
    assert isinstance(tuple_out, tuple) and len(tuple_out) == 1


def test_output_types_agree(pipe, components):
    kwargs = dict(num_frames=9, **components.call_kwargs)
    np_frames = pipe(PROMPT, generator=_gen(), output_type="np", **kwargs).frames
    pt_frames = pipe(PROMPT, generator=_gen(), output_type="pt", **kwargs).frames
    pil_frames = pipe(PROMPT, generator=_gen(), output_type="pil", **kwargs).frames
    latents = pipe(PROMPT, generator=_gen(), output_type="latent", **kwargs).frames
    np.testing.assert_allclose(pt_frames.permute(0, 1, 3, 4, 2).numpy(), np_frames, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil_frames[0][4]), (np_frames[0, 4] * 255).round().astype(np.uint8))
    # the latent output decodes (de-normalised, full-video decode) to the np output
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents * std + mean).sample
    expected = pipe.video_processor.postprocess_video(video, output_type="np")
    np.testing.assert_array_equal(expected, np_frames)


def test_stream_equals_call(pipe, components):
    full = pipe(PROMPT, num_frames=33, generator=_gen(7), **components.call_kwargs).frames
    with pipe.stream(PROMPT, num_frames=33, generator=_gen(7), **components.call_kwargs) as session:
        chunks = list(session)
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.num_frames for c in chunks] == [9, 12, 12]
    assert [c.frames.shape[1] for c in chunks] == [9, 12, 12]
    assert [c.frame_start for c in chunks] == [0, 9, 21]
    assert [c.latent_start for c in chunks] == [0, 3, 6]
    assert all(c.timings["total"] > 0 and c.timings["since_start"] >= c.timings["total"] for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks], axis=1), full)
    # an unbounded stream yields the same chunks first
    with pipe.stream(PROMPT, num_frames=None, generator=_gen(7), **components.call_kwargs) as session:
        first = [next(session).frames for _ in range(3)]
        assert next(session).num_frames == 12  # and goes on
    np.testing.assert_array_equal(np.concatenate(first, axis=1), full)


def test_fused_vae_decode(pipe, components):
    """`enable_fused_vae_decode` decodes the same frames up to float rounding, through the fused path."""
    kwargs = dict(num_frames=21, output_type="pt", **components.call_kwargs)
    expected = pipe(PROMPT, generator=_gen(3), **kwargs).frames
    pipe.enable_fused_vae_decode()
    try:
        with pipe.stream(PROMPT, generator=_gen(3), **kwargs) as session:
            chunks = [chunk.frames for chunk in session]
            assert session.decoder.fused and session.decoder._steady is not None
    finally:
        pipe.enable_fused_vae_decode(False)
    got = torch.cat(chunks, dim=1)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))
    with pytest.raises(ValueError, match="norm_kernel"):
        pipe.enable_fused_vae_decode(norm_kernel="cuda")


def test_seed_and_prompt_matter(pipe, components):
    kwargs = dict(num_frames=9, output_type="latent", **components.call_kwargs)
    a = pipe(PROMPT, generator=_gen(0), **kwargs).frames
    assert torch.equal(a, pipe(PROMPT, generator=_gen(0), **kwargs).frames)
    assert not torch.allclose(a, pipe(PROMPT, generator=_gen(1), **kwargs).frames, atol=1e-4)
    assert not torch.allclose(a, pipe("a blue boat on the sea", generator=_gen(0), **kwargs).frames, atol=1e-4)


def test_official_schedule(pipe, components):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_hybrid.pipelines import few_step_schedule

    timesteps, sigmas = few_step_schedule(pipe.config.denoising_step_list, pipe.config.timestep_shift,
                                          pipe.config.warp_denoising_step)
    np.testing.assert_allclose(timesteps, [1000.0, 937.5, 833.3333333, 625.0], rtol=1e-7)
    np.testing.assert_allclose(sigmas, [1.0, 0.9375, 0.8333333333, 0.625], rtol=1e-7)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(scheduler.timesteps.numpy(), timesteps, rtol=1e-6)
    assert few_step_schedule([1000, 500], 5.0, False) == ([1000.0, 500.0], [1.0, 0.5])


@torch.no_grad()
def test_denoising_loop_follows_the_schedule(pipe, components):
    """Record the transformer's calls: 4 read passes at the warped timesteps, then one write pass at t=0 with the
    returned clean latents; between steps x = (1 - s') x0 + s' eps."""
    transformer = pipe.transformer
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((kwargs["cache_mode"], kwargs["timestep"].clone(), kwargs["hidden_states"].clone(),
                      output[0].clone(), kwargs["frame_offset"]))

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        out = pipe(PROMPT, num_frames=21, generator=_gen(3), output_type="latent", **components.call_kwargs).frames
    finally:
        handle.remove()
    assert [c[0] for c in calls] == ["read"] * 4 + ["write"] + ["read"] * 4 + ["write"]
    assert [c[4] for c in calls] == [0] * 5 + [3] * 5
    np.testing.assert_allclose([c[1][0].item() for c in calls[:5]], [1000, 937.5, 833.3333, 625, 0], rtol=1e-5)
    sigmas = [1.0, 0.9375, 0.8333333333, 0.625]
    for chunk in range(2):
        passes = calls[5 * chunk : 5 * chunk + 5]
        x0 = [p[2] - s * p[3] for p, s in zip(passes[:4], sigmas)]
        assert torch.allclose(passes[4][2], x0[3], atol=1e-6)  # write pass on the last x0
        assert torch.allclose(out[:, :, 3 * chunk : 3 * chunk + 3], x0[3], atol=1e-6)
        # re-noising: x_{i+1} - (1 - s_{i+1}) x0_i is pure noise of scale s_{i+1}, fresh at every step
        eps = [(passes[i + 1][2] - (1 - sigmas[i + 1]) * x0[i]) / sigmas[i + 1] for i in range(3)]
        assert all(abs(e.std().item() - 1.0) < 0.3 for e in eps)
        assert not torch.allclose(eps[0], eps[1])


def test_schedule_override_per_call(components):
    pipe = components.make_pipeline()
    kwargs = dict(num_frames=9, output_type="latent", **components.call_kwargs)
    default = pipe(PROMPT, generator=_gen(), **kwargs).frames
    two_steps = pipe(PROMPT, generator=_gen(), denoising_step_list=[1000, 500], **kwargs).frames
    assert not torch.allclose(default, two_steps, atol=1e-4)
    pipe.register_to_config(denoising_step_list=[1000, 500])
    assert torch.equal(pipe(PROMPT, generator=_gen(), **kwargs).frames, two_steps)
    noisy_context = pipe(PROMPT, num_frames=21, generator=_gen(), context_noise=100, output_type="latent",
                         **components.call_kwargs).frames
    clean_context = pipe(PROMPT, num_frames=21, generator=_gen(), output_type="latent", **components.call_kwargs).frames
    # context noise changes what chunk 2 sees, not chunk 1
    assert torch.equal(noisy_context[:, :, :3], clean_context[:, :, :3])
    assert not torch.allclose(noisy_context[:, :, 3:], clean_context[:, :, 3:], atol=1e-4)


def test_latents_argument_and_batch(pipe, components):
    kwargs = dict(num_frames=21, output_type="latent", **components.call_kwargs)
    noise = torch.randn(2, 16, 6, 4, 4, generator=_gen(11))
    prompts = [PROMPT, "a blue boat on the sea at sunset"]
    batched = pipe(prompts, generator=[_gen(1), _gen(2)], latents=noise, **kwargs).frames
    assert batched.shape == (2, 16, 6, 4, 4)
    single = pipe(prompts[1], generator=_gen(2), latents=noise[1:], **kwargs).frames
    torch.testing.assert_close(batched[1:], single, atol=1e-5, rtol=1e-5)
    copies = pipe(PROMPT, num_videos_per_prompt=2, generator=_gen(1), **kwargs).frames
    assert copies.shape[0] == 2 and not torch.allclose(copies[0], copies[1], atol=1e-4)


def test_prompt_embeds_and_callback(pipe, components):
    kwargs = dict(num_frames=21, output_type="latent", **components.call_kwargs)
    with torch.no_grad():
        embeds = pipe.encode_prompt(PROMPT, max_sequence_length=components.max_sequence_length)
    assert embeds.shape == (1, components.max_sequence_length, 16)
    tokens = len(pipe.tokenizer(PROMPT).input_ids)
    assert embeds[0, tokens:].abs().sum() == 0 and embeds[0, :tokens].abs().sum() > 0  # padding zeroed
    from_embeds = pipe(prompt_embeds=embeds, generator=_gen(), **kwargs).frames
    assert torch.equal(from_embeds, pipe(PROMPT, generator=_gen(), **kwargs).frames)

    seen = []

    def callback(p, step, t, callback_kwargs):
        seen.append((step, float(t), tuple(callback_kwargs["latents"].shape)))
        if step == 3:  # last step of chunk 0: replace its clean latents
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return {}

    out = pipe(PROMPT, generator=_gen(), callback_on_step_end=callback, **kwargs).frames
    assert [s[0] for s in seen] == list(range(8)) and seen[0][1] == 1000.0 and seen[2][2] == (1, 16, 3, 4, 4)
    assert torch.equal(out[:, :, :3], torch.zeros(1, 16, 3, 4, 4))

    def stop(p, step, t, callback_kwargs):
        p._interrupt = step >= 3
        return {}

    out = pipe(PROMPT, num_frames=33, generator=_gen(), callback_on_step_end=stop, output_type="latent",
               **components.call_kwargs).frames
    assert out.shape[2] == 3  # stopped after the first chunk


def test_long_stream_constant_memory(pipe, components):
    """100 chunks (1197 frames) at 16x16 (the tiniest size): the transformer-cache and VAE-cache bytes never change
    (the VAE cache is filled by the first chunk), and no buffer is reallocated."""
    sizes = []
    with pipe.stream(PROMPT, num_frames=None, generator=_gen(), height=16, width=16, vae_frames_per_call=None,
                     max_sequence_length=components.max_sequence_length) as session:
        pointers = [t.data_ptr() for layer in session.cache.layers for t in layer.tensors()]
        for chunk in session:
            sizes.append(session.nbytes())
            assert np.isfinite(chunk.frames).all()
            if chunk.index == 99:
                break
        assert session.cache.frames_written == 300
        assert [t.data_ptr() for layer in session.cache.layers for t in layer.tensors()] == pointers
        assert session.cache.memory_tokens > 0  # hybrid memory absorbed the evicted frames
    assert sizes[1:] == [sizes[1]] * 99
    assert sizes[1]["cache"] == sizes[0]["cache"] and sizes[1]["vae"] > 0
    assert session.closed and session.nbytes() == {"cache": 0, "vae": 0, "recache": 0}
    with pytest.raises(StopIteration):
        next(session)


def test_attention_modes(components):
    """dense / window / hybrid through the pipeline: equal exactly while they see the same frames, different after."""
    configs = {
        "dense": dict(attention_mode="dense"),  # the 9 most recent frames
        "window": dict(attention_mode="window"),  # sink 3 + the 6 most recent frames
        "hybrid_dense_window": dict(attention_mode="hybrid", sparse_topk_ratio=1.0),  # + linear memory
        "hybrid": dict(attention_mode="hybrid"),  # + block sparsity
    }
    out = {}
    for name, config in configs.items():
        pipe = components.make_pipeline(**config)
        out[name] = pipe(PROMPT, num_frames=45, generator=_gen(), output_type="latent",
                         **components.call_kwargs).frames
    assert out["dense"].shape == (1, 16, 12, 4, 4)
    # chunks 0-2 see frames 0..8 in dense and window mode; chunk 3 does not see frames 0-2 in dense mode
    torch.testing.assert_close(out["dense"][:, :, :9], out["window"][:, :, :9], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["dense"][:, :, 9:], out["window"][:, :, 9:], atol=1e-3)
    # the memory is read from chunk 2 on (frames 0-2 leave the 6-frame window when frame 8 is generated)
    torch.testing.assert_close(out["window"][:, :, :6], out["hybrid_dense_window"][:, :, :6], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["window"][:, :, 6:], out["hybrid_dense_window"][:, :, 6:], atol=1e-3)
    # sparsity changes the output from the first chunk with more than one key block kept out
    assert not torch.allclose(out["hybrid"], out["hybrid_dense_window"], atol=1e-3)


def test_lora_loading(components, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    pipe = components.make_pipeline()
    kwargs = dict(num_frames=9, output_type="latent", **components.call_kwargs)
    base = pipe(PROMPT, generator=_gen(), **kwargs).frames
    donor = components.make_transformer()
    donor.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False))
    lora = get_peft_model_state_dict(donor)
    type(pipe).save_lora_weights(tmp_path, transformer_lora_layers=lora)
    pipe.load_lora_weights(tmp_path, adapter_name="test")
    with_lora = pipe(PROMPT, generator=_gen(), **kwargs).frames
    assert not torch.allclose(base, with_lora, atol=1e-4)
    pipe.set_adapters(["test"], [0.0])
    torch.testing.assert_close(pipe(PROMPT, generator=_gen(), **kwargs).frames, base)


def test_model_cpu_offload(components):
    """enable_model_cpu_offload (accelerate's hooks move the cache with `HybridCache.to` on every forward) gives the
    same frames; on CPU the "accelerator" is the CPU itself, the CUDA case is checked by benchmarks/bench_streaming.py."""
    pipe = components.make_pipeline()
    kwargs = dict(num_frames=21, output_type="np", **components.call_kwargs)
    reference = pipe(PROMPT, generator=_gen(), **kwargs).frames
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(getattr(pipe, name), "_hf_hook") for name in ("text_encoder", "transformer", "vae"))
    np.testing.assert_allclose(pipe(PROMPT, generator=_gen(), **kwargs).frames, reference, atol=1e-6)
    with pipe.stream(PROMPT, generator=_gen(), **kwargs) as session:
        np.testing.assert_allclose(np.concatenate([c.frames for c in session], axis=1), reference, atol=1e-6)


def test_interrupt_finishes_the_current_chunk(pipe, components):
    """`pipe._interrupt = True` mid-chunk: the chunk still runs all its steps, is cached and decoded, and is the last one
    (audit: it used to skip the remaining steps and return noise)."""
    kwargs = dict(num_frames=33, **components.call_kwargs)
    full = pipe(PROMPT, generator=_gen(), **kwargs).frames
    steps = []

    def interrupt_at_step_1(p, step, t, callback_kwargs):
        steps.append(step)
        p._interrupt = p._interrupt or step == 1
        return {}

    out = pipe(PROMPT, generator=_gen(), callback_on_step_end=interrupt_at_step_1, **kwargs).frames
    assert steps == [0, 1, 2, 3]  # all of chunk 0's steps, none of chunk 1's
    assert out.shape[1] == 9
    np.testing.assert_array_equal(out, full[:, :9])

    # stream: interrupted during chunk 1's first step -> chunks 0 and 1 complete, then the session ends
    def interrupt_at_step_4(p, step, t, callback_kwargs):
        p._interrupt = p._interrupt or step == 4
        return {}

    with pipe.stream(PROMPT, num_frames=33, generator=_gen(), callback_on_step_end=interrupt_at_step_4,
                     **components.call_kwargs) as session:
        chunks = list(session)
    assert [c.index for c in chunks] == [0, 1]
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks], axis=1), full[:, :21])

    # set between two chunks (e.g. from a UI thread): no further chunk starts
    with pipe.stream(PROMPT, num_frames=33, generator=_gen(), **components.call_kwargs) as session:
        first = next(session)
        pipe._interrupt = True
        with pytest.raises(StopIteration):
            next(session)
    np.testing.assert_array_equal(first.frames, full[:, :9])
    # a new call starts uninterrupted
    assert pipe(PROMPT, generator=_gen(), **kwargs).frames.shape[1] == 33 and not pipe.interrupt


def test_num_timesteps_follows_the_per_call_schedule(pipe, components):
    """`num_timesteps` (which diffusers' `PipelineCallback`s read) is the running call's steps per chunk."""
    seen = []

    def callback(p, step, t, callback_kwargs):
        seen.append((step, p.num_timesteps))
        return {}

    kwargs = dict(num_frames=21, output_type="latent", callback_on_step_end=callback, **components.call_kwargs)
    pipe(PROMPT, denoising_step_list=[1000, 500], **kwargs)
    assert seen == [(0, 2), (1, 2), (2, 2), (3, 2)]
    seen.clear()
    with pipe.stream(PROMPT, denoising_step_list=[1000, 750, 500], **kwargs) as session:
        next(session)
    assert seen == [(0, 3), (1, 3), (2, 3)]
    seen.clear()
    pipe(PROMPT, **kwargs)  # the configured schedule
    assert {n for _, n in seen} == {len(pipe.config.denoising_step_list)} == {4}
