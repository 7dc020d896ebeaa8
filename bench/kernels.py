"""Check every kernel against its torch reference at Mixtral-8x7B shapes, then time it.

Run on a Hopper GPU: `python -m bench.kernels` (logs to $OUT when set).
Timings: the call (4 rotating weight sets for the linears) captured in a CUDA graph,
replayed under triton.testing.do_bench (median, L2 flushed between replays).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.testing

from sluice.engine.kernels.fp8_linear import SmallMConfig, fp8_linear_small_m, small_m_config
from sluice.engine.kernels.fused_moe import (MoeConfig, fused_moe, fused_moe_reference, moe_align_block_size, moe_config,
                                      moe_prefill_config)
from sluice.engine.kernels.moe_prefill import fp8_moe_prefill
from sluice.engine.layers.moe import MoE
from sluice.engine.kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference
from sluice.engine.kernels.varlen_attention import paged_varlen_attention
from sluice.engine.layers.attention import paged_varlen_attention as paged_varlen_reference
from sluice.engine.kernels.act_quant import per_token_quant_fp8, per_token_quant_reference
from sluice.engine.quant.fp8 import Fp8Linear, quantize_per_channel

D, I, E, TOPK = 4096, 14336, 8, 2
HQ, HKV, HD = 32, 8, 128
ROWS: list[dict] = []
SWEEPS = os.environ.get("SLUICE_SWEEP", "1") == "1"  # tile sweeps; SLUICE_SWEEP=0 for the table only
FAILS: list[str] = []


def log(*a: object) -> None:
    print(*a, flush=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def verdict(name: str, err: float, tol: float) -> None:
    ok = err == err and err < tol
    log(f"  check {name}: rel err {err:.2e} (tol {tol:g}) {'OK' if ok else 'FAIL'}")
    if not ok:
        FAILS.append(f"{name}: {err}")


def bench_us(fn, inner: int = 1, eager: bool = False) -> float:
    """Median microseconds per inner call of fn, replayed from a CUDA graph (or called
    eagerly: for code that syncs with the host)."""
    fn()
    torch.cuda.synchronize()
    if eager:
        return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median") * 1000.0 / inner
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        ms = triton.testing.do_bench(g.replay, warmup=20, rep=80, return_mode="median")
    except Exception as exc:  # graph capture refused: time eagerly and say so
        log(f"  (graph capture failed: {exc!r:.120}; eager timing)")
        ms = triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median")
    return ms * 1000.0 / inner


def row(kernel: str, size: str, us: float, nbytes: float, note: str = "") -> None:
    r = {"kernel": kernel, "size": size, "us": round(us, 2), "TB/s": round(nbytes / us / 1e6, 3), "note": note}
    ROWS.append(r)
    log(f"  {kernel:34s} {size:14s} {us:9.2f} us {r['TB/s']:6.3f} TB/s {note}")


def best_of(configs, time_one, describe) -> tuple[float, object] | None:
    """Time each config (one that fails to compile or run is logged and skipped);
    returns the fastest as (us, config)."""
    best = None
    for c in configs:
        try:
            us = time_one(c)
        except Exception as exc:
            log(f"  sweep {c}: {exc!r:.120}")
            continue
        log(f"    sweep {describe(c, us)}")
        if best is None or us < best[0]:
            best = (us, c)
    return best


def section(fn) -> None:
    log(f"== {fn.__name__}")
    try:
        fn()
    except Exception:
        FAILS.append(f"{fn.__name__} raised")
        log(traceback.format_exc())
    torch.cuda.empty_cache()


def ceilings() -> None:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    us = bench_us(lambda: b.copy_(a))
    row("d2d copy (read+write)", "1 GiB", us, 2 * a.numel())


SWEEP = [SmallMConfig(*c) for c in [
    (64, 256, 1, 4, 4), (64, 256, 2, 4, 4), (64, 256, 4, 4, 4), (64, 512, 1, 4, 3), (64, 512, 2, 4, 3),
    (32, 512, 1, 4, 3), (32, 512, 2, 4, 4), (128, 256, 1, 4, 3), (128, 256, 2, 8, 3), (128, 128, 2, 4, 5),
    (64, 256, 1, 4, 6), (32, 256, 4, 4, 4), (128, 512, 1, 8, 3), (64, 1024, 1, 4, 2), (64, 128, 4, 4, 6),
]]


def linear() -> None:
    for k, n in [(D, I), (I, D)]:
        ws = [quantize_per_channel(torch.randn(n, k, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        layers = [Fp8Linear(w, s) for w, s in ws]
        shape = f"{k}->{n}"
        for m in [1, 2, 4, 8, 16, 32, 64]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = per_token_quant_fp8(x)
            rq, rs = per_token_quant_reference(x)
            verdict(f"per-token quant M={m} K={k}", rel_err(xq.float() * xs[:, None], rq.float() * rs[:, None]), 1e-6)
            ref = (x.float() @ (ws[0][0].float() * ws[0][1][:, None]).t())
            verdict(f"fp8 linear {shape} M={m} bf16-act", rel_err(fp8_linear_small_m(x, *ws[0]), ref), 1e-2)
            verdict(f"fp8 linear {shape} M={m} fp8-act", rel_err(fp8_linear_small_m(xq, *ws[0], x_scale=xs), ref), 6e-2)
            verdict(f"Fp8Linear {shape} M={m}", rel_err(layers[0](x), ref), 6e-2)
            nbytes = n * k
            cfg = small_m_config(m, n, k)
            row("triton fp8 W8A8 gemm", f"{shape} M={m}",
                bench_us(lambda: [fp8_linear_small_m(xq, w, s, x_scale=xs) for w, s in ws], 4), nbytes, str(cfg))
            row("Fp8Linear.forward (quant+gemm)", f"{shape} M={m}", bench_us(lambda: [lay(x) for lay in layers], 4), nbytes)
            row("triton fp8 W8A16 gemm (bf16 act)", f"{shape} M={m}",
                bench_us(lambda: [fp8_linear_small_m(x, w, s) for w, s in ws], 4), nbytes)
            try:
                row("torch._scaled_mm rowwise", f"{shape} M={m}", bench_us(lambda: [torch._scaled_mm(
                    xq, w.t(), scale_a=xs.view(-1, 1), scale_b=s.view(1, -1), out_dtype=torch.bfloat16)
                    for w, s in ws], 4), nbytes)
            except Exception as exc:
                log(f"  _scaled_mm M={m}: {exc!r:.200}")
            row("bf16 F.linear (cuBLAS)", f"{shape} M={m}", bench_us(lambda: [F.linear(x, w) for w in wb], 4), 2 * nbytes)
            if m in (1, 16, 64) and SWEEPS:
                best = best_of(
                    SWEEP,
                    lambda c: bench_us(lambda: [fp8_linear_small_m(xq, w, s, x_scale=xs, config=c) for w, s in ws], 4),
                    lambda c, us: f"W8A8 {shape} M={m} {c}: {us:.2f} us {nbytes / us / 1e6:.3f} TB/s")
                if best:
                    row("triton fp8 W8A8 gemm best of sweep", f"{shape} M={m}", best[0], nbytes, str(best[1]))
        del ws, wb, layers


def moe() -> None:
    w13, s13 = quantize_per_channel(torch.randn(E, 2 * I, D, device="cuda", dtype=torch.bfloat16) / D**0.5)
    w2, s2 = quantize_per_channel(torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16) / I**0.5)
    expert_bytes = 3 * I * D

    def route(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, ids = torch.randn(t, E, device="cuda").softmax(-1).topk(TOPK)
        return (w / w.sum(-1, keepdim=True)).contiguous(), ids.int().contiguous()

    for t in [1, 2, 4, 8, 16, 32, 64, 128, 256]:
        x = torch.randn(t, D, device="cuda", dtype=torch.bfloat16)
        tw, ti = route(t)
        if t in (1, 8, 64, 256):
            verdict(f"fused moe T={t}", rel_err(fused_moe(x, w13, s13, w2, s2, tw, ti),
                                               fused_moe_reference(x, w13, s13, w2, s2, tw, ti)), 2e-2)
        hit = int(ti.unique().numel())
        row("triton fused MoE fp8 (W8A16)", f"T={t} ({hit} exp)",
            bench_us(lambda: fused_moe(x, w13, s13, w2, s2, tw, ti)), hit * expert_bytes, str(moe_config(t)))
        for mode in (0, 1, 2):  # bf16 dots, fp16 dots (x converted in the kernel / before it)
            c16 = dataclasses.replace(moe_config(t), dot_f16=mode)
            verdict(f"fused moe T={t} dot_f16={mode}",
                    rel_err(fused_moe(x, w13, s13, w2, s2, tw, ti, config=c16),
                            fused_moe_reference(x, w13, s13, w2, s2, tw, ti)), 2e-2)
            row(f"triton fused MoE fp8, dot_f16={mode}", f"T={t} ({hit} exp)",
                bench_us(lambda: fused_moe(x, w13, s13, w2, s2, tw, ti, config=c16)), hit * expert_bytes, str(c16))
        if t in (1, 8, 64) and SWEEPS:
            row("  moe_align_block_size alone", f"T={t}",
                bench_us(lambda: moe_align_block_size(ti, E, moe_config(t).block_m)), 0.0)
            best = best_of(
                [MoeConfig(16, 32, 256, 32, 512), MoeConfig(16, 32, 256, 32, 512, 4, 5), MoeConfig(16, 32, 512, 32, 512, 4, 3),
                 MoeConfig(16, 16, 512, 16, 1024, 4, 3), MoeConfig(16, 64, 256, 32, 512, 4, 4), MoeConfig(16, 32, 256, 16, 512),
                 MoeConfig(16, 32, 128, 32, 256, 4, 6), MoeConfig(32, 64, 128, 64, 128), MoeConfig(64, 128, 64, 128, 64, 8, 3),
                 MoeConfig(32, 32, 256, 32, 256, 4, 4), MoeConfig(64, 64, 128, 64, 128, 4, 4),
                 MoeConfig(16, 32, 256, 32, 512, dot_f16=1), MoeConfig(16, 64, 256, 64, 256, dot_f16=1),
                 MoeConfig(16, 32, 512, 32, 512, 4, 3, dot_f16=1), MoeConfig(16, 64, 128, 32, 256, 4, 6, dot_f16=1),
                 MoeConfig(32, 64, 128, 64, 128, dot_f16=1), MoeConfig(16, 128, 128, 64, 256, 4, 4, dot_f16=1)],
                lambda c: bench_us(lambda: fused_moe(x, w13, s13, w2, s2, tw, ti, config=c)),
                lambda c, us: f"MoE T={t} {c}: {us:.2f} us {hit * expert_bytes / us / 1e6:.3f} TB/s")
            if best:
                row("triton fused MoE best of sweep", f"T={t} ({hit} exp)", best[0], hit * expert_bytes, str(best[1]))
    # bf16 baseline at batch 1: the two routed experts as dense cuBLAS GEMMs, no routing cost.
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    w13b = [torch.randn(2 * I, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    w2b = [torch.randn(D, I, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    def dense() -> None:
        for a, b in zip(w13b, w2b):
            gu = F.linear(x, a)
            F.linear(F.silu(gu[:, :I]) * gu[:, I:], b)

    row("bf16 2 experts dense (cuBLAS)", "T=1 (2 exp)", bench_us(dense), 2 * 2 * expert_bytes)


A8_SWEEP = [MoeConfig(bm, bn, bk, bn2, bk2, warps, stages, act_fp8=True, group_m=group)
            for bm, bn, bk, bn2, bk2, warps, stages, group in [
    (64, 128, 128, 128, 128, 4, 4, 1), (64, 128, 128, 128, 128, 4, 4, 8),
    (64, 128, 128, 128, 128, 8, 4, 8), (64, 128, 128, 128, 128, 4, 4, 16),
    (128, 128, 128, 128, 128, 8, 3, 8), (128, 128, 128, 128, 128, 8, 4, 8),
    (128, 64, 128, 128, 128, 4, 4, 8), (64, 256, 128, 256, 128, 8, 3, 8),
    (64, 64, 128, 128, 128, 4, 5, 8), (128, 128, 64, 128, 64, 8, 4, 8),
    (32, 128, 128, 128, 128, 4, 4, 8), (128, 256, 64, 256, 64, 8, 3, 8),
]]


def moe_prefill() -> None:
    """Prefill-sized T: triton W8A8 fused MoE vs the per-expert _scaled_mm loop, the W8A16
    fused kernel and the engine's bf16 path (per-expert cuBLAS), all from one random layer."""
    wb13 = torch.randn(E, 2 * I, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    wb2 = torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16) / I**0.5
    w13, s13 = quantize_per_channel(wb13)
    w2, s2 = quantize_per_channel(wb2)
    bf16 = MoE(D, I, E, TOPK).cuda()
    bf16.experts.w13.data, bf16.experts.w2.data = wb13, wb2
    flops_per_slot = 2 * 3 * I * D
    for t in [64, 128, 256, 384, 512, 1024, 2048, 4096]:
        x = torch.randn(t, D, device="cuda", dtype=torch.bfloat16)
        w, ti = torch.randn(t, E, device="cuda").softmax(-1).topk(TOPK)
        tw, ti = (w / w.sum(-1, keepdim=True)).contiguous(), ti.int().contiguous()
        cfg = moe_prefill_config(t)
        ref = fused_moe_reference(x, w13, s13, w2, s2, tw, ti)
        verdict(f"fused moe W8A8 T={t}", rel_err(fused_moe(x, w13, s13, w2, s2, tw, ti, config=cfg), ref), 6e-2)
        if t in (256, 1024):
            verdict(f"moe prefill _scaled_mm T={t}", rel_err(fp8_moe_prefill(x, w13, s13, w2, s2, tw, ti), ref), 6e-2)
            verdict(f"bf16 per-expert T={t}", rel_err(bf16.experts(x, tw, ti.long()),
                                                      fused_moe_reference(x, wb13, None, wb2, None, tw, ti)), 2e-2)
        tflop = t * TOPK * flops_per_slot / 1e12
        timed = [("triton fused MoE fp8 W8A8", lambda: fused_moe(x, w13, s13, w2, s2, tw, ti, config=cfg), str(cfg)),
                 ("triton fused MoE fp8 W8A16", lambda: fused_moe(x, w13, s13, w2, s2, tw, ti), str(moe_config(t))),
                 ("triton fused MoE bf16 weights", lambda: fused_moe(x, wb13, None, wb2, None, tw, ti), str(moe_config(t))),
                 ("fp8 per-expert _scaled_mm (eager)", lambda: fp8_moe_prefill(x, w13, s13, w2, s2, tw, ti), ""),
                 ("bf16 per-expert cuBLAS (engine bf16, eager)", lambda: bf16.experts(x, tw, ti.long()), "")]
        for name, fn, note in timed:
            us = bench_us(fn, eager="eager" in name)
            row(name, f"T={t}", us, E * 3 * I * D, f"{tflop / us * 1e6:.0f} TFLOP/s {note}")
        if SWEEPS and t in (256, 1024, 4096):
            best = best_of(
                A8_SWEEP,
                lambda c: bench_us(lambda: fused_moe(x, w13, s13, w2, s2, tw, ti, config=c)),
                lambda c, us: f"W8A8 MoE T={t} {c}: {us:.2f} us {tflop / us * 1e6:.0f} TFLOP/s")
            if best:
                row("triton fused MoE W8A8 best of sweep", f"T={t}", best[0], E * 3 * I * D, str(best[1]))


