"""Small fused kernels for the decode step, each one launch instead of many torch ops.

- `fused_add_rmsnorm`: residual = x + residual; out = weight * rmsnorm(residual)
  (or plain RMSNorm without a residual). Replaces ~8 elementwise/reduction launches.
  x may be the MoE's (N, K, D) per-slot outputs: their sum over K is taken in the same
  launch (the torch `.sum(1)` it replaces was a launch of its own).
- `rope_store_kv`: rotary on q and k (rotate-half layout) straight from the packed
  qkv projection, k and v written into their paged-cache slots, rotated q returned.
  Replaces the cos/sin gathers, chunk/cat/neg/mul/add per tensor and two index_copy.
- `router_topk`: softmax over the router logits in fp32, top-k, renormalise.
  Replaces float/softmax/topk/sum/div.

Each rounds where the torch code it replaces rounds (bf16 after the residual add,
after each rotary product and sum, before the norm weight), so greedy tokens match
the torch path bit for bit in the common case. Legend: N tokens, D hidden, Dh head dim, K experts per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sluice.engine.kernels._common import check, check_tensor


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, D, eps,
    HAS_RES: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    if PARTS == 1:
        x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0)
    else:  # the row's PARTS partial rows, summed in fp32 and rounded once, like torch's .sum(1)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(PARTS):
            acc += tl.load(x_ptr + (row * PARTS + j) * D + offs, mask=mask, other=0.0).to(tl.float32)
        x = acc.to(x_ptr.dtype.element_ty)
    if HAS_RES:
        r = tl.load(res_ptr + row * D + offs, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual, rounded like torch's add
    else:
        s = x
    if HAS_RES or PARTS > 1:
        tl.store(res_out_ptr + row * D + offs, s, mask=mask)
    h = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    n = (h * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (n * w).to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (N, D) -> (weight * rmsnorm(x + residual), x + residual).
    Without a residual: (weight * rmsnorm(x), x). x may also be (N, K, D) partials (the
    fused MoE's per-slot outputs, fused_moe(reduce=False)): x.sum(1) is used in its place,
    summed in fp32 and rounded once as torch's sum does."""
    check(x.dim() in (2, 3), f"x must be (N, D) or (N, K, D), got shape {tuple(x.shape)}")
    check_tensor(x, "x", x.dim(), (torch.bfloat16, torch.float16, torch.float32))
    check(x.is_contiguous(), "x must be contiguous")
    n, d = x.shape[0], x.shape[-1]
    parts = x.shape[1] if x.dim() == 3 else 1
    check(weight.shape == (d,) and weight.is_contiguous(), f"weight must be ({d},)")
    out = torch.empty((n, d), dtype=weight.dtype if weight.dtype == x.dtype else x.dtype, device=x.device)
    if residual is not None:
        check(residual.shape == (n, d) and residual.dtype == x.dtype and residual.is_contiguous(),
              f"residual must be contiguous ({n}, {d}) {x.dtype}")
    res_out = x if residual is None and parts == 1 else torch.empty_like(out, dtype=x.dtype)
    if n:
        block = triton.next_power_of_2(d)
        _add_rmsnorm_kernel[(n,)](
            x, residual if residual is not None else x, weight, out, res_out, d, eps,
            HAS_RES=residual is not None, PARTS=parts, BLOCK=block, num_warps=4 if block <= 2048 else 8,
        )
    return out, res_out


