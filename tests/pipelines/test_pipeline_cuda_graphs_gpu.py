# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""CUDA-graph replay of a session's passes (denoising and cache-write) against eager execution, through a prompt
switch that re-encodes the window (needs CUDA)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT_A = "a red panda walks through the forest"
PROMPT_B = "a blue boat on the sea at sunset"


def _stream(pipe, components, graphs: bool, switch_at: int, num_chunks: int):
    pipe.enable_cuda_graphs(graphs)
    chunks = []
    with pipe.stream(PROMPT_A, generator=torch.Generator().manual_seed(5), output_type="latent",
                     recache_on_switch=True, **components.call_kwargs) as session:
        for chunk in session:
            chunks.append(chunk.frames.float().clone())
            if chunk.index + 1 == switch_at:
                session.set_prompt(PROMPT_B, recache=True)
            if chunk.index + 1 == num_chunks:
                break
        replays = {mode: graph.replays for mode, graph in session._graphs.items()}
        captures = {mode: graph.captures for mode, graph in session._graphs.items()}
    return chunks, replays, captures


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_graphed_stream_equals_eager_through_a_recached_switch(components, kernel):
    """From the steady state on, read and write passes replay from graphs (the write pass's commits run eagerly after
    each replay); the switch re-encodes the window under the new prompt (rewind + write passes) and recaptures. Every
    chunk's latents equal the eager session's bit for bit."""
    pipe = components.make_pipeline(attention_head_dim=32, sparse_block_size=16).to("cuda")
    pipe.transformer.to(torch.bfloat16)  # the Triton attention takes 16-bit inputs
    pipe.transformer.set_attention_kernel(kernel)
    eager, replays, _ = _stream(pipe, components, False, switch_at=8, num_chunks=14)
    assert replays == {}
    graphed, replays, captures = _stream(pipe, components, True, switch_at=8, num_chunks=14)
    # chunks 4-13 are steady (window full, positions clamped); the switch recaptures both graphs
    assert replays["read"] >= 20 and replays["write"] >= 5, replays
    assert captures["read"] >= 2 and captures["write"] >= 2, captures  # recaptured for the new prompt
    assert len(graphed) == len(eager) == 14
    for index, (got, want) in enumerate(zip(graphed, eager)):
        assert torch.equal(got, want), (index, (got - want).abs().max().item())
    assert not torch.equal(eager[9], _stream(pipe, components, False, switch_at=20, num_chunks=10)[0][9])
