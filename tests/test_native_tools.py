"""Tools through a real tool-aware chat template: the default model's weights with our Hermes-style
template written into a copy of its GGUF, so tools reach a real template and calls come back through
the real Hermes parser."""

import json

import llama_cpp
import pytest

from conftest import Running, make_config
from engine import Engine
from model_fixtures import tool_model_path
from sse_grammar import sdk_client
from test_tools import ASK, WEATHER, assert_weather_call


@pytest.fixture(scope="module")
def tool_engine(model_cache):
    return Engine(make_config(model=tool_model_path(model_cache)))


@pytest.fixture(scope="module")
def client(tool_engine):
    running = Running(tool_engine)
    yield sdk_client(running.url)
    running.stop()


def test_the_template_is_recognised_as_hermes_with_native_tools(tool_engine):
    assert tool_engine.template.native_tools and tool_engine.template.tool_format.name == "hermes"


def test_the_model_entry_says_how_the_model_is_read(client, tool_engine):
    entry = client.models.retrieve(tool_engine.model_name)
    assert entry.llama_compat == {"chat_template": "gguf", "tool_calls": "hermes (the template's own)",
                                  "reasoning": None}


def test_tools_are_rendered_by_the_template_itself(tool_engine):
    import protocol
    request = protocol.parse_messages_request({"model": "m", "max_tokens": 5, "tools": [WEATHER], "messages": ASK})
    text = tool_engine.template.render(request)
    assert "<tools>" in text and '"name": "get_weather"' in text and "You can call these tools" not in text


def test_a_forced_call_comes_back_through_the_hermes_parser(client):
    message = client.messages.create(model="m", max_tokens=300, tools=[WEATHER], messages=ASK,
                                     tool_choice={"type": "tool", "name": "get_weather"})
    assert message.stop_reason == "tool_use"
    assert_weather_call(message.content[-1])


def test_a_streamed_call_and_a_tool_result_round_trip(client, tool_engine):
    with client.messages.stream(model="m", max_tokens=300, tools=[WEATHER], messages=ASK,
                                tool_choice={"type": "any"}) as stream:
        deltas = [e.delta.partial_json for e in stream if e.type == "content_block_delta"
                  and e.delta.type == "input_json_delta"]
        first = stream.get_final_message()
    call = first.content[-1]
    assert json.loads("".join(deltas)) == call.input
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                   "content": "Foggy, 14 degrees"}]}]
    import protocol
    rendered = tool_engine.template.render(protocol.parse_messages_request(
        {"model": "m", "max_tokens": 5, "tools": [WEATHER], "messages": history}))
    assert "<tool_response>\nFoggy, 14 degrees\n</tool_response>" in rendered
    assert '<tool_call>\n{"name": "get_weather", "arguments": ' in rendered
    answer = client.messages.create(model="m", max_tokens=40, tools=[WEATHER], messages=history,
                                    tool_choice={"type": "none"})
    assert answer.content[0].type == "text"


def test_a_control_token_shows_its_text_only_when_a_marker_the_reader_looks_for_holds_it(engine):
    """Where a format's markers are control tokens the reply is read with them as text; other control
    tokens (Cohere's response markers, here ChatML's) stay out of the answer as they would otherwise."""
    im_start = engine._llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    hello = engine._llm.tokenize(b"hello", add_bos=False)
    assert len(im_start) == 1 and llama_cpp.llama_vocab_is_control(engine._vocab, im_start[0])
    hidden = engine._reply_pieces(True, ("<tool_call>",))
    shown = engine._reply_pieces(True, ("<|im_start|>assistant",))
    assert hidden(im_start[0]) == b"" and shown(im_start[0]) == b"<|im_start|>"
    assert b"".join(map(hidden, hello)) == b"hello"
