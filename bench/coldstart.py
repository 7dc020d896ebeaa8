"""Cold start of a full-size FP8 Mixtral from a page-cached, pre-quantized checkpoint.

    python -m bench.coldstart /tmp/out                  # Mixtral-8x7B shapes, on CUDA
    python -m bench.coldstart /tmp/out --layers 2 --device cpu --preset tiny-mixtral

Writes a random checkpoint the way published FP8 Mixtral checkpoints are stored (e4m3
weights with per-output-channel ``weight_scale``; router, norms, embeddings and lm_head in
bf16; one safetensors shard per layer plus ``model.safetensors.index.json``), leaves it in
the page cache, then times what the runtime's cold start does twice: build the engine
(load, KV sizing and the kernel compiles it needs) and produce the first token (CUDA graphs
are captured after it). The second start finds the kernel cache (engine/kernel_cache.py)
warm, as a restart on the same host does.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sluice.engine.config import PRESETS, ModelConfig
from sluice.engine.llm import LLM
from sluice.engine.loader import expected_tensors
from sluice.engine.quant.fp8 import quantize_per_channel
from sluice.engine.sampling import SamplingParams


def _is_linear(name: str) -> bool:
    return name.endswith("proj.weight") or ".experts." in name


def write_fp8_checkpoint(path: Path, raw: dict, device: str, seed: int = 0) -> float:
    """Write the checkpoint; returns its size in GB."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(raw)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    size = 0

    def shard(fname: str, shapes: dict[str, tuple[int, ...]]) -> None:
        nonlocal size
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
                continue
            w = torch.randn(shape, generator=gen, device=device) * 0.02
            if _is_linear(name) and not name.endswith("gate.weight"):
                q, scale = quantize_per_channel(w)
                tensors[name] = q.cpu()
                tensors[name.replace(".weight", ".weight_scale")] = scale.unsqueeze(-1).cpu()  # [out, 1]
            else:
                tensors[name] = w.to(torch.bfloat16).cpu()
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))

    everything = expected_tensors(cfg)
    layer_names = {n: s for n, s in everything.items() if n.startswith("model.layers.")}
    shard("top.safetensors", {n: s for n, s in everything.items() if n not in layer_names})
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}."
        shard(f"layer-{layer:03d}.safetensors",
              {n: s for n, s in layer_names.items() if n.startswith(prefix)})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}))
    config = {**raw, "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return size / 1e9


def verify(llm: LLM, path: Path) -> int:
    """Compare loaded weights with the checkpoint's bytes (first, middle and last layer;
    first and last expert); returns how many tensors matched, raises on a mismatch."""
    from safetensors import safe_open

    cfg, checked = llm.model.config, 0
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for n in sorted({0, cfg.num_layers // 2, cfg.num_layers - 1}):
        layer = llm.model.layers[n]
        experts = layer.mlp.experts
        I = cfg.intermediate_size
        pairs = {"self_attn.q_proj.weight": layer.self_attn.qkv_proj.weight[: cfg.num_heads * cfg.head_dim],
                 "self_attn.o_proj.weight": layer.self_attn.o_proj.weight}
        for e in (0, cfg.num_experts - 1):
            q = f"block_sparse_moe.experts.{e}."
            pairs |= {q + "w1.weight": experts.w13[e, :I], q + "w3.weight": experts.w13[e, I:],
                      q + "w2.weight": experts.w2[e]}
        for name, got in pairs.items():
            full = f"model.layers.{n}.{name}"
            with safe_open(str(path / index[full]), framework="pt") as f:
                want = f.get_tensor(full)
            if not torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)):
                raise AssertionError(f"{full}: loaded bytes differ from the checkpoint")
            checked += 1
    return checked


def cold_start(path: Path, device: str, tokenizer: object, check: bool = False) -> dict:
    began = time.perf_counter()
    llm = LLM(path, dtype="fp8", device=device, max_num_seqs=64, max_model_len=2048,
              progress=False, tokenizer=tokenizer)
    built = time.perf_counter() - began
    llm.generate([[5] * 16], SamplingParams(temperature=0, max_tokens=1))
    total = time.perf_counter() - began
    result = {**llm.timings, "engine_built_s": built, "first_token_total_s": total}
    if check:
        result["tensors_verified"] = verify(llm, path)
    del llm
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def read_ceilings(path: Path, layers: int, device: str) -> dict:
    """What the page cache gives for the first (up to) 8 layers' shards, read several ways:
    one thread sequentially; the stager alone at several thread counts; the stager feeding
    GPU copies; and safetensors' get_tensor + copy to the device (the loader before staging)."""
    from safetensors import safe_open

    from sluice.engine import staging
    from sluice.engine.staging import LayerStager, read_header

    out: dict = {"meminfo": [ln for ln in Path("/proc/meminfo").read_text().splitlines()
                             if ln.startswith(("Cached:", "MemTotal:", "MemFree:"))]}
    files = [path / f"layer-{n:03d}.safetensors" for n in range(min(layers, 8))]
    buf = bytearray(64 << 20)
    t, nbytes = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while got := fh.readinto(buf):
                nbytes += got
    out["sequential_1thread_GBps"] = nbytes / 1e9 / (time.perf_counter() - t)
    extents: dict = {}
    groups = []
    for f in files:
        e = read_header(f)
        extents.update(e)
        groups.append(list(e))
    variants = [("stager_t4", 4, 32 << 20, False), ("stager_t16", 16, 32 << 20, False),
                ("stager_t16_c8M", 16, 8 << 20, False), ("stager_t32", 32, 32 << 20, False),
                ("stager_t16_to_gpu", 16, 32 << 20, True)]
    default_chunk = staging.CHUNK
    for label, threads, chunk, to_gpu in variants:
        staging.CHUNK = chunk
        t = time.perf_counter()
        stager = LayerStager(extents, groups, threads=threads)
        made = time.perf_counter() - t
        dst = None
        for n in range(len(groups)):
            for x in stager.take(n).values():
                if to_gpu:
                    dst = x.to(device, non_blocking=True)
            stager.release(n)
        if dst is not None and dst.is_cuda:
            torch.cuda.synchronize()
        stager.close()
        out[f"{label}_GBps"] = stager.bytes_read / 1e9 / (time.perf_counter() - t)
        out[f"{label}_buffers_s"] = made
        print(label, out[f"{label}_GBps"], flush=True)
    staging.CHUNK = default_chunk
    if device.startswith("cuda"):
        out |= h2d_ceilings()
    t, nbytes = time.perf_counter(), 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                x = h.get_tensor(name).to(device)
                nbytes += x.numel() * x.element_size()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out["get_tensor_to_device_GBps"] = nbytes / 1e9 / (time.perf_counter() - t)
    return out


def h2d_ceilings(nbytes: int = 1536 << 20, piece: int = 96 << 20) -> dict:
    """Host-to-device copy rates from pageable, torch-pinned and cudaHostRegister'ed
    memory, in pieces the size of one expert's weights, into one device tensor."""
    from sluice.engine.staging import pinned_buffer

    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    sources = {"pageable": torch.ones(nbytes, dtype=torch.uint8),
               "pinned_alloc": torch.ones(nbytes, dtype=torch.uint8).pin_memory(),
               "registered": pinned_buffer(nbytes).fill_(1)}
    out = {}
    for label, src in sources.items():
        for _ in range(2):  # the second pass is the one reported
            torch.cuda.synchronize()
            t = time.perf_counter()
            for off in range(0, nbytes, piece):
                dst[off:off + piece].copy_(src[off:off + piece], non_blocking=True)
            torch.cuda.synchronize()
            out[f"h2d_{label}_GBps"] = nbytes / 1e9 / (time.perf_counter() - t)
        out[f"h2d_{label}_is_pinned"] = src.is_pinned()
        print(label, out[f"h2d_{label}_GBps"], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="mixtral-8x7b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/sluice-fp8-ckpt"))
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="keep a checkpoint already written there")
    parser.add_argument("--read-ceilings", action="store_true",
                        help="first time plain reads and the stager on quarters of the layers")
    args = parser.parse_args()
    from bench.gpu_report import tokenizer

    raw = dict(PRESETS[args.preset])
    if args.layers:
        raw["num_hidden_layers"] = args.layers
    t = time.perf_counter()
    existing = args.checkpoint / "model.safetensors.index.json"
    if args.reuse and existing.exists():
        gb = json.loads(existing.read_text())["metadata"]["total_size"] / 1e9
    else:
        gb = write_fp8_checkpoint(args.checkpoint, raw, args.device)
    results: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "preset": args.preset,
                     "layers": raw["num_hidden_layers"], "checkpoint_gb": round(gb, 2),
                     "write_s": round(time.perf_counter() - t, 1), "starts": []}
    print(json.dumps(results), flush=True)
    if args.read_ceilings:
        results["read_ceilings"] = read_ceilings(args.checkpoint, raw["num_hidden_layers"], args.device)
        print(json.dumps(results["read_ceilings"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for n in range(args.starts):
        results["starts"].append(cold_start(args.checkpoint, args.device, tokenizer(), check=n == args.starts - 1))
        print(json.dumps(results["starts"][-1]), flush=True)
        (args.out / "coldstart.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
