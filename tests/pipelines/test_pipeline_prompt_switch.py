# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Prompt switching in a streaming session (with and without LongLive-style recache)."""

import numpy as np
import pytest
import torch

PROMPT_A = "a red panda walks through the forest"
PROMPT_B = "a blue boat on the sea at sunset"


def _latents(pipe, components, switch_at=None, new_prompt=PROMPT_B, num_chunks=6, recache=False, session_recache=None,
             **stream_kwargs):
    """Clean latents of each chunk; `set_prompt(new_prompt)` is called after chunk `switch_at - 1` was produced."""
    session_recache = recache if session_recache is None else session_recache
    chunks = []
    with pipe.stream(PROMPT_A, generator=torch.Generator().manual_seed(5), output_type="latent",
                     recache_on_switch=session_recache, **components.call_kwargs, **stream_kwargs) as session:
        for chunk in session:
            chunks.append(chunk)
            if chunk.index + 1 == switch_at:
                session.set_prompt(new_prompt, recache=recache)
            if chunk.index + 1 == num_chunks:
                break
    return chunks


def test_switch_changes_only_later_chunks(pipe, components):
    base = _latents(pipe, components)
    switched = _latents(pipe, components, switch_at=3)
    for i in range(3):
        assert torch.equal(base[i].frames, switched[i].frames), i
        assert switched[i].prompt == PROMPT_A and switched[i].timings["text_encode"] == 0
    for i in range(3, 6):
        # a stale cross-attention cache would keep generating with prompt A
        assert not torch.allclose(base[i].frames, switched[i].frames, atol=1e-3), i
        assert switched[i].prompt == PROMPT_B
    assert switched[3].timings["text_encode"] > 0 and switched[4].timings["text_encode"] == 0


def test_switch_uses_the_new_prompt(pipe, components):
    """Switching to the same prompt changes nothing; switching before the first chunk equals starting with the new
    prompt (so the re-encoded text, not a stale cross-attention cache, is used)."""
    base = _latents(pipe, components, num_chunks=4)
    same = _latents(pipe, components, switch_at=2, new_prompt=PROMPT_A, num_chunks=4)
    for a, b in zip(base, same):
        assert torch.equal(a.frames, b.frames)

    # prompt B from the start == prompt A for 0 chunks then B
    with pipe.stream(PROMPT_B, generator=torch.Generator().manual_seed(5), output_type="latent",
                     **components.call_kwargs) as session:
        b_only = [next(session).frames for _ in range(2)]
    with pipe.stream(PROMPT_A, generator=torch.Generator().manual_seed(5), output_type="latent",
                     **components.call_kwargs) as session:
        session.set_prompt(PROMPT_B)  # before the first chunk
        switched = [next(session).frames for _ in range(2)]
    assert torch.equal(b_only[0], switched[0]) and torch.equal(b_only[1], switched[1])


def test_switch_with_prompt_embeds_and_lists(pipe, components):
    with torch.no_grad():
        embeds_b = pipe.encode_prompt(PROMPT_B, max_sequence_length=components.max_sequence_length)
    by_text = _latents(pipe, components, switch_at=2, num_chunks=3)
    with pipe.stream(PROMPT_A, generator=torch.Generator().manual_seed(5), output_type="latent",
                     **components.call_kwargs) as session:
        chunks = [next(session), next(session)]
        session.set_prompt(prompt_embeds=embeds_b)
        chunks.append(next(session))
    assert chunks[2].prompt is None
    torch.testing.assert_close(chunks[2].frames, by_text[2].frames, atol=1e-5, rtol=1e-5)

    with pipe.stream([PROMPT_A, PROMPT_B], generator=torch.Generator().manual_seed(5), output_type="latent",
                     **components.call_kwargs) as session:
        next(session)
        session.set_prompt([PROMPT_B, PROMPT_A])
        assert next(session).prompt == [PROMPT_B, PROMPT_A]
        with pytest.raises(ValueError, match="list of 3 prompts but the batch has 2"):
            session.set_prompt([PROMPT_A, PROMPT_B, PROMPT_A])


_BASE = {}


