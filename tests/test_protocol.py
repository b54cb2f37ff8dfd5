"""Pure protocol functions: body decoding, request validation, and the content-block grammar."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import ApiError, Finish, MessageAssembler, TextDelta, parse_messages_request
from sse_grammar import check_grammar


def base(**extra):
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    body.update(extra)
    return body


def rejects(body, fragment, count_only=False):
    with pytest.raises(ApiError) as info:
        parse_messages_request(body, count_only=count_only)
    assert info.value.status == 400
    assert info.value.error_type == "invalid_request_error"
    assert fragment in info.value.message, info.value.message
    return info.value.message


# --- decoding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, fragment", [
    (b"", "empty"),
    (b"{", "Invalid JSON"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"a": NaN}', "NaN"),
    (b'{"a": Infinity}', "Infinity"),
    (b'{"a": ' + b"9" * 5000 + b"}", "too large"),
    (b"[" * 100000 + b"]" * 100000, "nesting"),
])
def test_a_malformed_body_is_a_400_that_says_why(raw, fragment):
    with pytest.raises(ApiError) as info:
        protocol.decode_json_body(raw)
    assert info.value.status == 400 and fragment in info.value.message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_an_object_or_a_400(raw):
    try:
        assert isinstance(protocol.decode_json_body(raw), dict)
    except ApiError as exc:
        assert exc.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8)

VALID = {"model": "m", "max_tokens": 2000, "system": [{"type": "text", "text": "s"}], "stop_sequences": ["x"],
         "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]}],
         "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
         "tool_choice": {"type": "auto"}, "thinking": {"type": "enabled", "budget_tokens": 1024},
         "metadata": {"user_id": "u"}, "temperature": 0.5, "output_config": {"effort": "high"}}


def paths(value, prefix=()):
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from paths(child, prefix + (key,))


def replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(list(paths(VALID))[1:]), json_values)
def test_any_mutation_of_a_valid_request_validates_or_is_a_400(path, value):
    try:
        parse_messages_request(replaced(VALID, path, value))
    except ApiError as exc:
        assert exc.status == 400 and exc.message


def test_the_fuzzed_request_is_valid_as_it_stands():
    assert parse_messages_request(VALID).thinking_budget == 1024


# --- validation ---------------------------------------------------------------------------------------

def test_a_minimal_request_parses():
    request = parse_messages_request(base())
    assert request.model == "m" and request.max_tokens == 16 and not request.stream
    assert request.messages[0].content[0].text == "hi"


@pytest.mark.parametrize("change, fragment", [
    ({"model": None}, "model"),
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"max_tokens": "16"}, "max_tokens: Input should be a valid integer"),
    ({"max_tokens": True}, "max_tokens"),
    ({"messages": []}, "at least one message"),
    ({"messages": "hi"}, "messages: Input should be a valid list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"content": "x"}]}, "messages.0.role: Field required"),
    ({"messages": [{"role": "user"}]}, "messages.0.content: Field required"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": ""}]}, "non-empty content"),
    ({"temperature": 1.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop_sequences": ["ok", 3]}, "stop_sequences.1"),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"stop_sequences": [" "]}, "stop_sequences.0"),
    ({"system": 5}, "system"),
    ({"system": [{"type": "image"}]}, "system.0.type: Input should be 'text'"),
    ({"stream": "yes"}, "stream"),
    ({"metadata": {"user_id": 5}}, "metadata.user_id"),
    ({"thinking": {"type": "enabled", "budget_tokens": 10}}, "budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "max_tokens` must be greater"),
    ({"thinking": {"type": "sometimes"}}, "thinking.type"),
    ({"tools": [{"name": "bad name", "input_schema": {}}]}, "tools.0.name"),
    ({"tools": [{"name": "a", "input_schema": {}}, {"name": "a", "input_schema": {}}]}, "unique"),
    ({"tools": [{"name": "a", "input_schema": []}]}, "tools.0.input_schema"),
    ({"tools": [{"name": "a"}]}, "tools.0.input_schema: Field required"),
    ({"tools": [{"name": "a", "input_schema": {}}], "tool_choice": {"type": "tool", "name": "b"}}, "'b' not found"),
    ({"tool_choice": {"type": "any"}}, "requires tools"),
    ({"output_config": {"format": {"type": "xml"}}}, "output_config.format.type"),
])
def test_each_bad_field_is_a_400_naming_it(change, fragment):
    body = base(**change)
    for key, value in change.items():
        if value is None:
            del body[key]
    rejects(body, fragment)


def test_a_tool_result_must_answer_a_tool_use_of_the_previous_turn():
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "x"}]}]
    rejects(base(messages=messages), "toolu_2")
    messages[2]["content"][0]["tool_use_id"] = "toolu_1"
    assert parse_messages_request(base(messages=messages)).messages[2].content[0].content == "x"


def test_fields_a_local_model_cannot_use_are_accepted_and_ignored():
    body = base(thinking={"type": "adaptive"}, output_config={"effort": "high"}, service_tier="auto",
                context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
                metadata={"user_id": json.dumps({"device": "x"})}, brand_new_field={"x": 1},
                system=[{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                tools=[{"type": "web_search_20250305", "name": "web_search"}])
    body["messages"][0]["content"] = [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]
    request = parse_messages_request(body)
    assert request.system == "sys" and request.tools == () and request.thinking


def test_system_messages_inside_messages_are_kept_in_place():
    body = base(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "agents"},
                          {"role": "user", "content": "b"}])
    roles = [m.role for m in parse_messages_request(body).messages]
    assert roles == ["user", "system", "user"]


def test_consecutive_turns_of_one_role_are_joined():
    body = base(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    (message,) = parse_messages_request(body).messages
    assert [b.text for b in message.content] == ["a", "b"]


def test_the_billing_header_block_is_dropped_from_the_system_prompt():
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.abc; cc_entrypoint=sdk-cli;"},
              {"type": "text", "text": "You are Claude Code."}]
    assert parse_messages_request(base(system=system)).system == "You are Claude Code."


def test_a_final_assistant_message_is_a_prefill_without_trailing_whitespace():
    body = base(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}])
    assert parse_messages_request(body).prefill == "Sure"
    body["messages"][1]["content"] = "Sure "
    rejects(body, "trailing whitespace")


def test_count_tokens_needs_no_max_tokens():
    body = base()
    del body["max_tokens"]
    assert parse_messages_request(body, count_only=True).max_tokens == 0
    rejects(body, "max_tokens: Field required")


def test_structured_output_schema_is_read_from_output_config():
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    request = parse_messages_request(base(output_config={"format": {"type": "json_schema", "schema": schema}}))
    assert request.json_schema == schema


# --- the content-block grammar ------------------------------------------------------------------------

def assemble(texts, finish=Finish("end_turn", None, 5, 0, 3)):
    assembler = MessageAssembler("msg_x", "m", 5)
    events = assembler.start()
    for text in texts:
        events += assembler.feed(TextDelta(text))
    events += assembler.feed(finish)
    return assembler.message, events


@given(st.lists(st.text(max_size=5), max_size=8))
def test_streamed_deltas_join_to_the_non_streamed_text(texts):
    message, events = assemble(texts)
    check_grammar(events)
    streamed = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert streamed == "".join(texts) == message["content"][0]["text"]


def test_message_start_carries_usage_and_message_delta_the_final_counts():
    message, events = assemble(["hi"], Finish("stop_sequence", "END", 7, 3, 2))
    assert events[0]["message"]["usage"]["input_tokens"] == 5
    assert events[-2]["usage"] == {"input_tokens": 7, "cache_creation_input_tokens": 0,
                                   "cache_read_input_tokens": 3, "output_tokens": 2}
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert message["stop_reason"] == "stop_sequence" and message["usage"]["output_tokens"] == 2


def test_an_empty_reply_still_has_one_text_block():
    message, events = assemble([])
    assert message["content"] == [{"type": "text", "text": ""}]
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_stop",
                                           "message_delta", "message_stop"]


def test_an_sse_frame_names_its_event_after_the_json_type():
    frame = protocol.sse_frame({"type": "ping"})
    assert frame == b'event: ping\ndata: {"type": "ping"}\n\n'


def test_ids_look_like_the_real_apis():
    assert protocol.new_id("msg_").startswith("msg_01") and len(protocol.new_id("msg_")) == 28