def fused_add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch code of sluice.engine.layers.norm.RMSNorm."""
    if x.dim() == 3:
        x = x.sum(1)
    s = x if residual is None else x + residual
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(s.dtype), s


@triton.jit
def _rope_store_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    stride_qkv, stride_cs,
    HQ: tl.constexpr, HKV: tl.constexpr, DH: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = DH // 2
    pos = tl.load(pos_ptr + tok)
    slot = tl.load(slot_ptr + tok)
    offs_d = tl.arange(0, HALF)
    # torch casts cos/sin to the activation dtype before multiplying
    c1 = tl.load(cos_ptr + pos * stride_cs + offs_d).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_cs + HALF + offs_d).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_cs + offs_d).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_cs + HALF + offs_d).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    dt = qkv_ptr.dtype.element_ty
    row = qkv_ptr + tok * stride_qkv

    # q: heads [0, HQ)
    hq = tl.arange(0, BLOCK_HQ)
    mq = (hq < HQ)[:, None]
    p1 = row + hq[:, None] * DH + offs_d[None, :]
    x1 = tl.load(p1, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mq, other=0.0).to(tl.float32)
    o1 = ((x1 * c1[None, :]).to(dt).to(tl.float32) + (-x2 * s1[None, :]).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)).to(dt)
    qo = q_out_ptr + tok * (HQ * DH) + hq[:, None] * DH + offs_d[None, :]
    tl.store(qo, o1, mask=mq)
    tl.store(qo + HALF, o2, mask=mq)

    # k: heads after q; v: after k. Both go to the cache slot.
    hk = tl.arange(0, BLOCK_HKV)
    mk = (hk < HKV)[:, None]
    pk = row + HQ * DH + hk[:, None] * DH + offs_d[None, :]
    k1 = tl.load(pk, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(pk + HALF, mask=mk, other=0.0).to(tl.float32)
    ko1 = ((k1 * c1[None, :]).to(dt).to(tl.float32) + (-k2 * s1[None, :]).to(dt).to(tl.float32)).to(dt)
    ko2 = ((k2 * c2[None, :]).to(dt).to(tl.float32) + (k1 * s2[None, :]).to(dt).to(tl.float32)).to(dt)
    cache_off = slot * (HKV * DH) + hk[:, None] * DH + offs_d[None, :]
    tl.store(k_cache_ptr + cache_off, ko1.to(k_cache_ptr.dtype.element_ty), mask=mk)
    tl.store(k_cache_ptr + cache_off + HALF, ko2.to(k_cache_ptr.dtype.element_ty), mask=mk)
    pv = pk + HKV * DH
    v1 = tl.load(pv, mask=mk, other=0.0)
    v2 = tl.load(pv + HALF, mask=mk, other=0.0)
    tl.store(v_cache_ptr + cache_off, v1.to(v_cache_ptr.dtype.element_ty), mask=mk)
    tl.store(v_cache_ptr + cache_off + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mk)


def rope_store_kv(
    qkv: torch.Tensor,  # (N, (Hq + 2 Hkv) * Dh): q heads, then k, then v
    positions: torch.Tensor,  # (N,) int
    cos: torch.Tensor,  # (P, Dh) fp32
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, Dh)
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # (N,) int64
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:  # (N, Hq, Dh) rotated q
    """Rotate q and k, write k and v to their cache slots; returns rotated q."""
    n = qkv.shape[0]
    check_tensor(qkv, "qkv", 2, (torch.bfloat16, torch.float16, torch.float32))
    check(qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim, f"qkv width {qkv.shape[1]} does not fit the heads")
    check(head_dim % 2 == 0 and (head_dim // 2) & (head_dim // 2 - 1) == 0, "head_dim/2 must be a power of two")
    check(cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape and cos.shape[1] == head_dim,
          "cos/sin must be contiguous (P, head_dim)")
    check(k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous")
    check(k_cache.shape[-2:] == (num_kv_heads, head_dim), f"cache {tuple(k_cache.shape)} does not fit the heads")
    q = torch.empty((n, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if n:
        _rope_store_kernel[(n,)](
            qkv, positions, cos, sin, slot_mapping, q, k_cache, v_cache, qkv.stride(0), cos.stride(0),
            HQ=num_heads, HKV=num_kv_heads, DH=head_dim,
            BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
            num_warps=4,
        )
    return q


@triton.jit
def softmax_topk(logits, E, K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """(R, BLOCK_E) fp32 router logits, columns from E on ignored -> the fp32 softmax's top
    K (lowest index first among ties, as torch.topk), renormalised: weights (R, BLOCK_K)
    fp32 and ids (R, BLOCK_K) int32, columns from K on zero. Shared with the one-launch
    router (moe_route.py)."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    e_ok = (offs_e < E)[None, :]
    logits = tl.where(e_ok, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(e_ok, p, -1.0)
    ws = tl.zeros_like(tl.max(p, axis=1))[:, None] + tl.zeros((1, BLOCK_K), dtype=tl.float32)  # (R, BLOCK_K)
    ids = ws.to(tl.int32)
    for j in tl.static_range(K):
        m = tl.max(p, axis=1)  # (R,)
        idx = tl.min(tl.where(p == m[:, None], offs_e[None, :], BLOCK_E), axis=1)  # lowest among ties
        ws = tl.where(offs_k[None, :] == j, m[:, None], ws)
        ids = tl.where(offs_k[None, :] == j, idx[:, None], ids)
        p = tl.where(offs_e[None, :] == idx[:, None], -1.0, p)
    return ws / tl.sum(ws, axis=1)[:, None], ids


@triton.jit
def _router_topk_kernel(
    logits_ptr, w_ptr, ids_ptr, E, stride_l,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)[None, :]
    x = tl.load(logits_ptr + row * stride_l + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
    ws, ids = softmax_topk(x, E, K, BLOCK_E, BLOCK_K)  # (1, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    tl.store(w_ptr + row * K + offs_k, ws, mask=offs_k < K)
    tl.store(ids_ptr + row * K + offs_k, ids, mask=offs_k < K)


def router_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) router logits -> renormalised top-k weights (N, k) fp32, ids (N, k) int32."""
    check_tensor(logits, "logits", 2, (torch.bfloat16, torch.float16, torch.float32))
    n, e = logits.shape
    w = torch.empty((n, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((n, top_k), dtype=torch.int32, device=logits.device)
    if n:
        _router_topk_kernel[(n,)](logits, w, ids, e, logits.stride(0), K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
                                  BLOCK_E=max(16, triton.next_power_of_2(e)), num_warps=1)
    return w, ids


def router_topk_reference(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids
