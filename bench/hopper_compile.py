"""Compile every triton kernel launch the engine makes on an H200, for Hopper (sm_90),
without a GPU: a check that kernel changes made on a CPU machine still lower to cubins
and fit in shared memory, and a record of what each launch compiles to.

    python3 -m bench.hopper_compile [--json OUT.json] [--only NAME,...]

How: the engine's kernel wrappers are called at Mixtral-8x7B shapes (E 8, top-2, D 4096,
I 14336, 32/8 heads of 128, 16-token pages) on CPU tensors that are never read, with
every `@triton.jit` kernel of sluice.engine.kernels swapped for a recorder. Each recorded
launch is bound the way triton's own launcher binds it (its signature, the integer and
pointer specialisations, num_warps/num_stages) and compiled by `triton.compile` for
GPUTarget("cuda", 90, 32) with the installed triton. Run without TRITON_INTERPRET (the
interpreter replaces the kernels at import).

Per launch: the kernel, the case (which wrapper, at which size and tiles), the compile
time, the shared memory the cubin asks for (H100/H200 allow 227 KiB a block) and the
MMA it issues (wgmma: Hopper's warpgroup MMA; mma.sync: the Ampere instruction; none).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on H100/H200
E, TOP_K, D, I = 8, 2, 4096, 14336  # noqa: E741  (Mixtral-8x7B)
HQ, HKV, HEAD = 32, 8, 128
PAGE = 16
DECODE_T = (1, 2, 8, 16, 32, 64, 128, 256)  # the decode batch sizes moe_config distinguishes, and past them
PREFILL_T = (256, 1024, 2048)  # token counts of a prefill chunk on the fused W8A8 path
SMALL_M = (1, 16, 64)  # attention projections, fp8_linear_small_m


@dataclass
class Launch:
    case: str
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside, `kernel[grid](...)` of every kernel module in sluice.engine.kernels records
    the launch (its case: `recording.case`) instead of running it."""
    from triton.runtime.jit import JITFunction

    import sluice.engine.kernels as pkg

    mods = [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, fn: JITFunction) -> None:
            self.fn = fn

        def __getitem__(self, grid: object) -> Callable[..., None]:
            return lambda *a, **kw: launches.append(Launch(recording.case, self.fn, a, kw))

    saved = [(m, name, v) for m in mods for name, v in vars(m).items() if isinstance(v, JITFunction)]
    if not saved:
        raise RuntimeError("no triton JITFunctions found: is TRITON_INTERPRET set? (the interpreter wraps them)")
    try:
        for m, name, v in saved:
            setattr(m, name, Recorder(v))
        yield launches
    finally:
        for m, name, v in saved:
            setattr(m, name, v)


recording.case = ""  # type: ignore[attr-defined]


def _case(name: str) -> None:
    recording.case = name  # type: ignore[attr-defined]


