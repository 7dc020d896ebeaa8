"""bench.throughput runs end to end on the tiny model and reports every batch size."""

from __future__ import annotations

import json

from bench.throughput import main


def test_bench_json_on_tiny_model(capsys):
    main(["--device", "cpu", "--batch-sizes", "1,4", "--prompt-len", "8", "--decode-len", "4", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and not report["cuda_graphs"]
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in report["results"])


def test_bench_preset_needs_random_weights(capsys):
    import pytest

    with pytest.raises(SystemExit, match="--random-weights"):
        main(["--preset", "mixtral-8x7b", "--device", "cpu"])


def test_serving_harness_on_tiny_model_and_cutoff_readout():
    """The GPU bench's Poisson serving loop runs end to end (tiny model, CPU), and the
    requests/s at a cut-off is read from the highest rate that met it and lost nothing."""
    from bench.gpu_report import compare_at_cutoffs, serve, sustained
    from sluice.engine.config import PRESETS, ModelConfig
    from sluice.engine.llm import LLM

    llm = LLM(model_config=ModelConfig.from_dict(PRESETS["tiny-mixtral"]), device="cpu", progress=False,
              max_num_seqs=8)
    row = serve(llm, rate=20.0, duration=0.5, prompt_len=16, out_len=4)
    assert row["completed"] == row["offered"] > 0 and row["req_s"] > 0
    assert row["tpot_p50_ms"] <= row["tpot_p90_ms"] and row["latency_p50_s"] <= row["latency_p90_s"]

    def r(rate, req_s, tpot, lost=0):
        return {"rate": rate, "offered": 10, "completed": 10 - lost, "req_s": req_s, "tpot_p50_ms": tpot,
                "tpot_p90_ms": tpot, "latency_p50_s": 1.0, "latency_p90_s": 1.0}

    fast = [r(3, 3.0, 10), r(6, 5.9, 20), r(9, 8.8, 45), r(12, 11.0, 30, lost=2)]
    base = [r(3, 3.0, 30), r(6, 5.8, 60), r(9, 8.0, 90)]
    assert sustained(fast, "tpot_p50_ms", 50) == 8.8  # rate 12 lost requests: not sustained
    assert sustained(base, "tpot_p50_ms", 25) is None
    row = next(x for x in compare_at_cutoffs(fast, base) if x["metric"] == "tpot_p50_ms" and x["limit"] == 50)
    assert row["ratio"] == 8.8 / 3.0
    assert not row["capped"]  # fast's highest offered rate (12) lost requests
    # strict reading: the highest rate below the first miss
    dip = [r(3, 3.0, 10), r(6, 5.9, 60), r(9, 8.8, 45)]
    assert sustained(dip, "tpot_p50_ms", 50) == 8.8
    assert sustained(dip, "tpot_p50_ms", 50, strict=True) == 3.0
    row = next(x for x in compare_at_cutoffs(dip, base) if x["metric"] == "tpot_p50_ms" and x["limit"] == 100)
    assert row["capped"] and row["strict_ratio"] == 8.8 / 8.0


def test_coldstart_bench_on_tiny_model(tmp_path, monkeypatch):
    """engine.bench_coldstart writes a pre-quantized sharded checkpoint, starts from it and
    checks the loaded bytes against it (CPU, tiny model)."""
    import sys

    from bench import coldstart as bench_coldstart

    monkeypatch.setattr(sys, "argv", ["bench_coldstart", str(tmp_path / "out"), "--preset", "tiny-mixtral",
                                      "--device", "cpu", "--checkpoint", str(tmp_path / "ckpt"),
                                      "--starts", "1", "--layers", "3", "--read-ceilings"])
    bench_coldstart.main()
    report = json.loads((tmp_path / "out" / "coldstart.json").read_text())
    [start] = report["starts"]
    assert report["layers"] == 3 and start["tensors_verified"] == 24
    assert start["first_token_total_s"] >= start["engine_built_s"] >= start["load_s"] > 0
    assert report["read_ceilings"]["stager_t16_GBps"] > 0
    assert len(list((tmp_path / "ckpt").glob("layer-*.safetensors"))) == 3


def test_gpu_bench_layer_errors_section_on_cpu(tmp_path, monkeypatch):
    """bench_gpu's per-sub-layer fp8-vs-bf16 section runs end to end (tiny model in place
    of Mixtral, CPU) with SDPA restricted to its fused kernels, and records every
    sub-layer and the logits for both prompt sizes."""
    import torch

    from bench import gpu_report as bench_gpu
    from sluice.engine.config import ModelConfig
    from sluice.engine.llm import LLM

    raw = {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}

    def tiny(layers, dtype, **kw):
        return LLM(model_config=ModelConfig.from_dict(raw), dtype=dtype, device="cpu", progress=False,
                   max_model_len=2048, **kw)

    monkeypatch.setattr(bench_gpu, "build", tiny)
    monkeypatch.setattr(bench_gpu, "OUT", tmp_path)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench_gpu, "RESULTS", {})
    bench_gpu.layer_errors()
    assert "failures" not in bench_gpu.RESULTS, bench_gpu.RESULTS
    for tokens in (1024, 32):
        errors = bench_gpu.RESULTS[f"fp8_vs_bf16_sublayer_errors_{tokens}_tokens"]
        assert set(errors) == {"layers.0.self_attn", "layers.0.mlp", "layers.1.self_attn", "layers.1.mlp", "logits"}
        assert all(0 < e < 0.2 for e in errors.values()), errors
