"""One chat encoding: Mixtral/Mistral prompts are exactly mistral-common's request encoding,
Llama 3 prompts exactly transformers' rendering of the checkpoint's chat template, and the
plugins' counting tokenizer gives the same ids as the engine's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from sluice.engine.tokenizer import (ChatEncodingError, HFTokenizer, SentencePieceTokenizer, load_tokenizer,
                                     mistral_call_id)
from sluice.gateway.backends.contract import ChatMessage, GenerationRequest, Tool, ToolCall
from sluice.plugins._tokenizer import MixtralTokenizer
from tests.engine.test_tokenizer import LLAMA3_TEMPLATE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def v1() -> SentencePieceTokenizer:
    return SentencePieceTokenizer()


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory) -> Path:
    """A checkpoint folder as Mistral-7B-Instruct-v0.3 ships it (tokenizer.model.v3 beside tokenizer.json)."""
    import mistral_common

    d = tmp_path_factory.mktemp("mistral-v3")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3",
                d / "tokenizer.model.v3")
    (d / "tokenizer.json").write_text("{}")  # must not be preferred over the Mistral file
    return d


def reference(tokenizer: MistralTokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens


CASES = {
    "system only": [{"role": "system", "content": "Be brief."}],
    "system then user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    "two systems": [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "Hello"}],
    "consecutive users": [{"role": "user", "content": "Hello"}, {"role": "user", "content": "How are you?"}],
    "multi-turn": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
                   {"role": "user", "content": "How are you?"}],
    "system after user": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                          {"role": "user", "content": "Why?"}, {"role": "system", "content": "Answer in French."}],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixtral_prompts_are_mistral_commons_encoding(v1, name):
    messages = CASES[name]
    assert v1.apply_chat_template(messages) == reference(MistralTokenizer.v1(), messages)


def test_consecutive_user_turns_and_system_only_are_not_dropped(v1):
    assert len(v1.apply_chat_template(CASES["consecutive users"])) == 15  # one [INST] block, blank line between
    assert len(v1.apply_chat_template(CASES["system only"])) > 1


def test_final_assistant_message_is_continued_as_a_prefix(v1):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    expected = reference(MistralTokenizer.v1(), [messages[0], {**messages[1], "prefix": True}])
    ids = v1.apply_chat_template(messages)
    assert ids == expected and ids[-1] != v1.eos_ids[0]  # no EOS: the model writes on
    assert v1.decode(ids).endswith("The colour is")


def test_developer_role_is_a_system_message(v1):
    dev = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert v1.apply_chat_template(dev) == v1.apply_chat_template(CASES["system then user"])


def test_v1_has_no_tools_and_says_so(v1):
    assert not v1.supports_tools
    with pytest.raises(ChatEncodingError) as err:
        v1.apply_chat_template(CASES["multi-turn"], tools=[WEATHER])
    assert err.value.param == "tools"


def test_bad_conversation_is_a_request_error_naming_messages(v1):
    with pytest.raises(ChatEncodingError) as err:
        v1.apply_chat_template([])
    assert err.value.param == "messages" and "at least one message" in str(err.value)
    with pytest.raises(ChatEncodingError, match="'system' after role 'assistant'"):  # as mistral-common
        v1.apply_chat_template(CASES["multi-turn"][:2] + [{"role": "system", "content": "x"}, CASES["multi-turn"][2]])


def test_v3_tools_tool_calls_and_results_match_mistral_common(v3_dir):
    tok = load_tokenizer(v3_dir)
    assert isinstance(tok, SentencePieceTokenizer) and tok.version == "v3" and tok.supports_tools
    assert tok.tool_calls_id == 5
    openai_style = [
        {"role": "system", "content": "You may call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_Xy12", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_Xy12", "name": "get_weather", "content": "sunny, 21C"},
    ]
    cid = mistral_call_id("call_Xy12")
    assert len(cid) == 9 and cid.isalnum() and cid == mistral_call_id("call_Xy12")
    native = [openai_style[0], openai_style[1],
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": cid, "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
              {"role": "tool", "tool_call_id": cid, "name": "get_weather", "content": "sunny, 21C"}]
    ids = tok.apply_chat_template(openai_style, tools=[WEATHER])
    assert ids == reference(MistralTokenizer.v3(), native, tools=[WEATHER])
    assert tok.tool_calls_id in ids
    assert "[AVAILABLE_TOOLS]" in MistralTokenizer.v3().decode(ids, special_token_policy="keep")


def test_plugin_counting_is_the_engine_encoding(v1):
    counting = MixtralTokenizer()
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hello"), ChatMessage("user", "Again"),
                ChatMessage("assistant", "Sure"))
    request = GenerationRequest("r1", "tiny-mixtral", messages=messages)
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]
    assert counting.prompt_ids(request) == v1.apply_chat_template(as_dicts) == reference(
        MistralTokenizer.v1(), as_dicts[:3] + [{"role": "assistant", "content": "Sure", "prefix": True}])
    assert counting.count_prompt(GenerationRequest("r2", "m", prompt="Hello")) == len(v1.encode("Hello"))


def test_plugin_tool_messages_reach_the_encoding(v3_dir):
    from sluice.plugins._tokenizer import chat_messages, chat_tools

    tok = load_tokenizer(v3_dir)
    request = GenerationRequest("r", "m", tools=(Tool("get_weather", "Current weather in a city",
                                                      WEATHER["function"]["parameters"]),),
                                messages=(ChatMessage("user", "Weather in Paris?"),
                                          ChatMessage("assistant", tool_calls=(ToolCall("c1", "get_weather",
                                                                                        '{"city": "Paris"}'),)),
                                          ChatMessage("tool", "sunny", tool_call_id="c1")))
    ids = tok.apply_chat_template(chat_messages(request.messages), chat_tools(request))
    text = MistralTokenizer.v3().decode(ids, special_token_policy="keep")
    assert "[TOOL_CALLS]" in text and "[TOOL_RESULTS]" in text and "get_weather" in text


# ---- Llama 3: the checkpoint's chat template, as transformers renders it -----------------

@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, how are you? be brief. naive cafe"] * 20, trainer)
    d = tmp_path_factory.mktemp("llama3")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


@pytest.mark.parametrize("name", sorted(CASES))
def test_llama3_prompts_are_transformers_rendering(llama3_dir, name):
    from transformers import PreTrainedTokenizerFast

    ours = load_tokenizer(llama3_dir)
    theirs = PreTrainedTokenizerFast.from_pretrained(str(llama3_dir))
    messages = CASES[name]
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert isinstance(ours, HFTokenizer) and ours.apply_chat_template(messages) == list(expected)
    prefix = messages + [{"role": "assistant", "content": "be"}]
    expected = theirs.apply_chat_template(prefix, continue_final_message=True, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(prefix) == list(expected)


def test_tokenizer_json_without_template_refuses_chat(llama3_dir, tmp_path):
    shutil.copy(llama3_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ChatEncodingError, match="chat_template"):
        load_tokenizer(tmp_path).apply_chat_template(CASES["multi-turn"])


def test_plugin_counting_estimates_what_mistral_refuses():
    counting = MixtralTokenizer()
    odd = GenerationRequest("r", "m", messages=(ChatMessage("user", "Hello"), ChatMessage("assistant", "Hi there"),
                                                ChatMessage("system", "Be brief.")))
    with pytest.raises(ChatEncodingError):
        counting.prompt_ids(odd)
    assert counting.count_prompt(odd) == 1 + sum(len(counting.encode(t)) for t in ("Hello", "Hi there", "Be brief."))
