# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Hub helpers: the remote-code shim layout that makes a saved pipeline loadable with
`DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`, and the model card.

Why shims: `DiffusionPipeline.from_pretrained` only loads classes from `diffusers`/`transformers`, a
`diffusers.pipelines` sub-module, or a `.py` file in the repository (remote code). A plain `save_pretrained` records our
classes by module path (`["diffusers_hybrid.models.transformer_hybrid_forcing", ...]`), which the Hub pre-download check
rejects. The shim layout keeps all code in the installed `diffusers_hybrid` package and puts one-line re-exports in the
repository:

```
model_index.json     "_class_name": ["pipeline_streaming_hybrid", "StreamingHybridPipeline"],
                     "transformer": ["transformer_hybrid_forcing", "HybridForcingTransformer3DModel"], ...
pipeline_streaming_hybrid.py              from diffusers_hybrid import StreamingHybridPipeline
transformer/transformer_hybrid_forcing.py from diffusers_hybrid import HybridForcingTransformer3DModel
```
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

PACKAGE = "diffusers_hybrid"
PIP_NAME = "diffusers-hybrid"
BASE_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
PIPELINE_SHIM = "pipeline_streaming_hybrid"
# component class -> the file stem of its shim (distinctive names: local dynamic modules share one namespace)
COMPONENT_SHIMS = {"HybridForcingTransformer3DModel": "transformer_hybrid_forcing"}
MODEL_CARD_TAGS = [
    "text-to-video",
    "video-generation",
    "diffusers",
    "diffusers-hybrid",
    "hybrid-forcing",
    "autoregressive",
    "streaming",
    "wan2.1",
]
_SHIM_HEADER = "# Remote-code shim written by diffusers_hybrid: the code lives in the `diffusers-hybrid` package.\n"


def shim_source(class_name: str) -> str:
    """The exact content of a shim file re-exporting `class_name` from the installed package."""
    return f"{_SHIM_HEADER}from {PACKAGE} import {class_name}  # noqa: F401\n"


def write_remote_code_shims(save_directory: str | os.PathLike, pipeline_class_name: str = "StreamingHybridPipeline"):
    """
    Rewrites a folder written by `save_pretrained` into the remote-code shim layout: `_class_name` and every component
    whose library is `diffusers_hybrid...` point to one-line re-export files, which are written next to them.

    Returns:
        `dict[str, str]`: the shim files written (relative path -> content).
    """
    save_directory = os.fspath(save_directory)
    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    written = {f"{PIPELINE_SHIM}.py": shim_source(pipeline_class_name)}
    index["_class_name"] = [PIPELINE_SHIM, pipeline_class_name]
    for name, value in list(index.items()):
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if not isinstance(library, str) or not isinstance(class_name, str):
            continue
        is_ours = library.split(".")[0] == PACKAGE or class_name in COMPONENT_SHIMS
        if not is_ours:
            continue
        stem = COMPONENT_SHIMS.get(class_name, f"{name}_{class_name.lower()}")
        index[name] = [stem, class_name]
        written[f"{name}/{stem}.py"] = shim_source(class_name)
    for rel, content in written.items():
        path = os.path.join(save_directory, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    return written


def is_known_shim_layout(directory: str | os.PathLike) -> bool:
    """True when `directory` is a local pipeline folder in our shim layout whose every `.py` file is exactly one of
    our one-line shims (so "trusting" it only imports the installed `diffusers_hybrid` package)."""
    directory = os.fspath(directory)
    index_path = os.path.join(directory, "model_index.json")
    if not os.path.isfile(index_path):
        return False
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    class_name = index.get("_class_name")
    if not (isinstance(class_name, list) and len(class_name) == 2 and class_name[0] == PIPELINE_SHIM):
        return False
    expected = {f"{PIPELINE_SHIM}.py": shim_source(index["_class_name"][1])}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if isinstance(library, str) and os.path.isfile(os.path.join(directory, name, f"{library}.py")):
            expected[f"{name}/{library}.py"] = shim_source(class_name)
    found = {}
    for root, _, files in os.walk(directory):
        for file in files:
            if file.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, file), directory).replace(os.sep, "/")
                with open(os.path.join(root, file), encoding="utf-8") as f:
                    found[rel] = f.read()
    return found == expected


@contextlib.contextmanager
def shim_module_aliases():
    """While loading, make each shim stem (e.g. `transformer_hybrid_forcing`) importable from `sys.modules` as the
    module that defines the class, so diffusers' check of an explicitly passed component finds it. Names already in
    `sys.modules` are left alone; the aliases are removed afterwards."""
    import importlib

    import diffusers_hybrid

    added = []
    for class_name, stem in COMPONENT_SHIMS.items():
        if stem not in sys.modules:
            sys.modules[stem] = importlib.import_module(getattr(diffusers_hybrid, class_name).__module__)
            added.append(stem)
    try:
        yield
    finally:
        for stem in added:
            sys.modules.pop(stem, None)


