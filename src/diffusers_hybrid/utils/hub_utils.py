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

An explicitly passed component (`from_pretrained(folder, transformer=...)`) is type-checked by diffusers against its
`model_index.json` library, which it looks up in `sys.modules` by name (it never imports a name a repository gives). For
our shim entries that name is the shim's stem, so importing the pipeline registers each stem as an alias of the module
that defines the class ([`register_shim_module_aliases`]): `DiffusionPipeline.from_pretrained(folder_or_repo,
trust_remote_code=True, transformer=...)` then works like `StreamingHybridPipeline.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap
from types import ModuleType
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, create_repo, try_to_load_from_cache, upload_folder
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

PACKAGE = "diffusers_hybrid"
PIP_NAME = "diffusers-hybrid"
# The Hub base of the Hybrid Forcing 1.3B release; no card claims it unless it is passed or known (`known_base_model`).
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


def _shim_modules(classes: list[type] | None = None) -> dict[str, ModuleType]:
    """Shim stem -> the module that defines the class the shim re-exports."""
    import importlib

    if classes is None:
        import diffusers_hybrid

        classes = [getattr(diffusers_hybrid, class_name) for class_name in COMPONENT_SHIMS]
    return {COMPONENT_SHIMS[c.__name__]: importlib.import_module(c.__module__) for c in classes}


def register_shim_module_aliases(classes: list[type] | None = None) -> list[str]:
    """
    Registers each shim stem (e.g. `transformer_hybrid_forcing`) in `sys.modules` as an alias of the module that
    defines the class, for good: diffusers' type check of an explicitly passed component (`from_pretrained(...,
    transformer=...)`) looks the `model_index.json` library up there, also in `DiffusionPipeline.from_pretrained`,
    whose loading code we do not run. Importing the pipeline module calls this (loading a shim folder imports it
    before any component is checked). A name already in `sys.modules` is left alone.

    Args:
        classes (`list[type]`, *optional*): classes named in `COMPONENT_SHIMS`; defaults to all of them.

    Returns:
        `list[str]`: the stems this call registered.
    """
    added = []
    for stem, module in _shim_modules(classes).items():
        if stem not in sys.modules:
            sys.modules[stem] = module
            added.append(stem)
    return added


@contextlib.contextmanager
def shim_module_aliases():
    """[`register_shim_module_aliases`] for the duration of a block only: the aliases this registered are removed
    afterwards (names already in `sys.modules`, e.g. registered by the pipeline module, are left alone)."""
    added = register_shim_module_aliases()
    try:
        yield
    finally:
        for stem in added:
            sys.modules.pop(stem, None)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _card_base_model(readme_path: str | None) -> str | None:
    if not readme_path or not os.path.isfile(readme_path):
        return None
    try:
        base = ModelCard.load(readme_path).data.base_model
    except Exception:  # noqa: BLE001 - a malformed card only means that the base is unknown
        return None
    return base if isinstance(base, str) and base else None


def known_base_model(
    pretrained_model_name_or_path: str | os.PathLike, cache_dir: str | None = None, revision: str | None = None
) -> str | None:
    """
    The Hub base model of a pipeline loaded from `pretrained_model_name_or_path`, when it is known without network:

    - a folder or repo in our layout (a saved `StreamingHybridPipeline`): the `base_model` of its model card (for a
      Hub repo id, only if the card is in the local Hub cache);
    - a Hub repo id of a stock diffusers pipeline (`model_index.json` naming e.g. `WanPipeline`; a converted
      transformer was passed in): that repo. A local folder of one is not a Hub id: unknown.

    Returns `None` when unknown; nothing is downloaded.
    """
    path = os.fspath(pretrained_model_name_or_path)
    local = os.path.isdir(path)

    def find(filename: str) -> str | None:
        if local:
            return os.path.join(path, filename)
        try:
            found = try_to_load_from_cache(path, filename, cache_dir=cache_dir, revision=revision)
        except Exception:  # noqa: BLE001 - e.g. not a valid repo id
            return None
        return found if isinstance(found, str) else None

    index = _read_json(find("model_index.json") or "")
    if index is None:
        return None
    class_name = index.get("_class_name")
    if isinstance(class_name, list) and class_name:
        class_name = class_name[-1]
    if class_name != "StreamingHybridPipeline":
        return None if local else path
    return _card_base_model(find("README.md"))


def load_hub_model_card(repo_id: str, token: str | None = None) -> ModelCard | None:
    """The model card of Hub repo `repo_id`, or `None` when the repo or its `README.md` does not exist (what
    diffusers' `load_or_create_model_card` checks before writing a new card). Needs network."""
    try:
        return ModelCard.load(repo_id, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None


def populate_model_card(card: ModelCard) -> bool:
    """Fills in what a kept card lacks and diffusers' `populate_model_card` adds (`library_name: diffusers`); the
    text is left as written. Returns whether anything was added."""
    if card.data.library_name is None:
        card.data.library_name = "diffusers"
        return True
    return False


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


def chunk_video_frames(num_frame_per_block: int, temporal_scale: int = 4) -> tuple[int, int]:
    """Video frames of the first chunk and of each later one: the Wan VAE decodes F latent frames into
    `1 + temporal_scale·(F - 1)` video frames, and each later chunk of F latent frames into `temporal_scale·F`."""
    return temporal_scale * (num_frame_per_block - 1) + 1, temporal_scale * num_frame_per_block


def default_num_frames(num_frame_per_block: int, temporal_scale: int = 4, target: int = 81) -> int:
    """The longest valid video length up to `target` frames (whole chunks; at least one chunk): 81 for chunks of 3
    latent frames, 77 for chunks of 4."""
    latent = (target - 1) // temporal_scale + 1
    latent = max(num_frame_per_block, latent - latent % num_frame_per_block)
    return temporal_scale * (latent - 1) + 1


def usage_snippet(repo_id: str, num_frames: int = 81) -> str:
    """Python that loads the pipeline from `repo_id` and writes a video (kept in the card, tested in CI)."""
    return textwrap.dedent(
        f"""\
        import torch
        from diffusers import DiffusionPipeline
        from diffusers.utils import export_to_video

        pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True, dtype=torch.bfloat16)
        pipe.to("cuda")

        prompt = "A red panda walks through a bamboo forest, cinematic lighting"
        video = pipe(prompt, height=480, width=832, num_frames={num_frames}).frames[0]
        export_to_video(video, "red_panda.mp4", fps=16)
        """
    )


def stream_snippet(repo_id: str) -> str:
    return textwrap.dedent(
        f"""\
        import torch
        from diffusers_hybrid import StreamingHybridPipeline

        pipe = StreamingHybridPipeline.from_pretrained("{repo_id}", trust_remote_code=True, dtype=torch.bfloat16)
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
    base_model: str | None = None,
    extra_tags: list[str] | None = None,
    temporal_scale: int = 4,
) -> ModelCard:
    """
    Builds the model card of a saved [`StreamingHybridPipeline`]: metadata (base model, tags, pipeline tag, library),
    the attention configuration of the transformer, the sampling schedule, and usage snippets.

    Args:
        repo_id (`str`): the repo id (or folder name) the snippets load.
        transformer_config (`dict`): the transformer's config (attention table, chunk length).
        pipeline_config (`dict`, *optional*): the pipeline's sampling schedule.
        base_model (`str`, *optional*): the Hub repo id the model is built on (e.g. `BASE_MODEL` for a Hybrid Forcing
            model distilled from Wan2.1-T2V-1.3B); `None` (the default) for a base that is unknown or not on the Hub:
            then no `base_model` metadata is written.
        extra_tags (`list[str]`, *optional*): tags added to `MODEL_CARD_TAGS`.
        temporal_scale (`int`, defaults to 4): video frames per latent frame of the VAE (Wan: 4), for the frame counts.
    """
    pipeline_config = pipeline_config or {}
    chunk = transformer_config.get("num_frame_per_block", 3)
    first_frames, later_frames = chunk_video_frames(chunk, temporal_scale)
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
    # no base model: its base is unknown or not on the Hub, and the card says nothing about it
    built_on = f", built on [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    content = f"""---
{data.to_yaml()}
---

# {repo_id.split('/')[-1]}

A streaming, autoregressive text-to-video model in the **Hybrid Forcing** family (arXiv 2604.10103){built_on}.
Video is generated chunk by chunk of {chunk} latent frames ({first_frames} video frames for the first chunk,
{later_frames} for each later one); self-attention sees sink frames and a sliding window of recent frames (block-sparse)
and, in `hybrid` mode, a linear-attention memory of every frame that left the window, so the stream can run without end
at constant memory.

The code lives in the [`{PIP_NAME}`](https://pypi.org/project/{PIP_NAME}/) package (`pip install {PIP_NAME}`); this
repository holds only weights, configs and one-line re-export files, which is why `trust_remote_code=True` is needed.

## Attention configuration

| option | value | meaning |
|---|---|---|
{rows}

{schedule}
## Usage

```python
{usage_snippet(repo_id, default_num_frames(chunk, temporal_scale))}```

### Streaming, with a prompt switch

```python
{stream_snippet(repo_id)}```

Frames from `stream` equal frames from `__call__` for the same seed. Each chunk's decoded frames come out as soon as they
exist ({first_frames} for the first chunk, {later_frames} for each later one).
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