def engine_launches() -> list[Launch]:
    """The engine's kernel launches at Mixtral-8x7B shapes, decode and prefill."""
    from sluice.engine.kernels._common import FP8_DTYPE
    from sluice.engine.kernels.act_quant import per_token_quant_fp8
    from sluice.engine.kernels.fp8_linear import SmallMConfig, fp8_linear_small_m
    from sluice.engine.kernels.fused_moe import fused_moe, moe_config, moe_prefill_config
    from sluice.engine.kernels.fused_small import fused_add_rmsnorm, rope_store_kv, router_topk
    from sluice.engine.kernels.moe_grouped import moe_combine
    from sluice.engine.kernels.moe_prefill import silu_mul_quant_fp8
    from sluice.engine.kernels.moe_route import route
    from sluice.engine.kernels.paged_attention import paged_decode_attention
    from sluice.engine.kernels.varlen_attention import paged_varlen_attention

    bf16, f32, i32, fp8 = torch.bfloat16, torch.float32, torch.int32, FP8_DTYPE
    w13, w2 = torch.empty(E, 2 * I, D, dtype=fp8), torch.empty(E, D, I, dtype=fp8)
    s13, s2 = torch.empty(E, 2 * I, dtype=f32), torch.empty(E, D, dtype=f32)
    gate, norm_w = torch.empty(E, D, dtype=bf16), torch.empty(D, dtype=bf16)
    k_cache = torch.empty(512, PAGE, HKV, HEAD, dtype=bf16)
    v_cache = torch.empty_like(k_cache)
    cos = sin = torch.empty(4096, HEAD, dtype=f32)

    def routing(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = (torch.arange(t * TOP_K, dtype=i32) % E).view(t, TOP_K).contiguous()
        return torch.full((t, TOP_K), 1.0 / TOP_K, dtype=f32), ids

    with recording() as launches:
        for t in DECODE_T:
            x = torch.empty(t, D, dtype=bf16)
            tw, ti = routing(t)
            cfg = moe_config(t)
            _case(f"decode T={t}: router + alignment (moe_route)")
            route(x, gate, TOP_K, torch.zeros(1, dtype=i32), cfg.block_m)
            _case(f"decode T={t}: fused_moe W8A16 {_tiles(cfg)}")
            fused_moe(x, w13, s13, w2, s2, tw, ti, config=cfg, reduce=False)
            for a8 in (False, True):
                swapped = replace(cfg, swap_ab=True, act_fp8=a8, block_m=16 if t <= 32 else 32,
                                  block_n=64, block_n2=64)
                _case(f"decode T={t}: fused_moe swap-AB {'W8A8' if a8 else 'W8A16'} {_tiles(swapped)}")
                fused_moe(x, w13, s13, w2, s2, tw, ti, config=swapped, reduce=False)
            _case(f"decode T={t}: add + RMSNorm summing the MoE partials")
            fused_add_rmsnorm(torch.empty(t, TOP_K, D, dtype=bf16), torch.empty(t, D, dtype=bf16), norm_w, 1e-5)
            _case(f"decode T={t}: rotary + KV store")
            rope_store_kv(torch.empty(t, (HQ + 2 * HKV) * HEAD, dtype=bf16), torch.zeros(t, dtype=torch.int64),
                          cos, sin, k_cache, v_cache, torch.zeros(t, dtype=torch.int64), HQ, HKV, HEAD)
            _case(f"decode T={t}: paged attention, 2048-token context")
            paged_decode_attention(torch.empty(t, HQ, HEAD, dtype=bf16), k_cache, v_cache,
                                   torch.zeros(t, 2048 // PAGE, dtype=i32), torch.ones(t, dtype=i32), HEAD**-0.5)
        for m in SMALL_M:
            for name, n in (("qkv", (HQ + 2 * HKV) * HEAD), ("o", D)):
                _case(f"decode M={m}: {name} projection (quant + fp8_linear_small_m)")
                xq, xs = per_token_quant_fp8(torch.empty(m, D, dtype=bf16))
                fp8_linear_small_m(xq, torch.empty(n, D, dtype=fp8), torch.empty(n, dtype=f32), x_scale=xs,
                                   out_dtype=bf16)
                _case(f"decode M={m}: {name} projection, W8A16 (SLUICE_LINEAR_W8A16=1)")
                fp8_linear_small_m(torch.empty(m, D, dtype=bf16), torch.empty(n, D, dtype=fp8),
                                   torch.empty(n, dtype=f32), out_dtype=bf16)
        _case("decode M=1: o projection, split-K 4 (SmallMConfig.split_k, off in the default tiles)")
        xq, xs = per_token_quant_fp8(torch.empty(1, D, dtype=bf16))
        fp8_linear_small_m(xq, torch.empty(D, D, dtype=fp8), torch.empty(D, dtype=f32), x_scale=xs,
                           out_dtype=bf16, config=SmallMConfig(block_n=64, block_k=256, split_k=4))
        for t in PREFILL_T:
            x = torch.empty(t, D, dtype=bf16)
            tw, ti = routing(t)
            cfg = moe_prefill_config(t)
            _case(f"prefill T={t}: router top-k")
            router_topk(torch.empty(t, E, dtype=bf16), TOP_K)
            _case(f"prefill T={t}: fused_moe W8A8 {_tiles(cfg)}")
            fused_moe(x, w13, s13, w2, s2, tw, ti, config=cfg)
            _case(f"prefill T={t}: grouped-GEMM MoE's silu*up quant and combine")
            silu_mul_quant_fp8(torch.empty(t * TOP_K, 2 * I, dtype=bf16))
            moe_combine(torch.empty(t * TOP_K, D, dtype=bf16), torch.zeros(t * TOP_K, dtype=torch.int64), tw)
            _case(f"prefill T={t}: varlen paged attention, one sequence")
            paged_varlen_attention(torch.empty(t, HQ, HEAD, dtype=bf16), k_cache, v_cache,
                                   torch.tensor([0, t], dtype=i32), torch.tensor([t], dtype=i32),
                                   torch.zeros(1, triton_cdiv(t, PAGE), dtype=i32), HEAD**-0.5)
    return launches


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(c: object) -> str:
    return (f"bm{c.block_m} {c.block_n}x{c.block_k}/{c.block_n2}x{c.block_k2} "  # type: ignore[attr-defined]
            f"w{c.num_warps} s{c.num_stages}")  # type: ignore[attr-defined]


def compile_sm90(launch: Launch) -> dict:
    """Bind the launch as triton's launcher does and compile it for sm_90."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs, debug=False)
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what JITFunction.run adds (triton 3.9)
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)  # type: ignore[attr-defined]
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(  # type: ignore[attr-defined]
        backend, kwargs, bound, specialization, options)
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
    consts = {fn.arg_names[k[0]]: v for k, v in constexprs.items()  # type: ignore[attr-defined]
              if len(k) == 1 and isinstance(v, (bool, int, float, str))}
    return {"kernel": fn.__name__, "case": launch.case, "compile_s": round(time.perf_counter() - t0, 2),  # type: ignore[attr-defined]
            "shared_bytes": int(kernel.metadata.shared), "mma": mma, "num_warps": options.num_warps,
            "num_stages": options.num_stages, "constexprs": consts}


def compile_all(launches: list[Launch], log: Callable[[str], None] = print) -> list[dict]:
    """Compile each distinct launch once (the same kernel, arguments' types and
    specialisations share a binary); failures are reported, not raised."""
    results, seen = [], {}
    for launch in launches:
        try:
            r = compile_sm90(launch)
        except Exception as exc:  # noqa: BLE001: a kernel that does not lower is the finding
            r = {"kernel": launch.fn.__name__, "case": launch.case,  # type: ignore[attr-defined]
                 "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        key = (r["kernel"], r["case"], json.dumps(r.get("constexprs"), sort_keys=True), r.get("num_stages"))
        if key in seen:
            continue
        seen[key] = r
        results.append(r)
        log(_row(r))
    return results


def _row(r: dict) -> str:
    if "error" in r:
        return f"FAILED {r['kernel']:28s} {r['case']}: {r['error'][:300]}"
    over = " OVER THE LIMIT" if r["shared_bytes"] > SM90_SHARED_LIMIT else ""
    return (f"{r['kernel']:28s} {r['mma']:8s} smem {r['shared_bytes'] / 1024:6.1f} KiB{over} w{r['num_warps']} "
            f"s{r['num_stages']} {r['compile_s']:5.2f}s  {r['case']}")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--only", help="comma-separated kernel names")
    args = ap.parse_args()
    import triton

    launches = engine_launches()
    if args.only:
        names = set(args.only.split(","))
        launches = [x for x in launches if x.fn.__name__ in names]  # type: ignore[attr-defined]
    print(f"triton {triton.__version__}, target sm_90: {len(launches)} launches", flush=True)
    t0 = time.perf_counter()
    results = compile_all(launches, lambda s: print(s, flush=True))
    bad = [r for r in results if "error" in r or r["shared_bytes"] > SM90_SHARED_LIMIT]
    print(f"{len(results)} distinct launches compiled in {time.perf_counter() - t0:.0f} s; "
          f"{len(bad)} failed or over the shared-memory limit")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "cuda sm_90", "results": results}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
