"""Constrained decoding on the tiny model (CPU): every output of a JSON-Schema-constrained
request parses and validates, over 200 generated schemas run as one batch."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest
import torch

from sluice.engine.errors import RequestError
from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams, sample
from sluice.engine.structured import Constraint, GrammarError, Grammars, apply_constraints


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """Small, bounded schemas (so a random model finishes them within a few dozen tokens):
    nested objects, arrays, enums, bounded integers and numbers, strings with lengths or
    patterns, booleans, required and optional properties."""
    kinds = ["string", "pattern", "integer", "number", "enum", "boolean", "const"]
    if depth < 2:
        kinds += ["object", "array"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(2, 6)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{1,4}$", "^[0-9]{3}$", "^(yes|no)$",
                                                         "^[A-Z][a-z]{0,3}$"])}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
    if kind == "number":
        lo = rng.choice([-1.5, 0, 2, 10])
        return {"type": "number", "minimum": lo, "maximum": lo + rng.choice([1, 5, 100])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "const":
        return {"const": rng.choice(["fixed", 7, False])}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 2)}
    return object_schema(rng, depth + 1)


def object_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    names = rng.sample(["id", "name", "tags", "size", "ok", "meta", "x", "kind"], rng.randint(1, 3))
    properties = {n: random_schema(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.6]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_mixtral) -> LLM:
    return LLM(tiny_mixtral, device="cpu", dtype="float32", max_num_seqs=256, num_kv_blocks=4096,
               block_size=16, progress=False)


@pytest.fixture(scope="module")
def grammars(llm) -> Grammars:
    return Grammars(llm.tokenizer, llm.model.config.vocab_size)


def test_200_generated_schemas_all_outputs_valid(llm, grammars):
    rng = random.Random(15)
    schemas = [object_schema(rng) for _ in range(200)]
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Answer in JSON."}])
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=160,
                             constraint=Constraint(grammars.json_schema(s))) for i, s in enumerate(schemas)]
    done = llm.generate([prompt] * len(schemas), params)
    assert [c.finish_reason for c in done] == ["stop"] * 200  # every grammar completed, then EOS
    assert not any(p.constraint.failed for p in params)
    for schema, completion in zip(schemas, done):
        jsonschema.validate(json.loads(completion.text), schema)


def test_json_object_gives_an_object_and_greedy_too(llm, grammars):
    params = [SamplingParams(temperature=t, seed=3, max_tokens=200, constraint=Constraint(grammars.json_object()))
              for t in (0.0, 1.0)]
    prompt = llm.tokenizer.encode("JSON please:")
    done = llm.generate([prompt, prompt], params)
    for c in done:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:  # the random model may write a long object: still a valid JSON prefix so far
            assert c.text.startswith("{")


def test_unconstrained_rows_are_left_alone(grammars):
    logits = torch.randn(3, grammars.vocab_size)
    before = logits.clone()
    c = Constraint(grammars.json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                         "required": ["a"]}))
    apply_constraints(logits, [None, c, None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(grammars_text(grammars, t).startswith("{") for t in allowed)


def test_mixed_batch_passes_its_rows_as_a_tensor(grammars, monkeypatch):
    """xgrammar copies a list of row indices from pageable memory, which on a GPU waits for
    the step queued ahead; the rows go as a tensor uploaded without waiting."""
    import xgrammar as xgr

    seen = []
    apply = xgr.apply_token_bitmask_inplace
    monkeypatch.setattr(xgr, "apply_token_bitmask_inplace",
                        lambda *a, **kw: (seen.append(kw["indices"]), apply(*a, **kw)))
    c = Constraint(grammars.json_object())
    apply_constraints(torch.randn(4, grammars.vocab_size), [None, None, c, None])
    apply_constraints(torch.randn(1, grammars.vocab_size), [Constraint(grammars.json_object())])
    assert isinstance(seen[0], torch.Tensor) and seen[0].tolist() == [2]
    assert seen[1] is None  # every row constrained: no index list at all


def grammars_text(grammars: Grammars, token: int) -> str:
    from sluice.engine.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer().token_bytes()[token].decode(errors="replace")


def test_forced_and_banned_tokens(grammars):
    forced = Constraint(grammars.json_object(), forced=[5])
    banned = Constraint(banned=[7, 31, 32])
    logits = torch.zeros(2, grammars.vocab_size)
    [a, b] = sample(logits, [SamplingParams(temperature=0, constraint=forced),
                             SamplingParams(temperature=0, constraint=banned)],
                    [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    assert a.token_id == 5 and not forced.forced and not forced.failed
    assert torch.isinf(logits[1, [7, 31, 32]]).all() and torch.isfinite(logits[1, [6, 8, 30, 33]]).all()


def test_one_constraint_per_request(grammars):
    c = Constraint(grammars.json_object())
    with pytest.raises(RequestError, match="its own"):
        apply_constraints(torch.zeros(2, grammars.vocab_size), [c, c])


def test_a_schema_xgrammar_cannot_compile_is_a_request_error(grammars):
    with pytest.raises(GrammarError) as err:
        grammars.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})
    assert err.value.param == "response_format"
