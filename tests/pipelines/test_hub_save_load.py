# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Saving and loading: the remote-code shim layout, the model card, push_to_hub's writer, assembling from a Wan repo.
No network: push_to_hub's Hub calls are replaced by local fakes."""

import json
import os
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_hybrid import HybridForcingTransformer3DModel, StreamingHybridPipeline
from diffusers_hybrid.utils import hub_utils

PROMPT = "a red panda walks through the forest"


def _run(pipe, components, **kwargs):
    kwargs = {"num_frames": 21, "output_type": "latent", **components.call_kwargs, **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).frames


def _files(folder):
    return sorted(
        os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
        for root, _, files in os.walk(folder)
        for f in files
    )


@pytest.fixture(scope="module")
def saved(components, tmp_path_factory):
    pipe = components.make_pipeline()
    pipe.register_to_config(denoising_step_list=[1000.0, 750.0, 500.0])  # non-default config must round-trip
    folder = tmp_path_factory.mktemp("saved") / "hybrid-forcing-tiny"
    pipe.save_pretrained(folder)
    return pipe, str(folder)


def test_folder_layout(saved):
    _, folder = saved
    files = _files(folder)
    assert "pipeline_streaming_hybrid.py" in files and "transformer/transformer_hybrid_forcing.py" in files
    assert "README.md" in files and "model_index.json" in files
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]  # safetensors only
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == ["pipeline_streaming_hybrid", "StreamingHybridPipeline"]
    assert index["transformer"] == ["transformer_hybrid_forcing", "HybridForcingTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["denoising_step_list"] == [1000.0, 750.0, 500.0]
    shim = open(os.path.join(folder, "transformer", "transformer_hybrid_forcing.py")).read()
    assert "from diffusers_hybrid import HybridForcingTransformer3DModel" in shim and len(shim.splitlines()) == 2
    assert hub_utils.is_known_shim_layout(folder)


def test_passes_the_hub_pre_download_check(saved):
    """What `DiffusionPipeline.download` checks on a Hub repo before downloading anything."""
    from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders

    _, folder = saved
    index = json.load(open(os.path.join(folder, "model_index.json")))
    custom, folders = _get_custom_components_and_folders(folder, index, _files(folder))
    assert custom == {"transformer": "transformer_hybrid_forcing"}
    assert set(folders) >= {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}


def test_diffusion_pipeline_from_pretrained_trust_remote_code(saved, components):
    pipe, folder = saved
    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded) is StreamingHybridPipeline  # the shim re-exports the installed class
    assert type(loaded.transformer) is HybridForcingTransformer3DModel
    assert loaded.config.denoising_step_list == [1000.0, 750.0, 500.0]
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_run(loaded, components), _run(pipe, components))
    np_loaded = _run(loaded, components, output_type="np")
    assert (np_loaded == _run(pipe, components, output_type="np")).all()
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(folder)


def test_class_from_pretrained_and_resave(saved, components, tmp_path):
    pipe, folder = saved
    loaded = StreamingHybridPipeline.from_pretrained(folder)  # our own shims need no trust flag
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_run(loaded, components), _run(pipe, components))
    # a component passed explicitly replaces the saved one (diffusers' type check finds the shim's class)
    window = HybridForcingTransformer3DModel.from_pretrained(folder, subfolder="transformer", attention_mode="window")
    swapped = StreamingHybridPipeline.from_pretrained(folder, transformer=window)
    assert swapped.transformer is window and swapped.transformer.config.attention_mode == "window"
    # saving a loaded pipeline keeps the layout
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert json.load(open(again / "model_index.json"))["_class_name"] == ["pipeline_streaming_hybrid",
                                                                            "StreamingHybridPipeline"]
    assert hub_utils.is_known_shim_layout(again)
    # a tampered shim is not trusted implicitly
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    with open(tampered / "pipeline_streaming_hybrid.py", "a") as f:
        f.write("import os\n")
    assert not hub_utils.is_known_shim_layout(tampered)
    with pytest.raises(ValueError, match="trust_remote_code"):
        StreamingHybridPipeline.from_pretrained(tampered)


def test_save_without_shims_and_errors(saved, components, tmp_path):
    pipe, _ = saved
    plain = tmp_path / "plain"
    pipe.save_pretrained(plain, remote_code_shims=False, model_card=False)
    assert not [f for f in _files(plain) if f.endswith((".py", ".md"))]
    assert json.load(open(plain / "model_index.json"))["transformer"][0].startswith("diffusers_hybrid.")
    loaded = StreamingHybridPipeline.from_pretrained(plain)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_run(loaded, components), _run(pipe, components))
    with pytest.raises(ValueError, match="safetensors"):
        pipe.save_pretrained(tmp_path / "pickle", safe_serialization=False)