def attention() -> None:
    for page, b, ctx in [(16, 1, 2048), (16, 1, 8192), (16, 8, 2048), (16, 32, 2048), (16, 64, 1024),
                         (16, 64, 4096), (256, 32, 2048), (256, 1, 8192)]:
        max_blocks = ctx // page
        nblocks = b * max_blocks
        kc = torch.randn(nblocks, page, HKV, HD, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        tables = torch.randperm(nblocks, device="cuda", dtype=torch.int32).view(b, max_blocks)
        lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        lens[0] = ctx - 37  # one ragged sequence
        q = torch.randn(b, HQ, HD, device="cuda", dtype=torch.bfloat16)
        scale = HD**-0.5
        verdict(f"paged attn bs={page} B={b} ctx={ctx}", rel_err(
            paged_decode_attention(q, kc, vc, tables, lens, scale),
            paged_decode_attention_reference(q, kc, vc, tables, lens, scale)), 1e-2)
        kv_bytes = 2 * int(lens.sum()) * HKV * HD * 2
        row("triton paged decode attn", f"bs{page} B={b} L={ctx}",
            bench_us(lambda: paged_decode_attention(q, kc, vc, tables, lens, scale)), kv_bytes)
        if SWEEPS and page == 16 and (b, ctx) in [(1, 8192), (32, 2048), (64, 4096)]:
            for bn, nw, ns, sp in [(32, 4, 2, None), (64, 4, 3, None), (128, 4, 2, None), (128, 8, 3, None),
                                   (64, 4, 2, 32), (64, 8, 2, None), (64, 4, 4, None)]:
                us = bench_us(lambda: paged_decode_attention(q, kc, vc, tables, lens, scale, num_splits=sp,
                                                             block_n=bn, num_warps=nw, num_stages=ns))
                log(f"    sweep attn B={b} L={ctx} block_n={bn} warps={nw} stages={ns} splits={sp}: "
                    f"{us:.2f} us {kv_bytes / us / 1e6:.3f} TB/s")
        if page == 16:
            k = kc[tables.long()].view(b, ctx, HKV, HD).transpose(1, 2).contiguous()  # (B, Hkv, L, D)
            v = vc[tables.long()].view(b, ctx, HKV, HD).transpose(1, 2).contiguous()
            qs = q.unsqueeze(2)  # (B, Hq, 1, D)
            try:
                row("torch SDPA gqa, contiguous KV", f"B={b} L={ctx}", bench_us(
                    lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)), 2 * b * ctx * HKV * HD * 2)
            except Exception as exc:
                log(f"  sdpa: {exc!r:.200}")
            del k, v


