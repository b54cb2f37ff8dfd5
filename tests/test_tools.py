"""Tool use and structured output end to end, on the real default model through the SDK."""

import json

import pytest

from sse_grammar import sdk_client

# maxLength: sampled at temperature 1, a 135M model can ramble inside a string argument until max_tokens
# (seen in CI: a forced call still open after 400 tokens); the grammar enforces the bound, so the call ends
WEATHER = {"name": "get_weather", "description": "Get the current weather in a given location",
           "input_schema": {"type": "object", "properties": {
               "location": {"type": "string", "maxLength": 60,
                            "description": "The city and state, e.g. San Francisco, CA"},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["location"]}}
TIME = {"name": "get_time", "description": "Current time in a time zone",
        "input_schema": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                         "required": ["zone"]}}
ASK = [{"role": "user", "content": "What is the weather like in San Francisco?"}]


@pytest.fixture(scope="module")
def client(served):
    return sdk_client(served.url)


def assert_weather_call(block):
    assert block.type == "tool_use" and block.id.startswith("toolu_") and block.name == "get_weather"
    assert isinstance(block.input["location"], str)
    assert set(block.input) <= {"location", "unit"} and block.input.get("unit", "celsius") in ("celsius", "fahrenheit")


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_a_forced_call_is_a_schema_valid_tool_use_block(client, choice):
    for seed_text in ("San Francisco", "Paris", "a small village"):
        message = client.messages.create(model="m", max_tokens=400, tools=[TIME, WEATHER], tool_choice=choice,
                                         messages=[{"role": "user", "content": f"Weather in {seed_text}?"}])
        assert message.stop_reason == "tool_use"
        tool_uses = [b for b in message.content if b.type == "tool_use"]
        assert len(tool_uses) == 1
        if choice["type"] == "tool":
            assert_weather_call(tool_uses[0])


def test_a_streamed_forced_call_sends_input_deltas_that_rebuild_the_input(client):
    with client.messages.stream(model="m", max_tokens=200, tools=[WEATHER], messages=ASK,
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert starts[0].content_block.type == "tool_use" and starts[0].content_block.input == {}
    deltas = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert len(deltas) > 1  # sent while the call is generated, not in one piece at the end
    assert json.loads("".join(deltas)) == final.content[0].input
    assert_weather_call(final.content[0])
    assert final.stop_reason == "tool_use"


def test_a_tool_result_round_trip_completes(client):
    first = client.messages.create(model="m", max_tokens=200, tools=[WEATHER], messages=ASK,
                                   tool_choice={"type": "any"})
    call = first.content[-1]
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                   "content": "Sunny, 18 degrees"}]}]
    answer = client.messages.create(model="m", max_tokens=40, tools=[WEATHER], messages=history,
                                    tool_choice={"type": "none"})
    assert answer.content[0].type == "text" and answer.stop_reason in ("end_turn", "max_tokens")


def test_tool_choice_none_produces_no_call(client):
    message = client.messages.create(model="m", max_tokens=30, tools=[WEATHER], messages=ASK,
                                     tool_choice={"type": "none"})
    assert all(b.type == "text" for b in message.content)


def test_structured_output_always_parses_and_has_the_required_fields(client):
    # maxLength: a 135M model can ramble inside a string until max_tokens; the grammar enforces the bound
    # (and at most 16 digits for an integer). 60 characters can still be 60 emoji of up to 4 tokens each
    # (seen: the reply was cut inside the number at 200 tokens), so max_tokens leaves room for that.
    schema = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 60},
                                               "words": {"type": "integer"}},
              "required": ["title", "words"], "additionalProperties": False}
    for stream in (False, True):
        body = dict(model="m", max_tokens=400, messages=[{"role": "user", "content": "Title for a chat about cats?"}],
                    output_config={"format": {"type": "json_schema", "schema": schema}})
        if stream:
            with client.messages.stream(**body) as s:
                message = s.get_final_message()
        else:
            message = client.messages.create(**body)
        value = json.loads(message.content[0].text)
        assert set(value) == {"title", "words"} and isinstance(value["title"], str) and len(value["title"]) <= 60
        assert isinstance(value["words"], int)


def test_a_tool_schema_the_grammar_cannot_express_still_answers(client):
    odd = {"name": "odd", "description": "d", "input_schema": {
        "type": "object", "patternProperties": {"^x": {"type": "string"}}, "if": {"required": ["a"]}}}
    message = client.messages.create(model="m", max_tokens=100, tools=[odd], messages=ASK,
                                     tool_choice={"type": "any"})
    assert message.content[-1].type == "tool_use" and isinstance(message.content[-1].input, dict)