def test_model_card(saved):
    from huggingface_hub import ModelCard

    pipe, folder = saved
    card = ModelCard.load(os.path.join(folder, "README.md"))
    assert card.data.base_model is None  # built from local components: its base is unknown
    assert "built on" not in card.text and "huggingface.co/Wan-AI" not in card.text
    assert "chunk by chunk of 3 latent frames (9 video frames for the first chunk, 12 for each later one)" in " ".join(
        card.text.split())
    assert card.data.pipeline_tag == "text-to-video" and card.data.library_name == "diffusers"
    assert {"hybrid-forcing", "text-to-video", "diffusers-hybrid", "attention-hybrid"} <= set(card.data.tags)
    config = pipe.transformer.config
    for key in ("attention_mode", "sink_frames", "local_attn_frames", "sparse_topk_ratio", "rope_mode"):
        assert f"| `{key}` | `{config[key]}` |" in card.text
    assert "denoising_step_list=[1000.0, 750.0, 500.0]" in card.text
    assert 'DiffusionPipeline.from_pretrained("hybrid-forcing-tiny", trust_remote_code=True' in card.text


def _snippets(card_text):
    parts = card_text.split("```python\n")[1:]
    return [p.split("```")[0] for p in parts]


def test_model_card_snippets_run(saved, tmp_path, monkeypatch):
    """The card's usage snippets run as written, pointed at the saved folder and scaled down to CPU size."""
    _, folder = saved
    text = open(os.path.join(folder, "README.md")).read()
    usage, stream = _snippets(text)
    replacements = {
        '"hybrid-forcing-tiny"': repr(folder),
        'pipe.to("cuda")': 'pipe.to("cpu"); pipe.set_progress_bar_config(disable=True)',
        "torch.bfloat16": "torch.float32",
        "height=480, width=832, num_frames=81": "height=32, width=32, num_frames=9, max_sequence_length=16",
        '"red_panda.mp4"': repr(str(tmp_path / "red_panda.mp4")),
    }
    for old, new in replacements.items():
        assert old in usage, old
        usage = usage.replace(old, new)
    exec(compile(usage, "card_usage", "exec"), {})
    assert (tmp_path / "red_panda.mp4").stat().st_size > 0

    replacements = {
        '"hybrid-forcing-tiny"': repr(folder),
        'pipe.to("cuda")': 'pipe.to("cpu")',
        "torch.bfloat16": "torch.float32",
        "num_frames=None)": "num_frames=None, height=32, width=32, max_sequence_length=16)",
        "chunk.index == 10": "chunk.index == 1",
        "chunk.index == 40": "chunk.index == 3",
    }
    for old, new in replacements.items():
        assert old in stream, old
        stream = stream.replace(old, new)
    printed = []
    exec(compile(stream, "card_stream", "exec"), {"print": lambda *a: printed.append(a)})
    assert [p[0] for p in printed] == [0, 1, 2, 3]


def test_push_to_hub_uses_the_same_writer(saved, components, tmp_path, monkeypatch):
    pipe, _ = saved
    uploaded = tmp_path / "uploaded"
    calls = {}

    class Repo:
        repo_id = "someone/hybrid-forcing-tiny"

    def fake_create_repo(repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return Repo()

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, kwargs.get("commit_message"))
        shutil.copytree(folder_path, uploaded, dirs_exist_ok=True)
        return "https://huggingface.co/someone/hybrid-forcing-tiny"

    monkeypatch.setattr(hub_utils, "create_repo", fake_create_repo)
    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload_folder)
    monkeypatch.setattr(hub_utils, "load_hub_model_card", lambda repo_id, token=None: None)  # a new repo: no card
    pipe.push_to_hub("hybrid-forcing-tiny", commit_message="test upload")
    assert calls["create_repo"] == "hybrid-forcing-tiny"
    assert calls["upload"] == ("someone/hybrid-forcing-tiny", "test upload")
    assert hub_utils.is_known_shim_layout(uploaded)
    assert 'from_pretrained("someone/hybrid-forcing-tiny", trust_remote_code=True' in (uploaded / "README.md").read_text()
    loaded = DiffusionPipeline.from_pretrained(uploaded, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_run(loaded, components), _run(pipe, components))

    calls.clear()
    pipe.save_pretrained(tmp_path / "direct", push_to_hub=True, repo_id="someone/other")
    assert calls["create_repo"] == "someone/other"