@pytest.mark.parametrize(
    "mode, switch_at",
    # hybrid (sink 3, history 3): 1 and 2 replay from an empty cache (2: sink chunk + history chunk), 3 and 4 restore
    # the evicted history and the linear memory; dense (history 6 = 2 chunks): 3 restores two commits
    [("hybrid", 2), ("hybrid", 3), ("hybrid", 4), ("dense", 3)],
)
def test_recache_with_the_same_prompt_is_exact(components, mode, switch_at):
    """Re-encoding the window with the unchanged prompt must rebuild the cache bit for bit."""
    if mode not in _BASE:
        pipe = components.make_pipeline(attention_mode=mode)
        _BASE[mode] = (pipe, _latents(pipe, components, num_chunks=6, session_recache=True))
    pipe, base = _BASE[mode]
    again = _latents(pipe, components, switch_at=switch_at, new_prompt=PROMPT_A, recache=True, num_chunks=6)
    for a, b in zip(base, again):
        assert torch.equal(a.frames, b.frames), (a.index, (a.frames - b.frames).abs().max())
    assert again[switch_at].timings["recache"] > 0


def test_recache_with_a_new_prompt(pipe, components):
    plain = _latents(pipe, components, switch_at=3, num_chunks=5, session_recache=True)
    recached = _latents(pipe, components, switch_at=3, num_chunks=5, recache=True)
    for i in range(3):
        assert torch.equal(plain[i].frames, recached[i].frames)
    for i in range(3, 5):
        assert not torch.allclose(plain[i].frames, recached[i].frames, atol=1e-4)
    with pipe.stream(PROMPT_A, output_type="latent", recache_on_switch=True, **components.call_kwargs) as session:
        for _ in range(3):
            next(session)
        sizes = session.nbytes()
        assert sizes["recache"] > 0
        next(session)
        assert session.nbytes() == sizes  # bounded
    with pipe.stream(PROMPT_A, output_type="latent", **components.call_kwargs) as session:
        with pytest.raises(ValueError, match="recache_on_switch=True"):
            session.set_prompt(PROMPT_B, recache=True)


def test_set_prompt_on_closed_session(pipe, components):
    session = pipe.stream(PROMPT_A, output_type="latent", **components.call_kwargs)
    next(session)
    session.close()
    with pytest.raises(ValueError, match="closed"):
        session.set_prompt(PROMPT_B)
    with pytest.raises(StopIteration):
        next(session)
    # a finished bounded stream closed by its context manager refuses prompts too
    with pipe.stream(PROMPT_A, num_frames=9, output_type="latent", **components.call_kwargs) as bounded:
        assert len(list(bounded)) == 1
    with pytest.raises(ValueError, match="closed"):
        bounded.set_prompt(PROMPT_B)


def test_switch_in_decoded_stream_keeps_frames_continuous(pipe, components):
    """Decoded frames before the switch are unchanged; the VAE stream is not restarted by a switch."""
    kwargs = dict(generator=torch.Generator().manual_seed(1), **components.call_kwargs)
    with pipe.stream(PROMPT_A, **kwargs) as session:
        frames = [next(session).frames, next(session).frames]
        session.set_prompt(PROMPT_B)
        after = next(session)
    reference = pipe(PROMPT_A, num_frames=21, generator=torch.Generator().manual_seed(1), **components.call_kwargs)
    np.testing.assert_array_equal(np.concatenate(frames, axis=1), reference.frames)
    assert after.num_frames == 12 and after.frame_start == 21 and after.frames.shape[1] == 12


@pytest.mark.parametrize("switch_after, reencoded", [(2, True), (3, False)])
def test_what_recache_reencodes(pipe, components, switch_after, reencoded):
    """The documented contract of `set_prompt(recache=True)` (hybrid, sink 3, window 6, chunks of 3): while every frame
    written is still cached (6 frames) everything is replayed, the sink frames' K/V and the linear memory included;
    later (9 frames) only the recent frames are, and the sink K/V and the memory keep the old prompt's encoding."""

    with pipe.stream(PROMPT_A, generator=torch.Generator().manual_seed(5), output_type="latent",
                     recache_on_switch=True, **components.call_kwargs) as session:
        for _ in range(switch_after):
            next(session)
        layer = session.cache[-1]
        sink = slice(0, 3 * layer.tokens_per_frame)
        sink_keys, memory = layer.key[:, sink].clone(), layer.kv_state.clone()
        assert memory.abs().sum() > 0
        session.set_prompt(PROMPT_B, recache=True)
        timings = {}
        session._apply_prompt_switch(timings)  # what the next chunk does first, before its own commit changes the cache
        assert timings["recache"] > 0
        layer = session.cache[-1]
        assert torch.equal(layer.key[:, sink], sink_keys) is not reencoded
        assert torch.equal(layer.kv_state, memory) is not reencoded
