"""The test models: a rewritten GGUF keeps everything but its template, our templates render the
conversations the server sends, and Gemma 3 assembles once into a working sliding-window model."""

import os
import tempfile

import gguf
import llama_cpp
import pytest

import tool_calls
from model_fixtures import (REASONING_TEMPLATE, TOOL_TEMPLATE, default_model_path, gemma3_path,
                            reasoning_model_path, render_chat, tool_model_path, with_chat_template)

# Kept between runs, so the 253 MB Gemma file is assembled once per machine rather than once per run.
SHARED_CACHE = os.path.join(tempfile.gettempdir(), "llama-compat-test-models")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather <for a city>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "The tool knows.", "tool_calls": [CALL]},
    {"role": "tool", "content": "18 °C, sunny", "tool_call_id": "call_1"},
    {"role": "system", "content": "Answer in French."},
]


def greedy(path, n_ctx=256):
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, verbose=False)
    return llm.metadata, llm.create_completion("Hello", max_tokens=8, temperature=0)["choices"][0]["text"]


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    return with_chat_template(default_model_path(), str(tmp_path_factory.mktemp("gguf") / "tools.gguf"),
                              TOOL_TEMPLATE)


# --- with_chat_template -------------------------------------------------------------------------------

def test_a_rewritten_model_carries_the_new_template_and_answers_as_the_original(rewritten):
    metadata, text = greedy(rewritten)
    original_metadata, original_text = greedy(default_model_path())
    assert metadata["tokenizer.chat_template"] == TOOL_TEMPLATE
    assert original_metadata["tokenizer.chat_template"] != TOOL_TEMPLATE
    assert text == original_text


def test_a_rewrite_keeps_every_other_key_and_every_tensor_byte(rewritten):
    before, after = gguf.GGUFReader(default_model_path()), gguf.GGUFReader(rewritten)
    assert list(before.fields) == list(after.fields)
    for name, field in before.fields.items():
        if name != "tokenizer.chat_template":
            assert b"".join(map(bytes, field.parts)) == b"".join(map(bytes, after.fields[name].parts)), name
    assert len(before.tensors) == len(after.tensors)
    for old, new in zip(before.tensors, after.tensors):
        assert (old.name, old.tensor_type, list(old.shape)) == (new.name, new.tensor_type, list(new.shape))
        assert old.data.tobytes() == new.data.tobytes(), old.name


def test_a_failed_rewrite_leaves_no_file_behind(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError):
        with_chat_template(str(tmp_path / "broken.gguf"), str(tmp_path / "out.gguf"), TOOL_TEMPLATE)
    assert os.listdir(tmp_path) == ["broken.gguf"]


def test_cached_models_are_built_once_under_a_name_that_changes_with_their_template(tmp_path):
    tools = tool_model_path(str(tmp_path))
    built_at = os.stat(tools).st_mtime_ns
    assert tool_model_path(str(tmp_path)) == tools and os.stat(tools).st_mtime_ns == built_at
    reasoning = reasoning_model_path(str(tmp_path))
    assert reasoning != tools
    assert gguf.GGUFReader(reasoning).fields["tokenizer.chat_template"].contents() == REASONING_TEMPLATE


# --- templates ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [TOOL_TEMPLATE, REASONING_TEMPLATE], ids=["tool", "reasoning"])
def test_templates_render_tools_calls_results_and_a_mid_conversation_system_message(template):
    text = render_chat(template, CONVERSATION, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "get_weather", "description": ' \
           '"Current weather <for a city>"' in text
    assert tool_calls.format_call(tool_calls.HERMES, "get_weather", {"city": "Paris"}) + "<|im_end|>\n" in text
    assert "<|im_start|>user\n<tool_response>\n18 °C, sunny\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("Be brief.") == 1


@pytest.mark.parametrize("template", [TOOL_TEMPLATE, REASONING_TEMPLATE], ids=["tool", "reasoning"])
def test_templates_are_detected_as_hermes_templates_with_tools(template):
    assert tool_calls.detect_format(template) is tool_calls.HERMES
    assert tool_calls.template_supports_tools(template)


def test_parallel_calls_and_their_results_share_one_turn_each():
    second = {"id": "call_2", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    text = render_chat(TOOL_TEMPLATE, [
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, second]},
        {"role": "tool", "content": "18", "tool_call_id": "call_1"},
        {"role": "tool", "content": "25", "tool_call_id": "call_2"}], tools=TOOLS)
    assert ('<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Rome"}}\n</tool_call><|im_end|>\n') in text
    assert ("<|im_start|>user\n<tool_response>\n18\n</tool_response>\n<tool_response>\n25\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in text


def test_without_tools_a_system_message_is_an_ordinary_first_turn():
    text = render_chat(TOOL_TEMPLATE, CONVERSATION[:2])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_reasoning_is_shown_after_the_last_user_message_and_dropped_before_it():
    assert "<think>\nThe tool knows.\n</think>\n\n<tool_call>" in render_chat(REASONING_TEMPLATE, CONVERSATION)
    later = CONVERSATION + [{"role": "assistant", "content": "Il fait beau."}, {"role": "user", "content": "Merci"}]
    assert "<think>" not in render_chat(REASONING_TEMPLATE, later)


def test_thinking_off_ends_the_prompt_with_an_empty_think_block():
    assert render_chat(REASONING_TEMPLATE, CONVERSATION, tools=TOOLS, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_chat(REASONING_TEMPLATE, CONVERSATION, tools=TOOLS).endswith("<|im_start|>assistant\n")


# --- Gemma 3 ------------------------------------------------------------------------------------------

@pytest.mark.slow  # assembling the 253 MB file takes a few seconds to ~30 s the first time
def test_gemma3_is_assembled_once_into_a_sliding_window_model_without_a_chat_template():
    path = gemma3_path(SHARED_CACHE)
    assert gemma3_path(SHARED_CACHE) == path and os.path.getsize(path) > 200_000_000
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, verbose=False)
    assert "tokenizer.chat_template" not in llm.metadata
    assert llama_cpp.llama_model_n_swa(llm._model.model) > 0
