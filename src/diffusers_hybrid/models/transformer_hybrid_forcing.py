# Copyright 2026 The diffusers-hybrid authors and The HuggingFace Team. Licensed under the Apache License, Version 2.0.
#
# Adapted from diffusers.models.transformers.transformer_wan (diffusers==0.42.1): the module tree and parameter names
# are Wan's, so Wan2.1 checkpoints load key for key; the only new parameters are `blocks.N.attn1.linear_proj.*`.
"""`HybridForcingTransformer3DModel`: a causal, streaming Wan2.1 transformer with hybrid self-attention."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanTimeTextImageEmbedding
from diffusers.utils import BaseOutput, apply_lora_scale, logging
from diffusers.utils.torch_utils import maybe_allow_in_graph

from ..attention_processors import (
    FullSequenceChunk,
    HybridAttentionContext,
    HybridForcingAttnProcessor,
    HybridForcingCrossAttnProcessor,
)
from ..cache import (
    ATTENTION_MODES,
    ROPE_MODES,
    AttentionLayout,
    ChunkPlan,
    HybridCache,
    HybridLayerCache,
    _normalize_device,
)
from ..ops import KERNELS, triton_available
from ..utils.torch_utils import cast_keeping_fp32_modules

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

CACHE_MODES = ("none", "read", "write")
# Parameters that exist here but not in WanTransformer3DModel.
NEW_PARAMETER_PATTERN = re.compile(r"^blocks\.\d+\.attn1\.linear_proj\.(weight|bias)$")

# Original Wan / Self-Forcing / official Hybrid Forcing key names -> diffusers names (the mapping of diffusers'
# convert_wan_to_diffusers, re-stated; `norm2` and `norm3` swap places).
_ORIGINAL_KEY_RENAMES = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("self_attn.linear_proj", "attn1.linear_proj"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
]
_WRAPPER_PREFIXES = ("model.diffusion_model.", "_fsdp_wrapped_module.", "_orig_mod.", "module.", "model.")


def _rename_original_key(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    key = key.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")
    match = re.match(r"^blocks\.(\d+)\.(.*)$", key)
    if match:
        index, rest = match.groups()
        if rest.startswith("norm3."):
            rest = "norm2." + rest[len("norm3.") :]
        elif rest.startswith("norm2."):
            rest = "norm3." + rest[len("norm2.") :]
        for old, new in _ORIGINAL_KEY_RENAMES:
            if rest == old or rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        return f"blocks.{index}.{rest}"
    for old, new in _ORIGINAL_KEY_RENAMES:
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _resolve_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """`dtype`, or its older name `torch_dtype` (diffusers 0.42 takes both); giving two different ones is an error."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"Got `dtype={dtype}` and `torch_dtype={torch_dtype}`; pass only `dtype`.")
    return dtype if dtype is not None else torch_dtype


def _modulation(table: torch.Tensor, temb: torch.Tensor, num: int) -> list[torch.Tensor]:
    """`table` `(1, num, C)` + per-frame `temb` `(B, F', num, C)` -> `num` tensors `(B, F', 1, C)`, float32."""
    return list((table.unsqueeze(0) + temb.float()).chunk(num, dim=2))


