"""Tokenizers: Mixtral's chat format to the id, Llama 3 by its chat template, UTF-8-safe streaming."""

from __future__ import annotations

import json

import pytest

from sluice.engine.tokenizer import HFTokenizer, IncrementalDetokenizer, SentencePieceTokenizer

REFERENCE_IDS = [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793, 15359, 736, 2,
                 733, 16289, 28793, 1602, 460, 368, 28804, 733, 28748, 16289, 28793]


@pytest.fixture(scope="module")
def sp() -> SentencePieceTokenizer:
    return SentencePieceTokenizer()


def test_mixtral_chat_template_matches_reference(sp):
    turns = [("user", "Hello"), ("assistant", "Hi there"), ("user", "How are you?")]
    assert sp.apply_chat_template(turns) == REFERENCE_IDS
    assert sp.apply_chat_template([{"role": r, "content": c} for r, c in turns]) == REFERENCE_IDS


def test_mixtral_system_message_leads_first_user_turn(sp):
    ids = sp.apply_chat_template([("system", "Be brief."), ("user", "Hello")])
    assert ids == [1] + sp.sp.encode("[INST] Be brief.\n\nHello [/INST]")


def test_mixtral_system_only_prompt_is_not_dropped(sp):
    ids = sp.apply_chat_template([("system", "Be brief.")])
    assert ids == [1] + sp.sp.encode("[INST] Be brief.\n\n [/INST]")


def streamed(tok, prompt: list[int], completion: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    ids = list(prompt)
    deltas = []
    for t in completion:
        ids.append(t)
        deltas.append(detok.step(ids))
    return deltas


def test_sentencepiece_stream_never_splits_a_character(sp):
    text = " naïve 𝔘𐍈 漢字 ok"
    prompt, completion = sp.encode("Say:"), sp.encode(text, add_bos=False)
    assert any(sp.sp.id_to_piece(t).startswith("<0x") for t in completion)  # byte fallback in play
    deltas = streamed(sp, prompt, completion)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == sp.decode(prompt + completion)[len(sp.decode(prompt)):]


#: Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, how are you? naïve café"] * 20, trainer)
    path = tmp_path_factory.mktemp("llama3-tok") / "tokenizer.json"
    tok.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return HFTokenizer.from_checkpoint(path.parent, eos_ids=(1,))


def test_llama3_chat_template(llama3_tokenizer):
    tok = llama3_tokenizer
    ids = tok.apply_chat_template([("system", "Be brief."), ("user", "hello ")])
    special = {name: tok.tok.token_to_id(name) for name in
               ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
    assert ids[0] == special["<|begin_of_text|>"] == tok.bos_id
    assert ids.count(special["<|start_header_id|>"]) == 3 and ids.count(special["<|eot_id|>"]) == 2
    text = tok.tok.decode(ids, skip_special_tokens=False)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert set(tok.eos_ids) == {1, special["<|eot_id|>"]}


def test_byte_level_stream_never_splits_a_character(llama3_tokenizer):
    tok = llama3_tokenizer
    completion = tok.encode(" naïve 漢字 🙂 café", add_bos=False)
    deltas = streamed(tok, tok.encode("hello"), completion)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == " naïve 漢字 🙂 café"


def test_token_bytes_spell_the_text_byte_for_byte(sp, llama3_tokenizer):
    text = " naïve 漢字 🙂 café"
    for tok in (sp, llama3_tokenizer):
        table = tok.token_bytes()
        ids = tok.encode(text, add_bos=False)
        spelled = b"".join(table[i] for i in ids)
        assert spelled.decode() in (text, " " + text)  # SentencePiece adds its dummy-prefix space
        assert table[tok.eos_ids[-1]] == b""  # special tokens spell nothing