# ---------------------------------------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------------------------------------
def _attention_rows(transformer_config: dict[str, Any]) -> list[tuple[str, str]]:
    keys = [
        ("attention_mode", "`dense` (Self-Forcing), `window` (sink + sliding window) or `hybrid` (sparse window + linear memory)"),
        ("num_frame_per_block", "latent frames per generated chunk"),
        ("sink_frames", "leading latent frames that stay in the window"),
        ("local_attn_frames", "most recent latent frames in the softmax window (current chunk included)"),
        ("dense_max_frames", "frames a `dense` chunk attends to at most"),
        ("sparse_topk_ratio", "fraction of key blocks each query block attends to (`hybrid`; 1.0 = dense window)"),
        ("sparse_block_size", "tokens per sparse block"),
        ("rope_mode", "`relative` (clamped, unbounded length) or `absolute`"),
        ("max_rope_frames", "temporal RoPE bound of `relative` mode"),
        ("absorb_sink_frames", "sink frames also enter the linear memory"),
    ]
    return [(k, f"`{transformer_config[k]}`", doc) for k, doc in keys if k in transformer_config]


def usage_snippet(repo_id: str) -> str:
    """Python that loads the pipeline from `repo_id` and writes a video (kept in the card, tested in CI)."""
    return textwrap.dedent(
        f"""\
        import torch
        from diffusers import DiffusionPipeline
        from diffusers.utils import export_to_video

        pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True, torch_dtype=torch.bfloat16)
        pipe.to("cuda")

        prompt = "A red panda walks through a bamboo forest, cinematic lighting"
        video = pipe(prompt, height=480, width=832, num_frames=81).frames[0]
        export_to_video(video, "red_panda.mp4", fps=16)
        """
    )


def stream_snippet(repo_id: str) -> str:
    return textwrap.dedent(
        f"""\
        import torch
        from diffusers_hybrid import StreamingHybridPipeline

        pipe = StreamingHybridPipeline.from_pretrained("{repo_id}", trust_remote_code=True, torch_dtype=torch.bfloat16)
        pipe.to("cuda")

        with pipe.stream("A sailing boat on a calm sea at sunset", num_frames=None) as session:  # no end
            for chunk in session:
                print(chunk.index, chunk.frames.shape, f"{{chunk.timings['total']:.3f}} s")
                if chunk.index == 10:
                    session.set_prompt("The same boat in a thunderstorm at night")
                if chunk.index == 40:
                    break
        """
    )


def make_model_card(
    repo_id: str,
    transformer_config: dict[str, Any],
    pipeline_config: dict[str, Any] | None = None,
    base_model: str | None = BASE_MODEL,
    extra_tags: list[str] | None = None,
) -> ModelCard:
    """
    Builds the model card of a saved [`StreamingHybridPipeline`]: metadata (base model, tags, pipeline tag, library),
    the attention configuration of the transformer, the sampling schedule, and usage snippets. `base_model` is a Hub
    repo id, or `None` for a model whose base is not on the Hub (then no `base_model` metadata is written).
    """
    pipeline_config = pipeline_config or {}
    tags = list(dict.fromkeys(MODEL_CARD_TAGS + [f"attention-{transformer_config.get('attention_mode', 'hybrid')}"]
                              + list(extra_tags or [])))
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        pipeline_tag="text-to-video",
        license="apache-2.0",
        tags=tags,
    )
    rows = "\n".join(f"| `{k}` | {v} | {doc} |" for k, v, doc in _attention_rows(transformer_config))
    steps = pipeline_config.get("denoising_step_list")
    schedule = ""
    if steps is not None:
        schedule = (
            f"Sampling: {len(steps)} denoising steps per chunk at `denoising_step_list={list(steps)}` "
            f"(timestep shift {pipeline_config.get('timestep_shift')}, warped: "
            f"{pipeline_config.get('warp_denoising_step')}), re-noising between steps, then one clean cache-write pass "
            f"(`context_noise={pipeline_config.get('context_noise')}`). No classifier-free guidance.\n"
        )
    built_on = (f"[{base_model}](https://huggingface.co/{base_model})" if base_model
                else "a base model that is not on the Hub")
    content = f"""---
{data.to_yaml()}
---

# {repo_id.split('/')[-1]}

A streaming, autoregressive text-to-video model in the **Hybrid Forcing** family (arXiv 2604.10103), built on
{built_on}. Video is generated chunk by chunk of
{transformer_config.get('num_frame_per_block', 3)} latent frames (12 video frames); self-attention sees sink frames and a
sliding window of recent frames (block-sparse) and, in `hybrid` mode, a linear-attention memory of every frame that left
the window, so the stream can run without end at constant memory.

The code lives in the [`{PIP_NAME}`](https://pypi.org/project/{PIP_NAME}/) package (`pip install {PIP_NAME}`); this
repository holds only weights, configs and one-line re-export files, which is why `trust_remote_code=True` is needed.

## Attention configuration

| option | value | meaning |
|---|---|---|
{rows}

{schedule}
## Usage

```python
{usage_snippet(repo_id)}```

### Streaming, with a prompt switch

```python
{stream_snippet(repo_id)}```

Frames from `stream` equal frames from `__call__` for the same seed. Each chunk's decoded frames come out as soon as they
exist (9 for the first chunk, 12 for each later one).
"""
    return ModelCard(content)


def upload_pipeline_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    create_repo_first: bool = True,
):
    """Uploads a folder written by `StreamingHybridPipeline.save_pretrained` (the writer `push_to_hub` uses)."""
    if create_repo_first:
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        token=token,
        commit_message=commit_message or "Upload StreamingHybridPipeline",
        create_pr=create_pr,
    )
