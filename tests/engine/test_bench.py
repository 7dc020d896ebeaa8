"""engine.bench runs end to end on the tiny model and reports every batch size."""

from __future__ import annotations

import json

from engine.bench import main


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
