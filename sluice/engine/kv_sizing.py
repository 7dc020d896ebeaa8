"""The KV cache: one allocation for every layer's K and V, sized to the memory left.

On CUDA the number of blocks is what ``memory_fraction`` of the device holds once the
weights and the activations of the largest step are counted; the activations are
measured by running a prefill of that many tokens against a throwaway cache, or taken
from an earlier start's record (engine/warm_record.py).
"""

from __future__ import annotations

import torch

from sluice.engine.config import EngineConfig
from sluice.engine.errors import ConfigError
from sluice.engine.layers.attention import AttentionKernels, AttentionMetadata
from sluice.engine.models.mixtral import CausalLM


def block_bytes(model: CausalLM, block_size: int) -> int:
    c = model.config
    dtype = model.embed_tokens.weight.dtype
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * dtype.itemsize


def allocate_cache(model: CausalLM, num_blocks: int, block_size: int) -> torch.Tensor:
    """(L, 2, num_blocks, block_size, Hkv, D), each layer's K and V views of it assigned to
    its attention; one allocation, so a wake re-takes a single address."""
    c = model.config
    layers = model.attention_layers()
    for attn in layers:  # drop the old cache before taking the new one
        attn.k_cache = attn.v_cache = torch.empty(0)
    device = next(model.parameters()).device
    cache = torch.zeros((len(layers), 2, num_blocks, block_size, c.num_kv_heads, c.head_dim),
                        dtype=model.embed_tokens.weight.dtype, device=device)
    for attn, kv in zip(layers, cache):
        attn.k_cache, attn.v_cache = kv[0], kv[1]  # (num_blocks, block_size, Hkv, D) each
    return cache


def profile_tokens(engine: EngineConfig, max_blocks_per_seq: int) -> int:
    """The token count of the prefill that measures a full step's activations."""
    return min(engine.max_num_batched_tokens, max_blocks_per_seq * engine.block_size)


def auto_num_blocks(model: CausalLM, engine: EngineConfig, max_blocks_per_seq: int, graph_tokens: list[int],
                    kernels: AttentionKernels | None, activations: int | None = None) -> tuple[int, int]:
    """How many KV blocks to allocate: a CPU default, or what fits on the GPU beside the
    weights, a full step's activations and the CUDA graphs' pool. ``activations``: the
    bytes a full step takes beyond the weights, as measured by an earlier start of the
    same model and configuration (engine/warm_record.py keeps it); None measures it.
    Returns (blocks, activations)."""
    device = next(model.parameters()).device
    per_block = block_bytes(model, engine.block_size)
    if device.type != "cuda":
        # CPU: room for every sequence at full length, capped at 2 GiB of cache
        return max(max_blocks_per_seq, min(engine.max_num_seqs * max_blocks_per_seq, (2 << 30) // per_block)), 0
    if activations is None:
        # (On an empty kernel cache its kernels were compiled while the weights loaded:
        # engine/precompile.py.)
        peak = measure_peak(model, profile_tokens(engine, max_blocks_per_seq), engine.block_size, kernels)
        activations = max(0, peak - torch.cuda.memory_allocated(device))
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    # Eager steps need a full step's activations; the graphs' pool keeps its own for good.
    # Graphs are captured in the background in order of size, and after a wake in order
    # of first use, and a capture cannot reuse smaller blocks freed by earlier ones: at
    # worst every size keeps its own (activations grow about linearly with tokens).
    reserve = activations * (1 + sum(graph_tokens) / engine.max_num_batched_tokens)
    budget = total * engine.memory_fraction - used - reserve
    blocks = int(budget // per_block) - 1
    if blocks < max_blocks_per_seq:
        raise ConfigError(f"only {blocks} KV blocks fit in memory_fraction={engine.memory_fraction}; "
                          f"one sequence of max_model_len needs {max_blocks_per_seq}")
    return blocks, activations


def measure_peak(model: CausalLM, num_tokens: int, block_size: int, kernels: AttentionKernels | None) -> int:
    """Peak device memory of a prefill of ``num_tokens`` tokens, with a throwaway cache."""
    device = next(model.parameters()).device
    nblocks = -(-num_tokens // block_size)
    allocate_cache(model, nblocks, block_size)
    torch.cuda.reset_peak_memory_stats(device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        query_start=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(nblocks, dtype=torch.int32, device=device)[None], kernels=kernels)
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    with torch.inference_mode():
        model.compute_logits(model(ids, torch.arange(num_tokens, device=device), meta)[-1:])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    allocate_cache(model, 0, block_size)
    return peak
