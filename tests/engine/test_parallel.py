"""Tensor and expert parallelism on the CPU: two processes over gloo produce exactly the
single-process engine's greedy tokens, each holding only its shard, before and after a
sleep and wake."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sluice.engine.config import ModelConfig
from sluice.engine.errors import ConfigError
from sluice.engine.llm import LLM
from sluice.engine.loader import Checkpoint, expected_tensors, load_model
from sluice.engine.parallel import Group, Sharding
from sluice.engine.sampling import SamplingParams

PROMPTS = [[1, 415, 2936, 9060, 285, 1142, 28705, 461, 10575], [1, 754, 272, 17898, 3914, 28723, 7, 300, 451, 28705,
           13, 13, 5613, 264, 4118, 28723, 851, 349, 264, 1369, 302], [1, 22557, 28725]]
MAX_TOKENS = 12
# small blocks and step budget: prefill spans blocks and chunks, decodes batch together
ENGINE = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=64, max_num_batched_tokens=16,
              progress=False)


def greedy(llm: LLM, vocab: int) -> list[list[int]]:
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [o.token_ids for o in outs]


def _rank(rank: int, port: int, mode: str, paths: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sluice.engine import parallel

    try:
        result = []
        for path in paths:
            llm = LLM(path, parallel=mode, world_size=2, **ENGINE)
            experts = [m.experts.experts.w13.shape[0] for m in llm.model.modules() if hasattr(m, "experts")
                       and hasattr(m.experts, "experts")]
            tokens = greedy(llm, llm.model.config.vocab_size)
            kv_heads = llm.runner.kv_cache.shape[-2]
            llm.sleep()  # nothing parked yet: the wake reloads this rank's shard from the checkpoint
            woke_from = llm.wake()
            result.append({"tokens": tokens, "kv_heads": kv_heads, "local_experts": experts, "woke_from": woke_from,
                           "after_wake": greedy(llm, llm.model.config.vocab_size)})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        torch.distributed.barrier()  # both ranks done before either tears gloo down (an abort at exit, once in CI)
    finally:
        parallel.destroy()


def _mirrored_rank(rank: int, port: int, mode: str, paths: list[str], out_dir: str) -> None:
    """Rank 0 serves through a Leader (greedy, sampled, aborted, sleep/wake); rank 1 follows."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sluice.engine import parallel, ranks

    try:
        llm = LLM(paths[0], parallel=mode, world_size=2, **ENGINE)
        if rank:
            result: dict = {"followed": ranks.follow(llm)}
        else:
            leader, vocab = ranks.Leader(llm), llm.model.config.vocab_size
            greedy_out = leader.generate([[t % vocab for t in p] for p in PROMPTS],
                                         SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
            [sampled] = leader.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS,
                                                                    ignore_eos=True))  # no seed: rank 0's draw
            cut = leader.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
            while cut.num_completion_tokens < 3:
                leader.step()
            leader.abort(cut.seq_id)
            leader.sleep()
            leader.wake()
            again = leader.generate([[t % vocab for t in p] for p in PROMPTS],
                                    SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
            leader.close()
            result = {"greedy": [c.token_ids for c in greedy_out], "again": [c.token_ids for c in again],
                      "all": {c.request_id: c.token_ids for c in greedy_out + [sampled] + again}
                      | {cut.request_id: cut.completion_token_ids}}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        torch.distributed.barrier()  # both ranks done before either tears gloo down (an abort at exit, once in CI)
    finally:
        parallel.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(mode: str, paths: list[Path], tmp_path: Path, fn=_rank) -> list:
    ctx = mp.start_processes(fn, args=(_free_port(), mode, [str(p) for p in paths], str(tmp_path)),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{mode}=2 did not finish in 120 s")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def single(tiny_mixtral, tiny_llama) -> dict[str, list[list[int]]]:
    out = {}
    for name, path in (("mixtral", tiny_mixtral), ("llama", tiny_llama)):
        llm = LLM(path, **ENGINE)
        out[name] = greedy(llm, llm.model.config.vocab_size)
    return out


def test_tensor_parallel_matches_one_process(single, tiny_mixtral, tiny_llama, tmp_path):
    ranks = run_two_ranks("tp", [tiny_mixtral, tiny_llama], tmp_path)
    for rank in ranks:
        mixtral, llama = rank
        assert mixtral["tokens"] == single["mixtral"]
        assert llama["tokens"] == single["llama"]  # dense MLP split the same way
        assert mixtral["kv_heads"] == llama["kv_heads"] == 1  # 2 KV heads, one per rank
        assert mixtral["local_experts"] == [4, 4]  # every expert, half of each one's intermediate dim
        assert mixtral["woke_from"] == "checkpoint" and mixtral["after_wake"] == single["mixtral"]
    assert single["mixtral"][0] != single["mixtral"][1]


def test_expert_parallel_matches_one_process(single, tiny_mixtral, tmp_path):
    ranks = run_two_ranks("ep", [tiny_mixtral], tmp_path)
    for [mixtral] in ranks:
        assert mixtral["tokens"] == single["mixtral"]
        assert mixtral["kv_heads"] == 1
        assert mixtral["local_experts"] == [2, 2]  # 4 experts, two whole ones per rank per layer
        assert mixtral["woke_from"] == "checkpoint" and mixtral["after_wake"] == single["mixtral"]


def test_bad_parallel_options_fail_before_waiting_for_peers(tiny_mixtral, monkeypatch):
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="world_size >= 2"):
        LLM(tiny_mixtral, parallel="tp", **ENGINE)
    with pytest.raises(ConfigError, match="do not split across 3 ranks"):
        LLM(tiny_mixtral, parallel="tp", world_size=3, **ENGINE)
    with pytest.raises(ConfigError, match="set RANK, MASTER_ADDR, MASTER_PORT"):
        LLM(tiny_mixtral, parallel="ep", world_size=2, **ENGINE)


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_each_rank_reads_only_its_part_of_the_checkpoint(tiny_mixtral, mode, monkeypatch):
    cfg = ModelConfig.from_file(tiny_mixtral)
    cpu, f32 = torch.device("cpu"), torch.float32
    full = load_model(cfg, cpu, f32, tiny_mixtral, progress=False)
    read: list[torch.Tensor] = []
    part = Checkpoint.part
    monkeypatch.setattr(Checkpoint, "part", lambda self, name, index: read.append(t := part(self, name, index)) or t)
    layers = {n: torch.Size(s).numel() * 4 for n, s in expected_tensors(cfg).items() if n.startswith("model.layers.")}
    replicated = sum(b for n, b in layers.items() if n.endswith(("norm.weight", "block_sparse_moe.gate.weight")))
    layer_bytes = sum(layers.values())
    ranks = []
    for rank in range(2):
        read.clear()
        ranks.append(load_model(cfg, cpu, f32, tiny_mixtral, progress=False, shard=Sharding(mode, Group(rank, 2))))
        # half of every split tensor, all of the norms and routers (top-level tensors: read as before)
        assert sum(t.numel() * t.element_size() for t in read) == (layer_bytes - replicated) // 2 + replicated
    for n, layer in enumerate(full.layers):
        a, b = (m.layers[n] for m in ranks)
        assert torch.equal(torch.cat([a.self_attn.o_proj.linear.weight, b.self_attn.o_proj.linear.weight], 1),
                           layer.self_attn.o_proj.weight)
        q = cfg.num_heads * cfg.head_dim
        assert torch.equal(torch.cat([a.self_attn.qkv_proj.weight[:q // 2], b.self_attn.qkv_proj.weight[:q // 2]]),
                           layer.self_attn.qkv_proj.weight[:q])
        w2 = [m.mlp.experts.experts.w2 for m in (a, b)]
        if mode == "tp":
            assert torch.equal(torch.cat(w2, dim=2), layer.mlp.experts.w2)
        else:
            assert torch.equal(w2[0], layer.mlp.experts.w2[0::2]) and torch.equal(w2[1], layer.mlp.experts.w2[1::2])
    assert ranks[0].config.num_kv_heads == 1 and full.config.num_kv_heads == 2


def test_rank_zero_leads_and_the_other_rank_follows(single, tiny_mixtral, tmp_path):
    """Requests arrive at rank 0 only (as a server's would); rank 1 repeats its calls."""
    leader, follower = run_two_ranks("tp", [tiny_mixtral], tmp_path, fn=_mirrored_rank)
    assert leader["greedy"] == leader["again"] == single["mixtral"]
    assert follower["followed"] == leader["all"]  # same tokens on both ranks, sampled and aborted included
    assert len(leader["all"]) == 2 * len(PROMPTS) + 2


def test_local_backend_serves_a_two_rank_engine(tmp_path):
    """The gateway's local backend with world_size=2: rank 0 in this process, rank 1
    spawned; same text as one process, across a sleep and wake; stop ends rank 1."""
    import asyncio

    import torch.distributed as dist

    from sluice.gateway.backends.contract import GenerationRequest
    from sluice.gateway.backends.contract import SamplingParams as WireParams
    from sluice.plugins.local_engine import LocalEngineBackend

    request = GenerationRequest("r1", "tiny-mixtral", prompt="Once upon a time",
                                sampling=WireParams(max_tokens=10, temperature=0))

    async def serve(**options) -> tuple[list[str], list]:
        backend = LocalEngineBackend(LocalEngineBackend.Options(
            cache_dir=str(tmp_path), device="cpu", dtype="float32", max_num_seqs=4, num_kv_blocks=64,
            max_model_len=256, **options))
        await backend.start()
        ranks = getattr(backend._engine.llm, "processes", [])
        texts = ["".join([e.text async for e in backend.generate(request)])]
        await backend.sleep()
        await backend.wake()
        texts.append("".join([e.text async for e in backend.generate(request)]))
        await backend.stop()
        return texts, ranks

    single, _ = asyncio.run(serve())
    both, ranks = asyncio.run(serve(parallel="tp", world_size=2))
    assert single[0] and both == single == [single[0]] * 2
    assert len(ranks) == 1 and not ranks[0].is_alive() and ranks[0].exitcode == 0
    assert not dist.is_initialized()


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_prequantized_fp8_checkpoint_is_cut_with_its_scales(tiny_mixtral, tmp_path, mode):
    from sluice.engine.quant.fp8 import Fp8FusedExperts, Fp8Linear
    from tests.engine.test_fp8 import write_prequantized

    path = write_prequantized(tiny_mixtral, tmp_path / "fp8", "compressed-tensors")
    cfg = ModelConfig.from_file(path)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    full = load_model(cfg, cpu, bf16, path, fp8=True, progress=False)
    a, b = (load_model(cfg, cpu, bf16, path, fp8=True, progress=False, shard=Sharding(mode, Group(r, 2)))
            for r in range(2))
    bits = lambda t: t.view(torch.uint8)  # noqa: E731 (e4m3 compared bit for bit)
    for n, layer in enumerate(full.layers):
        o = [m.layers[n].self_attn.o_proj.linear for m in (a, b)]
        assert all(isinstance(x, Fp8Linear) for x in o)
        assert torch.equal(bits(torch.cat([x.weight for x in o], 1)), bits(layer.self_attn.o_proj.weight))
        assert all(torch.equal(x.weight_scale, layer.self_attn.o_proj.weight_scale) for x in o)
        q = cfg.num_heads * cfg.head_dim // 2
        qkv = [m.layers[n].self_attn.qkv_proj for m in (a, b)]
        assert torch.equal(torch.cat([x.weight_scale[:q] for x in qkv]), layer.self_attn.qkv_proj.weight_scale[:2 * q])
        ex = [m.layers[n].mlp.experts.experts for m in (a, b)]
        assert all(isinstance(x, Fp8FusedExperts) for x in ex)
        if mode == "tp":
            assert torch.equal(bits(torch.cat([x.w2 for x in ex], 2)), bits(layer.mlp.experts.w2))
            assert torch.equal(ex[0].w2_scale, layer.mlp.experts.w2_scale)
        else:
            assert torch.equal(bits(ex[1].w2), bits(layer.mlp.experts.w2[1::2]))
            assert torch.equal(ex[1].w13_scale, layer.mlp.experts.w13_scale[1::2])
