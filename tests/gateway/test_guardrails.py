"""LlamaGuard wired into the request path: both directions, streams, audit, risk, and the
real engine running a tiny random Llama as the guard model."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import orjson
import pytest
from sqlalchemy import select

from sluice.gateway.db.accounting import AuditRecord
from sluice.gateway.pipeline.guard import Guard
from tests.conftest import GatewayServer, echo_settings


async def scripted_guard(prompt: str) -> str:
    """Stands in for the guard model: unsafe (S1, S10) when the conversation says BADWORD."""
    return "unsafe\nS1,S10" if "BADWORD" in prompt else "safe"


@pytest.fixture
def guarded(sqlite_url: str):  # type: ignore[no-untyped-def]
    server = GatewayServer(echo_settings(sqlite_url)).start()
    server.gateway.pipeline.guardrails.guard = Guard(scripted_guard)
    yield server
    server.stop()


def policy(server: GatewayServer, tenant: str, **policy: object) -> str:
    key = server.tenant_key(tenant)
    server.run(server.gateway.accounts.update_tenant(tenant, guard_policy=policy))
    server.gateway.keys.invalidate()
    return key


def chat(server: GatewayServer, key: str, text: str, **extra: object) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions",
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": "echo", "messages": [{"role": "user", "content": text}],
                            **extra})


def audit_actions(server: GatewayServer) -> list[tuple[str, str | None]]:
    async def rows() -> list[tuple[str, str | None]]:
        await server.gateway.audit.flush()
        async with server.gateway.accounts.sessions() as session:
            result = await session.execute(
                select(AuditRecord.action, AuditRecord.decision).order_by(AuditRecord.id))
            return [tuple(r) for r in result.all()]  # type: ignore[misc]

    return server.run(rows())


def test_unsafe_prompt_is_blocked_with_categories_and_audited(guarded: GatewayServer) -> None:
    key = guarded.tenant_key("guarded")
    assert chat(guarded, key, "hello there").status_code == 200
    r = chat(guarded, key, "tell me BADWORD")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "content_policy_violation"
    assert error["categories"] == ["S1", "S10"]
    assert ("guard.input", "block") in audit_actions(guarded)


def test_unsafe_answer_is_blocked_and_a_stream_is_cut(guarded: GatewayServer) -> None:
    key = policy(guarded, "out-only", input_mode="off", output_mode="block")
    r = chat(guarded, key, "please say BADWORD")  # echo repeats it: the answer is unsafe
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation"

    events = []
    with httpx.stream("POST", guarded.base_url + "/v1/chat/completions",
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": "echo", "stream": True,
                            "messages": [{"role": "user", "content": "please say BADWORD"}]}) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(orjson.loads(line[6:]))
    assert "error" in events[-1] and events[-1]["error"]["code"] == "content_policy_violation"
    streamed = "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in events if e.get("choices"))
    assert "BADWORD" not in streamed  # held back until a check covered it, then cut
    assert ("guard.output", "block") in audit_actions(guarded)


def test_flag_mode_serves_but_audits_and_violations_raise_risk(guarded: GatewayServer) -> None:
    key = policy(guarded, "flagged", input_mode="flag", output_mode="flag")
    r = chat(guarded, key, "BADWORD but only flagged")
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "BADWORD but only flagged"
    actions = audit_actions(guarded)
    assert ("guard.input", "flag") in actions and ("guard.output", "flag") in actions


def test_excluded_categories_and_off_mode(guarded: GatewayServer) -> None:
    off = policy(guarded, "unguarded", input_mode="off", output_mode="off")
    assert chat(guarded, off, "BADWORD").status_code == 200


@pytest.fixture(scope="module")
def tiny_llama_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama 3-style checkpoint with a tokenizer.json of Llama 3's specials."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-guard")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Task: Check if there is unsafe content in the conversation"] * 20,
                            trainer)
    tok.save(str(path / "tokenizer.json"))
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=0, eos_token_id=4)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def test_guard_runs_end_to_end_on_the_real_engine(sqlite_url: str,
                                                  tiny_llama_guard: Path) -> None:
    """The guard model is a real checkpoint on the in-process engine. Its weights are random,
    so its answer is not 'safe'/'unsafe': the guard fails closed by default, and a tenant
    that chose on_error=allow is served."""
    settings = echo_settings(sqlite_url, guard_model=str(tiny_llama_guard))
    server = GatewayServer(settings).start()
    try:
        assert "guard" in server.gateway.runtime.pools  # a pool of its own, not a public model
        key = server.tenant_key("strict")
        r = chat(server, key, "hello")
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "content_policy_violation"
        assert "guard error" in r.json()["error"]["message"]
        lenient = policy(server, "lenient", on_error="allow")
        assert chat(server, lenient, "hello").status_code == 200
        api = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)
        assert "llama-guard" not in {m.id for m in api.models.list().data}
        assert server.gateway.runtime.pools["guard"].cold_starts == 1
    finally:
        server.stop()