def test_assemble_from_a_stock_wan_repo(components, tmp_path):
    """A Wan2.1 Diffusers folder (WanPipeline, UniPC scheduler) + a converted transformer."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    config = {k: v for k, v in components.transformer_config.items()
              if k in WanTransformer3DModel._get_init_keys(WanTransformer3DModel)}
    torch.manual_seed(4)
    wan = WanTransformer3DModel(**config).eval()
    tokenizer = components.make_tokenizer()
    text_encoder = components.make_text_encoder(len(tokenizer))
    vae = components.make_vae()
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=wan,
                scheduler=UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction",
                                                  use_flow_sigmas=True)).save_pretrained(tmp_path / "wan")

    hybrid_config = {k: v for k, v in components.transformer_config.items() if k not in config}
    transformer = HybridForcingTransformer3DModel.from_wan(str(tmp_path / "wan"), subfolder="transformer",
                                                           **hybrid_config)
    pipe = StreamingHybridPipeline.from_pretrained(str(tmp_path / "wan"), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"  # kept, not used by the few-step loop
    from diffusers import FlowMatchEulerDiscreteScheduler

    direct = StreamingHybridPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                     scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    direct.set_progress_bar_config(disable=True)
    assert torch.equal(_run(pipe, components), _run(direct, components))
    with pytest.raises(ValueError, match="HybridForcingTransformer3DModel"):
        StreamingHybridPipeline.from_pretrained(str(tmp_path / "wan"))  # an unconverted Wan transformer


def test_model_card_of_a_model_whose_base_is_not_on_the_hub(saved):
    """A student distilled from a local teacher (e.g. the shapes teacher) must not claim a Hub base model."""
    from diffusers_hybrid.utils.hub_utils import make_model_card

    pipe, _ = saved
    card = make_model_card("shapes-student", dict(pipe.transformer.config), base_model=None)
    assert card.data.base_model is None and "huggingface.co/Wan-AI" not in card.text and "built on" not in card.text
    card = make_model_card("hf-1.3b", dict(pipe.transformer.config), base_model=hub_utils.BASE_MODEL)
    assert card.data.base_model == hub_utils.BASE_MODEL
    assert "built on [Wan-AI/Wan2.1-T2V-1.3B-Diffusers](https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers)" in (
        " ".join(card.text.split()))


def test_save_pretrained_names_a_base_model_only_when_known(saved, components, tmp_path):
    """Audit: every saved card claimed `base_model: Wan-AI/Wan2.1-T2V-1.3B-Diffusers`. Now: the `base_model` argument,
    else the pipeline's `base_model` attribute (`None` unless set or known when loading)."""
    from huggingface_hub import ModelCard

    pipe, folder = saved
    assert pipe.base_model is None
    pipe.save_pretrained(tmp_path / "plain")
    assert ModelCard.load(tmp_path / "plain" / "README.md").data.base_model is None
    pipe.save_pretrained(tmp_path / "arg", base_model="someone/base-model")
    card = ModelCard.load(tmp_path / "arg" / "README.md")
    assert card.data.base_model == "someone/base-model" and "huggingface.co/someone/base-model" in card.text
    pipe.base_model = "someone/attribute-base"
    try:
        pipe.save_pretrained(tmp_path / "attr")
    finally:
        pipe.base_model = None
    assert ModelCard.load(tmp_path / "attr" / "README.md").data.base_model == "someone/attribute-base"
    # known when loading: the local folder's card names it, and a re-save keeps it
    loaded = StreamingHybridPipeline.from_pretrained(tmp_path / "attr")
    assert loaded.base_model == "someone/attribute-base"
    loaded.save_pretrained(tmp_path / "resaved")
    assert ModelCard.load(tmp_path / "resaved" / "README.md").data.base_model == "someone/attribute-base"
    assert StreamingHybridPipeline.from_pretrained(folder).base_model is None


def test_base_model_of_a_stock_wan_hub_repo(tmp_path):
    """Assembled from a stock diffusers repo on the Hub (a converted transformer passed in), the base is that repo; a
    Hub repo in our layout has the base its cached card names. Read from the local Hub cache only."""
    def cache_file(repo_id, filename, content):
        repo = tmp_path / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text("abc123")
        (repo / "snapshots" / "abc123").mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / "abc123" / filename).write_text(content)

    cache_file("Wan-AI/Wan2.1-T2V-14B-Diffusers", "model_index.json", json.dumps({"_class_name": "WanPipeline"}))
    cache_file("someone/hybrid", "model_index.json",
               json.dumps({"_class_name": ["pipeline_streaming_hybrid", "StreamingHybridPipeline"]}))
    cache_file("someone/hybrid", "README.md", "---\nbase_model: Wan-AI/Wan2.1-T2V-14B-Diffusers\n---\n# card\n")
    cache_file("someone/other", "model_index.json",
               json.dumps({"_class_name": ["pipeline_streaming_hybrid", "StreamingHybridPipeline"]}))
    known = hub_utils.known_base_model
    assert known("Wan-AI/Wan2.1-T2V-14B-Diffusers", cache_dir=str(tmp_path)) == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    assert known("someone/hybrid", cache_dir=str(tmp_path)) == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    assert known("someone/other", cache_dir=str(tmp_path)) is None  # no cached card
    assert known("someone/not-cached", cache_dir=str(tmp_path)) is None
    assert known(str(tmp_path)) is None  # not a pipeline folder
    snapshot = next((tmp_path / "models--Wan-AI--Wan2.1-T2V-14B-Diffusers" / "snapshots").iterdir())
    (snapshot / "README.md").write_text("---\nbase_model: someone/wan-base\n---\n")
    assert known(str(snapshot)) is None  # a local stock folder is not a Hub id, and its card's base is not ours
    assert known("Wan-AI/Wan2.1-T2V-14B-Diffusers", cache_dir=str(tmp_path)) == "Wan-AI/Wan2.1-T2V-14B-Diffusers"


