# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
"""Linear-memory absorption with the keys' RoPE fused into the kernel, against the chain it replaces (needs CUDA).

Main shape: one commit of Wan2.1-1.3B at 832x480 -- 3 latent frames of 1,560 tokens leave the window (s = 4,680),
12 heads of 128, bf16, 9,360 tokens absorbed before --; the frames are read from a cache buffer laid out as the layer
cache's (`[sink 3 | history 3]` frames of raw keys, `[sink 3 | history 3 | current 3]` of values), the RoPE tables
are the model's at the absorbed frames' positions (12..14).

1. Check: the fused op against the float32 reference (`linear_memory_absorb_naive`, same bf16 inputs; the RoPE'd
   keys rounded to bf16 as the op specifies), and against the float32 rotation without that rounding (what the
   rounding costs). The old chain against the same reference.
2. Timings, medians of CUDA-graph replays (each replay runs the op `--inner` times back to back; "hot": inputs may
   stay in L2 between calls; "cold": the L2 is flushed before every call, flush time subtracted):
   (a) old chain, as `HybridLayerCache.commit` ran it before the fusion: `torch.cat` of the 3 frame slices of keys
       and of values, `apply_rotary_emb`, then the old 3-tensor kernel (a private copy of its default launch, below);
   (b) the fused op on slice views of the cache buffers (no copy);
   (c) (b) + what commit step 1 does next: copy into the state, `refresh_projected_memory` (`kv_state @ W.T`);
   (d) LM_CONFIG variants of (b), one knob at a time from the default (`--grid`: every combination of
       absorb_tokens 128/256/512 x absorb_warps 4/8 x absorb_stages 2/3 x absorb_ksum reduce/dot), each checked first;
   (e) the keys given RoPE'd (`key_roped`: the layer cache's `key` buffer, which holds the history RoPE'd at the
       positions the committing chunk saw, 15..17) with the one temporal rotation (3 frames) to the absorption
       positions: loaded tiles, the rotation applied to the sums;
   (f) (e) as `HybridLayerCache.commit` now runs it: written into the state in place, the projected state
       (`kv @ W.T`) by the same split-sum kernel;
   (g) LM_CONFIG variants of (e) (absorb_roped_stages, absorb_warps, absorb_tokens).
3. HBM lower bound per row: the bytes its kernels must read from memory / 3.35e12 B/s (H100 SXM).

    PYTHONPATH=src python benchmarks/bench_memory_absorb.py [--json PATH] [--grid] [--inner N] [--reps N]

Prints a table last; `--json` writes every figure (commit string from `BENCH_COMMIT`, else `git rev-parse`). Without a
CUDA device it exits with an error; `--dry-run` instead runs every step once on the CPU through Triton's interpreter
at a tiny shape with no timing (checks this script, measures nothing).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bench_common import commit, log  # noqa: E402

if not torch.cuda.is_available():  # --dry-run: Triton's interpreter, which must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from diffusers_hybrid.models.transformer_hybrid_forcing import HybridForcingRotaryPosEmbed  # noqa: E402
from diffusers_hybrid.ops import apply_rotary_emb, linear_memory_absorb  # noqa: E402
from diffusers_hybrid.ops.linear_memory import triton_kernel as tk  # noqa: E402
from diffusers_hybrid.ops.linear_memory.naive import linear_memory_absorb_naive  # noqa: E402

HBM_BYTES_PER_S = 3.35e12  # H100 SXM
# positions: the absorbed frames' absorption positions; cached_positions: those the cache's RoPE'd copy holds them at
MAIN = dict(batch=1, frames=3, height=30, width=52, heads=12, dim=128, count=9360, positions=[12, 13, 14],
            cached_positions=[15, 16, 17])
TINY = dict(MAIN, height=4, width=5, heads=2, dim=32, count=120)
DEFAULTS = {"absorb_tokens": 128, "absorb_warps": 8, "absorb_stages": 1, "absorb_ksum": "dot",
            "absorb_finish_rows": 8, "absorb_roped_stages": 3}  # the module's LM_CONFIG defaults (checked at start)
KNOBS = {"absorb_tokens": (128, 256, 512), "absorb_warps": (4, 8), "absorb_stages": (1, 2, 3),
         "absorb_ksum": ("reduce", "dot"), "absorb_finish_rows": (32, 16, 8)}
ROPED_KNOBS = {"absorb_roped_stages": (2, 3, 4), "absorb_warps": (4, 8), "absorb_tokens": (128, 512, 1024, 2048),
               "absorb_progs_per_sm": (2,), "absorb_finish_rows": (8, 16, 32), "absorb_finish_warps": (2, 4, 8),
               "absorb_roped_bt": (32, 128)}


# ------------------------------------------------------------------------------------------------------------------
# The absorption kernel before the fusion (commit 27e2c0a), default launch only: RoPE'd keys, raw keys and values
# read as three (B, s, H, D) tensors. Kept here to time the old chain; the split sums use the module's finish kernel.
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _old_absorb_kernel(KR, KRAW, V, KV_OLD, KM_OLD, KV_OUT, KM_OUT, PART_KV, PART_KM,
                       S, H, tokens_per_split, w_old, w_new,
                       s_krb, s_krl, s_krh, s_kwb, s_kwl, s_kwh, s_vb, s_vl, s_vh,
                       D: tl.constexpr, BT: tl.constexpr, DIRECT: tl.constexpr, F32: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(2)
    n_split = tl.num_programs(2)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, BT)
    acc = tl.zeros((D, D), dtype=tl.float32)
    ksum = tl.zeros((D,), dtype=tl.float32)
    t0 = sp * tokens_per_split
    t1 = tl.minimum(S, t0 + tokens_per_split)
    for t in range(t0, t1, BT):
        rows = t + offs_t
        ok = rows < t1
        kr = tl.load(KR + b * s_krb + h * s_krh + rows[:, None] * s_krl + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + rows[:, None] * s_vl + offs_d[None, :], mask=ok[:, None], other=0.0)
        if F32:  # the interpreter (--dry-run) mis-multiplies bf16
            acc = tl.dot(tl.trans(kr.to(tl.float32)), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(kr), v, acc)
        kw = tl.load(KRAW + b * s_kwb + h * s_kwh + rows[:, None] * s_kwl + offs_d[None, :], mask=ok[:, None],
                     other=0.0)
        ksum += tl.sum(tl.maximum(kw.to(tl.float32), 0.0), axis=0)
    if DIRECT:
        kv_ptr = bh * D * D + offs_d[:, None] * D + offs_d[None, :]
        tl.store(KV_OUT + kv_ptr, acc * w_new + tl.load(KV_OLD + kv_ptr) * w_old)
        tl.store(KM_OUT + bh * D + offs_d, ksum * w_new + tl.load(KM_OLD + bh * D + offs_d) * w_old)
    else:
        tl.store(PART_KV + (bh * n_split + sp) * D * D + offs_d[:, None] * D + offs_d[None, :], acc)
        tl.store(PART_KM + (bh * n_split + sp) * D + offs_d, ksum)


def old_absorb_launch(kv_state, kmean_state, count, key_roped, key_raw, value):
    """The old `_absorb_launch` at its default LM_CONFIG (128 tokens per program, 1 program per SM, 8 warps, 3
    stages, one column block, reduce key sums); contiguous inputs."""
    batch, num_new, heads, dim = key_raw.shape
    total = count + num_new
    w_old, w_new = count / total, 1.0 / total
    kv_out, km_out = torch.empty_like(kv_state), torch.empty_like(kmean_state)
    interpret = tk._interpret()
    bt = 32 if interpret else 64
    if interpret:
        num_splits = 1
    else:
        sms = torch.cuda.get_device_properties(key_raw.device).multi_processor_count
        num_splits = max(1, min(triton.cdiv(num_new, 128), sms // (batch * heads)))
    tokens_per_split = triton.cdiv(triton.cdiv(num_new, num_splits), bt) * bt
    num_splits = triton.cdiv(num_new, tokens_per_split)
    direct = num_splits == 1
    part_kv = torch.empty((batch * heads, num_splits, dim, dim), device=kv_state.device, dtype=torch.float32)
    part_km = torch.empty((batch * heads, num_splits, dim), device=kv_state.device, dtype=torch.float32)
    _old_absorb_kernel[(batch * heads, 1, num_splits)](
        key_roped, key_raw, value, kv_state, kmean_state, kv_out, km_out, part_kv, part_km,
        num_new, heads, tokens_per_split, w_old, w_new,
        *key_roped.stride()[:3], *key_raw.stride()[:3], *value.stride()[:3],
        D=dim, BT=bt, DIRECT=direct, F32=interpret, num_warps=8, num_stages=1 if interpret else 3,
    )
    if not direct:
        tk._absorb_finish_kernel[(batch * heads, dim // 32)](
            kv_state, kmean_state, kv_out, km_out, part_kv, part_km, kv_out, kv_out, kv_out, kv_out, num_splits, w_old,
            w_new, D=dim, BR=32, ROTATE=False, PROJECT=False, PREC="ieee", num_warps=4,
        )
    return kv_out, km_out


def roped_main_kernel(x: dict, count: int):
    """A launch of `_absorb_roped_kernel` alone as `_absorb_launch` makes it (default LM_CONFIG; partial sums into a
    preallocated buffer, no split sum), to split (e)'s time between its two kernels."""
    key, key_roped, value = x["key"], x["key_roped"], x["value"]
    batch, num_new, heads, dim = key.shape
    bt = 32 if tk._interpret() else tk.LM_CONFIG.get("absorb_roped_bt", 64)
    if tk._interpret():
        splits = 1
    else:
        sms = torch.cuda.get_device_properties(key.device).multi_processor_count
        splits = max(1, min(triton.cdiv(num_new, tk.LM_CONFIG["absorb_tokens"]), sms // (batch * heads)))
    tokens_per_split = triton.cdiv(triton.cdiv(num_new, splits), bt) * bt
    splits = triton.cdiv(num_new, tokens_per_split)
    part_kv = torch.empty((batch * heads, splits, dim, dim), device=key.device)
    part_km = torch.empty((batch * heads, splits, dim), device=key.device)
    f32, prec = tk._dot_mode(key)

    def launch():
        tk._absorb_roped_kernel[(batch * heads, 1, splits)](
            key_roped, key, value, part_kv, part_km, num_new, heads, tokens_per_split,
            *key_roped.stride()[:3], *key.stride()[:3], *value.stride()[:3],
            D=dim, BE=dim, BT=bt, F32=f32, PREC=prec, num_warps=tk.LM_CONFIG.get("absorb_warps", 8),
            num_stages=1 if tk._interpret() else tk.LM_CONFIG["absorb_roped_stages"])

    return launch


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def graph_median_us(fn, *, inner: int, reps: int, flush: torch.Tensor | None = None, dry_run: bool = False) -> float:
    """Median microseconds per call of `fn`: warm-up on a side stream, capture `inner` calls (each after an L2 flush
    when `flush` is given) into one CUDA graph, replay it `reps` times between CUDA events; with `flush`, the median
    of a graph of the flushes alone is subtracted."""
    if dry_run:
        fn()
        return float("nan")

    def body():
        for _ in range(inner):
            if flush is not None:
                flush.zero_()
            fn()

    def time_graph(step) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(5):
            graph.replay()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3 / inner

    us = time_graph(body)
    if flush is not None:
        us -= time_graph(lambda: [flush.zero_() for _ in range(inner)])
    return us


def make_inputs(shape: dict, device: str):
    """Cache buffers as the layer cache lays them out, the absorbed frames (history slots 3..5) as views, the state
    and the model's RoPE tables at the absorbed positions."""
    g = torch.Generator(device=device).manual_seed(0)
    tpf = shape["height"] * shape["width"]
    b, h, d = shape["batch"], shape["heads"], shape["dim"]
    sink = hist = shape["frames"]
    key_cache = torch.randn(b, (sink + hist) * tpf, h, d, device=device, generator=g).bfloat16()
    value_cache = torch.randn(b, (sink + hist + 3) * tpf, h, d, device=device, generator=g).bfloat16()
    absorbed = slice(sink * tpf, (sink + hist) * tpf)
    frame_slices = [slice((sink + i) * tpf, (sink + i + 1) * tpf) for i in range(hist)]
    kv = torch.randn(b, h, d, d, device=device, generator=g) / d
    kmean = torch.rand(b, h, d, device=device, generator=g)
    rope = HybridForcingRotaryPosEmbed(d, (1, 2, 2), 1024).to(device)
    cos, sin = rope(shape["positions"], shape["height"], shape["width"])
    weight = (torch.randn(d, d, device=device, generator=g) / d**0.5).bfloat16()  # linear_proj.weight
    # the layer cache's `key` buffer: the history RoPE'd at the positions the committing chunk saw; the rotation
    # from there to the absorption positions (as the model's chunk plan builds it)
    roped_cache = key_cache.clone()
    roped_cache[:, absorbed] = apply_rotary_emb(key_cache[:, absorbed],
                                                *rope(shape["cached_positions"], shape["height"], shape["width"]))
    delta = shape["cached_positions"][0] - shape["positions"][0]
    shift_cos, shift_sin = rope([delta], 1, 1)
    return dict(key_cache=key_cache, value_cache=value_cache, key=key_cache[:, absorbed],
                value=value_cache[:, absorbed], frame_slices=frame_slices, kv=kv, kmean=kmean, cos=cos, sin=sin,
                weight=weight, key_roped=roped_cache[:, absorbed], shift=(shift_cos, -shift_sin))


def hbm_bytes(x: dict) -> dict:
    """Bytes each row's kernels must read from HBM (lower bound: every input once; the tables' even / odd channels
    are read as whole 32-byte sectors, so whole tables; the state counted once)."""
    tokens = x["key"].numel() * x["key"].element_size()  # one (B, s, H, D) bf16 tensor
    tables = (x["cos"].numel() + x["sin"].numel()) * 4
    state = (x["kv"].numel() + x["kmean"].numel()) * 4
    fused = 2 * tokens + tables + state
    old = (2 * tokens  # torch.cat reads keys and values ...
           + tokens + tables  # ... apply_rotary_emb reads the gathered keys and the tables ...
           + 3 * tokens + state)  # ... the old kernel reads RoPE'd keys, raw keys, values
    commit = fused + x["kv"].numel() * 4 + x["weight"].numel() * x["weight"].element_size()
    roped = 3 * tokens + state  # RoPE'd keys, raw keys (their relu sums), values
    return {"old_chain": old, "fused": fused, "fused_commit": commit, "roped": roped,
            "roped_commit": roped + x["weight"].numel() * x["weight"].element_size()}


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the results here (default: none)")
    parser.add_argument("--grid", action="store_true", help="every LM_CONFIG combination (may take over a minute)")
    parser.add_argument("--inner", type=int, default=20, help="calls per CUDA-graph replay")
    parser.add_argument("--reps", type=int, default=100, help="replays per median")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny shape, no timings: checks this script only")
    args = parser.parse_args(argv)
    dry = args.dry_run
    effective = {"absorb_warps": 8, **{k: v for k, v in tk.LM_CONFIG.items() if k.startswith("absorb")}}
    if any(effective.get(k) != v for k, v in DEFAULTS.items()):
        raise SystemExit(f"DEFAULTS {DEFAULTS} differ from the module's LM_CONFIG {effective}: update this script")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("bench_memory_absorb.py needs a CUDA device (none found); --dry-run checks the script on CPU")
    if dry and not tk._interpret():
        raise SystemExit("--dry-run runs through Triton's interpreter: set TRITON_INTERPRET=1")
    device = "cpu" if dry else "cuda"
    shape = TINY if dry else MAIN
    inner, reps = (1, 1) if dry else (args.inner, args.reps)
    x = make_inputs(shape, device)
    count = shape["count"]
    key, value, kv, kmean, cos, sin = x["key"], x["value"], x["kv"], x["kmean"], x["cos"], x["sin"]
    flush = None
    if not dry:
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        flush = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=device)
    device_name = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    log(f"device {device_name}; B={shape['batch']} s={key.shape[1]} H={shape['heads']} D={shape['dim']} bf16, "
        f"count {count}; commit {commit()}")

    # ---- 1. correctness --------------------------------------------------------------------------------------
    want = linear_memory_absorb_naive(kv, kmean, count, key, value, cos, sin)
    want_unrounded = linear_memory_absorb_naive(kv, kmean, count, key.float(), value.float(), cos, sin)

    def old_chain():
        k_abs = torch.cat([x["key_cache"][:, sl] for sl in x["frame_slices"]], dim=1)
        v_abs = torch.cat([x["value_cache"][:, sl] for sl in x["frame_slices"]], dim=1)
        return old_absorb_launch(kv, kmean, count, apply_rotary_emb(k_abs, cos, sin), k_abs, v_abs)

    def fused():
        return linear_memory_absorb(kv, kmean, count, key, value, cos, sin, kernel="triton")

    state_kv, state_kmean, projected = kv.clone(), kmean.clone(), torch.empty_like(kv)

    def fused_commit():  # commit step 1 after the op: HybridLayerCache.commit + refresh_projected_memory
        new_kv, new_kmean = linear_memory_absorb(state_kv, state_kmean, count, key, value, cos, sin, kernel="triton")
        state_kv.copy_(new_kv)
        state_kmean.copy_(new_kmean)
        torch.matmul(state_kv, x["weight"].to(state_kv).t(), out=projected)

    def roped():
        return linear_memory_absorb(kv, kmean, count, key, value, *x["shift"], key_roped=x["key_roped"],
                                    kernel="triton")

    roped_state = (kv.clone(), kmean.clone(), torch.empty_like(kv, dtype=x["weight"].dtype))

    def roped_commit():  # HybridLayerCache.commit step 1 now: in place, the projection in the split-sum kernel
        linear_memory_absorb(roped_state[0], roped_state[1], count, key, value, *x["shift"], key_roped=x["key_roped"],
                             projection=x["weight"], out=roped_state, kernel="triton")

    errors = {}
    want_roped = linear_memory_absorb_naive(kv, kmean, count, key, value, *x["shift"], x["key_roped"], x["weight"])
    got = linear_memory_absorb(kv, kmean, count, key, value, *x["shift"], key_roped=x["key_roped"],
                               projection=x["weight"], kernel="triton")
    exact_projection = got[0] @ x["weight"].float().t()
    errors["roped"] = {"kv": rel_err(got[0], want_roped[0]), "kmean": rel_err(got[1], want_roped[1]),
                       "kv_vs_raw_key_form": rel_err(got[0], want[0]),
                       "projected_vs_float32": rel_err(got[2], exact_projection)}
    log(f"check roped      rel. err. vs float32 reference of that form: kv {errors['roped']['kv']:.2e}  kmean "
        f"{errors['roped']['kmean']:.2e}; kv vs the raw-key form {errors['roped']['kv_vs_raw_key_form']:.2e}; "
        f"projected (bf16) vs float32 {errors['roped']['projected_vs_float32']:.2e}")
    if not (errors["roped"]["kv"] < 1e-4 and errors["roped"]["kmean"] < 1e-5
            and errors["roped"]["kv_vs_raw_key_form"] < 1e-2 and errors["roped"]["projected_vs_float32"] < 1e-2):
        raise SystemExit(f"wrong results: roped ({errors['roped']})")
    for name, fn in (("fused", fused), ("old_chain", old_chain)):
        got = fn()
        errors[name] = {"kv": rel_err(got[0], want[0]), "kmean": rel_err(got[1], want[1]),
                        "kv_vs_fp32_rotation": rel_err(got[0], want_unrounded[0])}
        log(f"check {name:10s} rel. err. vs float32 reference: kv {errors[name]['kv']:.2e}  kmean "
            f"{errors[name]['kmean']:.2e}  (kv vs the fp32 rotation without bf16 rounding of R(k): "
            f"{errors[name]['kv_vs_fp32_rotation']:.2e})")
    bad = [n for n, e in errors.items() if not (e["kv"] < 1e-4 and e["kmean"] < 1e-5)]
    if bad:
        raise SystemExit(f"wrong results: {bad} ({errors})")

    # ---- 2. timings ------------------------------------------------------------------------------------------
    bounds = {k: v / HBM_BYTES_PER_S * 1e6 for k, v in hbm_bytes(x).items()}
    rows = []

    def time_row(name, fn, bound_key, label):
        hot = graph_median_us(fn, inner=inner, reps=reps, dry_run=dry)
        cold = graph_median_us(fn, inner=inner, reps=reps, flush=flush, dry_run=dry)
        rows.append({"name": name, "label": label, "hot_us": hot, "cold_us": cold, "hbm_bound_us": bounds[bound_key]})
        log(f"time {name:28s} hot {hot:8.2f} us  cold {cold:8.2f} us  (HBM bound {bounds[bound_key]:.2f} us)")

    time_row("a_old_chain", old_chain, "old_chain", "(a) cat + apply_rotary_emb + old 3-tensor kernel")
    time_row("b_fused", fused, "fused", "(b) fused op on slice views")
    time_row("c_fused_commit", fused_commit, "fused_commit", "(c) (b) + state copy + kv @ W.T")
    time_row("e_roped", roped, "roped", "(e) RoPE'd keys + one rotation of the sums")
    time_row("e1_roped_main", roped_main_kernel(x, count), "roped", "(e1) (e)'s main kernel alone (partial sums)")
    time_row("f_roped_commit", roped_commit, "roped_commit", "(f) (e) in place + projected state")

    # ---- (d) LM_CONFIG variants ----------------------------------------------------------------------------------
    if args.grid:
        import itertools

        configs = [dict(zip(KNOBS, values)) for values in itertools.product(*KNOBS.values())]
    else:
        configs = [dict(DEFAULTS)] + [{**DEFAULTS, k: v} for k, vs in KNOBS.items() for v in vs if v != DEFAULTS[k]]
        configs += [{**DEFAULTS, "absorb_progs_per_sm": n} for n in (2, 4)]  # the split count's other bound
    saved = tk.LM_CONFIG
    variants = []

    def time_variants(configs, fn, reference, form):
        """Each LM_CONFIG variant checked against `reference`, then timed; failures are reported, not timed."""
        for cfg in configs:
            tk.LM_CONFIG = {**saved, **cfg}
            label = ("roped " if form else "") + " ".join(f"{k.removeprefix('absorb_')}={v}" for k, v in cfg.items())
            entry = {"form": form, "config": cfg} if form else {"config": cfg}
            try:
                got = fn()
                err = (rel_err(got[0], reference[0]), rel_err(got[1], reference[1]))
                if not (err[0] < 1e-4 and err[1] < 1e-5):
                    raise RuntimeError(f"wrong result: rel. err. kv {err[0]:.2e}, kmean {err[1]:.2e}")
                hot = graph_median_us(fn, inner=inner, reps=reps, dry_run=dry)
                cold = graph_median_us(fn, inner=inner, reps=reps, flush=flush, dry_run=dry)
                variants.append({**entry, "hot_us": hot, "cold_us": cold, "err_kv": err[0], "err_kmean": err[1]})
                log(f"variant {label:70s} hot {hot:8.2f} us  cold {cold:8.2f} us  err {err[0]:.1e}")
            except Exception as exc:  # a variant that fails to compile or is wrong is reported, not timed
                variants.append({**entry, "error": f"{type(exc).__name__}: {exc}"})
                log(f"variant {label:70s} FAILED: {type(exc).__name__}: {exc}")

    try:
        time_variants(configs, fused, want, None)
        time_variants([{k: v} for k, vs in ROPED_KNOBS.items() for v in vs], roped, want_roped, "roped")
    finally:
        tk.LM_CONFIG = saved

    # ---- report --------------------------------------------------------------------------------------------------
    result = {
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name, "dry_run": dry, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
        "shape": {**shape, "tokens": key.shape[1], "dtype": "bfloat16"},
        "timing": {"method": "CUDA graph replay median", "inner": inner, "reps": reps,
                   "hbm_bytes_per_s": HBM_BYTES_PER_S},
        "errors": errors, "hbm_bytes": hbm_bytes(x), "rows": rows, "variants": variants,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    log("")
    log(f"{'':52s} {'hot us':>8s} {'cold us':>8s} {'HBM us':>8s}")
    for row in rows:
        log(f"{row['label']:52s} {row['hot_us']:8.2f} {row['cold_us']:8.2f} {row['hbm_bound_us']:8.2f}")
    timed = [v for v in variants if "error" not in v and "form" not in v]
    if timed:
        best = min(timed, key=lambda v: v["cold_us"] if v["cold_us"] == v["cold_us"] else float("inf"))
        label = "(d) best: " + " ".join(f"{k.removeprefix('absorb_')}={v}" for k, v in best["config"].items())
        log(f"{label:52s} {best['hot_us']:8.2f} {best['cold_us']:8.2f} {bounds['fused']:8.2f}")
    return result


if __name__ == "__main__":
    main()
