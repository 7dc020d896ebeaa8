"""Varlen steps (prefill chunks with decodes) through the runner's static inputs: a step
padded the way a CUDA graph replays it (extra token rows, empty sequence rows) gives the
unpadded step's logits. (The triton kernel inside the model: tests/engine/kernels.)"""

from __future__ import annotations

import torch

from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams


def mixed_batch(llm: LLM):
    """Two sequences decoding while a 5-token prompt and a 30-token one's first chunk arrive."""
    for n in (9, 14):
        llm.add_request([(7 * i + n) % 500 for i in range(n)], SamplingParams(temperature=0, max_tokens=8))
    llm.step()  # both prompts prefilled
    for n in (5, 30):
        llm.add_request([(3 * i + n) % 500 for i in range(n)], SamplingParams(temperature=0, max_tokens=8))
    batch = llm.scheduler.schedule()
    assert len(batch.decode) == 2 and batch.chunk_lens == [5, 17]
    batch.chunk_lens[-1] = 12  # a shorter chunk (never stepped): room for 5 padding rows
    return batch


def step_logits(llm: LLM, batch, num_rows: int) -> torch.Tensor:
    runner = llm.runner
    rows = runner.varlen.load(batch, num_rows, llm.config.block_size)
    with torch.inference_mode():
        hidden = llm.model(*runner.varlen.views(num_rows))
        return llm.model.compute_logits(hidden[rows])


def test_padded_varlen_step_matches_unpadded(tiny_mixtral):
    llm = LLM(tiny_mixtral, dtype="float32", device="cpu", block_size=4, num_kv_blocks=64, max_num_seqs=6,
              max_num_batched_tokens=24, progress=False)
    batch = mixed_batch(llm)
    n = batch.num_tokens
    assert n == 19 and llm.runner.varlen.max_seqs == 6  # 2 decodes + 5 + a 12-token chunk; two empty rows
    want = step_logits(llm, batch, n)
    got = step_logits(llm, batch, llm.runner.varlen.max_tokens)
    assert want.shape == got.shape == (3, llm.model.config.vocab_size)  # 2 decodes + the 5-token prompt ends
    torch.testing.assert_close(got, want)
    # padding wrote only the scratch block, past every real block
    scratch = llm.runner.num_blocks
    assert llm.runner.varlen.host64[2, n:].eq(scratch * llm.config.block_size).all()


def test_graph_sizes_follow_the_experts_limit(tiny_mixtral):
    """bf16 experts stop the graphs where their eager path changes kernel; fp8 experts
    (every path graph-safe) go to the full step, which gets a size of its own."""
    from sluice.engine.layers.moe import FUSED_MAX_TOKENS
    from sluice.engine.model_runner import varlen_graph_sizes
    from sluice.engine.quant.fp8 import quantize_fp8

    llm = LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False)
    assert varlen_graph_sizes(llm.model, 4096)[-1] == FUSED_MAX_TOKENS
    assert varlen_graph_sizes(llm.model, 100) == [16, 32, 64, 100]
    quantize_fp8(llm.model)
    assert varlen_graph_sizes(llm.model, 3000)[-3:] == [1536, 2048, 3000]