def test_save_pretrained_keeps_an_existing_card(saved, tmp_path):
    """Audit: re-saving into a folder replaced its hand-written README.md. Like diffusers' `load_or_create_model_card`,
    an existing card is kept (only `library_name` is added when missing); `overwrite_model_card=True` regenerates."""
    from huggingface_hub import ModelCard

    pipe, _ = saved
    folder = tmp_path / "student"
    pipe.save_pretrained(folder)
    handwritten = "---\nlibrary_name: diffusers\nlicense: apache-2.0\n---\n\n# My student\n\nTraining recipe.\n"
    (folder / "README.md").write_text(handwritten)
    pipe.save_pretrained(folder)
    assert (folder / "README.md").read_text() == handwritten  # byte for byte
    (folder / "README.md").write_text("# No metadata\n\nNotes.\n")
    pipe.save_pretrained(folder)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and "# No metadata\n\nNotes." in card.text
    unparsable = "---\nfoo: [unclosed\n---\n# Mine\n"
    (folder / "README.md").write_text(unparsable)
    pipe.save_pretrained(folder)
    assert (folder / "README.md").read_text() == unparsable
    pipe.save_pretrained(folder, overwrite_model_card=True)
    assert "Hybrid Forcing" in (folder / "README.md").read_text()


def test_model_card_frame_counts_follow_the_config(components, tmp_path):
    """Audit: the card said "(12 video frames)" whatever `num_frame_per_block` was. Chunks of 4 latent frames make 13
    video frames first and 16 after, and the usage snippet asks for a valid length (77 = 20 latent frames)."""
    from huggingface_hub import ModelCard

    pipe = components.make_pipeline(num_frame_per_block=4, sink_frames=4, local_attn_frames=8, dense_max_frames=12,
                                    max_rope_frames=16)
    pipe.save_pretrained(tmp_path / "four")
    text = " ".join(ModelCard.load(tmp_path / "four" / "README.md").text.split())
    assert "chunk by chunk of 4 latent frames (13 video frames for the first chunk, 16 for each later one)" in text
    assert "(13 for the first chunk, 16 for each later one)" in text and "12 video frames" not in text
    assert "num_frames=77" in text
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red panda", num_frames=77, output_type="latent", **components.call_kwargs).frames.shape[2] == 20


def test_push_to_hub_keeps_the_repo_card(saved, tmp_path, monkeypatch):
    """diffusers' `push_to_hub` keeps the card the Hub repo already has; so does ours."""
    from huggingface_hub import ModelCard

    pipe, _ = saved
    uploaded = tmp_path / "uploaded"

    class Repo:
        repo_id = "someone/hybrid-forcing-tiny"

    existing = ModelCard("---\nlibrary_name: diffusers\n---\n\n# The card on the Hub\n")
    monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kwargs: Repo())
    monkeypatch.setattr(hub_utils, "upload_folder",
                        lambda repo_id, folder_path, **kwargs: shutil.copytree(folder_path, uploaded))
    monkeypatch.setattr(hub_utils, "load_hub_model_card", lambda repo_id, token=None: existing)
    pipe.push_to_hub("hybrid-forcing-tiny")
    assert "# The card on the Hub" in (uploaded / "README.md").read_text()
    assert hub_utils.is_known_shim_layout(uploaded)


def test_diffusion_pipeline_from_pretrained_with_a_component(saved, components):
    """Audit: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, transformer=...)` raised "transformer_
    hybrid_forcing is not one of the libraries Diffusers can load components from"."""
    pipe, folder = saved
    window = HybridForcingTransformer3DModel.from_pretrained(folder, subfolder="transformer", attention_mode="window")
    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, transformer=window)
    assert type(loaded) is StreamingHybridPipeline and loaded.transformer is window
    assert loaded.transformer.config.attention_mode == "window"
    loaded.set_progress_bar_config(disable=True)
    swapped = StreamingHybridPipeline.from_pretrained(folder, transformer=window)
    swapped.set_progress_bar_config(disable=True)
    assert torch.equal(_run(loaded, components), _run(swapped, components))