def varlen_attention() -> None:
    """Mixed-step attention: the triton varlen kernel (one launch, graph-safe) against the
    per-sequence SDPA reference it replaces (flash kernel per sequence, host-read lengths)."""
    page = 16
    cases = {
        "1 prompt 1K": [(1024, 1024)],
        "1 prompt 4K": [(4096, 4096)],
        "4 prompts 1K": [(1024, 1024)] * 4,
        "chunk 512 after 1K": [(512, 1536)],
        "60 dec ~1K + 1K prompt": [(1, 1000 + 7 * i) for i in range(60)] + [(1024, 1024)],
        "64 dec 1K": [(1, 1024)] * 64,
    }
    for name, seqs in cases.items():
        width = max(-(-ctx // page) for _, ctx in seqs)
        nblocks = len(seqs) * width
        kc = torch.randn(nblocks, page, HKV, HD, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        tables = torch.randperm(nblocks, device="cuda", dtype=torch.int32).view(len(seqs), width)
        starts = torch.tensor([0] + [sum(q for q, _ in seqs[:i + 1]) for i in range(len(seqs))],
                              dtype=torch.int32, device="cuda")
        lens = torch.tensor([c for _, c in seqs], dtype=torch.int32, device="cuda")
        q = torch.randn(int(starts[-1]), HQ, HD, device="cuda", dtype=torch.bfloat16)
        scale = HD**-0.5
        args = (q, kc, vc, starts, lens, tables, scale)
        verdict(f"varlen attn {name}", rel_err(paged_varlen_attention(*args), paged_varlen_reference(*args)), 1e-2)
        # causal work: each query token scores (its position + 1) keys
        flops = 4 * HQ * HD * sum(sum(c - ql + i + 1 for i in range(ql)) for ql, c in seqs)
        kv_bytes = 2 * int(lens.sum()) * HKV * HD * 2
        us = bench_us(lambda: paged_varlen_attention(*args))
        row("triton varlen attn", name, us, kv_bytes, f"{flops / us / 1e6:.0f} TFLOP/s")
        row("SDPA per sequence (reference)", name, bench_us(lambda: paged_varlen_reference(*args), eager=True),
            kv_bytes)
        if all(ql == 1 for ql, _ in seqs):
            row("triton paged decode attn", name, bench_us(
                lambda: paged_decode_attention(q, kc, vc, tables, lens, scale)), kv_bytes)
        if SWEEPS and name in ("1 prompt 1K", "60 dec ~1K + 1K prompt", "1 prompt 4K"):
            best_of([(64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (128, 64, 4, 2),
                     (64, 64, 4, 3), (128, 128, 8, 2), (32, 64, 4, 2)],
                    lambda c: bench_us(lambda: paged_varlen_attention(*args, block_m=c[0], block_n=c[1],
                                                                      num_warps=c[2], num_stages=c[3])),
                    lambda c, us: f"varlen {name} block_m={c[0]} block_n={c[1]} warps={c[2]} stages={c[3]}: "
                                  f"{us:.1f} us {flops / us / 1e6:.0f} TFLOP/s")


def quant_pass() -> None:
    """How much a fused RMSNorm+quant could save: the torch per-token quant pass vs the GEMM it feeds."""
    w, s = quantize_per_channel(torch.randn(I, D, device="cuda", dtype=torch.bfloat16))
    for m in [64, 2048]:
        x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
        row("torch per-token quant (eager ops)", f"M={m} K={D}", bench_us(lambda: per_token_quant_reference(x)), 3 * m * D)
        row("triton per-token quant", f"M={m} K={D}", bench_us(lambda: per_token_quant_fp8(x)), 3 * m * D)
        xq, xs = per_token_quant_fp8(x)
        row("torch._scaled_mm rowwise", f"{D}->{I} M={m}", bench_us(lambda: torch._scaled_mm(
            xq, w.t(), scale_a=xs.view(-1, 1), scale_b=s.view(1, -1), out_dtype=torch.bfloat16)), I * D)


def fused_decode() -> None:
    """Issue 16's fused decode pieces at Mixtral shapes (bf16 activations, fp8 experts):
    the one-launch router (gate GEMM + top-k + alignment, moe_route.py) and the MoE's
    per-slot outputs summed by the next add + RMSNorm. Checks each against its torch
    reference, then times old vs new per-layer sequences, each replayed from a CUDA graph."""
    from sluice.engine.kernels.fused_moe import moe_align_reference
    from sluice.engine.kernels.fused_small import fused_add_rmsnorm, fused_add_rmsnorm_reference, router_topk
    from sluice.engine.kernels.moe_route import route, route_reference

    bf = torch.bfloat16
    w13, s13 = quantize_per_channel(torch.randn(E, 2 * I, D, device="cuda", dtype=bf) / D**0.5)
    w2, s2 = quantize_per_channel(torch.randn(E, D, I, device="cuda", dtype=bf) / I**0.5)
    gate = (torch.randn(E, D, device="cuda") * D**-0.5).to(bf)
    norm_w = (1 + 0.1 * torch.randn(D, device="cuda")).to(bf)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    for t in (1, 8, 64):
        bm = moe_config(t).block_m
        h = torch.randn(t, D, device="cuda", dtype=bf)  # the post-attention norm's output
        res = torch.randn(t, D, device="cuda", dtype=bf)
        # checks: router against torch, its alignment, graph replays (the counter resets)
        tw, ti, al = route(h, gate, TOPK, counter, bm)
        w_ref, i_ref = route_reference(h, gate, TOPK)
        same = (ti.long() == i_ref).all(-1)
        verdict(f"route T={t} tokens whose experts differ (near-ties)", 1 - same.float().mean().item(), 0.05)
        verdict(f"route T={t} weights", rel_err(tw[same], w_ref[same]), 1e-2)
        aligned = all(torch.equal(a, b) for a, b in zip(al, moe_align_reference(ti, E, bm)))
        verdict(f"route T={t} alignment == moe_align_reference", 0.0 if aligned else 1.0, 0.5)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            gw, gi, gal = route(h, gate, TOPK, counter, bm)
        replays_ok = True
        for _ in range(3):
            g.replay()
            replays_ok &= torch.equal(gw, tw) and torch.equal(gi, ti) and all(map(torch.equal, gal, al))
        verdict(f"route T={t} graph replays == eager", 0.0 if replays_ok and int(counter) == 0 else 1.0, 0.5)
        parts = fused_moe(h, w13, s13, w2, s2, tw, ti, align=al, reduce=False)
        y = fused_moe(h, w13, s13, w2, s2, tw, ti)
        verdict(f"fused_moe T={t} partials summed == reduced", 0.0 if torch.equal(parts.sum(1), y) else 1.0, 0.5)
        out, new_res = fused_add_rmsnorm(parts, res, norm_w, 1e-5)
        ref, ref_res = fused_add_rmsnorm_reference(parts, res, norm_w, 1e-5)
        verdict(f"add_rmsnorm(partials) T={t} residual bits differ", (new_res != ref_res).float().mean().item(), 1e-9)
        verdict(f"add_rmsnorm(partials) T={t} out", rel_err(out, ref), 1e-2)

        # timings: old vs new per layer, each sequence one CUDA graph
        def router_old() -> None:
            w, i = router_topk(F.linear(h, gate), TOPK)
            moe_align_block_size(i, E, bm)

        def router_new() -> None:
            route(h, gate, TOPK, counter, bm)

        def norm_old() -> None:
            fused_add_rmsnorm(parts.sum(1), res, norm_w, 1e-5)

        def norm_new() -> None:
            fused_add_rmsnorm(parts, res, norm_w, 1e-5)

        def layer_old() -> None:  # router, MoE (aligning, summing), next add + norm
            w, i = router_topk(F.linear(h, gate), TOPK)
            fused_add_rmsnorm(fused_moe(h, w13, s13, w2, s2, w, i), res, norm_w, 1e-5)

        def layer_new() -> None:
            w, i, a = route(h, gate, TOPK, counter, bm)
            fused_add_rmsnorm(fused_moe(h, w13, s13, w2, s2, w, i, align=a, reduce=False), res, norm_w, 1e-5)

        hit = int(ti.unique().numel())
        gate_bytes = E * D * 2 + t * D * 2
        for name, fn, nbytes in [("router: cuBLAS gate + router_topk + align", router_old, gate_bytes),
                                 ("router: moe_route (one launch)", router_new, gate_bytes),
                                 ("MoE sum + add_rmsnorm (two launches)", norm_old, 3 * t * D * 2),
                                 ("add_rmsnorm summing partials", norm_new, 3 * t * D * 2),
                                 ("MoE block old (router..next norm)", layer_old, hit * 3 * I * D),
                                 ("MoE block new (router..next norm)", layer_new, hit * 3 * I * D)]:
            row(name, f"T={t}", bench_us(fn), nbytes, f"{hit} exp" if "block" in name else "")
        if SWEEPS and t in (1, 64):
            best = best_of([256, 512, 1024, 2048],
                           lambda bd: bench_us(lambda: route(h, gate, TOPK, counter, bm, block_d=bd)),
                           lambda bd, us: f"route T={t} block_d={bd}: {us:.2f} us")
            if best:
                row("router: moe_route best block_d", f"T={t}", best[0], gate_bytes, f"block_d={best[1]}")
    del w13, w2


def main() -> int:
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    only = sys.argv[1:] or ["ceilings", "linear", "moe", "moe_prefill", "attention", "varlen_attention",
                            "quant_pass", "fused_decode"]
    for name in only:
        section(globals()[name])
    log("\n| kernel | size | us | TB/s | note |\n|---|---|---|---|---|")
    for r in ROWS:
        log(f"| {r['kernel']} | {r['size']} | {r['us']} | {r['TB/s']} | {r['note']} |")
    log(f"\nFAILURES: {FAILS}" if FAILS else "\nall checks passed")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "check_gpu.json"), "w") as f:
            json.dump({"device": props.name, "rows": ROWS, "fails": FAILS}, f, indent=1)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