def _per_frame(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """`(B, F·T, C)` -> `(B, F, T, C)`."""
    return x.unflatten(1, (num_frames, -1))


@dataclass
class HybridForcingTransformerOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, num_frames, height, width)`): the flow prediction.
        cache ([`HybridCache`], *optional*): the cache passed in (updated in place by `cache_mode="write"`).
    """

    sample: torch.Tensor
    cache: HybridCache | None = None


class HybridForcingRotaryPosEmbed(nn.Module):
    """Wan's 3-D RoPE tables, indexable by arbitrary temporal positions (relative / clamped RoPE)."""

    def __init__(self, attention_head_dim: int, patch_size: tuple[int, int, int], max_seq_len: int,
                 theta: float = 10000.0):
        super().__init__()
        self.h_dim = self.w_dim = 2 * (attention_head_dim // 6)
        self.t_dim = attention_head_dim - self.h_dim - self.w_dim
        self.patch_size = patch_size
        self.max_seq_len = max_seq_len
        self.theta = theta
        cos, sin = self._build_tables()
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _build_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = [], []
        for dim in (self.t_dim, self.h_dim, self.w_dim):
            c, s = get_1d_rotary_pos_embed(
                dim, self.max_seq_len, self.theta, use_real=True, repeat_interleave_real=True,
                freqs_dtype=torch.float64,
            )
            cos.append(c)
            sin.append(s)
        return torch.cat(cos, dim=1).float(), torch.cat(sin, dim=1).float()

    def forward(self, positions: list[int], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            positions (`list[int]`): temporal RoPE index of each frame.
            height, width (`int`): tokens per frame along each axis (after patching).
        Returns:
            `(cos, sin)`, each `(1, len(positions)·height·width, 1, head_dim)` float32.
        """
        key = (tuple(positions), height, width, self.freqs_cos.device)
        cached = self._tables.get(key)
        if cached is not None:
            return cached
        if min(positions) < 0 or max(positions) >= self.max_seq_len:
            raise ValueError(f"RoPE positions {positions} fall outside the table of {self.max_seq_len}.")
        frames = len(positions)
        split = [self.t_dim, self.h_dim, self.w_dim]
        out = []
        for table in (self.freqs_cos, self.freqs_sin):
            t, h, w = table.split(split, dim=1)
            t = t[torch.tensor(positions, device=table.device)].view(frames, 1, 1, -1).expand(frames, height, width, -1)
            h = h[:height].view(1, height, 1, -1).expand(frames, height, width, -1)
            w = w[:width].view(1, 1, width, -1).expand(frames, height, width, -1)
            out.append(torch.cat([t, h, w], dim=-1).reshape(1, frames * height * width, 1, -1))
        if len(self._tables) > 256:  # positions repeat in steady state; bound the table cache anyway
            self._tables.clear()
        self._tables[key] = (out[0], out[1])
        return out[0], out[1]

    def _apply(self, fn, recurse=True):
        self._tables = {}
        super()._apply(fn, recurse)
        if self.freqs_cos.dtype != torch.float32:
            # a `.to(dtype)` of the model: the tables stay float32 (the official ones are float64), rebuilt exactly
            cos, sin = self._build_tables()
            self.freqs_cos = cos.to(self.freqs_cos.device)
            self.freqs_sin = sin.to(self.freqs_sin.device)
        return self


class HybridForcingAttention(WanAttention):
    """Wan's self-attention module plus `linear_proj`, the read-out projection of the linear memory (shared by the
    heads, `head_dim -> head_dim`, zero-initialised so that the memory starts switched off)."""

    def __init__(self, dim: int, heads: int, dim_head: int, eps: float):
        super().__init__(dim=dim, heads=heads, dim_head=dim_head, eps=eps, processor=HybridForcingAttnProcessor())
        self.linear_proj = nn.Linear(dim_head, dim_head, bias=True)
        nn.init.zeros_(self.linear_proj.weight)
        nn.init.zeros_(self.linear_proj.bias)


@maybe_allow_in_graph
class HybridForcingTransformerBlock(nn.Module):
    """Wan's transformer block (same submodule names) with per-frame modulation and the hybrid self-attention."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = HybridForcingAttention(dim=dim, heads=num_heads, dim_head=dim // num_heads, eps=eps)
        self.attn2 = WanAttention(
            dim=dim, heads=num_heads, dim_head=dim // num_heads, eps=eps, cross_attention_dim_head=dim // num_heads,
            processor=HybridForcingCrossAttnProcessor(),
        )
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        temb: torch.Tensor,
        attention_context: HybridAttentionContext,
        text_cache: HybridLayerCache | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`(B, F·T, C)`), encoder_hidden_states (`(B, text_len, C)` or `None` when the cache holds
            the text K/V), temb (`(B, F or 1, 6, C)`): per-frame modulation.
        """
        num_frames = temb.shape[1]
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = _modulation(self.scale_shift_table, temb, 6)
        frames = _per_frame(hidden_states, num_frames)

        # 1. Self-attention
        norm = (_per_frame(self.norm1(hidden_states.float()), num_frames) * (1 + scale_msa) + shift_msa).flatten(1, 2)
        attn_output = self.attn1(norm.type_as(hidden_states), None, None, None, context=attention_context)
        frames = (frames.float() + _per_frame(attn_output, num_frames) * gate_msa).type_as(hidden_states)
        hidden_states = frames.flatten(1, 2)

        # 2. Cross-attention
        norm = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(norm, encoder_hidden_states, None, None, layer_cache=text_cache)

        # 3. Feed-forward
        norm = (_per_frame(self.norm3(hidden_states.float()), num_frames) * (1 + c_scale) + c_shift).flatten(1, 2)
        ff_output = self.ffn(norm.type_as(hidden_states))
        frames = _per_frame(hidden_states, num_frames).float() + _per_frame(ff_output.float(), num_frames) * c_gate
        return frames.flatten(1, 2).type_as(hidden_states)


class HybridForcingTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin):
    r"""
    Causal Wan2.1 transformer of Hybrid Forcing (arXiv 2604.10103): video is generated chunk by chunk of
    `num_frame_per_block` latent frames; self-attention sees a sliding window of recent frames plus sink frames
    (block-sparse softmax) and, in `"hybrid"` mode, a linear-attention memory of every frame that left the window.

    Args:
        patch_size ... pos_embed_seq_len: exactly as [`~diffusers.WanTransformer3DModel`] (Wan2.1-T2V-1.3B values as
            defaults).
        num_frame_per_block (`int`, defaults to 3): latent frames per chunk.
        attention_mode (`str`, defaults to `"hybrid"`): `"dense"` (Self-Forcing: every past frame up to
            `dense_max_frames`), `"window"` (sink + local window, evicted frames dropped) or `"hybrid"` (sink + local
            window, block-sparse, evicted frames folded into the linear memory).
        sink_frames (`int`, defaults to 3): leading frames that stay in the window forever.
        local_attn_frames (`int`, defaults to 6): most recent frames in the window, the current chunk included.
        dense_max_frames (`int`, defaults to 21): frames a `"dense"` chunk attends to at most (current included).
        sparse_topk_ratio (`float`, defaults to 0.2): fraction of key blocks each query block keeps (hybrid mode;
            1.0 = dense window).
        sparse_block_size (`int`, defaults to 64): tokens per sparse block.
        sparse_key_centering (`str`, defaults to `"heads"`): block selection centres keys over the head axis as the
            official code does (`"none"` to skip; see docs/deviations.md).
        rope_mode (`str`, defaults to `"relative"`): `"relative"` clamps temporal RoPE below `max_rope_frames`
            (unbounded streaming); `"absolute"` uses each frame's index.
        max_rope_frames (`int`, defaults to 21): the temporal RoPE bound of relative mode (Wan's 21 latent frames).
        absorb_sink_frames (`bool`, defaults to `True`): the sink frames also enter the linear memory (official).
        linear_attn_query (`str`, defaults to `"roped"`): numerator query of the memory read-out, `"roped"` = R(q)
            (official inference) or `"roped_relu"` = R(relu(q)) (official training).
        linear_attn_eps (`float`, defaults to 1e-6): added to the memory read-out's denominator.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _no_split_modules = ["HybridForcingTransformerBlock"]
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    _repeated_blocks = ["HybridForcingTransformerBlock"]
    _skip_keys = ["cache"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 12,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 8960,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        num_frame_per_block: int = 3,
        attention_mode: str = "hybrid",
        sink_frames: int = 3,
        local_attn_frames: int = 6,
        dense_max_frames: int = 21,
        sparse_topk_ratio: float = 0.2,
        sparse_block_size: int = 64,
        sparse_key_centering: str = "heads",
        rope_mode: str = "relative",
        max_rope_frames: int = 21,
        absorb_sink_frames: bool = True,
        linear_attn_query: str = "roped",
        linear_attn_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self._check_config()
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels

        # 1. Patch & position embedding
        self.rope = HybridForcingRotaryPosEmbed(attention_head_dim, patch_size, rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)

        # 2. Condition embeddings
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim, time_freq_dim=freq_dim, time_proj_dim=inner_dim * 6, text_embed_dim=text_dim,
            image_embed_dim=image_dim, pos_embed_seq_len=pos_embed_seq_len,
        )

        # 3. Transformer blocks
        self.blocks = nn.ModuleList(
            [
                HybridForcingTransformerBlock(inner_dim, ffn_dim, num_attention_heads, cross_attn_norm, eps)
                for _ in range(num_layers)
            ]
        )

        # 4. Output norm & projection
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

        self.gradient_checkpointing = False
        self._attention_kernel = "reference"

    # ------------------------------------------------------------------------------------------------------------
    # configuration
    # ------------------------------------------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        checks = [
            (c.attention_mode in ATTENTION_MODES, f"`attention_mode` must be one of {ATTENTION_MODES}"),
            (c.rope_mode in ROPE_MODES, f"`rope_mode` must be one of {ROPE_MODES}"),
            (c.sparse_key_centering in ("heads", "none"), "`sparse_key_centering` must be 'heads' or 'none'"),
            (c.linear_attn_query in ("roped", "roped_relu"), "`linear_attn_query` must be 'roped' or 'roped_relu'"),
            (tuple(c.patch_size)[0] == 1, "temporal `patch_size` must be 1 (one token row per latent frame)"),
            (c.image_dim is None and c.added_kv_proj_dim is None, "image conditioning (I2V) is not supported"),
            (c.num_frame_per_block >= 1, "`num_frame_per_block` must be >= 1"),
            (c.sink_frames >= 0, "`sink_frames` must be >= 0"),
            (c.local_attn_frames >= c.num_frame_per_block, "`local_attn_frames` (the window) is smaller than a chunk"),
            (c.dense_max_frames >= c.num_frame_per_block, "`dense_max_frames` is smaller than a chunk"),
            (0.0 < c.sparse_topk_ratio <= 1.0, "`sparse_topk_ratio` must be in (0, 1]"),
            (c.sparse_block_size >= 1, "`sparse_block_size` must be >= 1"),
            (c.max_rope_frames <= c.rope_max_seq_len, "`max_rope_frames` exceeds `rope_max_seq_len`"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got config {dict(c)}.")
        layout = AttentionLayout.from_config(c)
        if c.rope_mode == "relative":
            need = layout.window_frames + (layout.chunk_frames if layout.use_memory else 0)
            if c.max_rope_frames < need:
                raise ValueError(
                    f"`max_rope_frames`={c.max_rope_frames} is too small for a window of {layout.window_frames} "
                    f"frames{' plus the memory' if layout.use_memory else ''}: it must be >= {need}."
                )
            # clamped window keys end at `max_rope_frames` - 1; below the sink's they would share its positions
            if c.max_rope_frames < layout.sink_frames + layout.window_frames:
                raise ValueError(
                    f"`max_rope_frames`={c.max_rope_frames} would give window keys the temporal RoPE positions of the "
                    f"{layout.sink_frames} sink frames: it must be >= sink + window = "
                    f"{layout.sink_frames + layout.window_frames}."
                )

    def set_attention_mode(self, attention_mode: str, **attention_config) -> None:
        """
        Switches the attention configuration in place (e.g. stage 1 `"dense"` -> stage 2 `"hybrid"`), validating it.
        Caches made before the switch no longer match: call `init_cache` again.

        Args:
            attention_mode (`str`): `"dense"`, `"window"` or `"hybrid"`.
            **attention_config: other config values to change with it (`sink_frames`, `sparse_topk_ratio`, ...).
        """
        allowed = {
            "num_frame_per_block", "sink_frames", "local_attn_frames", "dense_max_frames", "sparse_topk_ratio",
            "sparse_block_size", "sparse_key_centering", "rope_mode", "max_rope_frames", "absorb_sink_frames",
            "linear_attn_query", "linear_attn_eps",
        }
        unknown = sorted(set(attention_config) - allowed)
        if unknown:
            raise ValueError(f"`set_attention_mode` cannot change {unknown}; allowed: {sorted(allowed)}.")
        previous = {k: self.config[k] for k in ["attention_mode", *attention_config]}
        self.register_to_config(attention_mode=attention_mode, **attention_config)
        try:
            self._check_config()
        except ValueError:
            self.register_to_config(**previous)
            raise

    @property
    def attention_layout(self) -> AttentionLayout:
        return AttentionLayout.from_config(self.config)

    def set_attention_kernel(self, kernel: str) -> None:
        """Selects the self-attention implementation: `"reference"` (plain PyTorch) or `"triton"`. Without a usable
        Triton (no CUDA device and no `TRITON_INTERPRET=1`) it falls back to `"reference"` with one warning."""
        if kernel not in KERNELS:
            raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}.")
        if kernel == "triton" and not triton_available():
            logger.warning("Triton kernels are not available here (no CUDA device); using the reference kernels.")
            kernel = "reference"
        for block in self.blocks:
            block.attn1.processor.kernel = kernel
        self._attention_kernel = kernel

    @property
    def attention_kernel(self) -> str:
        return self._attention_kernel

    # ------------------------------------------------------------------------------------------------------------
    # construction from other checkpoints
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_wan(cls, wan_model_or_path, subfolder: str | None = None, dtype: torch.dtype | None = None,
                 torch_dtype: torch.dtype | None = None, **hybrid_config) -> "HybridForcingTransformer3DModel":
        """
        Builds the model from a [`~diffusers.WanTransformer3DModel`] (an instance, or a path / repo id loadable by
        its `from_pretrained`), copying every Wan weight and explicitly zeroing the new `linear_proj` parameters.

        Args:
            wan_model_or_path: the Wan transformer or where to load it from.
            subfolder (`str`, *optional*): e.g. `"transformer"` for a pipeline folder.
            dtype (`torch.dtype`, *optional*): the weights' dtype (the modules Wan keeps in float32 stay so); defaults
                to the Wan model's. `torch_dtype` is accepted as its older name, as diffusers' `from_pretrained` does.
            **hybrid_config: Hybrid Forcing config values (`attention_mode`, `sink_frames`, ...).
        """
        from diffusers import WanTransformer3DModel

        dtype = _resolve_dtype(dtype, torch_dtype)
        if isinstance(wan_model_or_path, (str, os.PathLike)):
            kwargs = {"subfolder": subfolder} if subfolder else {}
            wan = WanTransformer3DModel.from_pretrained(wan_model_or_path, **kwargs)
        else:
            wan = wan_model_or_path
        config = {k: v for k, v in wan.config.items() if not k.startswith("_")}
        unknown = sorted(set(hybrid_config) - set(cls._get_init_keys(cls)))
        if unknown:
            raise ValueError(f"Unknown config arguments for {cls.__name__}: {unknown}.")
        model = cls.from_config({**config, **hybrid_config})
        state_dict = wan.state_dict()
        model._load_checked(state_dict, allow_missing_new=True)
        # `wan.dtype` skips the modules Wan keeps in float32 (its first parameter is one of them)
        model = model.to(wan.device)
        return cast_keeping_fp32_modules(model, dtype if dtype is not None else wan.dtype)

    def _load_checked(self, state_dict: dict[str, torch.Tensor], allow_missing_new: bool) -> None:
        """`load_state_dict` that raises on unknown keys and on missing keys other than the new parameters (which are
        zeroed explicitly when missing)."""
        own = self.state_dict()
        unexpected = sorted(k for k in state_dict if k not in own)
        missing = sorted(k for k in own if k not in state_dict)
        missing_other = [k for k in missing if not (allow_missing_new and NEW_PARAMETER_PATTERN.match(k))]
        if unexpected or missing_other:
            raise ValueError(
                f"Checkpoint does not match {type(self).__name__}: unknown keys {unexpected[:20]}"
                f"{' ...' if len(unexpected) > 20 else ''}; missing keys {missing_other[:20]}"
                f"{' ...' if len(missing_other) > 20 else ''}."
            )
        mismatched = [k for k in state_dict if state_dict[k].shape != own[k].shape]
        if mismatched:
            raise ValueError(
                "Checkpoint shapes do not match the config: "
                + ", ".join(f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:10])
            )
        self.load_state_dict(state_dict, strict=False)
        with torch.no_grad():
            for name in missing:
                self.get_parameter(name).zero_()

    @classmethod
    def from_original_checkpoint(
        cls,
        path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor],
        config: dict[str, Any] | str | os.PathLike | None = None,
        use_ema: bool = False,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        **hybrid_config,
    ) -> "HybridForcingTransformer3DModel":
        """
        Loads an original-format checkpoint: (a) Wan2.1 files (`blocks.N.self_attn.q.weight`, optionally under
        `model.diffusion_model.`), (b) Self-Forcing checkpoints (`{"generator": ..., "generator_ema": ...}`, keys
        under `model.`), (c) official Hybrid Forcing checkpoints (the same plus `self_attn.linear_proj`).

        Args:
            path_or_state_dict: a `.safetensors` or `.pt`/`.pth` file (read with `weights_only=True`), a folder of
                `.safetensors` shards, or a state dict.
            config: a dict, or a folder / `config.json` of a diffusers Wan or Hybrid Forcing transformer. If `None`,
                the architecture is inferred from the weights (head_dim 128, as in every Wan2.1 model, unless
                `attention_head_dim` is given).
            use_ema (`bool`, defaults to `False`): take `generator_ema` when the checkpoint holds both; the default
                takes `generator` first, as the official inference does.
            dtype (`torch.dtype`, *optional*): cast the weights (the float32 modules stay so); by default they keep
                the checkpoint's dtype. `torch_dtype` is accepted as its older name.
            **hybrid_config: config overrides (`attention_mode`, ...).
        """
        dtype = _resolve_dtype(dtype, torch_dtype)
        state_dict = cls._read_original_state_dict(path_or_state_dict, use_ema)
        state_dict = {_rename_original_key(k): v for k, v in state_dict.items()}
        base = cls._resolve_config(config, state_dict, hybrid_config.get("attention_head_dim", 128))
        model = cls.from_config({**base, **hybrid_config})
        model._load_checked(state_dict, allow_missing_new=True)
        return model if dtype is None else cast_keeping_fp32_modules(model, dtype)

    @staticmethod
    def _read_original_state_dict(source, use_ema: bool) -> dict[str, torch.Tensor]:
        if isinstance(source, dict):
            state = dict(source)
        elif os.path.isdir(source):
            from safetensors.torch import load_file

            files = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))
            if not files:
                raise ValueError(f"No .safetensors files in {source}.")
            state = {}
            for f in files:
                state.update(load_file(os.path.join(source, f)))
        else:
            state = _load_state_dict_file(os.fspath(source))
        order = ["generator_ema", "generator", "model"] if use_ema else ["generator", "generator_ema", "model"]
        if not any(isinstance(v, torch.Tensor) for v in state.values()):
            for key in order:
                if isinstance(state.get(key), dict):
                    return state[key]
            raise ValueError(f"Checkpoint holds no tensors and none of the keys {order}; found {list(state)[:10]}.")
        if use_ema:
            ema = {k[len("generator_ema.") :]: v for k, v in state.items() if k.startswith("generator_ema.")}
            if ema:
                return ema
        for key in order:
            sub = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(key + ".")}
            if sub and key != "model":
                return sub
        return state

    @classmethod
    def _resolve_config(cls, config, state_dict, head_dim: int = 128) -> dict[str, Any]:
        if isinstance(config, dict):
            return {k: v for k, v in config.items() if not k.startswith("_")}
        if config is not None:
            path = os.fspath(config)
            loaded = cls.load_config(os.path.dirname(path) if path.endswith(".json") else path)
            return {k: v for k, v in loaded.items() if not k.startswith("_")}
        try:
            patch = state_dict["patch_embedding.weight"]
            dim, in_channels = patch.shape[0], patch.shape[1]
            if dim % head_dim:
                raise ValueError(
                    f"Cannot infer the head layout: width {dim} is not a multiple of attention_head_dim={head_dim}; "
                    "pass `config=` or `attention_head_dim=`."
                )
            num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
            return {
                "patch_size": tuple(patch.shape[2:]),
                "num_attention_heads": dim // head_dim,
                "attention_head_dim": head_dim,
                "in_channels": in_channels,
                "out_channels": state_dict["proj_out.weight"].shape[0] // math.prod(patch.shape[2:]),
                "text_dim": state_dict["condition_embedder.text_embedder.linear_1.weight"].shape[1],
                "freq_dim": state_dict["condition_embedder.time_embedder.linear_1.weight"].shape[1],
                "ffn_dim": state_dict["blocks.0.ffn.net.0.proj.weight"].shape[0],
                "num_layers": num_layers,
            }
        except KeyError as e:
            raise ValueError(f"Cannot infer the architecture from the checkpoint (missing {e}); pass `config=`.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """[`~diffusers.ModelMixin.from_pretrained`], plus: a checkpoint without `linear_proj` (a Wan or stage-1
        checkpoint) gets it explicitly zeroed instead of left on the meta device or uninitialised."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded  # (model, loading_info)
        model._materialize_missing_new_parameters()
        return loaded

    def _materialize_missing_new_parameters(self) -> None:
        zeroed = []
        for name, param in list(self.named_parameters()):
            if not param.is_meta:
                continue
            if not NEW_PARAMETER_PATTERN.match(name):
                raise ValueError(f"Parameter {name} was not in the checkpoint and has no defined initialisation.")
            module_name, attr = name.rsplit(".", 1)
            module = self.get_submodule(module_name)
            sibling = self.get_submodule(module_name.rsplit(".", 1)[0]).to_q.weight
            setattr(module, attr, nn.Parameter(torch.zeros(param.shape, device=sibling.device, dtype=sibling.dtype)))
            zeroed.append(name)
        if zeroed:
            logger.warning(f"{len(zeroed)} linear-memory parameters were not in the checkpoint and were set to zero.")

    # ------------------------------------------------------------------------------------------------------------
    # cache
    # ------------------------------------------------------------------------------------------------------------
    def _tokens_grid(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        _, p_h, p_w = self.config.patch_size
        if latent_height % p_h or latent_width % p_w:
            raise ValueError(
                f"Latent height/width ({latent_height}, {latent_width}) must be divisible by the patch size "
                f"({p_h}, {p_w})."
            )
        return latent_height // p_h, latent_width // p_w

    def init_cache(self, batch_size: int, latent_height: int, latent_width: int, *, device=None,
                   dtype: torch.dtype | None = None) -> HybridCache:
        """
        Allocates the streaming cache once: per layer the sink + history + scratch K/V, raw keys, the float32 linear
        memory (hybrid mode); text K/V are filled on the first pass of a prompt.

        Args:
            batch_size (`int`), latent_height / latent_width (`int`): the latent video size (tokens per frame derive
                from them).
            device, dtype: default to the model's. A pass checks that the cache's dtype is the one its self-attention
                weights have then: give `dtype` only where they differ from the stored weights at run time (FSDP mixed
                precision casts them for compute).
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        grid_h, grid_w = self._tokens_grid(latent_height, latent_width)
        reference = self.blocks[0].attn1.to_q.weight
        device = reference.device if device is None else torch.device(device)
        dtype = reference.dtype if dtype is None else dtype
        layout = self.attention_layout
        heads, head_dim = self.config.num_attention_heads, self.config.attention_head_dim
        layers = [
            HybridLayerCache(layout, batch_size, grid_h * grid_w, heads, head_dim, device, dtype)
            for _ in range(self.config.num_layers)
        ]
        return HybridCache(layout, layers, batch_size, latent_height, latent_width, grid_h * grid_w, device, dtype)

    def _lora_state(self, text_only: bool = False) -> tuple:
        """The LoRA state of the layers (active, disabled and merged adapters, and their scales, which
        `attention_kwargs["scale"]` sets for a forward), of all of them or of those that make the cached text K/V
        (text embedder, cross-attention K/V projections); `()` without PEFT adapters."""
        if not getattr(self, "_hf_peft_config_loaded", False):
            return ()
        return tuple(
            (tuple(m.active_adapters), m.disable_adapters, tuple(m.merged_adapters),
             tuple(sorted(getattr(m, "scaling", {}).items())))
            for m in self._lora_layers(text_only)
        )

    def _lora_layers(self, text_only: bool) -> list:
        """The PEFT tuner layers that `_lora_state` reads, found once per set of adapters: walking every module
        costs milliseconds per pass on a 30-layer model, which a CUDA-graph replay would otherwise pay each time."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        # Adapters added, deleted or loaded again under a name give other config objects: find the layers again.
        adapters = tuple(getattr(self, "peft_config", {}).items())
        cached = self.__dict__.get("_lora_layers_cache")
        same = cached is not None and len(cached["adapters"]) == len(adapters) and all(
            a[0] == b[0] and a[1] is b[1] for a, b in zip(cached["adapters"], adapters))
        if not same:
            cached = self.__dict__["_lora_layers_cache"] = {"adapters": adapters}
        if text_only not in cached:
            if text_only:
                projections = [proj for block in self.blocks for proj in (block.attn2.to_k, block.attn2.to_v)]
                modules = [*self.condition_embedder.text_embedder.modules(), *projections]
            else:
                modules = self.modules()
            cached[text_only] = [m for m in modules if isinstance(m, BaseTunerLayer)]
        return cached[text_only]

    def _check_cache(self, cache: HybridCache, hidden_states: torch.Tensor, frame_offset: int) -> None:
        batch, _, num_frames, height, width = hidden_states.shape
        chunk = self.config.num_frame_per_block
        if cache.layout != self.attention_layout:
            raise ValueError("The cache was built for another attention configuration; call `init_cache` again.")
        if num_frames != chunk:
            raise ValueError(f"A cached pass takes one chunk of {chunk} latent frames, got {num_frames}.")
        if frame_offset != cache.frames_written:
            raise ValueError(
                f"`frame_offset`={frame_offset} does not match the cache, which holds {cache.frames_written} frames "
                f"(the next chunk starts at frame {cache.frames_written})."
            )
        if batch != cache.batch_size:
            raise ValueError(f"Batch size {batch} differs from the cache's {cache.batch_size}.")
        if (height, width) != (cache.latent_height, cache.latent_width):
            raise ValueError(
                f"Latent size {(height, width)} differs from the cache's {(cache.latent_height, cache.latent_width)}."
            )
        if _normalize_device(hidden_states.device) != cache.device:
            raise ValueError(f"Input on {hidden_states.device} but the cache is on {cache.device}.")
        param_dtype = self.blocks[0].attn1.to_q.weight.dtype
        if cache.dtype != param_dtype:
            raise ValueError(f"Cache dtype {cache.dtype} differs from the model's {param_dtype}; use `cache.to()`.")

    def write_plan(self, cache: HybridCache) -> ChunkPlan:
        """The plan of the cache-write pass of the chunk `cache` holds next: what [`HybridCache.commit_pending`] takes
        after a write pass whose commits were deferred ([`HybridCache.defer_commits`])."""
        return self._chunk_plan(cache, True, self._tokens_grid(cache.latent_height, cache.latent_width))

    def _chunk_plan(self, cache: HybridCache, write: bool, grid: tuple[int, int]) -> ChunkPlan:
        layout, f0 = cache.layout, cache.frames_written
        chunk, sink = layout.chunk_frames, layout.sink_frames
        frames, _ = layout.visible_frames(f0)
        plan = ChunkPlan(
            chunk_start=f0,
            tokens_per_frame=cache.tokens_per_frame,
            query_rope=self.rope(layout.query_positions(f0), *grid),
            sink_valid=sum(1 for f in frames if f < min(sink, f0)),
            history_valid=sum(1 for f in frames if sink <= f < f0),
            memory_tokens=cache.memory_tokens,
            memory_ready=cache.memory_tokens > 0,
        )
        if write:
            next_start = f0 + chunk
            new_sink = list(range(f0, min(sink, next_start)))
            if new_sink:
                plan.sink_rope = self.rope(new_sink, *grid)
            plan.absorb_frames, absorb_positions = layout.frames_absorbed_for(next_start)
            if plan.absorb_frames:
                plan.absorb_rope = self.rope(absorb_positions, *grid)
                # R(p - d) = R(-d) R(p): the temporal table at position d with its sines negated (the spatial
                # channels of position (0, 0) do not rotate)
                delta = layout.rope_shift(next_start) - layout.rope_shift(f0)
                cos, sin = self.rope([delta], 1, 1)
                plan.absorb_key_shift = (cos, -sin)
            if layout.history_frames:
                plan.history_rope = self._history_rope(layout, next_start, grid)
        return plan

    def _history_rope(self, layout: AttentionLayout, chunk_start: int, grid: tuple[int, int]):
        """RoPE of the history slots (the `history_frames` frames before `chunk_start`) as that chunk sees them."""
        shift = layout.rope_shift(chunk_start)
        history = range(chunk_start - layout.history_frames, chunk_start)
        # slots of frames that do not exist yet (f < 0) are never read; give them position 0
        return self.rope([max(0, f - shift) for f in history], *grid)

    def rewind_cache(self, cache: HybridCache, records: list) -> None:
        """Restores `cache` to before the first of `records` (consecutive [`~cache.CommitRecord`]s from
        `cache.record_commit()`, one per commit, covering the history window). Used to re-encode the window exactly
        under a new prompt: rewind, then replay the write passes."""
        if not records:
            raise ValueError("`records` is empty.")
        grid = self._tokens_grid(cache.latent_height, cache.latent_width)
        cache.rewind(records, self._history_rope(cache.layout, records[0].frames_written, grid))

    def _full_sequence_chunks(self, num_frames: int, grid: tuple[int, int]) -> list[FullSequenceChunk]:
        layout = self.attention_layout
        chunks = []
        for start in range(0, num_frames, layout.chunk_frames):
            key_frames, key_positions = layout.visible_frames(start)
            absorb, absorb_positions = layout.frames_absorbed_for(start)
            chunks.append(
                FullSequenceChunk(
                    chunk_start=start,
                    query_rope=self.rope(layout.query_positions(start), *grid),
                    key_frames=key_frames,
                    key_rope=self.rope(key_positions, *grid),
                    absorb_frames=absorb,
                    absorb_rope=self.rope(absorb_positions, *grid) if absorb else None,
                )
            )
        return chunks

    # ------------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------------
    def _embed_timestep(self, timestep: torch.Tensor, batch: int, num_frames: int, like: torch.Tensor):
        """Returns `temb` `(B, F', C)` and `timestep_proj` `(B, F', 6, C)` with `F'` = 1 or `num_frames`."""
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.ndim == 1:
            if timestep.shape[0] != batch:
                raise ValueError(f"`timestep` has {timestep.shape[0]} entries for a batch of {batch}.")
            timestep = timestep[:, None]
        elif timestep.ndim != 2 or timestep.shape[0] != batch or timestep.shape[1] not in (1, num_frames):
            raise ValueError(
                f"`timestep` must be [batch] or [batch, num_frames] = [{batch}, {num_frames}], got "
                f"{list(timestep.shape)}."
            )
        embedder = self.condition_embedder
        per_frame = timestep.shape[1]
        sinusoid = embedder.timesteps_proj(timestep.flatten())
        embed_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        if sinusoid.dtype != embed_dtype and embed_dtype != torch.int8:
            sinusoid = sinusoid.to(embed_dtype)
        temb = embedder.time_embedder(sinusoid).type_as(like)
        timestep_proj = embedder.time_proj(embedder.act_fn(temb))
        return temb.unflatten(0, (batch, per_frame)), timestep_proj.unflatten(0, (batch, per_frame)).unflatten(2, (6, -1))

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        cache: HybridCache | None = None,
        frame_offset: int = 0,
        cache_mode: str = "none",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> HybridForcingTransformerOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, in_channels, num_frames, height, width)`): latents.
            timestep (`torch.Tensor` of shape `(batch_size,)` or `(batch_size, num_frames)`): flow-matching timestep
                (0-1000), per sample or per frame.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, text_len, text_dim)`): text embeddings.
            cache ([`HybridCache`], *optional*): from [`init_cache`]; required by `cache_mode` `"read"`/`"write"`.
            frame_offset (`int`): first latent frame of `hidden_states` in the video; must equal
                `cache.frames_written` in cached modes.
            cache_mode (`str`): `"none"`: the whole input, block-causal by chunks (teacher forcing, training without a
                cache; equals running it chunk by chunk with `"write"`); `"read"`: one chunk attends to the cache and
                itself, the cache is unchanged (denoising steps); `"write"`: the same, then the chunk is committed
                (the clean context pass) and frames leaving the window are absorbed (hybrid) or dropped.
            return_dict (`bool`): return a [`HybridForcingTransformerOutput`] instead of a tuple.
            attention_kwargs (`dict`, *optional*): only `scale` (LoRA scale) is read.

        Returns:
            [`HybridForcingTransformerOutput`] or `(sample,)`; `sample` has the shape of `hidden_states` with
            `out_channels` channels.
        """
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"`cache_mode` must be one of {CACHE_MODES}, got {cache_mode!r}.")
        if hidden_states.ndim != 5:
            raise ValueError(f"`hidden_states` must be (B, C, F, H, W), got shape {tuple(hidden_states.shape)}.")
        batch, _, num_frames, height, width = hidden_states.shape
        grid = self._tokens_grid(height, width)
        tokens_per_frame = grid[0] * grid[1]
        layout = self.attention_layout
        config = self.config

        context = HybridAttentionContext(
            cache_mode=cache_mode, layout=layout, tokens_per_frame=tokens_per_frame,
            topk_ratio=config.sparse_topk_ratio if config.attention_mode == "hybrid" else 1.0,
            block_size=config.sparse_block_size, key_centering=config.sparse_key_centering,
            linear_query=config.linear_attn_query, linear_eps=config.linear_attn_eps,
        )
        if cache_mode == "none":
            if cache is not None:
                raise ValueError("`cache_mode='none'` runs without a cache; use 'read' or 'write' to use one.")
            if frame_offset != 0:
                raise ValueError(f"`cache_mode='none'` starts at frame 0; got `frame_offset`={frame_offset}.")
            if num_frames % layout.chunk_frames:
                raise ValueError(
                    f"`num_frames`={num_frames} is not a whole number of chunks of {layout.chunk_frames} frames."
                )
            context.chunks = self._full_sequence_chunks(num_frames, grid)
        else:
            if cache is None:
                raise ValueError(f"`cache_mode={cache_mode!r}` needs a `cache` (see `init_cache`).")
            self._check_cache(cache, hidden_states, frame_offset)
            context.plan = self._chunk_plan(cache, cache_mode == "write", grid)

        hidden_states = self.patch_embedding(hidden_states)
        hidden_states = hidden_states.flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj = self._embed_timestep(timestep, batch, num_frames, encoder_hidden_states)

        grad = torch.is_grad_enabled()
        use_text_cache = cache is not None and not grad
        text_weights = self._lora_state(text_only=True) if use_text_cache else ()
        if use_text_cache and cache.text_is_cached(encoder_hidden_states, text_weights):
            text = None
        else:
            text = self.condition_embedder.text_embedder(encoder_hidden_states)

        # Transformer blocks
        checkpointing = grad and self.gradient_checkpointing and cache_mode != "write"
        for index, block in enumerate(self.blocks):
            layer_cache = cache[index] if cache is not None else None
            snapshot = None
            if layer_cache is not None and grad:
                # detached copies: the cache's in-place updates (this pass's commit, later passes' writes) must not
                # change what backward uses or recomputes
                cached_key, cached_value = layer_cache.context(context.plan)
                states = (layer_cache.kv_state, layer_cache.kmean_state)
                snapshot = (cached_key.clone(), cached_value.clone()) + tuple(
                    s.clone() if s is not None else None for s in states
                )
            layer_context = context.for_layer(layer_cache, snapshot)
            text_cache = layer_cache if use_text_cache else None
            if checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, text, timestep_proj, layer_context, text_cache
                )
            else:
                hidden_states = block(hidden_states, text, timestep_proj, layer_context, text_cache)

        if cache is not None:
            if use_text_cache:
                cache.set_text_source(encoder_hidden_states, text_weights)
            if cache_mode == "write":
                cache.advance(context.plan)

        # Output norm, projection & unpatchify
        shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
        frames = _per_frame(self.norm_out(hidden_states.float()), temb.shape[1])
        hidden_states = (frames * (1 + scale) + shift).flatten(1, 2).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)

        p_t, p_h, p_w = config.patch_size
        hidden_states = hidden_states.reshape(batch, num_frames // p_t, grid[0], grid[1], p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        output = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)

        if not return_dict:
            return (output,)
        return HybridForcingTransformerOutput(sample=output, cache=cache)
